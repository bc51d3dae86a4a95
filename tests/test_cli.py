"""`python -m neti`: every subcommand writes what it says, and bad input exits 2 with a readable message."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from neti.__main__ import main
from neti.concept import Concept
from neti.images import read_settings


@pytest.fixture(scope="module")
def trained(tiny_model_dir, clip_dir, tmp_path_factory):
    """A concept trained for 2 steps through the CLI, with previews scored by a tiny CLIP, and a checkpoint."""
    root = tmp_path_factory.mktemp("cli")
    folder = root / "photos"
    folder.mkdir()
    for i in range(3):
        pixels = np.full((32, 32, 3), (40 * i, 90, 200), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
    out = root / "concepts" / "thing.safetensors"
    code = main(["train", "--model", str(tiny_model_dir), "--device", "cpu", "--images", str(folder),
                 "--token", "<thing>", "--init-token", "cat", "--steps", "2", "--grad-accum", "1",
                 "--checkpoint-every", "1", "--preview-every", "2", "--preview-seed", "3", "--preview-steps", "3",
                 "--crop", "random", "--flip-p", "0", "--lr-warmup-steps", "1", "--resolution", "32",
                 "--preview-prompt", "a photo of a {}", "--preview-prompt", "a photo of a {} on the beach",
                 "--clip", str(clip_dir), "--out", str(out)])
    assert code == 0
    return root, out


def test_train_writes_the_concept_previews_and_checkpoints(trained):
    root, out = trained
    assert Concept.load(out).train_steps == 2
    previews = sorted(p.name for p in (root / "concepts" / "thing-previews").iterdir())
    assert previews == ["scores.json", "step-000000.png", "step-000002.png", "step-000002.safetensors"]
    assert read_settings(root / "concepts" / "thing-previews" / "step-000002.png")["seeds"] == [3]
    assert Concept.load(root / "concepts" / "thing-previews" / "step-000002.safetensors").train_steps == 2


def test_train_scores_every_preview_in_its_json(trained):
    root, _ = trained
    scores = json.loads((root / "concepts" / "thing-previews" / "scores.json").read_text())
    assert [s["step"] for s in scores["scores"]] == [0, 2] and scores["best_step"] == 2  # step 0 is the baseline
    assert all(-1 <= s["image_similarity"] <= 1 and -1 <= s["text_similarity"] <= 1 for s in scores["scores"])
    assert sorted(p.name for p in (root / "concepts" / "thing-checkpoints").iterdir()) == [
        "checkpoint-000001.safetensors", "checkpoint-000002.safetensors"]  # the final step too (issue 13)


def test_train_options_reach_the_run_config(trained):
    from safetensors import safe_open

    from neti.train import TrainConfig

    root, _ = trained
    checkpoint = root / "concepts" / "thing-checkpoints" / "checkpoint-000001.safetensors"
    with safe_open(str(checkpoint), framework="pt") as f:
        config = TrainConfig.from_json(json.loads(f.metadata()["training_state"])["train_config"])
    preview = read_settings(root / "concepts" / "thing-previews" / "step-000002.png")  # previews: not the run's
    assert (config.crop, config.flip_p, config.lr_warmup_steps, config.resolution, preview["sampler_steps"],
            preview["seeds"]) == ("random", 0.0, 1, 32, 3, [3])


def test_info_prints_metadata_parameters_and_size(trained, capsys):
    _, out = trained
    assert main(["info", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["token"] == "<thing>" and info["method"] == "neti" and info["train_steps"] == "2"
    assert int(info["num_parameters"]) == Concept.load(out).num_parameters
    assert info["file_size_bytes"] == out.stat().st_size


def test_generate_writes_pngs_that_carry_their_settings(trained, tiny_model_dir, tmp_path):
    _, out = trained
    assert main(["generate", "--model", str(tiny_model_dir), "--device", "cpu", "--concept", str(out),
                 "--prompt", "a photo of a {}", "--seeds", "4", "5", "--steps", "2", "--truncation", "8",
                 "--out", str(tmp_path)]) == 0
    files = sorted(tmp_path.glob("image-*.png"))
    assert [f.name for f in files] == ["image-00-thing-k8-a0.2-seed4.png", "image-01-thing-k8-a0.2-seed5.png"]
    settings = read_settings(files[1])
    assert settings["seed"] == 5 and settings["truncation"] == 8 and settings["concepts"] == ["<thing>"]
    assert settings["scheduler"] == "dpm" and settings["steps"] == 2 and settings["alpha"] == 0.2


def test_sweep_mix_and_decompose_write_grids(trained, tiny_model_dir, tmp_path):
    _, out = trained
    common = ["--model", str(tiny_model_dir), "--device", "cpu", "--prompt", "a photo of a {}", "--steps", "2",
              "--out", str(tmp_path)]
    assert main(["generate", "--concept", str(out), "--seeds", "0", "1", "--sweep", "4", "128", *common]) == 0
    assert Image.open(tmp_path / "sweep-grid.png").size == (2 * 32 + 2, 2 * 32 + 2)
    assert main(["mix", "--geometry", str(out), "--appearance", str(out), "--starts", "600", "900", *common]) == 0
    assert len(list(tmp_path.glob("mix-0*.png"))) == 2
    assert main(["decompose", "--concept", str(out), "--timesteps", "999", "0", *common]) == 0
    assert Image.open(tmp_path / "decompose-grid.png").size == (2 * 32 + 2, 32)


def test_export_fp16_truncated_and_textual_inversion(trained, tmp_path):
    _, out = trained
    assert main(["export", str(out), "--out", str(tmp_path / "half.safetensors"), "--fp16"]) == 0
    assert (tmp_path / "half.safetensors").stat().st_size < 0.55 * out.stat().st_size
    assert main(["export", str(out), "--out", str(tmp_path / "k8.safetensors"), "--keep-units", "8"]) == 0
    assert Concept.load(tmp_path / "k8.safetensors").config.kept_units == 8
    assert main(["export", str(out), "--out", str(tmp_path / "ti.safetensors"), "--as", "textual-inversion"]) == 0
    from safetensors.torch import load_file

    assert list(load_file(tmp_path / "ti.safetensors")) == ["<thing>"]


def test_bad_input_exits_2_with_a_readable_message(trained, tiny_model_dir, tmp_path, capsys):
    _, out = trained
    assert main(["info", str(tmp_path / "missing.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["generate", "--model", str(tiny_model_dir), "--device", "cpu", "--concept", str(out),
                 "--prompt", "a photo of a cat", "--steps", "2", "--out", str(tmp_path)]) == 2
    assert "does not contain the concept's token" in capsys.readouterr().err
    assert main(["train", "--model", str(tiny_model_dir), "--device", "cpu", "--images", str(tmp_path),
                 "--token", "<x>", "--out", str(tmp_path / "x.safetensors")]) == 2
    assert str(tmp_path) in capsys.readouterr().err


@pytest.mark.slow  # two real processes (the launcher and the CLI): CI's slow run
def test_accelerate_launch_runs_the_training_cli(trained, tiny_model_dir, tmp_path):
    """`accelerate launch -m neti train ...` (one CPU process) trains and writes the concept."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root, _ = trained
    out = tmp_path / "launched.safetensors"
    repo = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=repo)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "neti", "train",
               "--model", str(tiny_model_dir), "--device", "cpu", "--images", str(root / "photos"),
               "--token", "<thing>", "--init-token", "cat", "--steps", "1", "--grad-accum", "1",
               "--checkpoint-every", "0", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert Concept.load(out).train_steps == 1


