"""The NeTI trainer, and the TI / XTI baselines in the same loop (NeTI Sec. 4 and 5.1; App. A).

Only the concept's representation trains; UNet, VAE and text encoder stay frozen. Each micro-batch draws images,
prompt templates, noise and timesteps t ~ U{0..999}, encodes the prompts for all cross-attention layers at the
samples' timesteps in one batched text-encoder pass (conditioning.py), and regresses the noise (or the velocity
for v-prediction models). Defaults follow the paper: batch 2, gradient accumulation 4, AdamW, lr 1e-3 scaled by
batch x accumulation x processes, constant schedule, 500 steps. Accumulation is for memory: on the CPU (or with
`accumulation="fused"`) a step's micro-batches, each conditioned with its own draws, share one UNet pass, which
gives the same loss and gradients about twice as fast on the bundled model. The frozen VAE encodes each distinct
photo once per run.

Everything random in micro-batch m is drawn under a seed derived from (seed, m), so a run stopped and resumed
from a checkpoint (checkpoints.py: weights, optimiser, lr schedule, step, random states) continues exactly as if
uninterrupted. A cancel request stops after the current micro-batch and saves the concept. What happens around
the loop (progress, previews: neti.previews) is the callers' `TrainingCallback`s.

Launched on several processes (`torchrun`, `accelerate launch`) the run is data-parallel: each process draws its
own micro-batches (its seed is offset by its rank), the concept is wrapped in DistributedDataParallel, whose
all-reduce averages the gradients at the last micro-batch of each step, so every process takes the same
optimisation step and the mappers stay equal; the step's loss is averaged over the processes. Only the main process
(rank 0) writes the concept and its checkpoints.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from . import checkpoints
from .attention import ensure_processors, pack
from .concept import Concept
from .conditioning_xl import added_conditions, conditioner_for
from .config import TrainConfig
from .data import ConceptDataset, LoadedImage, image_warnings, template_kind
from .layers import cross_attention_layers
from .models import model_label
from .precision import resolve_mixed_precision

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepInfo:
    step: int  # optimisation steps done
    total_steps: int
    loss: float  # mean loss of this step's micro-batches
    learning_rate: float
    seconds_per_step: float


@dataclass(frozen=True)
class PreviewInfo:
    step: int
    images: list  # PIL images, one per (prompt, seed), prompt-major
    prompts: list[str]
    seeds: list[int]


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    path: Path


class TrainingCallback:
    """Override what you need; the trainer calls these from its own thread, on every process."""

    def on_train_start(self, trainer: "Trainer") -> None:
        """Before the first step of `train` (step 0, or the step a resume continues from)."""

    def on_step(self, info: StepInfo) -> None: ...

    def on_preview(self, info: PreviewInfo) -> None:
        """A preview rendered by a `neti.previews.Previews` callback of the same trainer."""

    def on_checkpoint(self, info: CheckpointInfo) -> None: ...


@dataclass
class Batch:
    pixel_values: torch.Tensor  # (B, 3, R, R)
    prompts: list[str]
    noise: torch.Tensor  # (B, C, h, w)
    timesteps: torch.Tensor  # (B,)

    @staticmethod
    def concat(batches: list["Batch"]) -> "Batch":
        return Batch(torch.cat([b.pixel_values for b in batches]), [p for b in batches for p in b.prompts],
                     torch.cat([b.noise for b in batches]), torch.cat([b.timesteps for b in batches]))


@dataclass
class TrainResult:
    concept: Concept
    path: Path
    steps_done: int
    cancelled: bool
    losses: list[float] = field(default_factory=list)
    saved: bool = True  # False when nothing was trained (stopped before the first step): no file was written


class TrainingDiverged(ValueError):
    """The loss or the weights became NaN or infinite; the message says what was kept."""


def weights_digest(module: torch.nn.Module) -> str:
    """A short hash of `module`'s state (names and exact bytes): equal on every process of a data-parallel run."""
    digest = hashlib.sha1()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _seed_for(seed: int, micro_step: int) -> int:
    return (seed * 1_000_003 + micro_step * 7_919 + 17) % (2**63 - 1)


