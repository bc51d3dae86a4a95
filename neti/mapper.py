"""The NeTI mapper M(t, l) and the baselines' vector tables (NeTI Sec. 3.2-3.4, Eq. 2-4; App. A).

NeTI: positional encoding of (t, l) -> Linear onto the 160 anchor encodings (initialised with them, trainable as
in the official code) -> two 128-wide Linear+LayerNorm+LeakyReLU layers -> nested dropout (Sec. 3.4) -> Linear to
D (or 2D with the textual bypass, Sec. 3.3). The whole output is rescaled to the super-category token's norm
before it is split into (v_base, v_pass), as the official code does (docs/method.md "Output rescaling").

On SDXL (docs/sdxl.md) D = 768 + 1280 (one share per text encoder, each rescaled to its own super-category norm)
and the mapper is also queried at a virtual layer l = L whose output drives the pooled embedding: its anchors,
nested-dropout coins and XTI's vectors cover L + 1 positions.

XTI / P+ (Voynov et al.) keeps one vector per layer and Textual Inversion one vector; both share the mapper's
call signature so that every method trains, saves and generates through the same code.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import DEFAULT_HIDDEN_DIM, MapperConfig
from .positional_encoding import FourierEncoding, scaled_inputs


class MapperOutput(NamedTuple):
    base: torch.Tensor  # (N, D): replaces the placeholder's input embedding
    bypass: torch.Tensor | None  # (N, D): v_pass, added after the text encoder; None without the bypass


def check_truncation(truncation: int | None, hidden_dim: int = DEFAULT_HIDDEN_DIM) -> None:
    """Validate a nested-dropout truncation index: None (all units) or 1..hidden_dim."""
    if truncation is None:
        return
    if isinstance(truncation, bool) or not isinstance(truncation, int) or not 1 <= truncation <= hidden_dim:
        raise ValueError(
            f"truncation {truncation!r} is out of range: use an integer from 1 to {hidden_dim} "
            "(lower keeps fewer units: coarser, more editable), or None to keep all units"
        )


def parse_truncations(text: str, hidden_dim: int = DEFAULT_HIDDEN_DIM) -> list[int | None]:
    """Truncations written as text, e.g. '4, 16, 64, full': integers 1..hidden_dim, or 'full' / 'none' /
    hidden_dim + 1 for no truncation (None)."""
    values: list[int | None] = []
    for part in str(text).replace(",", " ").split():
        if part.lower() in ("full", "none", str(hidden_dim + 1)):
            values.append(None)
        elif part.isdigit() and 1 <= int(part) <= hidden_dim:
            values.append(int(part))
        else:
            raise ValueError(f"truncation {part!r} is not understood; give values in 1..{hidden_dim} or 'full', "
                             "e.g. '4, 16, 64, full'")
    return values


class NetiMapper(nn.Module):
    """M(t, l): (N,) timesteps in [0, 1000) and (N,) layer indices -> `MapperOutput`."""

    def __init__(self, config: MapperConfig):
        super().__init__()
        if config.method != "neti":
            raise ValueError(f"NetiMapper needs method 'neti', got {config.method!r}")
        if config.use_rescaling and config.target_norm is None:
            raise ValueError("rescaling needs target_norm, the norm of the super-category token's embedding")
        self.config = config
        width = config.hidden_dim
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            if config.use_positional_encoding:
                self.encoding = FourierEncoding(config.num_frequencies, config.sigma_t, config.sigma_l, config.seed)
                num_anchors = config.num_time_anchors * config.num_positions
                self.input_layer: nn.Module = nn.Linear(self.encoding.dim, num_anchors)
                with torch.no_grad():
                    anchors = self.encoding.anchors(
                        config.num_time_anchors, config.num_positions, config.num_train_timesteps
                    )
                    self.input_layer.weight.copy_(anchors)
                in_dim = num_anchors
            else:
                self.input_layer = nn.Identity()
                in_dim = 2
            self.hidden = nn.Sequential(
                nn.Linear(in_dim, width), nn.LayerNorm(width), nn.LeakyReLU(),
                nn.Linear(width, width), nn.LayerNorm(width), nn.LeakyReLU(),
            )
            out_dim = config.token_dim * (2 if config.has_bypass else 1)
            self.output_layer = nn.Linear(config.kept_units, out_dim)

    def encode_inputs(self, t: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        t = t.float() if cfg.use_time else torch.zeros_like(t, dtype=torch.float32)
        l = l.float() if cfg.use_layer else torch.zeros_like(l, dtype=torch.float32)
        if cfg.use_positional_encoding:
            return self.encoding(t, l)
        return scaled_inputs(t, l, cfg.num_train_timesteps, cfg.num_positions)

    def units_kept(self, l: torch.Tensor, truncation: int | None) -> torch.Tensor:
        """How many leading hidden units each row keeps: (N,) (nested dropout in training, truncation after)."""
        cfg = self.config
        keep = torch.full(l.shape, cfg.hidden_dim, dtype=torch.long)
        if self.training and cfg.use_nested_dropout:
            # One coin per layer, as the official code calls the mapper once per layer; k ~ U{0..H-1} per row.
            coin = torch.rand(cfg.num_positions) < cfg.nested_dropout_prob
            drawn = torch.randint(0, cfg.hidden_dim, l.shape)
            keep = torch.where(coin[l.long().cpu()], drawn, keep)
        if truncation is not None:
            keep = keep.clamp(max=truncation)
        return keep.to(l.device)

    def forward(self, t: torch.Tensor, l: torch.Tensor, truncation: int | None = None) -> MapperOutput:
        check_truncation(truncation, self.config.hidden_dim)
        x = self.input_layer(self.encode_inputs(t, l).to(self.output_layer.weight.dtype))
        h = self.hidden(x)  # (N, H)
        keep = self.units_kept(l, truncation)
        units = torch.arange(h.shape[-1], device=h.device)
        h = h * (units[None, :] < keep[:, None]).to(h.dtype)
        out = self.output_layer(h[:, : self.config.kept_units])  # (N, D) or (N, 2D)
        if self.config.use_rescaling:
            out = rescale(out, self.config)
        if self.config.has_bypass:
            base, bypass = out.chunk(2, dim=-1)
            return MapperOutput(base, bypass)
        return MapperOutput(out, None)


def rescale(out: torch.Tensor, config: MapperConfig) -> torch.Tensor:
    """Output rescaling (Eq. 4, as the official code does it: v_base and v_pass together). With several text
    encoders (SDXL) each encoder's share, its v_base and v_pass parts, is scaled to the super-category's norm in
    that encoder's own embedding table, since the two tables have different scales."""
    if len(config.widths) == 1 or not config.target_norms:
        return F.normalize(out, dim=-1) * config.target_norm
    halves = out.chunk(2, dim=-1) if config.has_bypass else (out,)  # ((N, D),) or (v_base, v_pass)
    pieces = [half.split(config.widths, dim=-1) for half in halves]  # per half, per encoder
    scaled = []
    for i, norm in enumerate(config.target_norms):
        group = torch.cat([p[i] for p in pieces], dim=-1)
        scaled.append(F.normalize(group, dim=-1) * norm)
    width = list(config.widths)
    per_half = [[g.split([w] * len(halves), dim=-1)[h] for g, w in zip(scaled, width)] for h in range(len(halves))]
    return torch.cat([torch.cat(parts, dim=-1) for parts in per_half], dim=-1)


