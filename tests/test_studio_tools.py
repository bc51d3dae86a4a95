"""The logic behind the app's A1111-style results and controls, without a server: the PNG `parameters` text,
file names, labelled X/Y grids, axis parsing, the token counter, progress with time left and Interrupt, style-mix
references, picker labels and the library's thumbnails."""

from __future__ import annotations

import threading

import pytest
from PIL import Image

from helpers import make_concept, wait_for

SETTINGS = {"prompt": "a photo of a {}", "resolved_prompt": "a photo of a <cat-toy>", "concepts": ["<cat-toy>"],
            "truncation": 8, "alpha": 0.2, "seed": 5, "steps": 25, "guidance": 7.5, "scheduler": "dpm",
            "negative_prompt": "blurry, low quality", "base_model": "assets/toy-sd"}


def test_a1111_parameters_have_the_prompt_the_negative_line_and_key_value_pairs():
    from neti.images import a1111_parameters

    text = a1111_parameters(SETTINGS, (64, 48))
    assert text == ("a photo of a <cat-toy>\n"
                    "Negative prompt: blurry, low quality\n"
                    "Steps: 25, Sampler: DPM++ 2M, CFG scale: 7.5, Seed: 5, Size: 64x48, Model: assets/toy-sd, "
                    "NeTI concepts: <cat-toy>, NeTI truncation: 8, NeTI bypass strength: 0.2")


def test_a1111_parameters_quote_values_with_commas_and_omit_an_empty_negative_prompt():
    from neti.images import a1111_parameters

    mixed = {**SETTINGS, "negative_prompt": "", "truncation": None, "appearance": "<b>", "mix_start": 700.0,
             "geometry_layers": ["IN07", "MID"], "base_model": "org/model, v2", "scheduler": "euler_a"}
    lines = a1111_parameters(mixed).split("\n")
    assert len(lines) == 2 and lines[0] == "a photo of a <cat-toy>"
    assert "Sampler: Euler a" in lines[1] and 'Model: "org/model, v2"' in lines[1]
    assert "NeTI truncation: full" in lines[1] and "NeTI mix start: 700" in lines[1]
    assert "NeTI appearance: <b>" in lines[1] and "NeTI geometry layers: IN07 MID" in lines[1]


def test_a_saved_png_carries_both_chunks_and_its_name_says_concept_truncation_alpha_and_seed(tmp_path):
    from neti.generate import Result
    from neti.images import read_settings

    result = Result([Image.new("RGB", (32, 32))] * 2, [SETTINGS, {**SETTINGS, "seed": 6, "truncation": None}])
    paths, grid = result.save(tmp_path, "image")
    assert [p.name for p in paths] == ["image-00-cat-toy-k8-a0.2-seed5.png", "image-01-cat-toy-kfull-a0.2-seed6.png"]
    assert grid is None and read_settings(paths[0]) == SETTINGS
    with Image.open(paths[1]) as image:
        assert image.text["parameters"].startswith("a photo of a <cat-toy>\nNegative prompt: blurry, low quality\n")
        assert "Seed: 6, Size: 32x32" in image.text["parameters"]


def test_file_names_of_mixes_and_hostile_tokens():
    from neti.images import file_name

    mix = {"concepts": ["<a/../b>"], "appearance": "<c d>", "truncation": None, "alpha": 0.5, "mix_start": 600.0,
           "seed": 1}
    assert file_name("mix", 3, mix) == "mix-03-a..b+cd-kfull-a0.5-t600-seed1.png"
    assert file_name("x", 0, {"concepts": [], "truncation": 4, "seed": 0}) == "x-00-base-k4-seed0.png"


