"""Frozen, typed configurations (NeTI Sec. 4 and App. A: the mapper; Sec. 5: training and inference defaults).

Every value that defines a concept lives in `MapperConfig` and is written into the concept file, so a concept
rebuilds itself from its file alone. Values computed at build time (the super-category norm, the token width,
the number of layers) are explicit fields, never mutations of a config. `TrainConfig` (how to train),
`PreviewConfig` (what to render while training) and `Sampling` (how to sample) are the other configurations;
each field's comment is its documentation and the command line's help text (`field_help`), and the choices a
field accepts are in `FIELD_CHOICES`, so the CLI restates neither.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import re
from dataclasses import dataclass
from typing import Any

METHODS = ("neti", "xti", "ti")  # NeTI; XTI / P+ (one vector per layer); Textual Inversion (one vector)
ABLATIONS = ("no_positional_encoding", "no_nested_dropout", "no_bypass", "no_rescaling", "time_only", "space_only")
BASE_LEARNING_RATES = {"neti": 1e-3, "xti": 6.25e-4, "ti": 5e-4}  # before scaling by batch x accumulation
ACCUMULATION = ("auto", "fused", "sequential")  # "auto": fused on the CPU (neti.train)
MIXED_PRECISION = ("auto", "no", "fp16", "bf16")  # "auto": follow the loaded weights (neti.precision)
DEFAULT_MIXED_PRECISION = "auto"
CROP_MODES = ("center", "random")  # how a training image is cropped square
TEMPLATE_KINDS = ("object", "style")  # Textual Inversion's prompt templates (neti.data)
SCHEDULERS = {  # the sampler names the CLI and the app accept, and diffusers' class for each
    "dpm": "DPMSolverMultistepScheduler", "ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler", "pndm": "PNDMScheduler", "lms": "LMSDiscreteScheduler",
    "unipc": "UniPCMultistepScheduler",
}
NUM_TRAIN_TIMESTEPS = 1000  # SD's diffusion length; timesteps are 0..999
DEFAULT_BYPASS_ALPHA = 0.2  # textual-bypass strength (Sec. 3.3; hard-coded 0.2 in the official code)
DEFAULT_HIDDEN_DIM = 128  # the mapper's hidden units, ordered by nested dropout: truncation k is 1..this


@dataclass(frozen=True)
class MapperConfig:
    """Everything that defines a concept's representation M(t, l)."""

    method: str = "neti"  # "neti", "xti" or "ti"
    token_dim: int = 768  # D: the text encoder's token width (768 SD 1.x, 1024 SD 2.x, 768 + 1280 SDXL)
    num_layers: int = 16  # L: cross-attention layers of the UNet (SDXL: 70)
    token_widths: tuple[int, ...] = ()  # each text encoder's width in order (SDXL: 768, 1280); (): one of token_dim
    target_norms: tuple[float, ...] = ()  # ||e_super|| in each encoder's embeddings (SDXL); (): target_norm
    pooled_layer: bool = False  # SDXL: a virtual layer l = L whose v_base drives the pooled embedding
    num_frequencies: int = 1024  # random Fourier features; the encoding has 2x this many values
    sigma_t: float = 0.03  # std of the time frequencies
    sigma_l: float = 2.0  # std of the layer frequencies
    num_time_anchors: int = 10  # anchors t = 0, 100, ..., 900 for the projection (x L layers = 160)
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS  # span of t
    hidden_dim: int = DEFAULT_HIDDEN_DIM  # width of the two hidden layers, ordered by nested dropout
    kept_units: int = DEFAULT_HIDDEN_DIM  # hidden units the output layer reads (< hidden_dim after a truncated export)
    use_positional_encoding: bool = True  # ablation: False feeds (t, l) scaled to [-1, 1]
    use_nested_dropout: bool = True  # ablation: False trains without nested dropout
    nested_dropout_prob: float = 0.5  # chance that a mapper call applies nested dropout in training
    use_bypass: bool = True  # textual bypass: the mapper also outputs v_pass
    use_rescaling: bool = True  # rescale the output to the super-category token's norm
    target_norm: float | None = None  # ||e_super||, measured at build time
    use_time: bool = True  # ablation "space-only": False ignores t
    use_layer: bool = True  # ablation "time-only": False ignores l
    seed: int = 0  # seed of the random frequencies and the initial weights

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r} is unknown; use one of {', '.join(METHODS)}")
        for name in ("token_dim", "num_layers", "num_frequencies", "num_time_anchors", "hidden_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if not 1 <= self.kept_units <= self.hidden_dim:
            raise ValueError(f"kept_units must be in 1..{self.hidden_dim}, got {self.kept_units}")
        if not 0.0 <= self.nested_dropout_prob <= 1.0:
            raise ValueError(f"nested_dropout_prob must be in [0, 1], got {self.nested_dropout_prob}")
        if self.use_rescaling and self.target_norm is not None and not self.target_norm > 0:
            raise ValueError(f"target_norm must be positive, got {self.target_norm}")
        if self.token_widths and sum(self.token_widths) != self.token_dim:
            raise ValueError(f"token_widths {self.token_widths} must add up to token_dim {self.token_dim}")
        if self.target_norms and (len(self.target_norms) != len(self.token_widths)
                                  or not all(n > 0 for n in self.target_norms)):
            raise ValueError(f"target_norms {self.target_norms} must give one positive norm per encoder width "
                             f"{self.token_widths}")

    @property
    def widths(self) -> tuple[int, ...]:
        """Each text encoder's share of the D-wide vectors, in order: (D,) for one encoder, (768, 1280) on SDXL."""
        return tuple(self.token_widths) or (self.token_dim,)

    @property
    def num_positions(self) -> int:
        """Layer indices the mapper is queried at: the L layers, and SDXL's virtual pooled layer l = L."""
        return self.num_layers + int(self.pooled_layer)

    @property
    def has_bypass(self) -> bool:
        return self.method == "neti" and self.use_bypass

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "MapperConfig":
        values = _known_fields(cls, json.loads(text))
        for key in ("token_widths", "target_norms"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)


def _known_fields(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """Keep the fields `cls` knows, so files written by a newer version with extra fields still load."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in values.items() if k in names}


@dataclass(frozen=True)
class TrainConfig:
    """How to train (Sec. 5, App. A); saved in every checkpoint so that a resume can check it continues the run."""

    method: str = "neti"  # representation to learn: NeTI, XTI (one vector per layer) or TI (one vector)
    ablations: tuple[str, ...] = ()  # mapper ablations, NeTI only (repeatable)
    steps: int = 500  # optimisation steps to reach
    batch_size: int = 2  # images per micro-batch
    grad_accum: int = 4  # micro-batches per optimisation step
    accumulation: str = "auto"  # 'fused': one UNet pass a step (same loss, more memory); 'sequential'; auto: CPU fuses
    learning_rate: float | None = None  # base learning rate; None: the method's default (BASE_LEARNING_RATES)
    scale_lr: bool = True  # multiply the learning rate by batch x accumulation x processes (1e-3 -> 8e-3)
    adam_betas: tuple[float, float] = (0.9, 0.999)  # AdamW's betas
    weight_decay: float = 1e-2  # AdamW's weight decay
    adam_eps: float = 1e-8  # AdamW's epsilon
    lr_warmup_steps: int = 0  # linear warm-up steps, then a constant learning rate
    templates: str = "object"  # prompt templates: 'object' for a thing, 'style' for an artistic style
    use_captions: bool = True  # an image's own caption (NAME.txt or a PNG 'caption' chunk) replaces the template
    flip_p: float = 0.5  # probability of a horizontal flip (0 for text, logos)
    crop: str = "center"  # how images are cropped square
    resolution: int | None = None  # training resolution in pixels; None: the base model's
    seed: int = 0  # seed of the data order, noise, timesteps and the mapper's initial weights
    mixed_precision: str = DEFAULT_MIXED_PRECISION  # 'auto' (follow the weights), 'no' (fp32), 'fp16' (CUDA), 'bf16'
    gradient_checkpointing: bool = False  # recompute UNet and text-encoder activations: less memory, slower
    text_encoder_checkpointing: bool = True  # recompute the text encoder alone: exact, ~5x less text memory
    checkpoint_every: int = 100  # optimisation steps between checkpoints (and the last step); 0 turns them off
    keep_checkpoints: int = 3  # newest checkpoints kept

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
        for name in ("steps", "batch_size", "grad_accum", "keep_checkpoints"):
            _check_positive(name, getattr(self, name))
        for name in ("checkpoint_every", "lr_warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.learning_rate is not None and not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate!r}")
        if self.accumulation not in ACCUMULATION:
            raise ValueError(f"accumulation {self.accumulation!r} is unknown; use one of {', '.join(ACCUMULATION)}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision {self.mixed_precision!r} is unknown; use one of {MIXED_PRECISION}")
        check_template_kind(self.templates)
        if not 0 <= self.flip_p <= 1:
            raise ValueError(f"flip_p must be a probability from 0 to 1, got {self.flip_p!r}")
        if self.crop not in CROP_MODES:
            raise ValueError(f"crop {self.crop!r} is unknown; use one of {', '.join(CROP_MODES)}")
        if self.resolution is not None and (isinstance(self.resolution, bool) or not isinstance(self.resolution, int)
                                            or self.resolution < 8):
            raise ValueError(f"resolution must be an integer of at least 8 pixels (or None), got {self.resolution!r}")

    def base_learning_rate(self) -> float:
        return self.learning_rate if self.learning_rate is not None else BASE_LEARNING_RATES[self.method]

    def mapper_config(self) -> MapperConfig:
        """The representation this run trains; the model's sizes are filled in by `Concept.for_pipeline`."""
        a = set(self.ablations)
        return MapperConfig(
            method=self.method, use_positional_encoding="no_positional_encoding" not in a,
            use_nested_dropout="no_nested_dropout" not in a, use_bypass="no_bypass" not in a,
            use_rescaling=self.method == "neti" and "no_rescaling" not in a, use_time="space_only" not in a,
            use_layer="time_only" not in a, seed=self.seed,
        )

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "TrainConfig":
        values = _known_fields(cls, json.loads(text))  # older files' extra fields (previews) are dropped
        for key in ("ablations", "adam_betas"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)


@dataclass(frozen=True)
class PreviewConfig:
    """What to render while a concept trains (`neti.previews.Previews`); not part of the run's weights."""

    every: int = 0  # optimisation steps between previews (step 0 included); 0 turns them off
    prompts: tuple[str, ...] = ("a photo of a {}",)  # preview prompts, {} for the concept (repeatable)
    seeds: tuple[int, ...] = (0,)  # seeds of every preview prompt (repeatable)
    steps: int = 20  # sampler steps of a preview
    guidance: float = 7.5  # classifier-free guidance scale of a preview

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ValueError(f"preview every must be >= 0, got {self.every!r}")
        _check_positive("preview steps", self.steps)
        if not self.prompts or not self.seeds:
            raise ValueError("previews need at least one prompt and one seed")


@dataclass(frozen=True)
class Sampling:
    """How to sample: everything but the prompt, concepts and NeTI controls."""

    steps: int = 50  # sampler steps
    guidance: float = 7.5  # classifier-free guidance scale
    scheduler: str = "dpm"  # the sampler
    negative_prompt: str = ""  # what the image should not show
    height: int | None = None  # image height in pixels, a multiple of 8; None: the model's resolution
    width: int | None = None  # image width in pixels, a multiple of 8; None: the model's resolution

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be a positive integer, got {self.steps!r}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler {self.scheduler!r} is unknown; use one of {', '.join(SCHEDULERS)}")
        if not self.guidance >= 0:
            raise ValueError(f"guidance must be >= 0, got {self.guidance!r}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and (value < 8 or value % 8):
                raise ValueError(f"{name} must be a positive multiple of 8, got {value}")


# The values a field accepts, keyed by field name (the CLI's choices).
FIELD_CHOICES: dict[str, tuple[str, ...]] = {
    "method": METHODS, "ablations": ABLATIONS, "accumulation": ACCUMULATION, "mixed_precision": MIXED_PRECISION,
    "crop": CROP_MODES, "templates": TEMPLATE_KINDS, "scheduler": tuple(SCHEDULERS),
}


@functools.cache
def field_help(cls: type) -> dict[str, str]:
    """Each field's trailing comment in `cls`'s source: the fields' documentation, read once, used as help text."""
    names = {f.name for f in dataclasses.fields(cls)}
    found = {}
    for line in inspect.getsource(cls).splitlines():
        match = re.match(r"\s+(\w+):[^#]*#\s*(.+)$", line)
        if match and match.group(1) in names:
            found[match.group(1)] = match.group(2).strip()
    return found


def check_template_kind(name: str) -> str:
    """The template kind `name` names ("object" or "style", any case), or a ValueError that says which exist."""
    key = name.strip().lower() if isinstance(name, str) else None
    if key not in TEMPLATE_KINDS:
        raise ValueError(f"Unknown template kind {name!r}; use one of {sorted(TEMPLATE_KINDS)} "
                         "('object' for a thing or a creature, 'style' for an artistic style).")
    return key


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
