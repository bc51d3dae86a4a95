"""The CLIP evaluation (Textual Inversion's protocol, NeTI Sec. 5.1) on the tiny pipeline with a tiny random CLIP."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from helpers import WORDS, make_concept
from neti import evaluate as ev
from neti.generate import Generator, Sampling
from neti.models import weights_fingerprint

PROMPTS = ("a photo of a {}", "a {} on a beach")
SAMPLING = Sampling(steps=1, guidance=7.5)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny random CLIPModel + CLIPProcessor saved with `save_pretrained`, loaded as a real CLIP would be."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTextConfig, CLIPVisionConfig

    from neti.testing.tokenizer import build_clip_tokenizer

    folder = tmp_path_factory.mktemp("tiny-clip")
    tokenizer = build_clip_tokenizer(WORDS, folder / "vocab", max_length=16)
    n = len(tokenizer)
    text = CLIPTextConfig(vocab_size=n, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, max_position_embeddings=16, projection_dim=8,
                          bos_token_id=n - 2, eos_token_id=n - 1, pad_token_id=n - 1)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=8)
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=8))
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    model.save_pretrained(folder / "clip")
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder / "clip")
    return folder / "clip"


@pytest.fixture(scope="module")
def training_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("train-images")
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def _entries(pipe, tmp_path, training_dir):
    neti = make_concept(pipe, token="<thing>", seed=1)
    neti.train_steps = 500
    ti = make_concept(pipe, token="<other>", method="ti", seed=2)
    ti.train_steps = 500
    neti.save(tmp_path / "neti-thing.safetensors"), ti.save(tmp_path / "ti-other.safetensors")
    return ev.build_entries([tmp_path / "neti-thing.safetensors", tmp_path / "ti-other.safetensors"],
                            {"neti-thing": str(training_dir), "<other>": str(training_dir)})


def _count_calls(monkeypatch) -> list[int]:
    calls = []
    original = Generator.render

    def counting(self, rows, *args, **kwargs):
        calls.append(len(rows))
        return original(self, rows, *args, **kwargs)

    monkeypatch.setattr(Generator, "render", counting)
    return calls


def test_placeholder_removal_deletes_only_the_placeholder():
    assert ev.remove_placeholder("A photo of {} on a beach") == "A photo of on a beach"
    assert ev.remove_placeholder("A photo of a {}") == "A photo of a"
    assert ev.remove_placeholder("A photograph of two {} on a table") == "A photograph of two on a table"
    assert ev.remove_placeholder("a <cat> and a {}", token="<cat>") == "a and a"
    assert len(ev.PAPER_PROMPTS) == 15 and len(ev.TOY_PROMPTS) == 15
    assert all("{}" in p for p in ev.PAPER_PROMPTS + ev.TOY_PROMPTS)


def test_toy_prompts_use_only_the_bundled_models_words():
    from toyworld.world import vocabulary

    words = set(vocabulary())
    for prompt in ev.TOY_PROMPTS:
        assert set(ev.remove_placeholder(prompt).split()) <= words, prompt


def test_metrics_equal_the_protocols_formulas_and_the_cache_resumes(generator, tmp_path, training_dir, clip_dir,
                                                                     monkeypatch):
    from transformers import CLIPModel, CLIPProcessor

    entries = _entries(generator.pipe, tmp_path, training_dir)
    config = ev.EvalConfig(prompts=PROMPTS, seeds=(0, 1), sweep=(4, 200), sampling=SAMPLING, batch_size=6)
    judge = ev.ClipJudge.load(clip_dir)
    calls = _count_calls(monkeypatch)
    report = ev.evaluate(generator, entries, judge, config, tmp_path / "cache", progress=False)
    # NeTI: no truncation and k = 4 (200 >= 128 units is the same as none); TI: no truncation. 2 prompts x 2 seeds
    assert [(p.concept, p.truncation) for p in report.points] == [("neti-thing", None), ("neti-thing", 4),
                                                                   ("ti-other", None)]
    assert report.generated == 12 and calls == [6, 6]  # batches of 6 images, whatever their prompt or k
    assert {g.label for g in report.groups} == {"NeTI 500", "TI 500"}

    # the protocol, computed directly: CLIP embeddings, L2-normalised, cosine of every pair
    model, processor = CLIPModel.from_pretrained(clip_dir).eval(), CLIPProcessor.from_pretrained(clip_dir)

    def embed_images(images):
        with torch.no_grad():
            out = model.get_image_features(**processor(images=images, return_tensors="pt"))
        return getattr(out, "pooler_output", out)

    def embed_text(text):
        with torch.no_grad():
            out = model.get_text_features(**processor.tokenizer([text], padding="max_length", return_tensors="pt"))
        return getattr(out, "pooler_output", out)[0]

    cache = ev.ImageCache(tmp_path / "cache")
    train = embed_images([Image.open(training_dir / f"{i}.png").convert("RGB") for i in range(3)])
    for point in report.points:
        entry = next(e for e in entries if e.name == point.concept)
        image_cos, text_cos = [], []
        for prompt in PROMPTS:
            text = embed_text(prompt.replace("{}", "").replace("  ", " ").strip())
            for seed in (0, 1):
                key = cache.key(entry.digest, prompt, seed, point.truncation, 0.2, generator.model_name, SAMPLING,
                                weights_fingerprint(generator.pipe))
                image = embed_images([Image.open(cache.path(key)).convert("RGB")])[0]
                image_cos += [float(F.cosine_similarity(image, t, dim=0)) for t in train]
                text_cos.append(float(F.cosine_similarity(image, text, dim=0)))
        assert point.num_generated == 4 and point.num_training == 3
        assert point.image_similarity == pytest.approx(np.mean(image_cos), abs=1e-5)
        assert point.text_similarity == pytest.approx(np.mean(text_cos), abs=1e-5)
    neti_full = report.points[0]
    assert np.mean(list(neti_full.per_prompt_text_similarity.values())) == pytest.approx(neti_full.text_similarity,
                                                                                        abs=1e-6)
    assert report.points[0].image_similarity != report.points[1].image_similarity  # truncation changed the images

    # run again: everything comes from the cache; one more seed renders only the new images
    calls.clear()
    again = ev.evaluate(generator, entries, judge, config, tmp_path / "cache", progress=False)
    assert again.generated == 0 and calls == []
    assert [p.image_similarity for p in again.points] == [p.image_similarity for p in report.points]
    more = ev.evaluate(generator, entries[:1], judge, ev.EvalConfig(prompts=PROMPTS, seeds=(0, 1, 2), sweep=(4,),
                                                                    sampling=SAMPLING), tmp_path / "cache", progress=False)
    assert more.generated == 4 and calls == [4]  # 2 truncations x 2 prompts, one new seed each

    # new weights under the same model name (a retrained decoder): nothing stale comes from the cache
    calls.clear()
    bias = generator.pipe.vae.decoder.conv_out.bias
    kept = bias.detach().clone()
    with torch.no_grad():
        bias.add_(0.5)
    try:
        retrained = ev.evaluate(generator, entries[:1], judge, config, tmp_path / "cache", progress=False)
    finally:
        with torch.no_grad():
            bias.copy_(kept)
    assert retrained.generated == 8 and calls == [6, 2]

    paths = ev.write_outputs(report, tmp_path / "out")
    assert Image.open(paths["plot"]).format == "PNG"
    data = json.loads(paths["json"].read_text())
    assert len(data["concepts"]) == 3 and data["settings"]["seeds"] == [0, 1]
    rows = list(csv.DictReader(paths["csv"].open()))
    assert [r["concept"] for r in rows] == ["mean"] * 3 + ["neti-thing", "neti-thing", "ti-other"]


def test_cli_eval_writes_results_and_resumes(tiny_model_dir, tmp_path, training_dir, clip_dir, monkeypatch, capsys):
    from helpers import make_concept as mk
    from neti.__main__ import main
    from neti.models import load_pipeline

    pipe = load_pipeline(tiny_model_dir, device="cpu")
    mk(pipe, token="<thing>", seed=3).save(tmp_path / "a.safetensors")
    argv = ["eval", "--model", str(tiny_model_dir), "--device", "cpu", "--concept", str(tmp_path / "a.safetensors"),
            "--images-for", f"a={training_dir}", "--clip", str(clip_dir), "--prompts", "toy", "--seeds", "1",
            "--steps", "1", "--out", str(tmp_path / "eval"), "--no-progress", "--label", "<thing>=mine"]
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("a photo of a {}\n\na {} on a beach\n")
    argv[argv.index("toy")] = str(prompts_file)
    calls = _count_calls(monkeypatch)
    assert main(argv) == 0
    assert "| mine | none |" in capsys.readouterr().out and calls == [2]
    assert main(argv) == 0
    assert "0 images generated" in capsys.readouterr().out and calls == [2]
    assert (tmp_path / "eval" / "plot.png").is_file() and (tmp_path / "eval" / "results.csv").is_file()


def test_bad_inputs_have_clear_errors(tmp_path, tiny_pipe, training_dir):
    make_concept(tiny_pipe).save(tmp_path / "c.safetensors")
    with pytest.raises(ValueError, match="no training images for concept c"):
        ev.build_entries([tmp_path / "c.safetensors"])
    with pytest.raises(ValueError, match="--images-for 'nope' matches none"):
        ev.build_entries([tmp_path / "c.safetensors"], {"nope": str(training_dir)})
    with pytest.raises(ValueError, match="NAME=VALUE"):
        ev.parse_assignments(["c"], "--images-for")
    with pytest.raises(ValueError, match="has no {}"):
        ev.EvalConfig(prompts=("a photo",))
    with pytest.raises(ValueError, match="toy-clip"):
        ev.ClipJudge.load(tmp_path / "missing-clip-folder-and-not-a-hub-id")