class VectorTable(nn.Module):
    """XTI (one vector per layer, shared over time) or TI (one vector): the same call signature as NeTI."""

    def __init__(self, config: MapperConfig):
        super().__init__()
        if config.method not in ("xti", "ti"):
            raise ValueError(f"VectorTable needs method 'xti' or 'ti', got {config.method!r}")
        self.config = config
        rows = config.num_positions if config.method == "xti" else 1
        self.vectors = nn.Parameter(torch.zeros(rows, config.token_dim))

    def initialize(self, embedding: torch.Tensor) -> None:
        """Start every vector at the super-category token's input embedding (Textual Inversion's init)."""
        with torch.no_grad():
            self.vectors.copy_(embedding.reshape(1, -1).expand_as(self.vectors))

    def forward(self, t: torch.Tensor, l: torch.Tensor, truncation: int | None = None) -> MapperOutput:
        check_truncation(truncation, self.config.hidden_dim)  # accepted for a uniform API; no units to drop
        rows = l.long() if self.config.method == "xti" else torch.zeros_like(l, dtype=torch.long)
        return MapperOutput(self.vectors[rows.to(self.vectors.device)], None)


def build_mapper(config: MapperConfig) -> nn.Module:
    """The module that represents a concept of `config.method`."""
    return NetiMapper(config) if config.method == "neti" else VectorTable(config)


def count_parameters(module: nn.Module) -> int:
    """Trainable parameters (buffers such as the Fourier frequencies are not counted)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
