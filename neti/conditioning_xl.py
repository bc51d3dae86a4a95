"""Text conditioning in P* on SDXL: two text encoders and a pooled embedding that follows t (NeTI Sec. 3.1-3.3).

SDXL conditions cross-attention on the concatenation of two encoders' penultimate hidden states (CLIP ViT-L, 768
wide, and OpenCLIP ViT-bigG, 1280) and its time embedding on bigG's projected end-of-text output (the pooled
embedding). A concept's mapper therefore outputs 768 + 1280 values per (t, l) (and as many for the bypass): the
first share replaces the placeholder's input embedding in the first encoder, the second in the second. Both
encoders run batched over all (t, l) rows with `TextConditioner`'s code in its `penultimate` mode; the rows of the
two are joined on the width axis.

The textual bypass (Sec. 3.3) is added where the official code adds it relative to the output: to the last state
before cross-attention. On SDXL that is the penultimate hidden state, which has no final LayerNorm, so
h + alpha * v_pass / ||v_pass|| * ||h|| goes to cross-attention as is; scaling by ||h|| keeps alpha the same
relative change as on SD 1.x, where the LayerNorm would undo any absolute scale (docs/sdxl.md).

The pooled embedding enters every UNet block through the time embedding, not through one layer, so the mapper is
queried at one extra, virtual layer l = L (`MapperConfig.pooled_layer`): M(t, L)'s second-encoder share replaces
the placeholder in a full pass of bigG, whose projected end-of-text output is the pooled embedding at t. The
generator hands it to diffusers' pipeline per step through the step-end callback (`add_text_embeds`).
"""

from __future__ import annotations

import itertools

from collections import OrderedDict
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import nn

from .conditioning import (DEFAULT_CHUNK_BYTES, CACHE_BYTES, DEFAULT_CACHE_BYTES, Encoding, GridConditioner,
                           GridEncoding, TextConditioner, TokenizedPrompt, _slot_rows, _text_parts, storage_bytes)
from .config import DEFAULT_BYPASS_ALPHA
from .mapper import MapperOutput


@dataclass(frozen=True)
class XLPrompt:
    """A prompt as each of SDXL's tokenizers reads it."""

    parts: tuple[TokenizedPrompt, ...]  # one per text encoder

    @property
    def slots(self) -> tuple[tuple[int, str], ...]:
        return self.parts[0].slots


@dataclass(frozen=True)
class XLGridEncoding(GridEncoding):
    """A `GridEncoding` (width 768 + 1280) with the pooled embedding of each stored timestep."""

    pooled: torch.Tensor  # (U, P) the pooled embedding at each of rows' timesteps

    def pooled_step(self, i: int) -> torch.Tensor:
        """(P,) the pooled embedding of denoising step i."""
        return self.pooled[self.step_rows[i]]

    def to(self, device: torch.device | str) -> "XLGridEncoding":
        return XLGridEncoding(self.rows.to(device), self.step_rows, self.num_layers, self.pooled.to(device))

    @property
    def nbytes(self) -> int:
        return self.rows.nbytes + storage_bytes(self.pooled)


class _Share(nn.Module):
    """One encoder's share of mapper outputs computed once for both encoders (nested dropout draws once)."""

    def __init__(self, out: MapperOutput, index: int, widths: Sequence[int]):
        super().__init__()
        start = sum(widths[:index])
        self.out = MapperOutput(out.base[:, start:start + widths[index]],
                                None if out.bypass is None else out.bypass[:, start:start + widths[index]])

    def forward(self, t: torch.Tensor, l: torch.Tensor, truncation: int | None = None) -> MapperOutput:
        assert len(t) == len(self.out.base), "the rows of both encoders' slots must agree"
        return self.out


def _join(encodings: Sequence[Encoding], keys: torch.Tensor) -> Encoding:
    """Encodings of the same rows from several encoders, whose keys were written side by side into `keys` (so that
    the grid's keys are never held twice). The bypassed placeholder rows stay compact when the tokenizers put the
    placeholders at the same positions (SDXL's share one vocabulary)."""
    if all(e.bypassed is None for e in encodings):
        return Encoding(keys)
    positions = next(e.positions for e in encodings if e.positions is not None)
    if all(e.positions is None or torch.equal(e.positions, positions) for e in encodings):
        parts = []
        for e in encodings:
            if e.bypassed is not None:
                parts.append(e.bypassed)
            else:  # no bypass on this encoder: its values are its keys at those positions
                index = positions.unsqueeze(-1).expand(*positions.shape, e.keys.shape[-1])
                parts.append(e.keys.gather(-2, index))
        return Encoding(keys, torch.cat(parts, dim=-1), positions)
    values = torch.cat([e.values for e in encodings], dim=-1)  # different positions: store the values whole
    every = torch.arange(keys.shape[-2], device=keys.device).expand(*keys.shape[:-1])
    return Encoding(keys, values, every)