def test_labelled_grid_heads_columns_and_rows_and_upscales_tiny_cells():
    from neti.images import GRID_CELL_MIN, labelled_grid

    cells = [Image.new("RGB", (32, 32), c) for c in ("red", "green", "blue", "white", "black", "yellow")]
    grid = labelled_grid(cells, ["0", "1", "2"], ["2", "full"], "seed", "truncation", pad=2)
    body_w, body_h = 3 * GRID_CELL_MIN + 4, 2 * GRID_CELL_MIN + 2
    assert grid.width > body_w and grid.height > body_h  # room for the labels
    left, top = grid.width - body_w, grid.height - body_h
    assert grid.getpixel((left + 5, top + 5)) == (255, 0, 0)  # first cell: red, upscaled
    assert grid.getpixel((left + GRID_CELL_MIN + 2 + 5, top + 5)) == (0, 128, 0)
    label_strip = grid.crop((0, top, left, grid.height)).convert("L")
    assert min(label_strip.getdata()) < 128  # the row labels are drawn
    with pytest.raises(ValueError, match="needs 6 images"):
        labelled_grid(cells[:5], ["0", "1", "2"], ["2", "full"])


def test_xy_axes_parse_check_and_cross_into_cells():
    from neti.xy import Axis, parse_axis, points

    assert parse_axis("truncation", "2, 8 full").values == (2, 8, None)
    assert parse_axis("bypass strength", "0,0.5").labels() == ["0", "0.5"]
    assert parse_axis("mix start", "600, 900").labels() == ["t=600", "t=900"]
    assert parse_axis("seed", "1 2 3").values == (1, 2, 3)
    with pytest.raises(ValueError, match="bypass strength value '2' is out of range"):
        parse_axis("bypass strength", "0, 2")
    with pytest.raises(ValueError, match="seed value 'x' is not a number"):
        parse_axis("seed", "x")
    with pytest.raises(ValueError, match="axis 'cfg' is unknown"):
        parse_axis("cfg", "1")
    cells = points(Axis("seed", (0, 1)), Axis("truncation", (2, None)), {"alpha": 0.2, "seed": 9, "truncation": 5})
    assert [(c["truncation"], c["seed"]) for c in cells] == [(2, 0), (2, 1), (None, 0), (None, 1)]
    with pytest.raises(ValueError, match="both 'seed'"):
        points(Axis("seed", (0,)), Axis("seed", (1,)), {})


def test_token_counter_warns_near_and_past_the_limit_and_counts_a_concept_token_as_one(generator, tiny_pipe):
    from neti.prompting import insert_token, token_counter_text

    assert token_counter_text(10, 77) == "10/77 tokens"
    assert "near the limit" in token_counter_text(70, 77)
    assert token_counter_text(80, 77) == ("80/77 tokens: too long, the last 3 token(s) will be cut off; shorten the "
                                          "prompt")
    concept = make_concept(tiny_pipe, "<thing>")
    short = generator.token_count("a photo of a {}", [concept])
    assert short == 2 + 4 + 1  # start and end tokens, four words, the concept token
    assert generator.token_count("a photo of a <thing>", [concept]) == short
    assert generator.token_count("a photo " * 40, []) == 2 + 80 > generator.max_tokens
    assert insert_token("a photo of a {}", "<x>") == "a photo of a <x>"
    assert insert_token("a photo of", "<x>") == "a photo of <x>"
    assert insert_token("a <x> photo", "<x>") == "a <x> photo"


def test_step_reporter_says_the_time_left_and_asks_for_interrupt():
    from neti.progress import StepReporter, format_seconds, time_left

    now = [0.0]
    seen = []
    stop = threading.Event()
    reporter = StepReporter(lambda d, t, text: seen.append(text), stop, clock=lambda: now[0])
    now[0] = 2.0
    assert reporter(1, 5) is False and seen[-1] == "step 1/5, about 8 s left"
    stop.set()
    now[0] = 4.0
    assert reporter(2, 5) is True
    assert reporter(5, 5) and seen[-1] == "step 5/5"
    assert time_left(0, 5, 1.0) is None and format_seconds(185) == "3 min 05 s"


