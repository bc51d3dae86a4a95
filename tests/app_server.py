"""Helpers for the app tests: a tiny base model on disk and `python app.py` running on a free port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Enough of the toy world's vocabulary for the prompts the tests write.
APP_WORDS = ["a", "photo", "of", "the", "on", "background", "shape", "object", "white", "blue", "red", "green",
             "yellow", "black", "circle", "square", "heart", "two", "rendering", "picture"]


def build_tiny_model(folder: Path, resolution: int = 32) -> Path:
    """A random-weight SD-1.x-shaped pipeline (16 cross-attention layers) saved in diffusers layout."""
    from toyworld.sd_layout import SDShape, build_pipeline
    from toyworld.tokenizer import build_clip_tokenizer

    tokenizer = build_clip_tokenizer(APP_WORDS, folder / "vocab", max_length=32)
    model = folder / "model"
    build_pipeline(SDShape(resolution=resolution, max_tokens=32), tokenizer, seed=0).save_pretrained(model)
    return model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AppServer:
    """`python app.py --model MODEL --concepts-dir DIR --port P` as a subprocess; `url` once it serves."""

    def __init__(self, model: Path, concepts_dir: Path, log: Path, extra_args: list[str] = (),
                 extra_env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "2",
               "PYTHONUNBUFFERED": "1", **(extra_env or {})}
        self.log_path = log
        self._log = open(log, "w")
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "app.py"), "--model", str(model), "--concepts-dir", str(concepts_dir),
             "--port", str(self.port), *extra_args], cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        self.startup_seconds = self.wait()

    def wait(self, timeout: float = 120) -> float:
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"app.py exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url, timeout=2) as r:
                    if r.status == 200:
                        return time.perf_counter() - self.started
            except OSError:
                time.sleep(0.3)
        raise TimeoutError(f"app.py did not serve {self.url} in {timeout} s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()[-5000:]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()
