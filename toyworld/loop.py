"""The toy model's training-loop helpers, shared by every stage (toyworld.train, classifier.py, clip.py).

Atomic checkpoints that resume exactly (batches and noise are pure functions of (seed, step)), pools of rendered
world images, the cosine schedule, one optimiser step, and `Progress`, which prints, says when a checkpoint is
due and turns SIGTERM/SIGINT into a clean stop.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import torch

from toyworld.world import World, render


def save_atomic(state: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict | None:
    return torch.load(path, map_location="cpu", weights_only=True) if path.exists() else None


def images_tensor(world: World, indices) -> torch.Tensor:
    """World images as a float (B, 3, 64, 64) tensor in [-1, 1]."""
    return scenes_tensor([world.scene(int(i)) for i in indices])


def scenes_tensor(scenes) -> torch.Tensor:
    """Rendered scenes as a float (B, 3, 64, 64) tensor in [-1, 1]."""
    images = np.stack([render(s) for s in scenes])
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def image_pool(world: World, first: int, count: int) -> tuple[np.ndarray, list]:
    """`count` world images (uint8, (N, 64, 64, 3)) and scenes from index `first`, rendered once and reused."""
    scenes = [world.scene(i) for i in range(first, first + count)]
    return np.stack([render(s) for s in scenes]), scenes


def pool_batch(images: np.ndarray, step: int, size: int) -> tuple[torch.Tensor, list[int]]:
    """Batch `step` of a pool, cycling through it in order: float (B, 3, 64, 64) in [-1, 1] and pool indices."""
    indices = [(step * size + j) % len(images) for j in range(size)]
    return torch.from_numpy(images[indices]).permute(0, 3, 1, 2).float() / 127.5 - 1, indices


def cosine(done: int, total: int) -> float:
    """The cosine schedule's factor after `done` of `total` steps: 1 at the start, 0 at the end."""
    return float(0.5 * (1 + np.cos(np.pi * done / total)))


def optimise(optimizer: torch.optim.Optimizer, loss: torch.Tensor, clip_params=None) -> None:
    """One optimiser step on `loss`, with gradient-norm clipping to 1 over `clip_params` when given."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip_params is not None:
        torch.nn.utils.clip_grad_norm_(clip_params, 1.0)
    optimizer.step()


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step, stream]).generate_state(1)[0]))


class Progress:
    """Prints a line every `every` seconds, says when a checkpoint is due, and turns SIGTERM/SIGINT into a clean
    stop (the loop saves its checkpoint and exits), so `kill PID` never loses more than the current step."""

    def __init__(self, save_minutes: float, minutes: float | None, every: float = 30.0):
        self.start = self.last_print = self.last_save = time.time()
        self.save_seconds, self.deadline, self.every = save_minutes * 60, minutes and self.start + minutes * 60, every
        self.stopped = False
        self.previous = {sig: signal.signal(sig, self._stop) for sig in (signal.SIGTERM, signal.SIGINT)}

    def close(self) -> None:
        """Give the signal handlers back (the caller may be a test runner)."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _stop(self, signum, frame) -> None:
        print(f"signal {signum}: saving and stopping", flush=True)
        self.stopped = True

    def print(self, text: str) -> None:
        if time.time() - self.last_print >= self.every:
            self.last_print = time.time()
            print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)

    def after_step(self, text: str, save) -> None:
        """Print progress and write a checkpoint with `save()` when one is due."""
        self.print(text)
        if self.save_due():
            save()

    def save_due(self) -> bool:
        if time.time() - self.last_save >= self.save_seconds:
            self.last_save = time.time()
            return True
        return False

    def out_of_time(self) -> bool:
        return self.stopped or (bool(self.deadline) and time.time() >= self.deadline)