def _prepare(pipe, concept: Concept, config: TrainConfig):
    """Freeze `pipe`; an accelerator for `config`'s precision, and the prepared (concept, AdamW, lr schedule), and
    the learning rate."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from diffusers.optimization import get_scheduler

    for module in (pipe.unet, pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
        if module is None:
            continue
        module.requires_grad_(False)
    device = pipe.device
    precision = resolve_mixed_precision(config.mixed_precision, pipe.unet.dtype, device)
    if AcceleratorState._shared_state and AcceleratorState().mixed_precision != precision:
        AcceleratorState._reset_state()  # a later trainer in this process may use another precision
    accelerator = Accelerator(mixed_precision=precision, cpu=device.type == "cpu")
    lr = config.base_learning_rate()
    if config.scale_lr:
        lr *= config.batch_size * config.grad_accum * accelerator.num_processes
    concept.to(accelerator.device)
    optimizer = torch.optim.AdamW(concept.parameters(), lr=lr, betas=config.adam_betas,
                                  weight_decay=config.weight_decay, eps=config.adam_eps)
    schedule = get_scheduler("constant_with_warmup" if config.lr_warmup_steps else "constant", optimizer,
                             num_warmup_steps=config.lr_warmup_steps)
    return accelerator, *accelerator.prepare(concept, optimizer, schedule), lr


def _dataset(images: Sequence[Image.Image | LoadedImage], resolution: int, config: TrainConfig):
    """The training data at `resolution`, and what the user should know about the images (also logged)."""
    warnings = image_warnings(images, resolution)
    for warning in warnings:
        logger.warning(warning)
    return ConceptDataset(list(images), resolution, template_kind(config.templates), flip_p=config.flip_p,
                          crop=config.crop, seed=config.seed, use_captions=config.use_captions), warnings


def _noise_scheduler(pipe):
    """The forward process of training: DDPM with the pipeline's noise schedule and prediction type."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipe.scheduler.config)


def _gradient_checkpointing(pipe, config: TrainConfig, on: bool) -> None:
    """Gradient checkpointing of the frozen UNet and text encoder as `config` asks, switched off after training."""
    unet = pipe.unet
    if on and config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if not on and getattr(unet, "is_gradient_checkpointing", False):
        unet.disable_gradient_checkpointing()
    for text_encoder in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):  # SDXL has two
        if text_encoder is None:
            continue
        if on and (config.gradient_checkpointing or config.text_encoder_checkpointing):
            text_encoder_checkpointing(text_encoder, True)
        if not on and is_checkpointing(text_encoder):
            text_encoder_checkpointing(text_encoder, False)


def is_checkpointing(text_encoder) -> bool:
    """Whether a transformers text encoder's activation checkpointing is on (either release's name)."""
    state = getattr(text_encoder, "is_activation_checkpointing", None)
    return bool(getattr(text_encoder, "is_gradient_checkpointing", False) if state is None else state)


def text_encoder_checkpointing(text_encoder, on: bool) -> None:
    """Switch a transformers text encoder's activation checkpointing on or off (transformers 5 names it
    `activation_checkpointing_*`, older releases `gradient_checkpointing_*`); it checkpoints only in training mode,
    which changes nothing else in CLIP (no dropout)."""
    prefix = "activation" if hasattr(text_encoder, "activation_checkpointing_enable") else "gradient"
    getattr(text_encoder, f"{prefix}_checkpointing_{'enable' if on else 'disable'}")()
    text_encoder.train(on)


def _accumulate_gradients(trainer: "Trainer") -> tuple[float, float]:
    """Forward and backward the micro-batches of `trainer`'s next optimisation step; returns this process's loss
    and the loss every process agrees on (their mean). With several processes gradients accumulate locally and
    the last micro-batch's backward all-reduces them. Fused, the micro-batches are conditioned one by one (the
    same nested-dropout draws as sequential) and share one UNet pass: their mean loss is the same number."""
    cfg, accelerator = trainer.config, trainer._accelerator
    micro_steps = range(trainer.step * cfg.grad_accum, (trainer.step + 1) * cfg.grad_accum)
    if trainer.fused:
        batches = [trainer.make_batch(m) for m in micro_steps]
        conditions = [_conditions(trainer, m, b) for m, b in zip(micro_steps, batches)]
        loss = trainer.loss(Batch.concat(batches), _concat_conditions(conditions))
        accelerator.backward(loss)
        loss_sum = float(loss.detach())
    else:
        loss_sum = 0.0
        for micro_step in micro_steps:
            sync = contextlib.nullcontext() if micro_step == micro_steps[-1] else accelerator.no_sync(trainer.model)
            with sync:
                batch = trainer.make_batch(micro_step)
                loss = trainer.loss(batch, _conditions(trainer, micro_step, batch))
                accelerator.backward(loss / cfg.grad_accum)
            loss_sum += float(loss.detach()) / cfg.grad_accum
    if accelerator.num_processes == 1:
        return loss_sum, loss_sum
    return loss_sum, float(accelerator.reduce(torch.tensor(loss_sum, device=accelerator.device), "mean"))


