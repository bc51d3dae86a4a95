"""The app on Stable Diffusion XL in a real browser: headless Debian chromium driven by Playwright.

`python app.py --model` a tiny SDXL-shaped random model (two text encoders, 70 cross-attention layers): the page
names the model's shape; three photos are uploaded and trained a few steps to the end; the new concept is picked
and generated at truncation 8 and at full truncation (the images must differ); it is style-mixed with a second
SDXL concept, with both references beside the mix; the decomposition renders one image per timestep. The SD 1.x
walk-through, with the helpers used here, is test_browser.py.
"""

from __future__ import annotations

import pytest

from helpers import APP_WORDS, HUNG_AFTER_S, make_concept
from neti.config import DEFAULT_HIDDEN_DIM
from neti.paths import EXAMPLES_DIR
from neti.testing import AppServer, tiny_xl_model
from test_browser import (CHROMIUM, browser_page, choose, gallery_image, generate_truncated, pixels, set_number, tab,
                          upload, wait_for_dropdown)

EXAMPLE = EXAMPLES_DIR / "dotted-crescent"
SAMPLER_STEPS = 4

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,  # ~50 s: in CI's slow run (`python -m pytest -m slow`), not the default suite
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian chromium is not installed at /usr/bin/chromium "
                       "(apt-get install -y chromium; .ci/run installs it)"),
]


@pytest.fixture(scope="module")
def xl_server(tmp_path_factory):
    from neti.models import load_pipeline

    root = tmp_path_factory.mktemp("browser-sdxl")
    model = tiny_xl_model(root, APP_WORDS)
    shipped = root / "shipped"
    shipped.mkdir()
    make_concept(load_pipeline(model, device="cpu"), "<other>", "shape", seed=3).save(shipped / "other.safetensors")
    server = AppServer(model, root / "concepts", root / "app.log", extra_args=["--shipped-concepts-dir", str(shipped)])
    yield server
    server.stop()


@pytest.fixture(scope="module")
def xl_page(xl_server):
    with browser_page(xl_server.url) as page:
        yield page


def test_train_generate_mix_and_explore_on_sdxl(xl_page):
    page = xl_page
    status = page.inner_text("#model-status")
    assert "token width 16 + 32, 70 cross-attention layers" in status, status

    # ---- Train: three photos, four steps, to the end; the concept is saved
    assert "3 image(s) ready" in upload(page, [EXAMPLE / f"{i}.png" for i in range(3)])
    page.get_by_label("Token").fill("<crescent>")
    page.get_by_label("Super-category (one word)").fill("shape")
    page.get_by_label("Concept name").fill("crescent")
    set_number(page, "#train-steps", 4)
    set_number(page, "#train-preview-every", 2)
    page.locator("#train-start").click()
    page.wait_for_selector("#train-message :text('Started training crescent')")
    page.wait_for_selector("#train-status :text('finished')", timeout=HUNG_AFTER_S * 1000)
    assert "Saved as concept 'crescent'" in page.locator("#train-status").inner_text()
    assert page.locator("#train-previews img").count() >= 2  # steps 0, 2 and 4

    # ---- Generate: the new concept at truncation 8 and at full truncation
    truncated = generate_truncated(page, "crescent", SAMPLER_STEPS)
    set_number(page, "#gen-truncation", DEFAULT_HIDDEN_DIM + 1)  # "full"
    page.locator("#gen-button").click()
    full = gallery_image(page, "#gen-gallery", previous=truncated)[0]
    assert pixels(truncated).shape == pixels(full).shape and abs(pixels(truncated) - pixels(full)).mean() > 0.5
    page.locator("#gen-gallery img").first.click()
    page.wait_for_function("document.querySelector('#gen-info textarea').value.includes('Seed: 0')")
    assert "<crescent>" in page.locator("#gen-info textarea").input_value()

    # ---- Style Mix: SDXL's geometry layers from one concept, the rest from the other
    tab(page, "Style Mix")
    choose(page, "#mix-geometry", "crescent")
    wait_for_dropdown(page, "#mix-geometry", "crescent")
    set_number(page, "#mix-steps", SAMPLER_STEPS)
    page.locator("#mix-button").click()
    assert len(gallery_image(page, "#mix-references", count=2)) == 2
    assert "geometry alone (<crescent>)" in page.locator("#mix-references").inner_text()
    assert page.locator("#mix-gallery img").count() >= 1

    # ---- Explore: the card gives the concept's width and 70 layers; the decomposition
    tab(page, "Explore")
    choose(page, "#explore-concept", "crescent")
    page.wait_for_selector("#concept-card :text('<crescent>')")
    assert "48 x 70" in page.inner_text("#concept-card")  # 16 + 32 wide, 70 layers
    set_number(page, "#decompose-steps", SAMPLER_STEPS)
    page.locator("#decompose-button").click()
    assert len(gallery_image(page, "#decompose-gallery", count=6)) == 6
