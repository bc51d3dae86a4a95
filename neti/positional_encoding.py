"""Random-Fourier positional encoding of (timestep, layer) (NeTI Sec. 3.2, App. A; Tancik et al. 2020).

f(t, l) = [sin(W x), cos(W x)] / ||.||, with x = (t, l) and fixed frequencies W (F x 2) drawn from N(0, 1),
column 0 scaled by sigma_t and column 1 by sigma_l. W is not trained but defines the concept, so it is a
registered buffer and travels in the concept file (the official code left it out of the state dict).
"""

from __future__ import annotations

import torch
from torch import nn


class FourierEncoding(nn.Module):
    """Maps (t, l) pairs to unit-norm 2F-dimensional random Fourier features."""

    def __init__(self, num_frequencies: int = 1024, sigma_t: float = 0.03, sigma_l: float = 2.0, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        frequencies = torch.randn(num_frequencies, 2, generator=generator)
        frequencies = frequencies * torch.tensor([sigma_t, sigma_l])
        self.register_buffer("frequencies", frequencies)  # (F, 2)

    @property
    def dim(self) -> int:
        return 2 * self.frequencies.shape[0]

    def forward(self, t: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
        """(N,) timesteps and (N,) layer indices -> (N, 2F) unit vectors."""
        x = torch.stack([t, l], dim=-1).to(self.frequencies.dtype)  # (N, 2)
        phase = x @ self.frequencies.T  # (N, F)
        features = torch.cat([phase.sin(), phase.cos()], dim=-1)  # (N, 2F)
        return features / features.norm(dim=-1, keepdim=True)

    def anchors(self, num_time_anchors: int, num_layers: int, num_train_timesteps: int = 1000) -> torch.Tensor:
        """Encodings of the anchor grid t = 0, T/A, 2T/A, ... (t-major) x l = 0..L-1: (A * L, 2F)."""
        step = num_train_timesteps // num_time_anchors
        t = torch.arange(0, num_train_timesteps, step, dtype=torch.float32)[:num_time_anchors]
        l = torch.arange(num_layers, dtype=torch.float32)
        grid_t, grid_l = torch.meshgrid(t, l, indexing="ij")  # t-major: all layers of t=0 first
        return self(grid_t.reshape(-1), grid_l.reshape(-1))


def scaled_inputs(t: torch.Tensor, l: torch.Tensor, num_train_timesteps: int, num_layers: int) -> torch.Tensor:
    """The no-positional-encoding ablation's input: (t, l) each scaled to [-1, 1], (N, 2)."""
    t_scaled = t / (num_train_timesteps - 1) * 2 - 1
    l_scaled = l / max(num_layers - 1, 1) * 2 - 1
    return torch.stack([t_scaled, l_scaled], dim=-1)