def test_interrupt_ends_the_run_after_that_step_and_decodes_what_it_has(generator, tiny_pipe):
    from neti.generate import Sampling

    concept = make_concept(tiny_pipe)
    calls = []

    def on_step(done, total):
        calls.append((done, total))
        return done == 2

    result = generator.generate("a photo of a {}", [concept], [0], Sampling(steps=6), on_step=on_step)
    assert calls == [(1, 6), (2, 6)] and result.interrupted_at == 2 and len(result.images) == 1
    full = generator.generate("a photo of a {}", [concept], [0], Sampling(steps=6), on_step=lambda d, t: False)
    assert full.interrupted_at is None and (full.settings[0]["width"], full.settings[0]["height"]) == (32, 32)
    assert full.settings[0]["resolved_prompt"] == "a photo of a <thing>"


def test_xy_grid_renders_every_cell_with_its_settings_and_a_labelled_grid(generator, tiny_pipe):
    from neti.generate import Sampling
    from neti.xy import Axis

    concept = make_concept(tiny_pipe)
    result = generator.xy("a photo of a {}", [concept], Axis("bypass strength", (0.0, 0.5)),
                          Axis("truncation", (2, None)), seed=3, sampling=Sampling(steps=2))
    assert [(s["truncation"], s["alpha"], s["seed"]) for s in result.settings] == \
        [(2, 0.0, 3), (2, 0.5, 3), (None, 0.0, 3), (None, 0.5, 3)]
    assert result.grid.width > 2 * result.images[0].width
    other = make_concept(tiny_pipe, "<other>", seed=2)
    mixed = generator.xy("a photo of a {}", [concept], Axis("mix start", (0.0, 1000.0)), Axis("seed", (0,)),
                         sampling=Sampling(steps=2), appearance=other)
    assert [s["mix_start"] for s in mixed.settings] == [0.0, 1000.0] and mixed.settings[0]["appearance"] == "<other>"
    with pytest.raises(ValueError, match="needs one geometry concept and one appearance concept"):
        generator.xy("a photo of a {}", [concept], Axis("mix start", (0.0,)), Axis("seed", (0,)))


def test_mix_references_are_each_concept_alone_at_the_same_seed(generator, tiny_pipe):
    import numpy as np

    from neti.generate import Sampling

    geo, app = make_concept(tiny_pipe, "<geo>", seed=1), make_concept(tiny_pipe, "<app>", seed=2)
    result = generator.mix("a photo of a {}", geo, app, [4], [700], sampling=Sampling(steps=3), references=True)
    assert len(result.images) == 1 and [s["reference"] for s in result.references.settings] == \
        ["geometry", "appearance"]
    assert result.references.settings[1]["resolved_prompt"] == "a photo of a <app>"
    alone = generator.generate("a photo of a {}", [geo], [4], Sampling(steps=3))
    assert np.abs(np.asarray(alone.images[0], dtype=float) - np.asarray(result.references.images[0], dtype=float)
                  ).max() <= 2  # the geometry reference is the geometry concept generated alone


def test_mix_start_is_said_in_words():
    from neti.generate import describe_mix_start

    text = describe_mix_start(700, ["IN07", "MID"])
    assert "first 30% of the denoising" in text and "only IN07, MID keep it" in text
    assert "Lower start: more of the geometry concept" in text


def test_pickers_flag_concepts_that_cannot_be_used(tiny_model_dir, tmp_path):
    from neti.studio import Studio

    studio = Studio(str(tiny_model_dir), tmp_path / "concepts", None, device="cpu", output_dir=tmp_path / "out")
    good = make_concept(studio.pipe, "<good>")
    good.train_steps = 40
    good.save(tmp_path / "concepts" / "good.safetensors")
    make_concept(studio.pipe, "<fresh>").save(tmp_path / "concepts" / "fresh.safetensors")  # 0 steps
    (tmp_path / "concepts" / "broken.safetensors").write_bytes(b"not a concept")
    statuses = studio.concept_statuses()
    assert [(c.name, c.problem) for c in statuses] == [("good", ""), ("broken", "unreadable file"),
                                                       ("fresh", "0 training steps")]
    assert statuses[0].label == "good · <good> · 40 steps"
    assert statuses[2].label.startswith("⚠ fresh · <fresh> · 0 steps · unusable: 0 training steps")


