"""Background training for a server: one NeTI training at a time (NeTI Sec. 4), observable while it runs.

`TrainingManager` runs a `neti.train.Trainer` in a thread and keeps an immutable `TrainingSnapshot` (loss history
raw and smoothed, speed, time left, previews from step 0, their fidelity and editability scores and the steps
kept (`neti.fidelity`), outcome) that any thread may read, so a page that reloads reconnects to the running job.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

from .config import PreviewConfig, TrainConfig
from .fidelity import FidelityTracker, StepScore
from .previews import Previews
from .progress import about_left
from .train import Trainer, TrainingCallback

logger = logging.getLogger(__name__)

LOSS_EMA = 0.9  # smoothing of the displayed loss curve


class TrainingBusyError(RuntimeError):
    """A training is already running on this server; the message says which and how far it is."""



@dataclass(frozen=True)
class TrainingSnapshot:
    """What the app shows of the current (or last) training; immutable, safe to read from any thread."""

    status: str = "idle"  # idle, running, stopping, finished, stopped, failed
    name: str = ""
    token: str = ""
    model: str = ""
    super_category: str = ""
    config: TrainConfig | None = None  # the job's settings, so that a reloaded page shows them
    preview_config: PreviewConfig | None = None  # the job's preview settings
    step: int = 0
    total: int = 0
    losses: tuple[float, ...] = ()
    smoothed: tuple[float, ...] = ()
    seconds_per_step: float | None = None
    eta_seconds: float | None = None
    previews: tuple[tuple[int, tuple], ...] = ()  # (step, images) from step 0 on
    preview_prompts: tuple[str, ...] = ()
    scores: tuple[StepScore, ...] = ()  # fidelity and editability of each preview (empty without a CLIP)
    best_step: int | None = None  # the best trade-off of `scores`
    kept_steps: tuple[int, ...] = ()  # preview steps whose concept was kept (`steps_dir`), any of which can be kept
    steps_dir: str = ""
    error: str = ""
    output_path: str = ""
    saved: bool = False  # whether the concept file was written (a run stopped before its first step writes none)
    warnings: tuple[str, ...] = ()  # what to expect from these images (too few, too small)
    version: int = 0  # increases with every change

    @property
    def running(self) -> bool:
        return self.status in ("running", "stopping")

    def summary(self) -> str:
        if self.status == "idle":
            return "No training has run on this server yet."
        speed = f", {self.seconds_per_step:.2f} s/step" if self.seconds_per_step else ""
        eta = about_left(self.eta_seconds) if self.running else ""
        loss = f", loss {self.losses[-1]:.4f} (smoothed {self.smoothed[-1]:.4f})" if self.losses else ""
        best = f", best fidelity/editability trade-off at step {self.best_step}" if self.best_step is not None else ""
        head = f"{self.name} (`{self.token}`): {self.status}, step {self.step}/{self.total}{loss}{speed}{eta}{best}"
        if self.status == "failed":
            return f"{head}. Error: {self.error}"
        if self.status in ("finished", "stopped"):
            return f"{head}. Saved as concept '{self.name}'." if self.saved else f"{head}. Nothing was trained: no " \
                "concept was saved."
        return head


class _Recorder(TrainingCallback):
    def __init__(self, job: "TrainingManager"):
        self.job = job

    def on_step(self, info) -> None:
        self.job._record_step(info)

    def on_preview(self, info) -> None:
        self.job._record_preview(info)


def background_threads() -> int:
    """CPU threads for a background training: half the cores (at least one), leaving the rest to generation.

    Torch work from a second Python thread runs its own OpenMP team, which contends with the team of the thread
    that ran torch work first: on this project's 2-core machine a training step in a background thread took
    1.10 s with 2 threads, against 0.43 s with 1 thread and 0.50 s in the main thread (benchmarks/README.md)."""
    import os

    return max(1, (os.cpu_count() or 2) // 2)


class TrainingManager:
    """Runs at most one `Trainer` at a time in a background thread; `snapshot()` is always safe to call.

    While it trains, torch uses `threads` CPU threads (default `background_threads()`; torch's setting is
    process-wide, so generation requests meanwhile use them too); on a GPU they hardly matter."""

    def __init__(self, threads: int | None = None):
        self.threads = threads or background_threads()
        self._lock = threading.Lock()
        self._snap = TrainingSnapshot()
        self._trainer: Trainer | None = None
        self._thread: threading.Thread | None = None
        self._sps_ema: float | None = None

    def snapshot(self) -> TrainingSnapshot:
        with self._lock:
            return self._snap

    def _update(self, **changes) -> None:  # call with the lock held
        self._snap = replace(self._snap, version=self._snap.version + 1, **changes)

    @property
    def running(self) -> bool:
        return self.snapshot().running

    def check_idle(self) -> None:
        """Raise `TrainingBusyError` naming the running job and its progress, if there is one."""
        with self._lock:
            self._check_idle()

    def _check_idle(self) -> None:  # call with the lock held
        s = self._snap
        if s.running:
            left = about_left(s.eta_seconds)
            raise TrainingBusyError(
                f"a training is already running on this server: '{s.name}' ({s.token}) at step {s.step}/{s.total}"
                f"{left}; wait for it or stop it first (one training at a time)")

    def start(self, pipe, model_name: str, images: Sequence, name: str, token: str, super_category: str,
              config: TrainConfig, out_path: Path, on_done=None, previews: PreviewConfig = PreviewConfig(),
              resume: Path | None = None, judge=None, steps_dir: Path | None = None) -> TrainingSnapshot:
        """Build the trainer (bad token, super-category or settings raise here) and train in the background,
        rendering `previews` as it goes; with `resume` (a checkpoint, or a concept with checkpoints) the run
        continues from it. With previews on, the concept at each preview step is kept in `steps_dir` and, with a
        CLIP `judge` (`neti.evaluate.ClipJudge`), each preview is scored (`neti.fidelity`)."""
        with self._lock:
            self._check_idle()
            previous = self._snap
            self._snap = TrainingSnapshot(status="running", name=name, token=token, model=model_name,
                                          super_category=super_category, config=config, preview_config=previews,
                                          total=config.steps, preview_prompts=tuple(previews.prompts),
                                          output_path=str(out_path), steps_dir=str(steps_dir or ""),
                                          version=self._snap.version + 1)
            self._sps_ema = None
        try:
            callbacks = [_Recorder(self), Previews(token, previews)]
            trainer = Trainer(pipe, list(images), token, super_category, config, model_name, callbacks)
            if previews.every and (judge is not None or steps_dir is not None):
                photos = [getattr(im, "image", im) for im in images]
                trainer.callbacks.append(FidelityTracker(judge, photos, trainer.concept, steps_dir, self._record_score,
                                                         on_kept=self._record_kept))
        except BaseException:  # bad token, super-category or settings: nothing started, keep the last job's view
            with self._lock:
                self._snap = replace(previous, version=self._snap.version + 1)
            raise
        with self._lock:  # a Stop pressed while the trainer was being built is honoured now
            self._trainer = trainer
            self._update(warnings=tuple(trainer.warnings))
            if self._snap.status == "stopping":
                trainer.cancel()
        self._thread = threading.Thread(target=self._run, args=(trainer, Path(out_path), on_done, resume),
                                        name=f"neti-train-{name}", daemon=True)
        self._thread.start()
        logger.info("training %s (%s) for %d steps -> %s", name, token, config.steps, out_path)
        return self.snapshot()

    def _run(self, trainer: Trainer, out_path: Path, on_done, resume: Path | None = None) -> None:
        import torch

        previous = torch.get_num_threads()
        torch.set_num_threads(self.threads)  # torch's setting is process-wide: restored when the training ends
        try:
            result = trainer.train(out_path, resume=resume)
            with self._lock:
                self._update(status="stopped" if result.cancelled else "finished", step=result.steps_done,
                             eta_seconds=None, saved=result.saved)
        except Exception as exc:  # shown to the user; the trainer saved what it had
            logger.exception("training %s failed", out_path.name)
            with self._lock:
                self._update(status="failed", error=str(exc) if isinstance(exc, ValueError) else
                             f"{type(exc).__name__}: {exc}", eta_seconds=None, saved=Path(out_path).is_file())
        finally:
            torch.set_num_threads(previous)
            self._trainer = None
            if on_done is not None:
                try:
                    on_done(out_path)
                except Exception:  # pragma: no cover - a notification must not kill the thread
                    logger.exception("on_done failed")

    def _record_step(self, info) -> None:
        with self._lock:
            s = self._snap
            prev = s.smoothed[-1] if s.smoothed else info.loss
            smoothed = info.loss if not s.smoothed else LOSS_EMA * prev + (1 - LOSS_EMA) * info.loss
            self._sps_ema = info.seconds_per_step if self._sps_ema is None else \
                0.8 * self._sps_ema + 0.2 * info.seconds_per_step
            eta = (info.total_steps - info.step) * self._sps_ema
            self._update(step=info.step, total=info.total_steps, losses=s.losses + (float(info.loss),),
                         smoothed=s.smoothed + (float(smoothed),), seconds_per_step=self._sps_ema, eta_seconds=eta)

    def _record_preview(self, info) -> None:
        with self._lock:
            self._update(previews=self._snap.previews + ((info.step, tuple(info.images)),))

    def _record_score(self, score: StepScore, best: int | None) -> None:
        with self._lock:
            self._update(scores=self._snap.scores + (score,), best_step=best)

    def _record_kept(self, step: int) -> None:
        with self._lock:
            self._update(kept_steps=self._snap.kept_steps + (step,))

    def stop(self) -> TrainingSnapshot:
        """Ask the running training to stop after its current micro-batch; it then saves the concept."""
        with self._lock:
            if not self._snap.running:
                raise ValueError("no training is running")
            self._update(status="stopping")
            trainer = self._trainer
        if trainer is not None:
            trainer.cancel()
        return self.snapshot()

    def wait(self, timeout: float | None = None) -> TrainingSnapshot:
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return self.snapshot()
