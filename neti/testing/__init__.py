"""Helpers for the project's own tests and benchmarks: tiny SD-shaped models, and the Gradio app as a subprocess.

Like `transformers.testing_utils`, this is not part of the public API. `tiny_model` saves a random-weight
pipeline with SD 1.x's 16 cross-attention layers (NeTI Sec. 3: the space axis of P*) at a test's size, the one
builder the tests use (sd_layout.py, over a closed-vocabulary tokenizer, tokenizer.py), and `tiny_xl_model` its
SDXL counterpart (sdxl_layout.py: two text encoders, 70 cross-attention layers); `AppServer` runs app.py
(it needs a source checkout).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from ..paths import APP_SCRIPT, REPO_ROOT


def tiny_model(folder: Path, words: list[str], seed: int = 0, prediction_type: str = "epsilon", **shape) -> Path:
    """Save a random-weight SD-1.x-shaped pipeline (16 cross-attention layers; `SDShape`'s tiny sizes unless `shape`
    says otherwise) whose tokenizer knows `words` as single tokens to `folder`/model (diffusers layout)."""
    from .sd_layout import SDShape, build_pipeline
    from .tokenizer import build_clip_tokenizer

    shape = SDShape(**shape)
    pipe = build_pipeline(shape, build_clip_tokenizer(words, folder / "vocab", max_length=shape.max_tokens), seed=seed)
    pipe.scheduler.register_to_config(prediction_type=prediction_type)
    pipe.save_pretrained(folder / "model")
    return folder / "model"


def tiny_xl_model(folder: Path, words: list[str], seed: int = 0, **shape) -> Path:
    """Save a random-weight SDXL-shaped pipeline (70 cross-attention layers, two text encoders; `SDXLShape`'s tiny
    sizes unless `shape` says otherwise) whose tokenizers know `words` as single tokens to `folder`/model."""
    from .sdxl_layout import SDXLShape, build_xl_pipeline
    from .tokenizer import build_clip_tokenizer

    shape = SDXLShape(**shape)
    tokenizer = build_clip_tokenizer(words, folder / "vocab", max_length=shape.max_tokens)
    build_xl_pipeline(shape, tokenizer, seed=seed).save_pretrained(folder / "model")
    return folder / "model"


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
            [sys.executable, str(APP_SCRIPT), "--model", str(model), "--concepts-dir", str(concepts_dir),
             "--port", str(self.port), *extra_args], cwd=REPO_ROOT, env=env, stdout=self._log,
            stderr=subprocess.STDOUT)
        self.startup_seconds = self.wait()

    def wait(self, timeout: float = 120) -> float:
        """Seconds from launch until the page is served (polling it); an error if the app exits first."""
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
