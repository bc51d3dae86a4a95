"""Previews while a concept trains: the preview prompts rendered with the current mapper (NeTI Sec. 4-5).

`Previews` is a `TrainingCallback` the CLI and the app pass to the `Trainer`: at step 0 and every
`PreviewConfig.every` steps (on the main process) it renders every preview prompt and seed in one batch with the
core generator on the trainer's pipeline, under fixed seeds and without touching the training's random state,
and hands the `PreviewInfo` to every callback of that trainer (`on_preview`).
"""

from __future__ import annotations

import torch

from .conditioning import format_prompt
from .config import DEFAULT_BYPASS_ALPHA, PreviewConfig
from .generate import Generator, Row, Sampling
from .train import PreviewInfo, Trainer, TrainingCallback


class Previews(TrainingCallback):
    """Render `config`'s prompts for the concept `token` while it trains; a prompt that cannot render is refused
    here, before any training starts."""

    def __init__(self, token: str, config: PreviewConfig = PreviewConfig()):
        for prompt in config.prompts:
            format_prompt(prompt, [token])
        self.config = config
        self.trainer: Trainer | None = None

    def on_train_start(self, trainer: Trainer) -> None:
        self.trainer = trainer
        if trainer.step == 0 and not trainer.stopping.is_set():
            self.render()

    def on_step(self, info) -> None:
        if self.config.every and info.step % self.config.every == 0:
            self.render()

    def render(self) -> PreviewInfo | None:
        """Render the previews of the trainer's current step (main process only) and hand them to its callbacks."""
        trainer, cfg = self.trainer, self.config
        if not cfg.every or trainer is None or not trainer.is_main_process:
            return None
        generator = Generator(trainer.pipe, trainer.model_name)
        sampling = Sampling(steps=cfg.steps, guidance=cfg.guidance)
        timesteps = generator.timesteps(sampling)
        rows, prompts, seeds = [], [], []
        for prompt in cfg.prompts:  # every prompt and seed in one batch
            encoding = generator.encode(prompt, [trainer.concept], timesteps, None, DEFAULT_BYPASS_ALPHA)
            rows += [Row(encoding, seed, {"prompt": prompt}) for seed in cfg.seeds]
            prompts += [prompt] * len(cfg.seeds)
            seeds += list(cfg.seeds)
        with torch.random.fork_rng(devices=[]):
            images = generator.render(rows, sampling).images
        info = PreviewInfo(trainer.step, images, prompts, seeds)
        for cb in trainer.callbacks:
            cb.on_preview(info)
        return info