class XLTextConditioner(GridConditioner):
    """Batched P* encodings for SDXL's two tokenizer / text-encoder pairs, with a byte-bounded inference cache.

    The arguments are `TextConditioner`'s, applied to both encoders (`chunk_rows` per encoder call)."""

    def __init__(self, tokenizers: Sequence, text_encoders: Sequence[nn.Module], chunk_rows: int | None = None,
                 cache_bytes: int | None = None, offload_cache: bool = False,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        self.parts = tuple(TextConditioner(tok, enc, chunk_rows, 0, offload_cache, chunk_bytes, penultimate=True)
                           for tok, enc in zip(tokenizers, text_encoders))
        lengths = {p.max_length for p in self.parts}
        if len(lengths) != 1:
            raise ValueError(f"SDXL's tokenizers read different lengths {sorted(lengths)}; they must agree")
        if cache_bytes is not None and (isinstance(cache_bytes, bool) or not isinstance(cache_bytes, int)
                                        or cache_bytes < 0):
            raise ValueError(f"cache_bytes must be a non-negative integer or None, got {cache_bytes!r}")
        self.cache_bytes = cache_bytes
        self.offload_cache = offload_cache
        self._cache: OrderedDict = OrderedDict()

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(_text_parts(p.text_encoder).config.hidden_size for p in self.parts)

    @property
    def max_length(self) -> int:
        return self.parts[0].max_length

    @property
    def tokenizer(self):
        return self.parts[0].tokenizer

    @property
    def cache_budget(self) -> int:
        if self.cache_bytes is not None:
            return self.cache_bytes
        device = _text_parts(self.parts[0].text_encoder).embeddings.token_embedding.weight.device
        return CACHE_BYTES.get(device.type, DEFAULT_CACHE_BYTES)

    def token_count(self, prompt: str, tokens: Sequence[str] = ()) -> int:
        return max(p.token_count(prompt, tokens) for p in self.parts)

    def tokenize(self, prompt: str, tokens: Sequence[str] = ()) -> XLPrompt:
        return XLPrompt(tuple(p.tokenize(prompt, tokens) for p in self.parts))

    def _shared(self, prompts: Sequence[XLPrompt], prompt_index: torch.Tensor, t: torch.Tensor, l: torch.Tensor,
                concepts: Mapping[str, nn.Module], truncation: int | None) -> dict[str, MapperOutput]:
        """Each concept's outputs at the rows holding its token, computed once for both encoders."""
        outputs = {}
        for token, concept in concepts.items():
            rows, _ = _slot_rows([p.parts[0] for p in prompts], prompt_index, token)
            if rows.numel():
                unique = torch.unique(rows).cpu()
                where = next(iter(concept.parameters()), t).device
                outputs[token] = concept(t[unique].to(where), l[unique].to(where), truncation)
        return outputs

    def encode_rows(self, prompts: Sequence[XLPrompt], prompt_index: torch.Tensor, t: torch.Tensor,
                    l: torch.Tensor, concepts: Mapping[str, nn.Module], truncation: int | None = None,
                    alpha: float = DEFAULT_BYPASS_ALPHA) -> Encoding:
        """Encodings of rows (prompts[prompt_index[n]], t[n], l[n]): keys (N, S, 768 + 1280) and bypassed rows."""
        shared = self._shared(prompts, prompt_index, t, l, concepts, truncation)
        weight = self.parts[0].text_encoder.get_input_embeddings().weight
        keys = weight.new_empty((len(prompt_index), len(prompts[0].parts[0].ids), sum(self.widths)))
        encodings, offsets = [], [0, *itertools.accumulate(self.widths)]
        for i, part in enumerate(self.parts):
            shares = {token: _Share(out, i, self.widths) for token, out in shared.items()}
            encodings.append(part.encode_rows([p.parts[i] for p in prompts], prompt_index, t, l, shares, truncation,
                                              alpha, into=keys[..., offsets[i]:offsets[i + 1]]))
        return _join(encodings, keys)

    def pooled_rows(self, prompts: Sequence[XLPrompt], prompt_index: torch.Tensor, t: torch.Tensor, pooled_layer: int,
                    concepts: Mapping[str, nn.Module], truncation: int | None = None) -> torch.Tensor:
        """(N, P) pooled embeddings of rows (prompts[prompt_index[n]], t[n]): M(t, `pooled_layer`)'s second share
        in the placeholder, a full pass of the second encoder, its end-of-text output projected."""
        part = self.parts[-1]
        encoder = part.text_encoder
        parts = _text_parts(encoder)
        weight = parts.embeddings.token_embedding.weight
        device, dtype = weight.device, weight.dtype
        l = torch.full_like(t, float(pooled_layer))
        shared = self._shared(prompts, prompt_index, t, l, concepts, truncation)
        ids = torch.tensor([p.parts[-1].ids for p in prompts], device=device)
        prompt_index = prompt_index.to(device)
        embeds = parts.embeddings.token_embedding(ids)[prompt_index]  # (N, S, D)
        for token, out in shared.items():
            rows, pos = _slot_rows([p.parts[-1] for p in prompts], prompt_index, token)
            base = _Share(out, len(self.parts) - 1, self.widths).out.base.to(device, dtype)
            _, inverse = torch.unique(rows, return_inverse=True)
            embeds = embeds.index_put((rows, pos), base[inverse])
        eos = torch.tensor([_end_of_text(p.parts[-1], part.tokenizer.eos_token_id) for p in prompts], device=device)
        step = part.rows_per_call(ids.shape[1], device, dtype)
        pooled = []
        for start in range(0, len(prompt_index), step):
            hidden = parts.final_layer_norm(part._body(embeds[start:start + step], all_layers=True))
            chunk = prompt_index[start:start + step]
            pooled.append(hidden[torch.arange(len(chunk), device=device), eos[chunk]])
        return encoder.text_projection(torch.cat(pooled))

    def encode_grid(self, prompt: XLPrompt, concepts: Mapping[str, nn.Module], timesteps: Sequence[float],
                    num_layers: int, truncation: int | None = None,
                    alpha: float = DEFAULT_BYPASS_ALPHA) -> XLGridEncoding:
        """All (timestep, layer) encodings of one prompt and its pooled embedding per timestep, each distinct row
        once (as `TextConditioner.encode_grid`), cached at inference."""
        used, key, hit, fresh = self._grid_rows(prompt, concepts, timesteps, num_layers, truncation, alpha)
        if hit is not None:
            return hit
        enc, ts, step_rows = fresh
        pooled = self.pooled_rows([prompt], torch.zeros(len(ts), dtype=torch.long), ts, num_layers, used, truncation)
        return self._store(key, XLGridEncoding(enc, step_rows, num_layers, pooled))

    def _encoder_ids(self) -> tuple[int, ...]:
        return tuple(id(p.text_encoder) for p in self.parts)


def conditioner_for(pipe, **kwargs) -> "TextConditioner | XLTextConditioner":
    """The text conditioner of a loaded pipeline: `XLTextConditioner` on SDXL, else `TextConditioner`."""
    if getattr(pipe, "text_encoder_2", None) is not None:
        return XLTextConditioner((pipe.tokenizer, pipe.tokenizer_2), (pipe.text_encoder, pipe.text_encoder_2),
                                 **kwargs)
    return TextConditioner(pipe.tokenizer, pipe.text_encoder, **kwargs)


def added_conditions(conditioner, prompts: Sequence, timesteps: torch.Tensor, num_layers: int,
                     concepts: Mapping[str, nn.Module], resolution: int) -> dict | None:
    """SDXL's `added_cond_kwargs` for a training batch: each sample's pooled embedding at its own timestep (the
    virtual layer L) and the size/crop conditioning of a square `resolution` image, uncropped, as the pipeline
    passes at that size; None on SD 1.x/2.x."""
    if not isinstance(conditioner, XLTextConditioner):
        return None
    tokenized = [conditioner.tokenize(p, list(concepts)) for p in prompts]
    pooled = conditioner.pooled_rows(tokenized, torch.arange(len(prompts)), timesteps.float().cpu(), num_layers,
                                     concepts)
    time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=pooled.dtype)
    return {"text_embeds": pooled, "time_ids": time_ids.to(pooled.device).expand(len(prompts), -1)}


def _end_of_text(prompt: TokenizedPrompt, eos_id: int) -> int:
    """The position of the end-of-text token `tokenize` appended: the first `eos_id` that is not a placeholder slot
    (a slot holds the pad id, which CLIP's tokenizers may share with the end-of-text id). transformers' CLIP pools
    the first end-of-text position (or, on configs with the old eos id 2, the largest id's); for prompts without a
    concept both are this position."""
    slots = {position for position, _ in prompt.slots}
    return next(i for i, token in enumerate(prompt.ids) if token == eos_id and i not in slots)
