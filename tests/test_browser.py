"""The app in a real browser: headless Debian chromium driven by Playwright against `python app.py`.

Uploads four of a bundled example's images through the file input, trains a few steps, watches loss points, the
progress bar, previews and the CLIP fidelity/editability curve appear (Start disabled, Stop enabled), reloads (the
form shows the running job's settings), stops, keeps the best trade-off step, picks the new concept, generates it
at truncation 8 and, with Ctrl+Enter, at full truncation (the images must differ), opens an image's settings and
reuses its seed, mixes two concepts with their references and sends a mix to Generate, runs a decomposition,
deletes a concept through its confirmation, and saves a screenshot of each tab in a temporary folder. Bad
uploads (a text file named .png, an empty file, too many files) must each show
their message in the page. Runs on the bundled toy model when it is there, else on a tiny random model
($NETI_BROWSER_MODEL overrides).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
from pathlib import Path

import pytest

from helpers import APP_WORDS, HUNG_AFTER_S, wait_for
from neti.config import DEFAULT_HIDDEN_DIM
from neti.paths import BUNDLED_MODEL, EXAMPLES_DIR, REPO_ROOT
from neti.testing import AppServer, tiny_model

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
EXAMPLE = EXAMPLES_DIR / "dotted-crescent"
TRAIN_STEPS = 3  # enough for a loss curve, a speed and a time left
SAMPLER_STEPS = 5  # of every image the walk-through renders

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian chromium is not installed at /usr/bin/chromium "
                       "(apt-get install -y chromium; .ci/run installs it)"),
]


def random_concept(model: Path, token: str):
    """A random NeTI concept sized for `model` (its token width, 16 layers), for the style mix's second concept."""
    from neti.concept import Concept
    from neti.config import MapperConfig

    width = json.loads((model / "text_encoder" / "config.json").read_text())["hidden_size"]
    return Concept(token, "shape", MapperConfig(token_dim=width, num_layers=16, target_norm=0.5, seed=3,
                                                hidden_dim=32, kept_units=32, num_frequencies=64), (), "random", 1)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    if os.environ.get("NETI_BROWSER_MODEL"):  # e.g. a toy-shaped folder, to time the test on another model
        model = Path(os.environ["NETI_BROWSER_MODEL"])
    else:
        bundled = (BUNDLED_MODEL / "model_index.json").is_file()
        model = BUNDLED_MODEL if bundled else tiny_model(root, APP_WORDS, max_tokens=32)
    shipped = root / "shipped"
    shipped.mkdir()
    random_concept(model, "<other>").save(shipped / "other.safetensors")
    server = AppServer(model, root / "concepts", root / "app.log", extra_args=["--shipped-concepts-dir", str(shipped)])
    yield server
    server.stop()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    """Where the screenshots go: a temporary folder, never the source tree."""
    return tmp_path_factory.mktemp("screenshots")


@contextlib.contextmanager
def browser_page(url: str):
    """A headless Chromium page on the app at `url`, once it shows its base model."""
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.set_default_timeout(60_000)
            page.goto(url)
            page.wait_for_selector("#model-status :text('Base model')")
            yield page
        finally:
            browser.close()


@pytest.fixture(scope="module")
def page(server):
    with browser_page(server.url) as page:
        status = page.inner_text("#model-status")
        assert "assets/toy-sd (64x64 px" in status and str(REPO_ROOT) not in status, status  # the repository-relative label
        yield page


def tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def shot(page, folder: Path, name: str) -> None:
    page.screenshot(path=str(folder / f"{name}.png"), full_page=True)


def upload(page, files) -> str:
    page.locator("#train-uploads input[type=file]").set_input_files([str(f) for f in files])
    status = page.locator("#upload-status")
    status.locator("p").first.wait_for()
    return status.inner_text()


def clear_uploads(page) -> None:
    button = page.locator("#train-uploads").get_by_label("Clear")
    if button.count():
        button.first.click()
        page.wait_for_function("!document.querySelector('#upload-status').innerText.trim()")


def set_number(page, selector: str, value) -> None:
    box = page.locator(f"{selector} input[type=number]").first
    box.fill(str(value))
    box.press("Enter")


def choose(page, selector: str, text: str, replace: bool = False) -> None:
    """Pick the option containing `text` in a dropdown (with `replace`, first remove a multiselect's last pick)."""
    box = page.locator(f"{selector} input").first
    box.click()
    if replace:
        box.press("Backspace")
    box.fill(text)
    page.locator("[data-testid='dropdown-option']", has_text=text).first.click()


def wait_for_dropdown(page, selector: str, text: str) -> None:
    page.wait_for_function(f"document.querySelector('{selector} input').value.includes('{text}')")


