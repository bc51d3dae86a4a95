"""Frozen, typed configurations (NeTI Sec. 4 and App. A: the mapper; Sec. 5: training and inference defaults).

Every value that defines a concept lives in `MapperConfig` and is written into the concept file, so a concept
rebuilds itself from its file alone. Values computed at build time (the super-category norm, the token width,
the number of layers) are explicit fields, never mutations of a config.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

METHODS = ("neti", "xti", "ti")  # NeTI; XTI / P+ (one vector per layer); Textual Inversion (one vector)
NUM_TRAIN_TIMESTEPS = 1000  # SD's diffusion length; timesteps are 0..999
DEFAULT_BYPASS_ALPHA = 0.2  # textual-bypass strength (Sec. 3.3; hard-coded 0.2 in the official code)
DEFAULT_HIDDEN_DIM = 128  # the mapper's hidden units, ordered by nested dropout: truncation k is 1..this


@dataclass(frozen=True)
class MapperConfig:
    """Everything that defines a concept's representation M(t, l)."""

    method: str = "neti"  # "neti", "xti" or "ti"
    token_dim: int = 768  # D: the text encoder's token width (768 SD 1.x, 1024 SD 2.x)
    num_layers: int = 16  # L: cross-attention layers of the UNet
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

    @property
    def has_bypass(self) -> bool:
        return self.method == "neti" and self.use_bypass

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "MapperConfig":
        return cls(**_known_fields(cls, json.loads(text)))


def _known_fields(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """Keep the fields `cls` knows, so files written by a newer version with extra fields still load."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in values.items() if k in names}