def _fuses(config: TrainConfig, device: torch.device) -> bool:
    """Whether a step's micro-batches share one UNet pass (`TrainConfig.accumulation`; auto: on the CPU)."""
    mode = config.accumulation
    return config.grad_accum > 1 and (mode == "fused" or mode == "auto" and device.type == "cpu")


def _optimiser_step(trainer: "Trainer") -> bool:
    """Step the optimiser and the learning-rate schedule; whether the weights are all still finite."""
    trainer.optimizer.step()
    trainer.lr_scheduler.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    return bool(torch.stack([torch.isfinite(p).all() for p in trainer.concept.parameters()]).all())


def _concat_conditions(conditions: list[tuple[torch.Tensor, dict | None]]) -> tuple[torch.Tensor, dict | None]:
    states, added = zip(*conditions)
    if added[0] is None:
        return torch.cat(states), None
    return torch.cat(states), {k: torch.cat([a[k] for a in added]) for k in added[0]}


def _conditions(trainer: "Trainer", micro_step: int | None, batch: Batch) -> tuple[torch.Tensor, dict | None]:
    """The UNet's text conditioning of `batch` (packed per-layer keys/values, and SDXL's added conditions), with
    micro-batch `micro_step`'s nested-dropout draws (None: the global random state's)."""
    with contextlib.ExitStack() as stack:
        if micro_step is not None:
            stack.enter_context(torch.random.fork_rng(devices=[]))
            torch.manual_seed(trainer._seed(micro_step) + 1)  # nested dropout
        with trainer._accelerator.autocast():
            return trainer.encoder_states(batch.prompts, batch.timesteps), _added_conditions(trainer, batch)


def _added_conditions(trainer: "Trainer", batch: Batch) -> dict | None:
    """SDXL's pooled embedding per sample at its timestep and its size conditioning (conditioning_xl.py); None on SD
    1.x/2.x."""
    added = added_conditions(trainer.conditioner, batch.prompts, batch.timesteps, len(trainer.layers),
                             {trainer.concept.token: trainer.model}, trainer.resolution)
    return None if added is None else {k: v.to(trainer.pipe.unet.dtype) for k, v in added.items()}


class LatentCache:
    """The frozen VAE's scaled posterior means of training images. Each distinct image (a concept's 3-10 photos,
    flipped or not) is encoded once, alone, and remembered, up to `size` of them (random crops rarely repeat)."""

    def __init__(self, size: int = 64):
        self.size, self.found = size, {}

    @torch.no_grad()
    def __call__(self, vae, pixel_values: torch.Tensor, device: torch.device) -> torch.Tensor:
        latents = []
        for image in pixel_values:
            key = hashlib.blake2b(image.contiguous().cpu().numpy().tobytes(), digest_size=16).digest()
            latent = self.found.get(key)
            if latent is None:
                latent = vae.encode(image[None].to(device, vae.dtype)).latent_dist.mean[0] * vae.config.scaling_factor
                if len(self.found) < self.size:
                    self.found[key] = latent
            latents.append(latent)
        return torch.stack(latents)


class _Digest:
    """`weights_digest(module)`, computed only when a debug line is actually written."""

    def __init__(self, module):
        self.module = module

    def __str__(self) -> str:
        return weights_digest(self.module)