@pytest.mark.slow  # two launches of two real processes each: CI's slow run
def test_torchrun_two_processes_train_one_concept_with_equal_mappers(tiny_model_dir, clip_dir, tmp_path):
    """`torchrun --nproc_per_node 2 -m neti train` on the CPU (gloo) is data-parallel: each rank draws its own data,
    the mappers are equal after every step, rank 0 alone writes the concept, checkpoints and previews and prints
    the summary; a resume of the run, launched the same way, continues it."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    from neti.train import weights_digest

    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        Image.fromarray(np.full((32, 32, 3), (40 * i, 90, 200), dtype=np.uint8)).save(photos / f"{i}.png")
    out = tmp_path / "concepts" / "thing.safetensors"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "neti"]
    train = ["train", "--model", str(tiny_model_dir), "--device", "cpu", "--images", str(photos), "--token",
             "<thing>", "--init-token", "cat", "--grad-accum", "2", "--checkpoint-every", "1", "--resolution", "32",
             "--preview-every", "2", "--preview-steps", "2", "--clip", str(clip_dir), "--out", str(out)]

    first = subprocess.run([*launch, "-vv", *train, "--steps", "2"], capture_output=True, text=True, timeout=300,
                           env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    digests = {}  # (step, rank) -> (local loss, mapper digest), from each rank's debug notes
    for rank, step, loss, digest in re.findall(
            r"^(?:\[rank (\d)\] )?DEBUG step (\d+) on process \d: local loss (\S+), mapper weights (\w+)$",
            first.stderr, re.MULTILINE):
        digests[int(step), int(rank or 0)] = (float(loss), digest)
    assert sorted(digests) == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert all(digests[step, 0][1] == digests[step, 1][1] for step in (1, 2))  # equal mappers after every step
    assert digests[1, 0][0] != digests[1, 1][0]  # from different data (a per-rank seed)
    assert weights_digest(Concept.load(out).mapper) == digests[2, 0][1]
    assert first.stdout.count("saved to") == 1 and first.stdout.count("<thing> (neti") == 1
    assert first.stdout.count("step 2: image similarity") == 1  # the preview's scores, once
    assert re.findall(r"^(\[rank 1\] )?INFO saved <thing>", first.stderr, re.MULTILINE) == [""]  # by rank 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["thing-checkpoints", "thing-previews", "thing.safetensors"]
    assert sorted(p.name for p in (out.parent / "thing-previews").iterdir()) == [
        "scores.json", "step-000000.png", "step-000002.png", "step-000002.safetensors"]

    resumed = subprocess.run([*launch, *train, "--steps", "3", "--resume", str(out)], capture_output=True, text=True,
                             timeout=300, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "[rank 1]" not in resumed.stderr  # the other rank is silent without errors
    assert resumed.stdout.count("saved to") == 1 and resumed.stdout.count("<thing> (neti, super-category 'cat', 3 "
                                                                           "steps") == 1
    assert Concept.load(out).train_steps == 3
    assert sorted(p.name for p in (out.parent / "thing-checkpoints").iterdir()) == [
        "checkpoint-000001.safetensors", "checkpoint-000002.safetensors", "checkpoint-000003.safetensors"]