def gallery_image(page, selector: str, previous: bytes | None = None, count: int = 1) -> list[bytes]:
    """The images of a gallery once it shows `count` of them (and, if given, something other than `previous`)."""
    images = page.locator(f"{selector} img")
    page.wait_for_function(f"document.querySelectorAll('{selector} img').length >= {count}")
    return wait_for(lambda: [page.request.get(images.nth(i).get_attribute("src")).body() for i in range(count)],
                    lambda data: previous is None or data[0] != previous)


def generate_truncated(page, concept: str, steps: int) -> bytes:
    """In Generate, pick `concept` alone and render one image at truncation 8; its PNG bytes."""
    tab(page, "Generate")
    page.wait_for_selector("#gen-concepts :text('other')")
    choose(page, "#gen-concepts", concept, replace=True)
    page.wait_for_selector("#gen-tokens :text('tokens')")  # the pick has reached the server
    set_number(page, "#gen-images", 1)
    set_number(page, "#gen-steps", steps)
    set_number(page, "#gen-truncation", 8)
    page.locator("#gen-button").click()
    return gallery_image(page, "#gen-gallery")[0]


def pixels(png: bytes):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def test_bad_uploads_each_show_their_message(page, tmp_path):
    fake = tmp_path / "notes.png"
    fake.write_text("just some text, not a picture")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = upload(page, [fake, empty, EXAMPLE / "0.png"])
    assert "notes.png: not an image file Pillow can read" in text and "empty.png: empty file (0 bytes)" in text
    assert "1 image(s) ready" in text
    clear_uploads(page)
    many = [tmp_path / f"copy-{i}.png" for i in range(21)]
    for f in many:
        f.write_bytes((EXAMPLE / "0.png").read_bytes())
    assert "21 files uploaded, but at most 20" in upload(page, many)
    clear_uploads(page)


