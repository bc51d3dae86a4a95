"""Issue 13: every bad input gets one clear line, and a failed run never leaves a broken concept.

One table of bad inputs runs through the CLI: each must exit 2 with exactly one line on stderr that names the
value, no traceback, and nothing written. The table runs in-process through `neti.__main__.main` in the default
suite (fast: one tiny model folder, one trained concept, shared by every row) and through `python -m neti` in real
subprocesses under the `slow` marker. `kill -9` during training runs a real subprocess.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import wait_for
from PIL import Image, PngImagePlugin
from safetensors.torch import save_file

from neti.__main__ import main
from neti.concept import Concept

REPO = Path(__file__).resolve().parent.parent


def png_claiming(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height pixels (a decompression bomb) with no pixel data at all."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def ws(tiny_model_dir, tmp_path_factory):
    """The workspace every row shares: photos, a concept trained 1 step (with its checkpoint), an XTI checkpoint,
    and the hostile files of item 8."""
    root = tmp_path_factory.mktemp("issue13")
    photos = root / "photos"
    photos.mkdir()
    for i in range(3):
        Image.fromarray(np.full((32, 32, 3), (40 * i, 90, 200), dtype=np.uint8)).save(photos / f"{i}.png")
    common = ["--model", str(tiny_model_dir), "--device", "cpu", "--images", str(photos), "--init-token", "cat",
              "--grad-accum", "1", "--resolution", "32", "--steps", "1", "--checkpoint-every", "1"]
    assert main(["train", *common, "--token", "<c>", "--out", str(root / "c.safetensors")]) == 0
    assert main(["train", *common, "--token", "<x>", "--method", "xti", "--out", str(root / "xti.safetensors")]) == 0
    (root / "folder").mkdir()
    (root / "file.txt").write_text("not a folder")
    (root / "random.bin").write_bytes(np.random.default_rng(0).bytes(4096))
    checkpoint = root / "c-checkpoints" / "checkpoint-000001.safetensors"
    (root / "truncated.safetensors").write_bytes(checkpoint.read_bytes()[:3000])
    torch.save({"state_dict": {"weight": torch.zeros(2)}, "cfg": {"model": {}}}, root / "nokeys.pt")
    concept = Concept.load(root / "c.safetensors")
    tensors = {f"mapper.{k}": v.contiguous() for k, v in concept.mapper.state_dict().items()}
    meta = concept.metadata()
    save_file(tensors, root / "notoken.safetensors", metadata={k: v for k, v in meta.items() if k != "token"})
    config = json.loads(meta["config"])
    config.update(hidden_dim=16, kept_units=16)  # metadata that disagrees with the tensors
    save_file(tensors, root / "mismatch.safetensors", metadata={**meta, "config": json.dumps(config)})
    with open(root / "huge-header.safetensors", "wb") as f:
        f.write(struct.pack("<Q", 10 * 2**30) + b'{"__metadata__":{}}')
    (root / "bomb").mkdir()
    png_claiming(root / "bomb" / "bomb.png", 100_000, 100_000)
    (root / "caption").mkdir()
    info = PngImagePlugin.PngInfo()
    info.add_text("caption", "a {} " + "x" * 10_000_000)
    Image.new("RGB", (32, 32)).save(root / "caption" / "big.png", pnginfo=info)
    return root


def listing(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*"))}


def train(ws: Path, model: Path, *extra: str, token: str = "<d>", out: str = "new/d.safetensors") -> list[str]:
    args = ["train", "--model", str(model), "--device", "cpu", "--images", str(ws / "photos"), "--init-token", "cat",
            "--grad-accum", "1", "--resolution", "32", "--steps", "2", "--token", token, *extra]
    return args + (["--out", str(ws / out)] if "--out" not in extra else [])


# (id, the CLI arguments, text the one line must contain: the value it names)
ROWS = [
    ("divergence", lambda w, m: train(w, m, "--steps", "3", "--lr", "1e6", "--checkpoint-every", "0"),
     "training diverged"),
    ("preview-without-token", lambda w, m: train(w, m, "--preview-every", "1", "--preview-prompt", "a photo of a cat"),
     "'a photo of a cat'"),
    ("train-out-is-a-folder", lambda w, m: train(w, m, out="folder"), "folder' is an existing folder"),
    ("train-out-exists", lambda w, m: train(w, m, out="c.safetensors"), "c.safetensors' already exists"),
    ("train-out-below-a-file", lambda w, m: train(w, m, out="file.txt/d.safetensors"), "file.txt' is a file"),
    ("generate-out-is-a-file", lambda w, m: ["generate", "--model", str(m), "--concept", str(w / "c.safetensors"),
                                             "--prompt", "a {}", "--steps", "1", "--out", str(w / "file.txt")],
     "file.txt' is an existing file"),
    ("export-out-is-a-folder", lambda w, m: ["export", str(w / "c.safetensors"), "--out", str(w / "folder")],
     "folder' is an existing folder"),
    ("export-out-below-a-file", lambda w, m: ["export", str(w / "c.safetensors"), "--out", str(w / "file.txt/x")],
     "file.txt' is a file"),
    ("export-out-name-too-long", lambda w, m: ["export", str(w / "c.safetensors"), "--out", str(w / ("a" * 300))],
     "300 bytes long"),
    ("import-without-mapper-keys", lambda w, m: ["import-official", str(w / "nokeys.pt"), "--out",
                                                 str(w / "new.safetensors")], "nokeys.pt' has no mapper weights"),
    ("import-random-bytes", lambda w, m: ["import-official", str(w / "random.bin"), "--out",
                                          str(w / "new.safetensors")], "random.bin' is not an official NeTI"),
    ("resume-random-bytes", lambda w, m: train(w, m, "--resume", str(w / "random.bin")), "random.bin"),
    ("resume-truncated", lambda w, m: train(w, m, "--resume", str(w / "truncated.safetensors")),
     "truncated.safetensors' is not a readable concept file"),
    ("resume-other-method", lambda w, m: train(w, m, "--resume", str(w / "xti-checkpoints")), "method 'xti'"),
    ("resume-without-more-steps", lambda w, m: train(w, m, "--steps", "1", "--resume", str(w / "c.safetensors"),
                                                     out="c.safetensors"),
     "checkpoint-000001.safetensors' is already at step 1"),
    ("metadata-without-token", lambda w, m: ["info", str(w / "notoken.safetensors")], "without its 'token' metadata"),
    ("metadata-disagrees-with-tensors", lambda w, m: ["info", str(w / "mismatch.safetensors")],
     "does not match its own config"),
    ("header-claims-10-GB", lambda w, m: ["info", str(w / "huge-header.safetensors")],
     "huge-header.safetensors' is not a readable concept file"),
    ("token-in-vocabulary", lambda w, m: train(w, m, token="cat"), "'cat' is already in the tokenizer's vocabulary"),
    ("bare-token-with-a-hyphen", lambda w, m: train(w, m, token="my-cat"), "'my-cat' without angle brackets"),
    ("init-token-not-one-token", lambda w, m: train(w, m, "--init-token", "car"), "super-category 'car'"),
    ("fp16-on-cpu", lambda w, m: train(w, m, "--mixed-precision", "fp16"), "'fp16' needs a CUDA GPU"),
    ("resolution", lambda w, m: train(w, m, "--resolution", "4"), "got 4"),
    ("decompression-bomb", lambda w, m: train(w, m, "--images", str(w / "bomb")), "bomb.png' is 10,000,000,000 pixels"),
    ("caption-of-10-MB", lambda w, m: train(w, m, "--images", str(w / "caption")), "10,000,005 characters"),
]


def check_one_line(code: int, err: str, expected: str, before: dict, after: dict) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected in lines[0] and "Traceback" not in err
    assert after == before, "files were written or removed"


@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_each_bad_input_is_one_line_and_exit_2_with_nothing_written(row, ws, tiny_model_dir, capsys):
    _, argv, expected = row
    before = listing(ws)
    capsys.readouterr()
    code = main(argv(ws, tiny_model_dir))
    check_one_line(code, capsys.readouterr().err, expected, before, listing(ws))


def cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "neti", *args], capture_output=True, text=True, env=env,
                          timeout=300, **kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_each_bad_input_through_the_real_cli_in_a_subprocess(row, ws, tiny_model_dir):
    _, argv, expected = row
    before = listing(ws)
    done = cli(*argv(ws, tiny_model_dir))
    check_one_line(done.returncode, done.stderr, expected, before, listing(ws))


def test_unexpected_errors_are_one_line_and_show_their_traceback_with_v(ws, monkeypatch, capsys):
    import neti.__main__ as cli_module

    def broken(args):
        raise RuntimeError("a bug\nwith two lines")

    monkeypatch.setitem(cli_module.COMMANDS, "info", broken)
    assert main(["info", str(ws / "c.safetensors")]) == 1
    err = capsys.readouterr().err
    assert err.strip() == "error: unexpected RuntimeError: a bug with two lines (rerun with -v for the traceback)"
    with pytest.raises(RuntimeError, match="a bug"):
        main(["-v", "info", str(ws / "c.safetensors")])


def test_force_overwrites_and_a_missing_parent_is_created(ws, tmp_path, capsys):
    target = tmp_path / "made" / "for" / "it.safetensors"
    assert main(["export", str(ws / "c.safetensors"), "--out", str(target), "--fp16"]) == 0
    assert main(["export", str(ws / "c.safetensors"), "--out", str(target)]) == 2
    assert main(["export", str(ws / "c.safetensors"), "--out", str(target), "--force"]) == 0
    assert Concept.load(target).mapper.output_layer.weight.dtype == torch.float32  # rewritten in fp32


def test_a_bare_token_trains_and_matches_only_as_a_whole_word(ws, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "dc.safetensors"
    assert main(train(ws, tiny_model_dir, "--steps", "1", "--checkpoint-every", "0", "--out", str(out),
                      token="dc")) == 0
    assert main(["generate", "--model", str(tiny_model_dir), "--device", "cpu", "--concept", str(out), "--prompt",
                 "a {} next to a red dcx", "--steps", "1", "--out", str(tmp_path / "png")]) == 0
    from neti.images import read_settings

    assert read_settings(next((tmp_path / "png").glob("image-*.png")))["concepts"] == ["dc"]


def test_one_image_or_a_tiny_one_trains_with_a_warning_saying_what_to_expect(ws, tiny_model_dir, tmp_path, caplog):
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (1, 1), (200, 30, 30)).save(tiny)
    out = tmp_path / "one.safetensors"
    assert main(train(ws, tiny_model_dir, "--images", str(tiny), "--steps", "1", "--checkpoint-every", "0",
                      "--out", str(out))) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("only 1 training image(s): NeTI uses 3-10" in w for w in warnings)
    assert any("smaller than the model's 32x32 px (tiny.png is 1x1)" in w and "blurred" in w for w in warnings)
    assert Concept.load(out).train_steps == 1


@pytest.mark.slow  # a real CLI process, killed: CI's slow run
def test_kill_9_during_training_leaves_the_last_checkpoint_loadable_and_resumable(ws, tiny_model_dir, tmp_path):
    from neti.models import load_pipeline
    from neti.checkpoints import latest_checkpoint
    from neti.train import TrainConfig, Trainer

    out = tmp_path / "killed.safetensors"
    folder = tmp_path / "killed-checkpoints"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "neti", *train(ws, tiny_model_dir, "--steps", "100000",
                                                                  "--checkpoint-every", "1", "--keep-checkpoints", "2",
                                                                  "--out", str(out))],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        third = folder / "checkpoint-000003.safetensors"  # the event: a third checkpoint (or the run's end)
        wait_for(lambda: proc.poll() is not None or third.exists(), bool, interval=0.05)
        assert proc.poll() is None, proc.stderr.read().decode()
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not out.exists()  # killed: the concept was never written, the checkpoints are the record
    last = latest_checkpoint(folder)
    step = Concept.load(last).train_steps
    assert step >= 3
    config = TrainConfig(steps=step + 1, batch_size=2, grad_accum=1, resolution=32, checkpoint_every=0)
    result = Trainer(load_pipeline(tiny_model_dir, "cpu"), [Image.open(p) for p in sorted((ws / "photos").iterdir())],
                     "<d>", "cat", config).train(out, resume=folder)
    assert result.steps_done == step + 1 and Concept.load(out).train_steps == step + 1
