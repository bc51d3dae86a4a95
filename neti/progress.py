"""Per-step progress of a denoising run with time left, and an Interrupt that ends it early.

`Generator` methods take `on_step(done, total) -> bool` (diffusers' `callback_on_step_end`, once per sampler
step); returning True interrupts the run: the sampler skips its remaining steps and the images are decoded from
the latents reached so far, as AUTOMATIC1111's Interrupt does. `StepReporter` is such a callback: it estimates
the time left from the mean time per step so far and asks an `threading.Event` whether to stop.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Callable

StepCallback = Callable[[int, int], bool]  # (steps done, total steps) -> interrupt?


def interrupt_if_asked(pipeline, i: int, steps: int, on_step: "StepCallback | None", done: list[int]) -> None:
    """Denoising step i finished: report it to `on_step`; when that returns True (and steps remain), set diffusers'
    interrupt flag, so the remaining steps are skipped, and record the steps done in `done[0]`."""
    if on_step is not None and on_step(i + 1, steps) and i + 1 < steps:
        pipeline._interrupt = True
        done[0] = i + 1
        logging.getLogger(__name__).info("interrupted after %d of %d steps", i + 1, steps)


def format_seconds(seconds: float | None) -> str:
    """'42 s', '3 min 05 s', or '?' when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def about_left(seconds: float | None) -> str:
    """', about 12 s left' to append to a status line, or '' when the time left is unknown or nothing is left."""
    return f", about {format_seconds(seconds)} left" if seconds else ""


def time_left(done: int, total: int, elapsed: float) -> float | None:
    """Seconds left at the mean pace so far; None before the first step."""
    return None if done <= 0 else elapsed / done * max(0, total - done)


class StepReporter:
    """An `on_step` callback: calls `report(done, total, text)` with 'step 5/25, about 12 s left', and returns
    whether `interrupt` is set."""

    def __init__(self, report: Callable[[int, int, str], None] | None, interrupt: threading.Event | None = None,
                 what: str = "step", clock: Callable[[], float] = time.perf_counter):
        self.report, self.interrupt, self.what, self.clock = report, interrupt, what, clock
        self.started = clock()
        self.done = 0

    def __call__(self, done: int, total: int) -> bool:
        self.done = done
        if self.report is not None:
            left = time_left(done, total, self.clock() - self.started)
            eta = about_left(left) if done < total else ""
            self.report(done, total, f"{self.what} {done}/{total}{eta}")
        return self.interrupt is not None and self.interrupt.is_set()
