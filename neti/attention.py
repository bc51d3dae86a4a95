"""Per-layer cross-attention with separate key and value encodings (NeTI Sec. 3.1 and Sec. 3.3).

Each cross-attention layer l attends to its own text encoding: the keys come from the plain encoding (the
mapper's v_base at this layer), the values from the bypassed one (v_base plus the textual bypass). Both travel
through the UNet packed in `encoder_hidden_states`, a tensor of shape (B, L * 2 * S, D): for every layer its key
sequence then its value sequence. Every processor picks its own slice by its layer index, so there is no shared
mutable state and the UNet, diffusers' pipelines, classifier-free guidance batching and gradient checkpointing
work unchanged. Self-attention keeps diffusers' own processor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import CrossAttentionLayer


def pack(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """(B, L, S, D) keys and values -> (B, L * 2 * S, D), the UNet's `encoder_hidden_states`."""
    batch, layers, seq, dim = keys.shape
    return torch.stack([keys, values], dim=2).reshape(batch, layers * 2 * seq, dim)


def unpack(packed: torch.Tensor, num_layers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `pack`: (B, L * 2 * S, D) -> keys, values, each (B, L, S, D)."""
    batch, total, dim = packed.shape
    if total % (2 * num_layers):
        raise ValueError(f"packed sequence length {total} is not a multiple of 2 x {num_layers} layers")
    both = packed.view(batch, num_layers, 2, total // (2 * num_layers), dim)
    return both[:, :, 0], both[:, :, 1]


class NetiCrossAttnProcessor:
    """Scaled-dot-product cross-attention for layer `index` of `num_layers`, keys and values from packed text.

    An unpacked `encoder_hidden_states` is used for both keys and values, so a UNet with these processors still
    runs plain prompts exactly as diffusers' `AttnProcessor2_0` does. Packed means a length of 2L x `seq_len`
    (the tokenizer's length) when `seq_len` is known, else any multiple of 2L: the bundled model's 32-token
    prompts with its 16 layers are such a multiple, so the pipeline code always passes `seq_len`.
    """

    def __init__(self, index: int, num_layers: int, seq_len: int | None = None):
        self.index = index
        self.num_layers = num_layers
        self.seq_len = seq_len

    def is_packed(self, total: int) -> bool:
        if self.seq_len is not None:
            return total == 2 * self.num_layers * self.seq_len
        return total % (2 * self.num_layers) == 0

    def split(self, encoder_hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, total, dim = encoder_hidden_states.shape
        if not self.is_packed(total):
            return encoder_hidden_states, encoder_hidden_states
        both = encoder_hidden_states.view(batch, self.num_layers, 2, total // (2 * self.num_layers), dim)
        return both[:, self.index, 0], both[:, self.index, 1]

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        if encoder_hidden_states is None:
            raise ValueError("NetiCrossAttnProcessor is for cross-attention: encoder_hidden_states is required")
        key_text, value_text = self.split(encoder_hidden_states)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, key_text.shape[1], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            key_text = attn.norm_encoder_hidden_states(key_text)
            value_text = attn.norm_encoder_hidden_states(value_text)
        key, value = attn.to_k(key_text), attn.to_v(value_text)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (x.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for x in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)  # (B, HW, C)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def install_processors(unet: nn.Module, layers: list[CrossAttentionLayer], seq_len: int | None = None) -> None:
    """Give every cross-attention layer its NeTI processor; other attention keeps its processor. `seq_len`, the
    text encoder's sequence length, tells packed encodings from plain ones of any length."""
    processors = dict(unet.attn_processors)
    for layer in layers:
        processors[f"{layer.path}.processor"] = NetiCrossAttnProcessor(layer.index, len(layers), seq_len)
    unet.set_attn_processor(processors)


def has_processors(unet: nn.Module, layers: list[CrossAttentionLayer], seq_len: int | None = None) -> bool:
    current = unet.attn_processors
    return all(isinstance(p := current.get(f"{layer.path}.processor"), NetiCrossAttnProcessor)
               and p.seq_len == seq_len and p.num_layers == len(layers) for layer in layers)


def ensure_processors(unet: nn.Module, layers: list[CrossAttentionLayer], seq_len: int | None = None) -> None:
    """Install the NeTI processors unless this UNet already has them for these layers and sequence length."""
    if not has_processors(unet, layers, seq_len):
        install_processors(unet, layers, seq_len)
