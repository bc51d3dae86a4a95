"""Helpers for the project's own tests and benchmarks: the Gradio app (app.py) as a subprocess on a free port.

Like `transformers.testing_utils`, this is not part of the public API; it needs a source checkout (app.py).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from .paths import APP_SCRIPT, REPO_ROOT


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
