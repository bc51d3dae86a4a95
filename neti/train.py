"""The NeTI trainer, and the TI / XTI baselines in the same loop (NeTI Sec. 4 and 5.1; App. A).

Only the concept's representation trains; UNet, VAE and text encoder stay frozen. Each micro-batch draws images,
prompt templates, noise and timesteps t ~ U{0..999}, encodes the prompts for all cross-attention layers at the
samples' timesteps in one batched text-encoder pass (conditioning.py), and regresses the noise (or the velocity
for v-prediction models). Defaults follow the paper: batch 2, gradient accumulation 4, AdamW, lr 1e-3 scaled by
batch x accumulation x processes, constant schedule, 500 steps.

Everything random in micro-batch m is drawn under a seed derived from (seed, m), so a run stopped and resumed
from a checkpoint (weights, optimiser, lr schedule, step, random states) continues exactly as if uninterrupted.
Checkpoints are concept files with the optimiser state inside; they are written atomically and are themselves
loadable concepts. A cancel request stops after the current micro-batch and saves the concept.
"""

from __future__ import annotations

import json
import logging
import math
import random
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from .attention import ensure_processors, pack
from .concept import Concept, atomic_write, mapper_weights, one_line, read_header, read_tensors
from .conditioning import TextConditioner, check_placeholder_token, format_prompt, super_category_id
from .config import DEFAULT_BYPASS_ALPHA, METHODS, MapperConfig, _known_fields
from .data import CROP_MODES, ConceptDataset, LoadedImage, image_warnings, template_kind
from .layers import cross_attention_layers
from .models import model_label
from .precision import DEFAULT_MIXED_PRECISION, MIXED_PRECISION, resolve_mixed_precision

logger = logging.getLogger(__name__)

BASE_LEARNING_RATES = {"neti": 1e-3, "xti": 6.25e-4, "ti": 5e-4}  # before scaling by batch x accumulation
ABLATIONS = ("no_positional_encoding", "no_nested_dropout", "no_bypass", "no_rescaling", "time_only", "space_only")