def test_a_thumbnail_follows_its_concept_through_rename_and_delete(tmp_path, tiny_pipe):
    from neti.library import ConceptLibrary

    library = ConceptLibrary(tmp_path, None)
    make_concept(tiny_pipe, "<a>").save(tmp_path / "a.safetensors")
    assert library.thumbnail("a") is None
    library.save_thumbnail("a", Image.new("RGB", (8, 8), "red"))
    library.rename("a", "b")
    assert library.thumbnail("b") == tmp_path / "b.preview.png" and not (tmp_path / "a.preview.png").exists()
    assert library.names() == ["b"]  # a thumbnail is not a concept
    library.delete("b")
    assert list(tmp_path.iterdir()) == []


def test_resume_extends_a_concept_from_its_checkpoint_and_the_last_preview_becomes_its_thumbnail(tiny_model_dir,
                                                                                                 tmp_path):
    from neti.config import PreviewConfig, TrainConfig
    from neti.data import LoadedImage
    from neti.studio import Studio

    studio = Studio(str(tiny_model_dir), tmp_path / "concepts", None, device="cpu", output_dir=tmp_path / "out")
    images = [LoadedImage(None, Image.new("RGB", (32, 32), c), None) for c in ("red", "blue", "green")]
    config, previews = TrainConfig(steps=2, grad_accum=1, checkpoint_every=1), PreviewConfig(every=2, steps=1)
    with pytest.raises(ValueError, match="no concept named 'r'"):
        studio.start_training(images, "r", "<r>", "cat", config, previews, resume=True)
    studio.start_training(images, "r", "<r>", "cat", config, previews)
    assert studio.training.wait(600).status == "finished"
    wait_for(lambda: studio.library.thumbnail("r"), lambda path: path is not None)  # the event: on_done ran
    with pytest.raises(ValueError, match="already exists"):
        studio.start_training(images, "r", "<r>", "cat", config, previews)
    snap = studio.start_training(images, "r", "<r>", "cat", TrainConfig(steps=3, grad_accum=1, checkpoint_every=1),
                                 resume=True)
    assert snap.config.steps == 3
    done = studio.training.wait(600)
    assert done.status == "finished" and done.step == 3 and studio.library.load("r").train_steps == 3


# ---- issue 14 item 1: fidelity and editability while training ----------------------------------------------------

def test_best_tradeoff_normalises_both_scores_over_the_run():
    from neti.fidelity import StepScore, best_tradeoff

    scores = [StepScore(0, 0.50, 0.30), StepScore(10, 0.80, 0.28), StepScore(20, 0.82, 0.20),
              StepScore(30, 0.83, 0.10)]
    # normalised: image (0, .91, .97, 1), text (1, .9, .5, 0): sums 1, 1.81, 1.47, 1
    assert best_tradeoff(scores) == 10
    assert best_tradeoff([]) is None and best_tradeoff([StepScore(5, 0.1, 0.1)]) == 5


class FakeJudge:
    """Embeddings in 2-D: an image by its mean red and blue, a text by whether it says 'blue'."""

    def embed_images(self, images):
        import torch
        import torch.nn.functional as F

        return F.normalize(torch.tensor([[im.getpixel((0, 0))[0] + 1.0, im.getpixel((0, 0))[2] + 1.0]
                                         for im in images]), dim=-1)

    def embed_texts(self, texts):
        import torch

        return torch.tensor([[0.0, 1.0] if "blue" in t else [1.0, 0.0] for t in texts])


