"""The app over its HTTP API: `python app.py` on a free port, driven by `gradio_client`, on a tiny random model.

Each tab's main action is called as a browser would call it (generate, sweep, style mix and its strip,
decomposition, training, import/export, rename/delete), and every library error must come back as a readable
message rather than a stack trace.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from PIL import Image

from helpers import APP_WORDS, wait_for
from neti.config import DEFAULT_BYPASS_ALPHA as ALPHA
from neti.config import DEFAULT_HIDDEN_DIM
from neti.paths import EXAMPLES_DIR
from neti.testing import AppServer, tiny_model

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

EXAMPLE = EXAMPLES_DIR / "dotted-crescent"
FULL = DEFAULT_HIDDEN_DIM + 1  # the truncation slider's "full" position


def tiny_concept(token: str, seed: int):
    """A random NeTI concept for the tiny model (token width 32, 16 layers), built without loading the model."""
    from neti.concept import Concept
    from neti.config import MapperConfig

    return Concept(token, "shape", MapperConfig(token_dim=32, num_layers=16, target_norm=0.5, seed=seed,
                                                hidden_dim=16, kept_units=16, num_frequencies=64), (), "tiny", 7)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    root = tmp_path_factory.mktemp("app")
    model = tiny_model(root, APP_WORDS, max_tokens=32)
    concepts, shipped = root / "concepts", root / "shipped"
    shipped.mkdir()
    concepts.mkdir()
    tiny_concept("<alpha>", 1).save(concepts / "alpha.safetensors")
    tiny_concept("<beta>", 2).save(concepts / "beta.safetensors")
    tiny_concept("<shipped>", 3).save(shipped / "shipped-one.safetensors")
    server = AppServer(model, concepts, root / "app.log", extra_args=["--shipped-concepts-dir", str(shipped)])
    client = Client(server.url, verbose=False)
    client.concepts_dir = concepts
    client.server = server
    yield client
    server.stop()


def call(client, api_name, *args):
    return client.predict(*args, api_name=api_name)


def error_of(client, api_name, *args) -> str:
    with pytest.raises(AppError) as info:
        call(client, api_name, *args)
    message = str(info.value)
    assert "Traceback" not in message
    return message


GEN = dict(negative="", num_images=2, seed=5, random_seed=False, steps=2, guidance=7.5, scheduler="dpm")


def test_app_serves_the_page_quickly(app):
    print(f"start-up to served page: {app.server.startup_seconds:.1f} s")
    assert app.server.startup_seconds < 90


def test_generate_returns_pngs_with_settings_and_the_seed_in_each_caption(app):
    from neti.images import read_settings

    images, files, grid, info = call(app, "/generate", ["alpha"], "a photo of a {}", *GEN.values(), 8, ALPHA, 32, 32)
    assert [item["caption"] for item in images] == ["seed 5 · truncation 8", "seed 6 · truncation 8"]
    assert grid is None and info == ""  # a new result clears the last grid and selection
    settings = read_settings(files[0])
    assert settings["seed"] == 5 and settings["truncation"] == 8 and settings["concepts"] == ["<alpha>"]
    assert settings["resolved_prompt"] == "a photo of a <alpha>"
    assert Path(files[0]).name == "neti-00-alpha-k8-a0.2-seed5.png"
    with Image.open(files[0]) as image:
        assert image.size == (32, 32)
        assert image.text["parameters"].startswith("a photo of a <alpha>\nSteps: 2, Sampler: DPM++ 2M, CFG scale: "
                                                   "7.5, Seed: 5, Size: 32x32")


def test_width_and_height_set_the_image_size(app):
    _, files, _, _ = call(app, "/generate", ["alpha"], "a photo of a {}", *GEN.values(), 8, ALPHA, 48, 24)
    assert Image.open(files[0]).size == (48, 24)


def test_interrupt_ends_a_running_generation_with_the_images_so_far(app):
    job = app.submit(["alpha"], "a photo of a {}", "", 1, 0, False, 100, 7.5, "dpm", FULL, ALPHA, 32, 32,
                     api_name="/generate")
    wait_for(lambda: job.status(), lambda s: job.done() or bool(s.progress_data and s.progress_data[0].index))
    # the event above: a sampler step reported (not merely the "Generating…" before the model runs)
    call(app, "/interrupt")
    images, files, _, _ = job.result()
    assert re.search(r"interrupted at step \d+$", images[0]["caption"]) and len(files) == 1
    assert int(images[0]["caption"].rsplit(" ", 1)[1]) < 100


def test_xy_grid_over_two_controls_is_labelled_and_every_image_carries_its_cell(app):
    from neti.images import GRID_CELL_MIN, read_settings

    grid, images, files, _ = call(app, "/xy_grid", ["alpha"], "a photo of a {}", "", 5, False, 2, 7.5, "dpm", FULL,
                                  ALPHA, 32, 32, "bypass strength", "0, 0.5", "truncation", "2, full")
    assert [i["caption"] for i in images] == ["truncation 2 · bypass strength 0",
                                              "truncation 2 · bypass strength 0.5",
                                              "truncation full · bypass strength 0",
                                              "truncation full · bypass strength 0.5"]
    assert read_settings(files[1])["alpha"] == 0.5 and read_settings(files[2])["truncation"] is None
    width, height = Image.open(grid).size
    assert width > 2 * GRID_CELL_MIN and height > 2 * GRID_CELL_MIN  # upscaled cells plus the axis labels
    assert "out of range" in error_of(app, "/xy_grid", ["alpha"], "a photo of a {}", "", 5, False, 2, 7.5, "dpm",
                                      FULL, ALPHA, 32, 32, "bypass strength", "0, 3", "truncation", "2")


def test_token_counter_and_insert_token(app):
    assert call(app, "/count_tokens", "a photo of a {}", ["alpha"]) == "7/32 tokens"
    assert "too long" in call(app, "/count_tokens", "a photo " * 20, [])
    assert call(app, "/insert_token", "a photo of a", ["alpha"]) == "a photo of a <alpha>"
    assert "select a concept first" in error_of(app, "/insert_token", "a photo", [])


def test_random_seed_is_drawn_and_shown(app):
    images, *_ = call(app, "/generate", ["alpha"], "a photo of a {}", "", 1, 0, True, 2, 7.5, "dpm", FULL, ALPHA, 32,
                      32)
    assert images[0]["caption"].startswith("seed ") and images[0]["caption"].endswith("truncation full")


def test_sweep_grid_has_a_row_per_truncation_and_a_column_per_seed(app):
    from neti.images import GRID_CELL_MIN

    grid, images, files, _ = call(app, "/sweep", ["alpha"], "a photo of a {}", *GEN.values(), "2, 16, full", ALPHA,
                                  32, 32)
    assert len(images) == 6 and images[0]["caption"] == "truncation 2 · seed 5"
    width, height = Image.open(grid).size
    assert 2 * GRID_CELL_MIN + 2 < width < 3 * GRID_CELL_MIN and 3 * GRID_CELL_MIN + 4 < height < 4 * GRID_CELL_MIN


def test_style_mix_with_its_references_and_the_strip_of_four_starts(app):
    args = ["alpha", "beta", "a photo of a {}", ["IN07", "IN08", "MID"]]
    mixed, refs, _, _ = call(app, "/mix", *args, 700, 0, False, 2, 7.5, "dpm")
    assert len(mixed) == 1 and mixed[0]["caption"] == "start t=700 · seed 0"
    assert [r["caption"] for r in refs] == ["geometry alone (<alpha>) · seed 0", "appearance alone (<beta>) · seed 0"]
    strip, refs, files, _ = call(app, "/mix_strip", *args, 0, False, 2, 7.5, "dpm")
    assert [s["caption"].split(" · ")[0] for s in strip] == [f"start t={t}" for t in (600, 700, 800, 900)]
    assert len(refs) == 2
    msg = error_of(app, "/mix", "alpha", "beta", "a photo of a {}", ["IN99"], 700, 0, False, 2, 7.5, "dpm")
    assert "IN99" in msg
    assert "at least one geometry layer" in error_of(app, "/mix", "alpha", "beta", "a photo of a {}", [], 700, 0,
                                                     False, 2, 7.5, "dpm")


def test_mix_xy_grid_over_start_and_seed(app):
    grid, images, _, _ = call(app, "/mix_xy_grid", "alpha", "beta", "a photo of a {}", ["MID"], 700, 0, False, 2, 7.5,
                              "dpm", "mix start", "300, 900", "seed", "0")
    assert [i["caption"] for i in images] == ["seed 0 · mix start t=300", "seed 0 · mix start t=900"]
    assert Path(grid).is_file()


def test_decomposition_renders_one_image_per_fixed_timestep(app):
    images = call(app, "/decompose", "alpha", "a photo of a {}", 0, 2)
    assert [i["caption"] for i in images] == [f"t = {t} · seed 0" for t in (999, 800, 600, 400, 200, 0)]


def test_concept_card_names_token_method_steps_and_size(app):
    card = call(app, "/concept_card", "alpha")
    assert "<alpha>" in card and "neti" in card and "file size" in card and "parameters" in card


def test_library_errors_reach_the_user_as_readable_messages(app):
    msg = error_of(app, "/generate", ["alpha"], "a photo of a circle", *GEN.values(), FULL, ALPHA, 32, 32)
    assert "does not contain the concept's token" in msg
    msg = error_of(app, "/load_model", "no-such-org/no-such-model")
    assert "could not load base model" in msg
    assert "no concept named" in error_of(app, "/concept_card", "gamma")
    msg = error_of(app, "/train_start", [handle_file(EXAMPLE / "0.png")], "x", "photo", "shape", "NeTI", 5, 0, True,
                   True, "a photo of a {}", 0, 0)
    assert "already in the tokenizer's vocabulary" in msg


def test_names_that_escape_the_concepts_folder_are_refused(app):
    for bad in ("../escape", "/etc/passwd", "a/b", "..", "sub\\dir"):
        assert "not allowed" in error_of(app, "/rename", "alpha", bad, [], "alpha", "beta")
        assert "not allowed" in error_of(app, "/concept_card", bad)
    assert sorted(p.name for p in app.concepts_dir.iterdir()) == ["alpha.safetensors", "beta.safetensors"]


def test_upload_check_accepts_images_by_content_and_names_each_rejected_file(app, tmp_path):
    fake = tmp_path / "notes.png"
    fake.write_text("this is text, not a picture")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    renamed = tmp_path / "photo.txt"  # content decides, not the extension
    renamed.write_bytes((EXAMPLE / "0.png").read_bytes())
    thumbs, message = call(app, "/check_uploads", [handle_file(p) for p in (EXAMPLE / "1.png", fake, empty, renamed)])
    assert len(thumbs) == 2 and "2 image(s) ready" in message
    assert "notes.png: not an image file Pillow can read" in message and "empty.png: empty file (0 bytes)" in message
    _, message = call(app, "/check_uploads", [handle_file(EXAMPLE / "0.png")] * 21)
    assert "21 files uploaded, but at most 20" in message


def test_training_runs_in_the_background_refuses_a_second_job_and_saves_on_stop(app):
    images = [handle_file(EXAMPLE / f"{i}.png") for i in range(4)]
    started = call(app, "/train_start", images, "trained", "<trained>", "shape", "NeTI", 500, None, True, True,
                   "a photo of a {}", 2, 0)
    assert "Started training trained" in started
    msg = error_of(app, "/train_start", images, "other", "<other>", "shape", "NeTI", 5, None, True, True,
                   "a photo of a {}", 0, 0)
    assert "already running" in msg and "'trained'" in msg and "/500" in msg
    status = wait_for(lambda: call(app, "/train_status"),  # the event: step 3 and the step-2 preview (or an end)
                      lambda s: s["status"] != "running" or (s["step"] >= 3 and 2 in s["preview_steps"]))
    assert status["status"] == "running" and status["preview_steps"][:2] == [0, 2]
    assert len(status["smoothed"]) == len(status["losses"]) >= 3 and status["eta_seconds"] > 0
    assert "switch the base model" in error_of(app, "/load_model", "/tmp")
    during, *_ = call(app, "/generate", ["alpha"], "a photo of a {}", "", 1, 0, False, 2, 7.5, "dpm", FULL, ALPHA, 32,
                      32)
    assert len(during) == 1  # generation runs while the training does
    call(app, "/train_stop")
    wait_for(lambda: call(app, "/train_status")["status"], lambda s: s not in ("running", "stopping"))  # the job ends
    status = call(app, "/train_status")
    assert status["status"] == "stopped" and 3 <= status["step"] < 500
    card = call(app, "/concept_card", "trained")
    assert "<trained>" in card and f"`{status['step']}`" in card
    assert status["kept_steps"][0] == 2 and status["scores"] == []  # a concept per preview; no CLIP offline here
    assert call(app, "/keep_step", 2) == "Concept 'trained' is now its step 2."
    assert "`2`" in call(app, "/concept_card", "trained")
    assert "was not kept" in error_of(app, "/keep_step", 7)
    images_out, *_ = call(app, "/generate", ["trained"], "a photo of a {}", *GEN.values(), FULL, ALPHA, 32, 32)
    assert len(images_out) == 2


def test_rename_delete_and_shipped_concepts_are_read_only(app):
    out = call(app, "/rename", "beta", "beta-2", [], "alpha", "beta")
    assert out[0] == "Renamed 'beta' to 'beta-2'." and "beta-2" in [c[1] for c in out[4]["choices"]]
    assert ["beta-2 · <beta> · 7 steps"] == [c[0] for c in out[4]["choices"] if c[1] == "beta-2"]
    assert (app.concepts_dir / "beta-2.safetensors").is_file() and not (app.concepts_dir / "beta.safetensors").exists()
    assert "already exists" in error_of(app, "/rename", "beta-2", "alpha", [], "alpha", "beta-2")
    assert "read-only" in error_of(app, "/delete", "shipped-one", [], "alpha", "beta-2")
    out = call(app, "/delete", "beta-2", [], "alpha", "beta-2")
    assert "beta-2" not in [c[1] for c in out[4]["choices"]] and "shipped-one" in [c[1] for c in out[4]["choices"]]


def test_import_official_checkpoint_then_export_as_textual_inversion(app, official_checkpoint):
    from safetensors.torch import load_file

    mapper, embeds, _ = official_checkpoint
    out = call(app, "/import_official", handle_file(mapper), handle_file(embeds), "official", [], "alpha", "alpha",
               "alpha")
    assert out[0] == "Imported as 'official'." and "official" in [c[1] for c in out[1]["choices"]]
    path = call(app, "/export_textual_inversion", "official")
    assert list(load_file(path)) == ["<x>"] and Path(path).name == "official-textual-inversion.safetensors"
    assert "not an official NeTI mapper checkpoint" in error_of(
        app, "/import_official", handle_file(EXAMPLE / "0.png"), None, "", [], "alpha", "alpha", "alpha")


# ---- the service layer without a server ------------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["", "  ", "..", "../x", "a/b", "a\\b", "/abs", ".hidden", "-flag", "x" * 81])
def test_concept_names_must_be_plain_file_stems(bad):
    from neti.studio import check_name

    with pytest.raises(ValueError, match="concept name"):
        check_name(bad)


def test_concept_names_and_tokens():
    from neti.studio import check_name, name_from_token

    assert check_name(" my cat.safetensors ") == "my cat"
    assert name_from_token("<dotted-crescent>") == "dotted-crescent" and name_from_token("<>") == "concept"


def test_snapshot_smooths_the_loss_and_estimates_time_left():
    from neti.jobs import LOSS_EMA, TrainingManager
    from neti.train import StepInfo

    manager = TrainingManager()
    for step, loss in enumerate([1.0, 0.0, 0.0], start=1):
        manager._record_step(StepInfo(step, 10, loss, 1e-3, 2.0))
    snap = manager.snapshot()
    assert snap.losses == (1.0, 0.0, 0.0) and snap.smoothed == pytest.approx((1.0, LOSS_EMA, LOSS_EMA ** 2))
    assert snap.step == 3 and snap.eta_seconds == pytest.approx(7 * 2.0)


def test_background_training_runs_with_the_managers_cpu_threads(tiny_pipe, tmp_path):
    """The training thread sets its own torch threads (default: half the cores), so it does not contend with
    the OpenMP team of the thread that loaded the model."""
    import threading

    import torch

    from neti.jobs import TrainingManager, background_threads
    from neti.train import TrainConfig

    seen, done = [], threading.Event()
    before = torch.get_num_threads()
    manager = TrainingManager(threads=before + 1)
    original = manager._record_step
    manager._record_step = lambda info: (seen.append(torch.get_num_threads()), original(info))
    manager.start(tiny_pipe, "tiny", [Image.new("RGB", (32, 32), "red")], "t", "<t>", "cat",
                  TrainConfig(steps=2, grad_accum=1, checkpoint_every=0), tmp_path / "t.safetensors",
                  on_done=lambda path: done.set())
    assert done.wait(120) and manager.snapshot().status == "finished"
    assert seen == [before + 1] * 2 and torch.get_num_threads() == before  # set while training, then restored
    assert TrainingManager().threads == background_threads() >= 1


# ---- issue 13: every message readable, no broken concept -------------------------------------------------------

def test_a_message_with_a_token_comes_back_html_escaped_and_whole(app):
    import html

    msg = error_of(app, "/generate", ["alpha"], "a photo of a circle", *GEN.values(), FULL, ALPHA, 32, 32)
    assert "&lt;alpha&gt;" in msg and "does not contain the concept's token '<alpha>'" in html.unescape(msg)


def test_bad_training_requests_are_refused_before_anything_starts(app):
    import html

    images = [handle_file(EXAMPLE / f"{i}.png") for i in range(3)]
    before = sorted(p.name for p in app.concepts_dir.iterdir())
    msg = html.unescape(error_of(app, "/train_start", images, "nobrace", "<nobrace>", "shape", "NeTI", 5, None, True,
                                 True, "a photo of a circle", 1, 0))
    assert "'a photo of a circle' does not contain the concept's token '<nobrace>'" in msg
    msg = html.unescape(error_of(app, "/train_start", images, "clash", "<alpha>", "shape", "NeTI", 5, None, True,
                                 True, "a photo of a {}", 0, 0))
    assert "the token '<alpha>' is already used by concept 'alpha'" in msg
    assert "'my-cat' without angle brackets" in error_of(app, "/train_start", images, "bare", "my-cat", "shape",
                                                         "NeTI", 5, None, True, True, "a photo of a {}", 0, 0)
    assert call(app, "/train_status")["status"] != "running"
    assert sorted(p.name for p in app.concepts_dir.iterdir()) == before


def test_one_small_image_trains_with_a_warning_in_the_message(app):
    tiny = app.concepts_dir.parent / "one-pixel.png"
    Image.new("RGB", (1, 1), "red").save(tiny)
    message = call(app, "/train_start", [handle_file(tiny)], "one-image", "<one-image>", "shape", "NeTI", 1, None,
                   True, True, "a photo of a {}", 0, 0)
    assert "Started training one-image" in message
    assert "only 1 training image(s): NeTI uses 3-10" in message and "(one-pixel.png is 1x1)" in message
    status = wait_for(lambda: call(app, "/train_status")["status"], lambda s: s != "running")  # the one step ends
    assert status == "finished"
    call(app, "/delete", "one-image", [], "alpha", "alpha")


def test_hostile_names_and_links_out_of_the_concepts_folder_are_refused(app, tmp_path):
    outside = tmp_path / "outside.safetensors"
    tiny_concept("<outside>", 9).save(outside)
    link = app.concepts_dir / "linked.safetensors"
    link.symlink_to(outside)
    try:
        assert "outside the concepts folder" in error_of(app, "/concept_card", "linked")
        assert "outside the concepts folder" in error_of(app, "/delete", "linked", [], "alpha", "alpha")
        for bad in ("nul\x00name", "x" * 300, "..", "a/../b"):
            assert "not allowed" in error_of(app, "/rename", "alpha", bad, [], "alpha", "alpha")
        assert outside.is_file()
    finally:
        link.unlink()


def test_stop_pressed_while_the_trainer_is_being_built_stops_the_run(tiny_pipe, tmp_path, monkeypatch):
    import threading

    import neti.jobs as jobs
    from neti.train import TrainConfig

    building, release = threading.Event(), threading.Event()
    real = jobs.Trainer

    def slow_trainer(*args, **kwargs):
        building.set()
        assert release.wait(60)
        return real(*args, **kwargs)

    monkeypatch.setattr(jobs, "Trainer", slow_trainer)
    manager = jobs.TrainingManager()
    done = threading.Event()
    starter = threading.Thread(target=manager.start, args=(
        tiny_pipe, "tiny", [Image.new("RGB", (32, 32), "red")] * 3, "t", "<t>", "cat",
        TrainConfig(steps=500, grad_accum=1, checkpoint_every=0), tmp_path / "t.safetensors", lambda p: done.set()))
    starter.start()
    assert building.wait(60)
    assert manager.stop().status == "stopping"
    release.set()
    starter.join(60)
    assert done.wait(120)
    snap = manager.snapshot()
    assert snap.status == "stopped" and snap.step == 0 and not snap.saved
    assert "Nothing was trained: no concept was saved" in snap.summary()
    assert not (tmp_path / "t.safetensors").exists()


def test_a_timer_tick_leaves_alone_a_pick_made_while_it_was_in_flight(monkeypatch):
    """When a concept appears, the 1-s timer sends the pickers their new choices; a picker whose selection it did
    not change gets no value, so that what the user picked after the tick was sent survives its answer. A picker
    whose concept is gone, or that was empty, gets one."""
    import app

    choices = [("alpha · 9 steps", "alpha"), ("beta · 3 steps", "beta"), ("new · 5 steps", "new")]
    monkeypatch.setattr(app, "concept_choices", lambda: choices)
    monkeypatch.setattr(app, "library_gallery", lambda: [])
    *pickers, _ = app.dropdown_updates(["alpha"], "gone", "beta", "new", shown=(["alpha"], "gone", "beta", None))
    assert [p.constructor_args.get("choices") for p in pickers] == [choices] * 4
    assert ["value" in p.constructor_args for p in pickers] == [False, True, False, True]
    assert pickers[1].constructor_args["value"] == "alpha" and pickers[3].constructor_args["value"] == "new"
    *pickers, _ = app.dropdown_updates(["alpha"], "beta", "beta", "new")  # a user's own action: every value
    assert all("value" in p.constructor_args for p in pickers)