@dataclass(frozen=True)
class TrainConfig:
    """How to train; saved in every checkpoint so that a resume can check it continues the same run."""

    method: str = "neti"  # "neti", "xti" or "ti"
    ablations: tuple[str, ...] = ()  # any of ABLATIONS (NeTI only)
    steps: int = 500  # optimisation steps
    batch_size: int = 2
    grad_accum: int = 4  # micro-batches per optimisation step
    learning_rate: float | None = None  # None: the method's default (BASE_LEARNING_RATES)
    scale_lr: bool = True  # multiply by batch x accumulation x processes (1e-3 -> 8e-3)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-2
    adam_eps: float = 1e-8
    lr_warmup_steps: int = 0  # constant schedule after warm-up
    templates: str = "object"  # "object" or "style" prompt templates
    use_captions: bool = True  # an image's own caption (neti.data.read_caption) replaces the random template
    flip_p: float = 0.5
    crop: str = "center"
    resolution: int | None = None  # None: the base model's resolution
    seed: int = 0
    mixed_precision: str = DEFAULT_MIXED_PRECISION  # "auto" (follow the weights), "no", "fp16" (CUDA), "bf16"
    gradient_checkpointing: bool = False  # of the UNet and the text encoder: less memory, ~30% more time
    # of the text encoder alone: exact, ~5x less memory for the 16 per-layer text rows per sample (SD 1.5, batch 2:
    # 1.36 GB -> 0.27 GB in fp32) for one more text-encoder forward (docs/efficiency.md)
    text_encoder_checkpointing: bool = True
    per_layer_conditioning: bool = False  # the official loop: one text-encoder pass per layer (for benchmarks)
    checkpoint_every: int = 100  # optimisation steps between checkpoints; 0 turns them off
    keep_checkpoints: int = 3
    preview_every: int = 0  # optimisation steps between previews (step 0 included); 0 turns them off
    preview_prompts: tuple[str, ...] = ("a photo of a {}",)
    preview_seeds: tuple[int, ...] = (0,)
    preview_steps: int = 20  # sampler steps of a preview
    preview_guidance: float = 7.5

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r} is unknown; use one of {', '.join(METHODS)}")
        unknown = [a for a in self.ablations if a not in ABLATIONS]
        if unknown:
            raise ValueError(f"unknown ablation(s) {unknown}; use any of {', '.join(ABLATIONS)}")
        if self.ablations and self.method != "neti":
            raise ValueError(f"ablations apply to the NeTI mapper only, not to method {self.method!r}")
        if "time_only" in self.ablations and "space_only" in self.ablations:
            raise ValueError("time_only and space_only together leave the mapper no input; pick one")
        for name in ("steps", "batch_size", "grad_accum", "keep_checkpoints", "preview_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("checkpoint_every", "preview_every", "lr_warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.learning_rate is not None and not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate!r}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision {self.mixed_precision!r} is unknown; use one of {MIXED_PRECISION}")
        template_kind(self.templates)
        if not 0 <= self.flip_p <= 1:
            raise ValueError(f"flip_p must be a probability from 0 to 1, got {self.flip_p!r}")
        if self.crop not in CROP_MODES:
            raise ValueError(f"crop {self.crop!r} is unknown; use one of {', '.join(CROP_MODES)}")
        if self.resolution is not None and (isinstance(self.resolution, bool) or not isinstance(self.resolution, int)
                                            or self.resolution < 8):
            raise ValueError(f"resolution must be an integer of at least 8 pixels (or None), got {self.resolution!r}")
        if not self.preview_prompts or not self.preview_seeds:
            raise ValueError("previews need at least one prompt and one seed")

    def base_learning_rate(self) -> float:
        return self.learning_rate if self.learning_rate is not None else BASE_LEARNING_RATES[self.method]

    def mapper_config(self, token_dim: int, num_layers: int, target_norm: float) -> MapperConfig:
        a = set(self.ablations)
        return MapperConfig(
            method=self.method, token_dim=token_dim, num_layers=num_layers, target_norm=target_norm,
            use_positional_encoding="no_positional_encoding" not in a, use_nested_dropout="no_nested_dropout" not in a,
            use_bypass="no_bypass" not in a, use_rescaling=self.method == "neti" and "no_rescaling" not in a,
            use_time="space_only" not in a, use_layer="time_only" not in a, seed=self.seed,
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "TrainConfig":
        values = _known_fields(cls, json.loads(text))
        for key in ("ablations", "adam_betas", "preview_prompts", "preview_seeds"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)


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
    """Override what you need; the trainer calls these from its own thread."""

    def on_step(self, info: StepInfo) -> None: ...

    def on_preview(self, info: PreviewInfo) -> None: ...

    def on_checkpoint(self, info: CheckpointInfo) -> None: ...


@dataclass
class Batch:
    pixel_values: torch.Tensor  # (B, 3, R, R)
    prompts: list[str]
    noise: torch.Tensor  # (B, C, h, w)
    timesteps: torch.Tensor  # (B,)


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


def _seed_for(seed: int, micro_step: int) -> int:
    return (seed * 1_000_003 + micro_step * 7_919 + 17) % (2**63 - 1)


class Trainer:
    """Trains one concept on a loaded `StableDiffusionPipeline`'s frozen components."""

    def __init__(self, pipe, images: Sequence[Image.Image | LoadedImage], token: str, super_category: str,
                 config: TrainConfig = TrainConfig(), model_name: str = "",
                 callbacks: Sequence[TrainingCallback] = ()):
        if not images:
            raise ValueError("training needs at least one image")
        self.pipe, self.config, self.model_name = pipe, config, model_label(model_name)
        self.callbacks = list(callbacks)
        self._cancel = threading.Event()
        check_placeholder_token(pipe.tokenizer, token)
        super_id = super_category_id(pipe.tokenizer, super_category)
        if config.preview_every:  # a preview prompt that cannot render must fail now, not at step 0
            for prompt in config.preview_prompts:
                format_prompt(prompt, [token])
        self.layers = cross_attention_layers(pipe.unet)
        self.conditioner = TextConditioner(pipe.tokenizer, pipe.text_encoder)
        ensure_processors(pipe.unet, self.layers, self.conditioner.max_length)
        super_embedding = self.conditioner.embedding_of(super_id).float()
        mapper_config = config.mapper_config(pipe.text_encoder.config.hidden_size, len(self.layers),
                                             float(super_embedding.norm()))
        self.concept = Concept(token, super_category, mapper_config, [x.name for x in self.layers], self.model_name)
        if mapper_config.method != "neti":
            self.concept.mapper.initialize(super_embedding)
        self.resolution = config.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
        self.warnings = image_warnings(images, self.resolution)
        for warning in self.warnings:
            logger.warning(warning)
        self.dataset = ConceptDataset(list(images), self.resolution, template_kind(config.templates),
                                      flip_p=config.flip_p, crop=config.crop, seed=config.seed,
                                      use_captions=config.use_captions)
        from diffusers import DDPMScheduler

        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.step = 0
        self._last_checkpoint: Path | None = None  # the newest checkpoint written or resumed (finite weights)
        self._accelerator = None
        self._setup_optimizer()

    # ---- set-up ----------------------------------------------------------------------------------------------
    def _setup_optimizer(self) -> None:
        from accelerate import Accelerator
        from diffusers.optimization import get_scheduler

        cfg = self.config
        device = self.pipe.device
        precision = resolve_mixed_precision(cfg.mixed_precision, self.pipe.unet.dtype, device)
        from accelerate.state import AcceleratorState

        if AcceleratorState._shared_state and AcceleratorState().mixed_precision != precision:
            AcceleratorState._reset_state()  # a later trainer in this process may use another precision
        self._accelerator = accelerator = Accelerator(mixed_precision=precision, cpu=device.type == "cpu")
        lr = cfg.base_learning_rate()
        if cfg.scale_lr:
            lr *= cfg.batch_size * cfg.grad_accum * accelerator.num_processes
        self.learning_rate = lr
        self.concept.to(accelerator.device)
        for module in (self.pipe.unet, self.pipe.vae, self.pipe.text_encoder):
            module.requires_grad_(False)
        optimizer = torch.optim.AdamW(self.concept.parameters(), lr=lr, betas=cfg.adam_betas,
                                      weight_decay=cfg.weight_decay, eps=cfg.adam_eps)
        lr_scheduler = get_scheduler("constant_with_warmup" if cfg.lr_warmup_steps else "constant", optimizer,
                                     num_warmup_steps=cfg.lr_warmup_steps)
        self.model, self.optimizer, self.lr_scheduler = accelerator.prepare(self.concept, optimizer, lr_scheduler)

    @property
    def process_index(self) -> int:
        return self._accelerator.process_index if self._accelerator is not None else 0

    @property
    def is_main_process(self) -> bool:
        return self.process_index == 0

    def _checkpointing(self, on: bool) -> None:
        """Gradient checkpointing of the frozen UNet and text encoder as configured, switched off after training."""
        unet, text_encoder, cfg = self.pipe.unet, self.pipe.text_encoder, self.config
        if on and cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        if on and (cfg.gradient_checkpointing or cfg.text_encoder_checkpointing):
            text_encoder.gradient_checkpointing_enable()
            text_encoder.train()  # transformers checkpoints only in training mode; CLIP has no dropout
        if not on and getattr(unet, "is_gradient_checkpointing", False):
            unet.disable_gradient_checkpointing()
        if not on and getattr(text_encoder, "is_gradient_checkpointing", False):
            text_encoder.gradient_checkpointing_disable()
            text_encoder.eval()

    def cancel(self) -> None:
        """Ask the loop to stop after the current micro-batch; the concept is saved with its step count."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    # ---- one micro-batch -------------------------------------------------------------------------------------
    def make_batch(self, micro_step: int) -> Batch:
        """The data, noise and timesteps of micro-batch `micro_step`: a function of (seed, micro_step) only."""
        g = torch.Generator().manual_seed(_seed_for(self.config.seed + 7919 * self.process_index, micro_step))
        indices = torch.randint(len(self.dataset), (self.config.batch_size,), generator=g).tolist()
        items = [self.dataset[i] for i in indices]
        pixels = torch.stack([it["pixel_values"] for it in items])
        prompts = [it["template"].format(self.concept.token) for it in items]
        latent_hw = self.resolution // self.pipe.vae_scale_factor
        noise = torch.randn(len(items), self.pipe.unet.config.in_channels, latent_hw, latent_hw, generator=g)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (len(items),), generator=g)
        return Batch(pixels, prompts, noise, timesteps)

    def encoder_states(self, prompts: list[str], timesteps: torch.Tensor, truncation: int | None = None) -> torch.Tensor:
        """Packed per-layer keys/values for each sample at its timestep: (B, L * 2 * S, D)."""
        token = self.concept.token
        tokenized = [self.conditioner.tokenize(p, [token]) for p in prompts]
        num_layers, batch = len(self.layers), len(prompts)
        concepts = {token: self.model}
        if self.config.per_layer_conditioning:  # the official code's loop: one text-encoder pass per layer
            parts = [self.conditioner.encode_rows(tokenized, torch.arange(batch), timesteps.float(),
                                                  torch.full((batch,), float(l)), concepts, truncation)
                     for l in range(num_layers)]
            keys = torch.stack([p.keys for p in parts], dim=1)
            values = torch.stack([p.values for p in parts], dim=1)
        else:  # all layers of all samples in one pass; once per sample if the concept ignores the layer (TI)
            per = num_layers if self.concept.depends_on_layer else 1
            rows = torch.arange(batch).repeat_interleave(per)
            enc = self.conditioner.encode_rows(tokenized, rows, timesteps.float().repeat_interleave(per),
                                               torch.arange(per).repeat(batch).float(), concepts, truncation)
            keys, values = (x.view(batch, per, *x.shape[1:]).expand(-1, num_layers, -1, -1)
                            for x in (enc.keys, enc.values))
        return pack(keys, values)

    def loss(self, batch: Batch) -> torch.Tensor:
        pipe = self.pipe
        device, dtype = pipe.device, pipe.unet.dtype
        with torch.no_grad():
            latents = pipe.vae.encode(batch.pixel_values.to(device, pipe.vae.dtype)).latent_dist.mean
            latents = latents * pipe.vae.config.scaling_factor
        noise, timesteps = batch.noise.to(device, latents.dtype), batch.timesteps.to(device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        with self._accelerator.autocast():
            states = self.encoder_states(batch.prompts, batch.timesteps)
            pred = pipe.unet(noisy.to(dtype), timesteps, states.to(dtype)).sample
        return F.mse_loss(pred.float(), target.float())

    def evaluation_loss(self, batch: Batch) -> float:
        """Loss on a fixed batch without nested dropout (eval mode), for tracking progress."""
        was_training = self.concept.training
        self.concept.eval()
        with torch.no_grad():
            value = float(self.loss(batch))
        self.concept.train(was_training)
        return value

    # ---- the loop --------------------------------------------------------------------------------------------
    def train(self, out_path: str | Path, resume: str | Path | None = None) -> TrainResult:
        """Train to `config.steps` (from a checkpoint, or a finished run's concept, if `resume`), saving the
        concept to `out_path`. A NaN or infinite loss or weight stops the run (`TrainingDiverged`) and keeps the
        last checkpoint as the concept, or writes nothing; a run that trained no step writes nothing."""
        cfg, out_path = self.config, Path(out_path)
        if resume is not None:
            self.load_checkpoint(resume)
        losses: list[float] = []
        self._keep = True  # False after a divergence with no finite checkpoint to fall back on
        self.concept.train()
        self._checkpointing(True)
        try:
            if cfg.preview_every and self.step == 0 and self.is_main_process and not self.cancelled:
                self.preview()
            while self.step < cfg.steps and not self.cancelled:
                started = time.perf_counter()
                step_loss = 0.0
                for micro in range(cfg.grad_accum):
                    micro_step = self.step * cfg.grad_accum + micro
                    with torch.random.fork_rng(devices=[]):
                        torch.manual_seed(_seed_for(cfg.seed + 7919 * self.process_index, micro_step) + 1)  # dropout
                        loss = self.loss(self.make_batch(micro_step))
                        self._accelerator.backward(loss / cfg.grad_accum)
                    step_loss += float(loss.detach()) / cfg.grad_accum
                if not math.isfinite(step_loss):
                    self._diverged(f"the loss became {step_loss} at step {self.step + 1}")
                self.optimizer.step()
                self.lr_scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                if not bool(torch.stack([torch.isfinite(p).all() for p in self.concept.parameters()]).all()):
                    self._diverged(f"the weights became NaN or infinite at step {self.step + 1}")
                self.step += 1
                self.concept.train_steps = self.step
                losses.append(step_loss)
                info = StepInfo(self.step, cfg.steps, step_loss, self.lr_scheduler.get_last_lr()[0],
                                time.perf_counter() - started)
                for cb in self.callbacks:
                    cb.on_step(info)
                if not self.is_main_process:  # other processes only compute gradients
                    continue
                if cfg.checkpoint_every and (self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps):
                    self.save_checkpoint(out_path)  # the final one too: a finished run can be extended
                if cfg.preview_every and self.step % cfg.preview_every == 0:
                    self.preview()
        finally:  # finished, cancelled or crashed: the concept so far is saved (never untrained, never NaN)
            self.concept.eval()
            self._checkpointing(False)
            saved = self._keep and self.step > 0 and self.is_main_process
            if saved:
                self.concept.save(out_path)
                logger.info("saved %s after %d steps to %s", self.concept.token, self.step, out_path)
            elif self.step == 0:
                logger.info("%s trained no step: nothing saved to %s", self.concept.token, out_path)
        return TrainResult(self.concept, out_path, self.step, self.cancelled, losses, saved)

    def _diverged(self, what: str) -> None:
        """Put the last checkpoint's weights back (if any) and raise `TrainingDiverged` saying what was kept."""
        lr = f"{self.learning_rate:g}"
        kept = self._last_checkpoint
        if kept is not None:
            self._load_weights(kept)
            outcome = f"the concept is kept at step {self.step} from its last checkpoint {str(kept)!r}"
        else:
            self._keep = False
            outcome = "nothing was saved (no checkpoint with finite weights yet)"
        raise TrainingDiverged(f"training diverged: {what}; {outcome}. Lower the learning rate (it was {lr} after "
                               "scaling) or turn mixed precision off")

    def preview(self) -> PreviewInfo:
        """Render the preview prompts with the core generator on the same pipeline (fixed seeds)."""
        from .generate import Generator, Row, Sampling

        cfg = self.config
        generator = Generator(self.pipe, self.model_name)
        sampling = Sampling(steps=cfg.preview_steps, guidance=cfg.preview_guidance)
        timesteps = generator.timesteps(sampling)
        rows, prompts, seeds = [], [], []
        for prompt in cfg.preview_prompts:  # every prompt and seed in one batch
            encoding = generator.encode(prompt, [self.concept], timesteps, None, DEFAULT_BYPASS_ALPHA)
            rows += [Row(encoding, seed, {"prompt": prompt}) for seed in cfg.preview_seeds]
            prompts += [prompt] * len(cfg.preview_seeds)
            seeds += list(cfg.preview_seeds)
        with torch.random.fork_rng(devices=[]):
            images = generator.render(rows, sampling).images
        info = PreviewInfo(self.step, images, prompts, seeds)
        for cb in self.callbacks:
            cb.on_preview(info)
        return info

    # ---- checkpoints -----------------------------------------------------------------------------------------
    def checkpoint_dir(self, out_path: Path) -> Path:
        return out_path.with_name(out_path.stem + "-checkpoints")

    def save_checkpoint(self, out_path: str | Path) -> Path:
        """A concept file that also carries optimiser, lr-schedule, step and random states (atomic)."""
        folder = self.checkpoint_dir(Path(out_path))
        path = folder / f"checkpoint-{self.step:06d}.safetensors"
        tensors = {f"mapper.{k}": v.detach().cpu().contiguous() for k, v in self.concept.mapper.state_dict().items()}
        optim_state = self.optimizer.state_dict()
        for index, state in optim_state["state"].items():
            for name, value in state.items():
                tensors[f"optimizer.{index}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
        tensors["rng.torch"] = torch.get_rng_state()
        meta = self.concept.metadata()
        meta["training_state"] = json.dumps({
            "step": self.step, "train_config": self.config.to_json(),
            "param_groups": optim_state["param_groups"], "lr_scheduler": self.lr_scheduler.state_dict(),
            "python_random": _jsonable(random.getstate()),
        })
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
        self._last_checkpoint = path
        for old in sorted(folder.glob("checkpoint-*.safetensors"))[: -self.config.keep_checkpoints]:
            old.unlink(missing_ok=True)
        for cb in self.callbacks:
            cb.on_checkpoint(CheckpointInfo(self.step, path))
        return path

    def _load_weights(self, path: Path) -> dict[str, torch.Tensor]:
        """Read a checkpoint's tensors and put its mapper weights and step into the concept."""
        tensors = read_tensors(path)
        try:
            self.concept.mapper.load_state_dict(mapper_weights(tensors))
        except RuntimeError as exc:
            raise ValueError(f"{str(path)!r} does not fit this run's mapper ({one_line(exc)}); resume with the "
                             "settings it was trained with (method, ablations)") from None
        self.step = self.concept.train_steps = int(read_header(path)[0].get("train_steps", "0"))
        return tensors

    def load_checkpoint(self, path: str | Path) -> None:
        """Continue from a training checkpoint, a checkpoints folder, or a finished run's concept file (whose
        checkpoint at the same step is in its '*-checkpoints' folder)."""
        path = resumable_checkpoint(path)
        meta, _ = read_header(path)
        try:
            state = json.loads(meta["training_state"])
            saved = TrainConfig.from_json(state["train_config"])
            step, param_groups, scheduler_state = int(state["step"]), state["param_groups"], state["lr_scheduler"]
            python_random = _from_jsonable(state["python_random"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{str(path)!r} has a damaged training state ({one_line(exc)}); resume from another "
                             "checkpoint") from None
        if step >= self.config.steps:
            raise ValueError(f"{str(path)!r} is already at step {step} and steps is {self.config.steps}: nothing to "
                             f"train; give more steps (e.g. --steps {step + self.config.steps}) to extend the run")
        if (saved.method, saved.ablations) != (self.config.method, self.config.ablations):
            raise ValueError(f"{str(path)!r} was trained with method {saved.method!r} and ablations "
                             f"{list(saved.ablations)}, this run uses {self.config.method!r} and "
                             f"{list(self.config.ablations)}; resume with the same method and ablations")
        if _weights_settings(saved) != _weights_settings(self.config):
            logger.warning("resuming with settings that differ from the checkpoint's; the run will not be "
                           "identical to an uninterrupted one")
        tensors = self._load_weights(path)
        optim_state: dict = {"state": {}, "param_groups": param_groups}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, index, name = key.split(".", 2)
                optim_state["state"].setdefault(int(index), {})[name] = value
        try:
            self.optimizer.load_state_dict(optim_state)
            self.lr_scheduler.load_state_dict(scheduler_state)
            torch.set_rng_state(tensors["rng.torch"])
            random.setstate(python_random)
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise ValueError(f"{str(path)!r} has a damaged optimiser or random state ({one_line(exc)}); resume "
                             "from another checkpoint") from None
        self.step = self.concept.train_steps = step
        self._last_checkpoint = path
        logger.info("resumed %s from %s at step %d", self.concept.token, path, self.step)


def _weights_settings(config: TrainConfig) -> TrainConfig:
    """`config` without the settings that do not change the weights (steps, checkpoints, previews)."""
    return replace(config, steps=1, checkpoint_every=0, keep_checkpoints=1, preview_every=0, preview_prompts=("{}",),
                   preview_seeds=(0,), preview_steps=1, preview_guidance=0.0)


def _checkpoint_step(path: Path) -> int | None:
    """The step of a training checkpoint (from its metadata); None for an unreadable file or a plain concept."""
    try:
        meta, _ = read_header(path)
        return int(json.loads(meta["training_state"])["step"])
    except (KeyError, TypeError, ValueError):
        return None


def latest_checkpoint(path: str | Path) -> Path:
    """`path` itself, or the checkpoint with the highest step (read from metadata) in a folder."""
    path = Path(path)
    if path.is_dir():
        candidates = []
        for file in path.glob("*.safetensors"):
            step = _checkpoint_step(file)
            if step is None:
                logger.warning("ignoring %s: not a readable training checkpoint", file)
            else:
                candidates.append((step, file))
        if not candidates:
            raise FileNotFoundError(f"no training checkpoint in {str(path)!r}")
        return max(candidates)[1]
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    return path


def resumable_checkpoint(path: str | Path) -> Path:
    """The checkpoint to resume from: `latest_checkpoint(path)`, or for a finished run's concept file the
    checkpoint of its '*-checkpoints' folder at the concept's step with the same weights."""
    path = latest_checkpoint(path)
    meta, _ = read_header(path)
    if "training_state" in meta:
        return path
    folder = path.with_name(path.stem + "-checkpoints")
    steps = meta.get("train_steps", "?")
    if folder.is_dir():
        concept = Concept.load(path)
        for file in sorted(folder.glob("*.safetensors")):
            if str(_checkpoint_step(file)) == steps:
                weights = {k: v.float() for k, v in mapper_weights(read_tensors(file)).items()}
                if all(torch.equal(weights[k], v) for k, v in concept.mapper.state_dict().items() if k in weights):
                    return file
    raise ValueError(f"{str(path)!r} is a concept but not a training checkpoint (no optimiser state), and "
                     f"{str(folder)!r} holds no checkpoint of it at step {steps}; resume from a file in the "
                     "'*-checkpoints' folder (runs trained with checkpoints on can be extended)")


def _jsonable(state):
    return [_jsonable(x) for x in state] if isinstance(state, (tuple, list)) else state


def _from_jsonable(state):
    return tuple(_from_jsonable(x) for x in state) if isinstance(state, list) else state