def test_tracker_scores_fidelity_on_the_first_prompt_and_editability_on_the_others(tmp_path, tiny_pipe):
    from neti.concept import Concept
    from neti.fidelity import FidelityTracker, kept_steps
    from neti.train import PreviewInfo

    concept = make_concept(tiny_pipe, "<x>")
    red, blue = Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))
    seen, kept = [], []
    tracker = FidelityTracker(FakeJudge(), [red, red], concept, tmp_path / "steps",
                              lambda score, best: seen.append((score, best)), kept.append)
    prompts = ["a photo of a {}", "a photo of a {} on a blue background"]
    tracker.on_preview(PreviewInfo(0, [red, blue], prompts, [0, 0]))  # untrained: the baseline, never the best
    tracker.on_preview(PreviewInfo(10, [blue, red], prompts, [0, 0]))  # unlike the photos, ignores the edit
    tracker.on_preview(PreviewInfo(20, [red, blue], prompts, [0, 0]))  # like the photos, follows the edit
    (base, best0), (first, best1), (second, best2) = seen
    assert base.image_similarity > 0.99 and best0 is None and best1 == 10
    assert first.image_similarity < 0.01 and first.text_similarity < 0.01
    assert second.image_similarity > 0.99 and second.text_similarity > 0.99 and best2 == 20
    assert kept == [10, 20] and kept_steps(tmp_path / "steps") == [10, 20]  # step 0 (untrained) is not kept
    assert Concept.load(tmp_path / "steps" / "step-000010.safetensors").train_steps == 10
    assert tracker.to_json()["best_step"] == 20


def test_no_clip_for_another_model_offline_means_no_curve(tmp_path):
    from neti.fidelity import default_judge

    assert default_judge(str(tmp_path / "some-model")) is None
    assert default_judge(str(tmp_path), clip=tmp_path / "missing-clip") is None


def test_a_named_clip_scores_the_previews_of_any_model(tiny_model_dir, clip_dir, tmp_path):
    from neti.config import PreviewConfig, TrainConfig
    from neti.data import LoadedImage
    from neti.studio import Studio

    studio = Studio(str(tiny_model_dir), tmp_path / "concepts", None, device="cpu", output_dir=tmp_path / "out",
                    clip=clip_dir)
    images = [LoadedImage(None, Image.new("RGB", (32, 32), c), None) for c in ("red", "blue", "green")]
    studio.start_training(images, "c", "<c>", "cat", TrainConfig(steps=2, grad_accum=1, checkpoint_every=0),
                          PreviewConfig(every=1, steps=1, prompts=("a photo of a {}", "a {} on the beach")))
    done = studio.training.wait(600)
    assert done.status == "finished" and [s.step for s in done.scores] == [0, 1, 2] and done.best_step in (1, 2)
    assert "best fidelity/editability trade-off at step" in done.summary()


def test_keep_step_makes_the_concept_an_earlier_preview_step(tiny_model_dir, tmp_path):
    from neti.config import PreviewConfig, TrainConfig
    from neti.data import LoadedImage
    from neti.studio import Studio

    studio = Studio(str(tiny_model_dir), tmp_path / "concepts", None, device="cpu", output_dir=tmp_path / "out")
    images = [LoadedImage(None, Image.new("RGB", (32, 32), c), None) for c in ("red", "blue", "green")]
    studio.start_training(images, "k", "<k>", "cat", TrainConfig(steps=2, grad_accum=1, checkpoint_every=0),
                          PreviewConfig(every=1, steps=1))
    done = studio.training.wait(600)
    assert done.status == "finished" and done.kept_steps == (1, 2) and done.scores == ()  # no CLIP for this model
    final = studio.library.load("k").mapper.state_dict()
    assert studio.keep_step(1) == "k"
    kept = studio.library.load("k")
    assert kept.train_steps == 1 and any(not (kept.mapper.state_dict()[n] == v).all() for n, v in final.items())
    with pytest.raises(ValueError, match="step 5 was not kept; the last training kept the steps: 1, 2"):
        studio.keep_step(5)