class Trainer:
    """Trains one concept on a loaded `StableDiffusionPipeline`'s (or SDXL's) frozen components."""

    def __init__(self, pipe, images: Sequence[Image.Image | LoadedImage], token: str, super_category: str,
                 config: TrainConfig = TrainConfig(), model_name: str = "", callbacks: Sequence[TrainingCallback] = ()):
        if not images:
            raise ValueError("training needs at least one image")
        self.pipe, self.config, self.model_name, self.callbacks = pipe, config, model_label(model_name), list(callbacks)
        self.stopping, self.step = threading.Event(), 0  # stopping: set by cancel()
        self.concept = Concept.for_pipeline(pipe, token, super_category, config.mapper_config(), self.model_name)
        self.layers = cross_attention_layers(pipe.unet)
        self.conditioner = conditioner_for(pipe)
        ensure_processors(pipe.unet, self.layers, self.conditioner.max_length)
        self.resolution = config.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
        self.dataset, self.warnings = _dataset(images, self.resolution, config)
        self.noise_scheduler = _noise_scheduler(pipe)
        self._latents, self.fused = LatentCache(), _fuses(config, pipe.device)
        self._last_checkpoint: tuple[Path, int] | None = None  # the newest checkpoint written or resumed, its step
        self._accelerator, self.model, self.optimizer, self.lr_scheduler, self.learning_rate = _prepare(
            pipe, self.concept, config)

    @property
    def is_main_process(self) -> bool:
        return self._accelerator.process_index == 0

    def cancel(self) -> None:
        """Ask the loop to stop after the current micro-batch; the concept is saved with its step count."""
        self.stopping.set()

    # ---- one micro-batch -------------------------------------------------------------------------------------
    def _seed(self, micro_step: int) -> int:
        return _seed_for(self.config.seed + 7919 * self._accelerator.process_index, micro_step)

    def make_batch(self, micro_step: int) -> Batch:
        """The data, noise and timesteps of micro-batch `micro_step`: a function of (seed, micro_step) only."""
        g = torch.Generator().manual_seed(self._seed(micro_step))
        indices = torch.randint(len(self.dataset), (self.config.batch_size,), generator=g).tolist()
        items = [self.dataset[i] for i in indices]
        latent_hw = self.resolution // self.pipe.vae_scale_factor
        noise = torch.randn(len(items), self.pipe.unet.config.in_channels, latent_hw, latent_hw, generator=g)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (len(items),), generator=g)
        return Batch(torch.stack([it["pixel_values"] for it in items]),
                     [it["template"].format(self.concept.token) for it in items], noise, timesteps)

    def encoder_states(self, prompts: list[str], timesteps: torch.Tensor, truncation: int | None = None) -> torch.Tensor:
        """Packed per-layer keys/values for each sample at its timestep, all layers of all samples in one pass (one
        per sample if the concept ignores the layer, as TI does): (B, L * 2 * S, D)."""
        tokenized = [self.conditioner.tokenize(p, [self.concept.token]) for p in prompts]
        num_layers, batch = len(self.layers), len(prompts)
        per = num_layers if self.concept.depends_on_layer else 1
        enc = self.conditioner.encode_rows(tokenized, torch.arange(batch).repeat_interleave(per),
                                           timesteps.float().repeat_interleave(per),
                                           torch.arange(per).repeat(batch).float(), {self.concept.token: self.model},
                                           truncation)
        keys, values = (x.view(batch, per, *x.shape[1:]).expand(-1, num_layers, -1, -1) for x in (enc.keys, enc.values))
        return pack(keys, values)

    def loss(self, batch: Batch, conditions: tuple[torch.Tensor, dict | None] | None = None) -> torch.Tensor:
        """The denoising loss of `batch` under `conditions` (`_conditions(self, None, batch)` if not given)."""
        pipe = self.pipe
        latents = self._latents(pipe.vae, batch.pixel_values, pipe.device)
        noise, timesteps = batch.noise.to(pipe.device, latents.dtype), batch.timesteps.to(pipe.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        v_prediction = self.noise_scheduler.config.prediction_type == "v_prediction"
        target = self.noise_scheduler.get_velocity(latents, noise, timesteps) if v_prediction else noise
        states, added = conditions if conditions is not None else _conditions(self, None, batch)
        with self._accelerator.autocast():
            pred = pipe.unet(noisy.to(pipe.unet.dtype), timesteps, states.to(pipe.unet.dtype),
                             added_cond_kwargs=added).sample
        return F.mse_loss(pred.float(), target.float())

    def evaluation_loss(self, batch: Batch) -> float:
        """Loss on a fixed batch without nested dropout (eval mode), for tracking progress."""
        was_training, _ = self.concept.training, self.concept.eval()
        with torch.no_grad():
            value = float(self.loss(batch))
        self.concept.train(was_training)
        return value

    # ---- the loop --------------------------------------------------------------------------------------------
    def train(self, out_path: str | Path, resume: str | Path | None = None) -> TrainResult:
        """Train to `config.steps` (from a checkpoint, or a finished run's concept, if `resume`), saving the
        concept to `out_path`. A NaN or infinite loss or weight stops the run (`TrainingDiverged`) and keeps the
        last checkpoint as the concept, or writes nothing; a run that trained no step writes nothing."""
        cfg, out_path, losses = self.config, Path(out_path), []
        if resume is not None:
            path, self.step = checkpoints.resume(resume, self.concept, self.optimizer, self.lr_scheduler, cfg)
            self._last_checkpoint = path, self.step
            logger.info("resumed %s from %s at step %d", self.concept.token, path, self.step)
        self._keep = True  # False after a divergence with no finite checkpoint to fall back on
        self.concept.train()
        _gradient_checkpointing(self.pipe, cfg, True)
        try:
            for cb in self.callbacks:
                cb.on_train_start(self)
            while self.step < cfg.steps and not self.stopping.is_set():
                started, (local_loss, step_loss) = time.perf_counter(), _accumulate_gradients(self)
                if not math.isfinite(step_loss):
                    self._diverged(f"the loss became {step_loss} at step {self.step + 1}")
                if not _optimiser_step(self):
                    self._diverged(f"the weights became NaN or infinite at step {self.step + 1}")
                self.step = self.concept.train_steps = self.step + 1
                losses.append(step_loss)
                logger.debug("step %d on process %d: local loss %.6f, mapper weights %s", self.step,
                             self._accelerator.process_index, local_loss, _Digest(self.concept.mapper))
                info = StepInfo(self.step, cfg.steps, step_loss, self.lr_scheduler.get_last_lr()[0],
                                time.perf_counter() - started)
                for cb in self.callbacks:
                    cb.on_step(info)
                if cfg.checkpoint_every and (self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps):
                    self.save_checkpoint(out_path)  # the final one too: a finished run can be extended
        finally:  # finished, cancelled or crashed: the concept so far is saved (never untrained, never NaN)
            self.concept.eval()
            _gradient_checkpointing(self.pipe, cfg, False)
            saved = self._keep and self.step > 0 and self.is_main_process
            if saved:
                self.concept.save(out_path)
                logger.info("saved %s after %d steps to %s", self.concept.token, self.step, out_path)
            elif self.step == 0:
                logger.info("%s trained no step: nothing saved to %s", self.concept.token, out_path)
        return TrainResult(self.concept, out_path, self.step, self.stopping.is_set(), losses, saved)

    def _diverged(self, what: str) -> None:
        """Put the last checkpoint's weights back (if any) and raise `TrainingDiverged` saying what was kept."""
        if self._last_checkpoint is not None:
            kept, self.step = self._last_checkpoint
            if self.is_main_process:  # the other processes of a data-parallel run write nothing
                checkpoints.restore_weights(kept, self.concept)
            outcome = f"the concept is kept at step {self.step} from its last checkpoint {str(kept)!r}"
        else:
            self._keep = False
            outcome = "nothing was saved (no checkpoint with finite weights yet)"
        raise TrainingDiverged(f"training diverged: {what}; {outcome}. Lower the learning rate (it was "
                               f"{self.learning_rate:g} after scaling) or turn mixed precision off")

    def save_checkpoint(self, out_path: str | Path) -> Path:
        """Write a checkpoint of this step beside `out_path` (checkpoints.py) and tell the callbacks; the other
        processes of a data-parallel run only note the checkpoint the main process writes."""
        if not self.is_main_process:
            self._last_checkpoint = checkpoints.checkpoint_path(out_path, self.step), self.step
            return self._last_checkpoint[0]
        path = checkpoints.save_checkpoint(out_path, self.concept, self.optimizer, self.lr_scheduler, self.config,
                                           self.step)
        self._last_checkpoint = path, self.step
        for cb in self.callbacks:
            cb.on_checkpoint(CheckpointInfo(self.step, path))
        return path