def test_train_watch_stop_generate_mix_and_explore(page, shots):
    # ---- Train: four photos through the file input, a few steps, live loss and previews, stop
    text = upload(page, [EXAMPLE / f"{i}.png" for i in range(4)])
    assert "4 image(s) ready" in text
    assert page.locator("#train-thumbs img").count() == 4
    page.get_by_label("Token").fill("<crescent>")
    page.get_by_label("Super-category (one word)").fill("shape")
    page.get_by_label("Concept name").fill("crescent")
    page.locator("#train-preset").get_by_text("Quick look: 100 steps").click()
    page.wait_for_function("document.querySelector('#train-steps input').value === '100'")
    set_number(page, "#train-steps", 500)
    set_number(page, "#train-preview-every", 2)
    page.get_by_label("Preview prompts (one per line, {} is the concept)").fill(
        "a photo of a {}\na photo of a {} on a blue background")  # fidelity, then an edit
    assert page.locator("#train-stop").is_disabled() and page.locator("#train-start").is_enabled()
    page.locator("#train-start").click()
    page.wait_for_selector("#train-message :text('Started training crescent')")
    page.wait_for_function("!document.querySelector('#train-stop').disabled")  # the event: the job runs
    assert page.locator("#train-start").is_disabled()
    page.wait_for_function("""() => { const s = document.querySelector('#train-status').innerText;
                                      const m = s.match(/step (\\d+)\\//);
                                      return (m && +m[1] >= %d) || /: (stopped|finished|failed),/.test(s); }""" % TRAIN_STEPS,
                           timeout=HUNG_AFTER_S * 1000)  # the event: step 3 (or the run's end, caught below)
    assert page.locator("#train-previews img").count() >= 1  # the step-0 preview at least
    assert page.locator("#loss-plot canvas, #loss-plot svg path, #loss-plot svg .mark-symbol").count() >= 1
    status = page.locator("#train-status").inner_text()
    assert re.search(r"loss \d\.\d+ \(smoothed \d\.\d+\)", status) and "s/step" in status and "left" in status
    assert page.locator("#train-progress progress").count() == 1 and "/500 steps" in page.inner_text("#train-progress")
    assert page.locator("#train-latest img").count() == 1
    assert "step 0: a photo of a <crescent> on a blue background" in page.inner_text("#train-previews")
    page.wait_for_selector("#train-status :text('best fidelity/editability trade-off at step')")  # the toy CLIP
    assert page.locator("#fidelity-plot canvas, #fidelity-plot svg path, #fidelity-plot svg .mark-symbol").count()
    shot(page, shots, "train-running")
    page.reload()  # the job runs on the server: a reloaded page reconnects to it, with the job's settings
    page.wait_for_selector("#train-status :text('crescent')")
    assert "running" in page.locator("#train-status").inner_text()
    page.wait_for_function("document.querySelector('#train-preview-every input').value === '2'")
    assert page.get_by_label("Concept name").input_value() == "crescent"
    assert page.locator("#train-steps input").input_value() == "500"
    page.wait_for_function("!document.querySelector('#train-stop').disabled")
    page.locator("#train-stop").click()
    page.wait_for_selector("#train-status :text('stopped')", timeout=HUNG_AFTER_S * 1000)
    assert "Saved as concept 'crescent'" in page.locator("#train-status").inner_text()
    page.wait_for_function("document.querySelector('#train-stop').disabled && "
                           "!document.querySelector('#train-start').disabled")
    page.wait_for_function("document.querySelector('#keep-step input').value.startsWith('step ')")
    page.locator("#keep-step-button").click()  # the selected step (the best trade-off) becomes the concept
    page.wait_for_selector("#keep-message :text(\"Concept 'crescent' is now its step\")")
    # The app's next 1-s tick gives the pickers the kept step's label; a click while Gradio redraws an open option
    # list can miss (a finished pick is no longer undone by the tick, but one in progress still can be).
    page.wait_for_timeout(2500)
    shot(page, shots, "train")

    # ---- Generate: the user's selection was kept; pick the new concept; truncation 8 vs full differ
    truncated = generate_truncated(page, "crescent", SAMPLER_STEPS)
    set_number(page, "#gen-truncation", DEFAULT_HIDDEN_DIM + 1)  # "full"
    page.locator("#gen-prompt textarea").press("Control+Enter")  # Ctrl+Enter generates
    full = gallery_image(page, "#gen-gallery", previous=truncated)[0]
    assert abs(pixels(truncated) - pixels(full)).mean() > 0.5
    assert "seed 0" in page.locator("#gen-gallery").inner_text()
    page.locator("#gen-gallery img").first.click()  # the lightbox, and the image's settings beside it
    page.wait_for_function("document.querySelector('#gen-info textarea').value.includes('Seed: 0')")
    info = page.locator("#gen-info textarea").input_value()
    assert info.startswith(f"a photo of a <crescent> on a white background\nSteps: {SAMPLER_STEPS}, Sampler: DPM++ 2M"), info
    set_number(page, "#gen-seed", 7)
    page.locator("#gen-reuse-seed").click()
    page.wait_for_function("document.querySelector('#gen-seed input').value === '0'")
    shot(page, shots, "generate")

    # ---- Style Mix: one mix with each concept alone beside it, the start slider in words
    tab(page, "Style Mix")
    choose(page, "#mix-geometry", "crescent")
    wait_for_dropdown(page, "#mix-geometry", "crescent")
    assert "Lower start: more of the geometry concept" in page.inner_text("#mix-start-text")
    set_number(page, "#mix-steps", SAMPLER_STEPS)
    set_number(page, "#mix-seed", 3)
    page.locator("#mix-button").click()
    assert len(gallery_image(page, "#mix-references", count=2)) == 2
    assert "geometry alone (<crescent>)" in page.locator("#mix-references").inner_text()
    assert "start t=700" in page.locator("#mix-gallery").inner_text()
    shot(page, shots, "style-mix")
    page.locator("#mix-gallery img").first.click()  # its settings, then back to Generate with them
    page.wait_for_function("document.querySelector('#mix-info textarea').value.includes('NeTI mix start: 700')")
    page.locator("#mix-send").click()
    page.wait_for_function("document.querySelector('#gen-seed input') && "
                           "document.querySelector('#gen-seed input').value === '3'")
    assert page.locator("#gen-button").is_visible()

    # ---- Explore: concept card and the per-timestep decomposition
    tab(page, "Explore")
    page.wait_for_function("document.querySelectorAll('#library-gallery img').length === 2")  # crescent, other
    choose(page, "#explore-concept", "crescent")
    page.wait_for_selector("#concept-card :text('<crescent>')")
    set_number(page, "#decompose-steps", SAMPLER_STEPS)
    page.locator("#decompose-button").click()
    assert len(gallery_image(page, "#decompose-gallery", count=6)) == 6
    shot(page, shots, "explore")
    page.locator("#delete-button").click()  # asks first
    page.wait_for_selector("#delete-question :text('crescent')")
    page.locator("#delete-cancel").click()
    page.wait_for_selector("#delete-confirm", state="hidden")
    assert "Deleted" not in page.inner_text("#manage-message")
    page.locator("#delete-button").click()
    page.locator("#delete-confirm").click()
    page.wait_for_selector("#manage-message :text(\"Deleted 'crescent'\")")


def test_a_message_naming_a_token_is_shown_whole_in_the_toast(page):
    """Toasts render HTML: a message with '<token>' was cut at the '<' (issue 13)."""
    tab(page, "Generate")
    page.wait_for_function("document.querySelector('#gen-concepts input') !== null")
    page.get_by_label("Prompt ({} or the concepts' tokens)").fill("a photo of a circle")
    page.locator("#gen-button").click()
    toast = page.locator("[data-testid='toast-text']").filter(has_text="does not contain").first
    toast.wait_for()
    text = toast.inner_text()
    assert re.search(r"does not contain the concept's token '<[^'<>]+>' as a word of its own: write <[^'<>]+> "
                     r"\(or \{\}\) where the concept should appear", text), text
    page.get_by_label("Prompt ({} or the concepts' tokens)").fill("a photo of a {} on a white background")
