"""Text conditioning in P*: every (timestep, layer) encoding of a prompt in one batched pass (NeTI Sec. 3.1-3.3).

For each row (prompt, t, l) the placeholder's input embedding is replaced by the concept's v_base(t, l) and the
CLIP text encoder runs on all rows at once (chunked only to bound memory), where the official code runs it once
per (t, l) pair. The textual bypass (Sec. 3.3, as in the official code) adds alpha * v_pass / ||v_pass|| * ||h||
to the encoder's last hidden state h at the placeholder, before the final LayerNorm: the plain sequence feeds
cross-attention keys, the bypassed one the values (docs/method.md "Text conditioning and the textual bypass").

Placeholder tokens are never added to the tokenizer: a prompt is split around them, so a shared tokenizer and
text encoder are never mutated and several concepts can share one prompt. A token matches only as a word of its
own (`token_pattern`), the one rule training, generation and the app share.

Exact savings (docs/efficiency.md): rows no concept can tell apart are encoded once (repeated timesteps, the fixed
timestep of a decomposition, XTI's timesteps, TI's layers); the values are stored as the keys plus the bypassed
placeholder rows, since the bypass changes only those tokens; the inference cache is bounded in bytes.
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import DEFAULT_BYPASS_ALPHA

logger = logging.getLogger(__name__)

PLACEHOLDER = "{}"
# Tokens (rows x sequence length) per text-encoder call on the CPU, where small chunks keep the activations in
# cache: 50 steps x 16 layers of the bundled model encode ~1.9x faster in chunks of 2,048 tokens than in one call
# (benchmarks/README.md).
CHUNK_TOKENS = {"cpu": 2048}
# Elsewhere (accelerators) a chunk is sized by the transient memory of one encoder layer (`_layer_bytes_per_row`):
# 256 MiB is ~118 rows of 77 tokens for SD 1.5 in fp16 and ~88 for SD 2.1, thousands of tokens per call.
DEFAULT_CHUNK_BYTES = 256 * 2**20
# Byte budget of the inference cache of encodings, by device type of the text encoder. One 50-step encoding of a
# one-concept prompt stores its keys plus the placeholder rows: 95 MB for SD 1.5 in fp16, 126 MB for SD 2.1, twice
# that in fp32; a decomposition's fixed timestep stores 1/50 of that.
CACHE_BYTES = {"cpu": 2 * 2**30}
DEFAULT_CACHE_BYTES = 512 * 2**20  # accelerators: ~5 SD 1.5 / 4 SD 2.1 fp16 encodings
_TOKEN_LIKE = re.compile(r"<[^<>\s]+>")
_BRACKETED = re.compile(r"<[^<>{}\s]+>")
_BARE = re.compile(r"\w+")
MAX_TOKEN_CHARS = 64


@dataclass(frozen=True)
class TokenizedPrompt:
    ids: tuple[int, ...]  # (S,) token ids; placeholder slots hold the pad id
    slots: tuple[tuple[int, str], ...]  # (position, concept token) for every placeholder occurrence


@dataclass(frozen=True)
class Encoding:
    """Text encodings of rows: the keys, and the values stored as the keys plus their bypassed placeholder rows.

    The bypass changes the encoder's output only at the placeholder (the final LayerNorm acts per token), so the
    values equal the keys everywhere else and `values` rebuilds them exactly.
    """

    keys: torch.Tensor  # (..., S, D) plain encodings, for cross-attention keys
    bypassed: torch.Tensor | None = None  # (..., P, D) the values at `positions`; None: the values are the keys
    positions: torch.Tensor | None = None  # (..., P) long, the sequence positions of `bypassed`

    @property
    def values(self) -> torch.Tensor:
        """(..., S, D) bypassed encodings, for cross-attention values."""
        if self.bypassed is None:
            return self.keys
        index = self.positions.to(self.keys.device).unsqueeze(-1).expand(self.bypassed.shape)
        return self.keys.scatter(-2, index, self.bypassed.to(self.keys.dtype))

    def __getitem__(self, index) -> "Encoding":
        """The rows at `index` of the leading dimensions."""
        if self.bypassed is None:
            return Encoding(self.keys[index])
        return Encoding(self.keys[index], self.bypassed[index], self.positions[index])

    def view(self, *lead: int) -> "Encoding":
        """The same rows with leading dimensions `lead`."""
        if self.bypassed is None:
            return Encoding(self.keys.view(*lead, *self.keys.shape[-2:]))
        return Encoding(self.keys.view(*lead, *self.keys.shape[-2:]),
                        self.bypassed.view(*lead, *self.bypassed.shape[-2:]),
                        self.positions.view(*lead, self.positions.shape[-1]))

    def expand(self, *lead: int) -> "Encoding":
        """A broadcast view with leading dimensions `lead` (no copy)."""
        if self.bypassed is None:
            return Encoding(self.keys.expand(*lead, -1, -1))
        return Encoding(self.keys.expand(*lead, -1, -1), self.bypassed.expand(*lead, -1, -1),
                        self.positions.expand(*lead, -1))

    def to(self, device: torch.device | str) -> "Encoding":
        if self.bypassed is None:
            return Encoding(self.keys.to(device))
        return Encoding(self.keys.to(device), self.bypassed.to(device), self.positions.to(device))

    @property
    def nbytes(self) -> int:
        return storage_bytes(self.keys, self.bypassed, self.positions)


@dataclass(frozen=True)
class GridEncoding:
    """All (timestep, layer) encodings of one prompt, each distinct row stored once.

    `rows` holds the distinct timesteps x layers, (U, L', ...) with L' = 1 when no concept depends on the layer;
    denoising step i reads `rows[step_rows[i]]`. `keys` and `values` give the full (T, L, S, D) grid.
    """

    rows: Encoding  # (U, L', S, D)
    step_rows: tuple[int, ...]  # (T,) the stored timestep of each step
    num_layers: int  # L

    @property
    def num_steps(self) -> int:
        return len(self.step_rows)

    def step(self, i: int) -> Encoding:
        """The (L, S, D) encodings of denoising step i."""
        return self.rows[self.step_rows[i]].expand(self.num_layers)

    def _grid(self, part: torch.Tensor) -> torch.Tensor:
        index = torch.tensor(self.step_rows, device=part.device)
        grid = part[index] if len(set(self.step_rows)) > 1 else part[self.step_rows[0]].unsqueeze(0)
        return grid.expand(self.num_steps, self.num_layers, *part.shape[2:])

    @property
    def keys(self) -> torch.Tensor:
        return self._grid(self.rows.keys)

    @property
    def values(self) -> torch.Tensor:
        return self._grid(self.rows.values)

    def to(self, device: torch.device | str) -> "GridEncoding":
        return GridEncoding(self.rows.to(device), self.step_rows, self.num_layers)

    @property
    def nbytes(self) -> int:
        return self.rows.nbytes


def storage_bytes(*tensors: torch.Tensor | None) -> int:
    """Bytes of the memory behind `tensors`, each storage counted once (broadcast views cost nothing)."""
    seen = {}
    for t in tensors:
        if t is not None:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def check_token_text(token: str) -> str:
    """The token rule, shared by training, generation and the app: `<name>` (no spaces, `<>{}` inside) or a bare
    word of letters, digits and `_`. Such a token matches a prompt only as a word of its own (`find_token`)."""
    if not isinstance(token, str) or not token.strip() or token != token.strip() or any(c.isspace() for c in token):
        raise ValueError(f"placeholder token {token!r} must be one word without spaces, e.g. '<my-cat>'")
    if PLACEHOLDER in token:
        raise ValueError(f"placeholder token {token!r} must not contain {{}}")
    if len(token) > MAX_TOKEN_CHARS:
        raise ValueError(f"placeholder token {token[:20]!r}... has {len(token)} characters, more than "
                         f"{MAX_TOKEN_CHARS}; choose a short token such as '<my-cat>'")
    if token.startswith("<") or token.endswith(">"):
        if not _BRACKETED.fullmatch(token):
            raise ValueError(f"placeholder token {token!r} must be '<name>' with no '<', '>', '{{' or '}}' inside the "
                             "brackets, e.g. '<my-cat>'")
    elif not _BARE.fullmatch(token):
        raise ValueError(f"placeholder token {token!r} without angle brackets must be letters, digits and '_' only "
                         f"(it is matched as a whole word); write it as '<{token}>'")
    return token


def token_pattern(tokens: Sequence[str]) -> re.Pattern:
    """Matches any of `tokens` as a word of its own: not joined to a letter, digit or '_' on either side, so the
    token 'art' is not found in 'heart' and '<dc>' not in '<dc>s'."""
    alternatives = "|".join(re.escape(t) for t in sorted(set(tokens), key=len, reverse=True))
    return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)")


def find_token(text: str, token: str) -> bool:
    """Whether `token` occurs in `text` as a word of its own (the one matching rule, `token_pattern`)."""
    return token_pattern([token]).search(text) is not None


def format_prompt(prompt: str, tokens: Sequence[str]) -> str:
    """Put the concept token in place of `{}` and check that every concept and no unknown token is used."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("the prompt is empty: write one, with {} (or the concept's token) where the concept goes")
    if PLACEHOLDER in prompt:
        if len(tokens) != 1:
            raise ValueError(
                f"the prompt {prompt!r} uses {{}} but {len(tokens)} concepts are selected; with several concepts "
                f"write their tokens ({', '.join(tokens) or 'none'}) instead of {{}}"
            )
        prompt = prompt.replace(PLACEHOLDER, tokens[0])
    for found in _TOKEN_LIKE.findall(prompt):
        if found not in tokens:
            raise ValueError(
                f"the prompt uses the token {found!r}, which is not a selected concept "
                f"(selected: {', '.join(tokens) or 'none'}); select its concept or remove it from the prompt"
            )
    for token in tokens:
        if not find_token(prompt, token):
            raise ValueError(
                f"the prompt {prompt!r} does not contain the concept's token {token!r} as a word of its own: "
                f"write {token} (or {{}}) where the concept should appear"
            )
    return prompt


def check_placeholder_token(tokenizer, token: str) -> None:
    """A placeholder must follow the token rule (`check_token_text`) and be new: not in the vocabulary."""
    check_token_text(token)
    if token.lower() in tokenizer.get_vocab() or token.lower() + "</w>" in tokenizer.get_vocab():
        raise ValueError(
            f"placeholder token {token!r} is already in the tokenizer's vocabulary; pick a new word, e.g. '<{token}>'"
        )


def super_category_id(tokenizer, word: str) -> int:
    """The id of `word`, which must be exactly one existing token; the error shows how the tokenizer splits it."""
    pieces = tokenizer.tokenize(word) if isinstance(word, str) and word.strip() else []
    if len(pieces) != 1:
        raise ValueError(
            f"super-category {word!r} must be exactly one existing token, but the tokenizer splits it into "
            f"{pieces}; choose a common single word such as 'object', 'cat' or 'teapot'"
        )
    return tokenizer.convert_tokens_to_ids(pieces[0])


def _text_parts(text_encoder: nn.Module) -> nn.Module:
    return getattr(text_encoder, "text_model", text_encoder)  # transformers 4.x nests the parts, 5.x does not


def text_transformer(text_encoder: nn.Module, embeds: torch.Tensor, penultimate: bool = False) -> torch.Tensor:
    """A CLIP text encoder on input embeddings (N, S, D) instead of token ids: the last hidden state before the
    final LayerNorm, exactly what `text_encoder(ids)` computes from the ids' embeddings (causal mask, no padding
    mask, as in Stable Diffusion); with `penultimate`, the hidden state before the last encoder layer (SDXL's)."""
    from transformers.masking_utils import create_causal_mask

    parts = _text_parts(text_encoder)
    hidden = parts.embeddings(inputs_embeds=embeds)
    mask = create_causal_mask(config=parts.config, inputs_embeds=hidden, attention_mask=None, cache=None)
    if not penultimate:
        return parts.encoder(inputs_embeds=hidden, attention_mask=mask, is_causal=True).last_hidden_state
    for layer in parts.encoder.layers[:-1]:
        hidden = layer(hidden, mask, is_causal=True)
    return hidden


def grid_plan(used: Mapping[str, nn.Module], timesteps: Sequence[float], num_layers: int
              ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """The rows a grid encoding needs: the distinct timesteps and the layers to encode, and each denoising step's
    row of timesteps. Rows no concept can tell apart are encoded once: repeated timesteps (a decomposition's fixed
    t), every timestep when no concept depends on t (XTI, TI, a plain prompt), every layer when none depends on
    the layer (TI, a plain prompt)."""
    by_time = any(getattr(c, "depends_on_time", True) for c in used.values())
    by_layer = any(getattr(c, "depends_on_layer", True) for c in used.values())
    distinct = list(dict.fromkeys(float(t) for t in timesteps)) if by_time else [float(timesteps[0])]
    where = {t: i for i, t in enumerate(distinct)}
    step_rows = tuple(where[float(t)] for t in timesteps) if by_time else (0,) * len(timesteps)
    ts = torch.tensor(distinct, dtype=torch.float32)
    return ts, torch.arange(num_layers if by_layer else 1, dtype=torch.float32), step_rows


class GridConditioner:
    """What SD's and SDXL's conditioners share: a grid's distinct (t, l) rows encoded in one batched call
    (`grid_plan`, their `encode_rows`) and the byte-bounded, least-recently-used cache of grid encodings kept at
    inference (their `_cache`, `cache_budget` and `offload_cache`)."""

    _cache: OrderedDict
    offload_cache: bool

    @property
    def cached_bytes(self) -> int:
        return sum(size for _, size in self._cache.values())

    def _cache_key(self, *parts):
        """A cache key, or None while gradients are on (training encodes afresh)."""
        return None if torch.is_grad_enabled() else parts

    def _lookup(self, key):
        if key is None or key not in self._cache:
            return None
        self._cache.move_to_end(key)
        return self._cache[key][0]

    def _store(self, key, result):
        """Cache `result` under `key` (not when None), in CPU memory with `offload_cache`; returns what to use."""
        if key is None:
            return result
        if self.offload_cache:
            result = result.to("cpu")
        size, budget = result.nbytes, self.cache_budget
        if size > budget:
            logger.debug("an encoding of %d bytes exceeds the cache budget (%d bytes): not cached", size, budget)
            return result
        self._cache[key] = (result, size)
        while self.cached_bytes > budget:
            self._cache.popitem(last=False)
        return result

    def clear_cache(self) -> None:
        self._cache.clear()

    def _grid_rows(self, prompt, concepts: Mapping[str, nn.Module], timesteps: Sequence[float], num_layers: int,
                   truncation: int | None, alpha: float):
        """The start of `encode_grid`: the concepts the prompt uses, the cache key, a cached result if any, else
        the distinct rows encoded, (T', L', S, D), with their timesteps and each step's row."""
        used = {tok: c for tok, c in concepts.items() if any(tok == s for _, s in prompt.slots)}
        key = self._cache_key(prompt, tuple(timesteps), num_layers, truncation, float(alpha), _identity(used),
                              self._encoder_ids())
        if (hit := self._lookup(key)) is not None:
            return used, key, hit, None
        ts, ls, step_rows = grid_plan(used, timesteps, num_layers)
        grid_t, grid_l = torch.meshgrid(ts, ls, indexing="ij")
        rows = torch.zeros(grid_t.numel(), dtype=torch.long)
        enc = self.encode_rows([prompt], rows, grid_t.reshape(-1), grid_l.reshape(-1), used, truncation, alpha)
        return used, key, None, (enc.view(len(ts), len(ls)), ts, step_rows)


class TextConditioner(GridConditioner):
    """Batched P* text encodings for one tokenizer / text encoder pair, with a byte-bounded cache for inference.

    `chunk_rows` fixes the rows per text-encoder call (default: `CHUNK_TOKENS` on the CPU, `chunk_bytes` of
    transient memory elsewhere). `cache_bytes` bounds the cache (default `CACHE_BYTES` for the text encoder's
    device type); `offload_cache` keeps cached encodings in CPU memory, moved to the device one step at a time.
    """

    def __init__(self, tokenizer, text_encoder: nn.Module, chunk_rows: int | None = None,
                 cache_bytes: int | None = None, offload_cache: bool = False,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, penultimate: bool = False):
        for name, value in (("chunk_rows", chunk_rows), ("cache_bytes", cache_bytes)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be a non-negative integer or None, got {value!r}")
        if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be a positive integer, got {chunk_bytes!r}")
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.chunk_rows = chunk_rows or None  # None: by CHUNK_TOKENS / chunk_bytes for the encoder's device
        self.chunk_bytes = chunk_bytes
        self.cache_bytes = cache_bytes  # None: CACHE_BYTES for the encoder's device; 0: no cache
        self.offload_cache = offload_cache
        # SDXL (conditioning_xl.py): the encodings are the penultimate hidden states, the last encoder layer skipped
        # and no final LayerNorm; the bypass is then added to what cross-attention receives.
        self.penultimate = penultimate
        self._cache: OrderedDict = OrderedDict()  # key -> (GridEncoding, its bytes)

    @property
    def max_length(self) -> int:
        return self.tokenizer.model_max_length

    @property
    def cache_budget(self) -> int:
        """The cache's byte budget: `cache_bytes`, else the default for the text encoder's device type."""
        if self.cache_bytes is not None:
            return self.cache_bytes
        device = _text_parts(self.text_encoder).embeddings.token_embedding.weight.device
        return CACHE_BYTES.get(device.type, DEFAULT_CACHE_BYTES)

    def embedding_of(self, token_id: int) -> torch.Tensor:
        return _text_parts(self.text_encoder).embeddings.token_embedding.weight[token_id].detach()

    def token_count(self, prompt: str, tokens: Sequence[str] = ()) -> int:
        """How many tokens `prompt` takes with its start and end tokens (a concept token is one), uncut: more
        than `max_length` means the end of the prompt is cut off."""
        ids, _ = self._ids(prompt, tokens)
        return len(ids) + 1

    def _ids(self, prompt: str, tokens: Sequence[str]) -> tuple[list[int], list[tuple[int, str]]]:
        """The start token and the prompt's ids (a pad id in each concept token's slot), uncut; the slots."""
        tok = self.tokenizer
        pieces, at = [], 0  # (text, is a token), split by the one matching rule (whole words only)
        for match in (token_pattern(tokens).finditer(prompt) if tokens else ()):
            pieces += [(prompt[at:match.start()], False), (match.group(), True)]
            at = match.end()
        pieces.append((prompt[at:], False))
        ids, slots = [tok.bos_token_id], []
        for piece, is_token in pieces:
            if is_token:
                slots.append((len(ids), piece))
                ids.append(tok.pad_token_id)
            elif piece.strip():
                ids.extend(tok(piece, add_special_tokens=False).input_ids)
        return ids, slots

    def tokenize(self, prompt: str, tokens: Sequence[str] = ()) -> TokenizedPrompt:
        """Token ids of `prompt` with one slot for each occurrence of a concept token, padded to max length."""
        tok = self.tokenizer
        ids, slots = self._ids(prompt, tokens)
        if len(ids) + 1 > self.max_length:
            lost = [t for p, t in slots if p >= self.max_length - 1]
            if lost:
                raise ValueError(
                    f"the prompt is too long ({len(ids) + 1} tokens, the model reads {self.max_length}) and the "
                    f"concept token {lost[0]} falls beyond the limit; shorten the prompt or move the token earlier"
                )
            ids = ids[: self.max_length - 1]
        ids.append(tok.eos_token_id)
        ids += [tok.pad_token_id] * (self.max_length - len(ids))
        return TokenizedPrompt(tuple(ids), tuple(slots))

    def _body(self, embeds: torch.Tensor, all_layers: bool = False) -> torch.Tensor:
        """`text_transformer` on input embeddings (N, S, D): the last hidden state before the final LayerNorm, or
        (`penultimate`, unless `all_layers`) the hidden state before the last encoder layer."""
        return text_transformer(self.text_encoder, embeds, penultimate=self.penultimate and not all_layers)

    def _output(self, hidden: torch.Tensor) -> torch.Tensor:
        """What cross-attention receives of a body output: the final LayerNorm's, or the penultimate state as is."""
        return hidden if self.penultimate else _text_parts(self.text_encoder).final_layer_norm(hidden)

    def rows_per_call(self, seq_len: int, device: torch.device, dtype: torch.dtype) -> int:
        """Rows per text-encoder call: `chunk_rows`, else `CHUNK_TOKENS` tokens on the CPU, else as many rows as
        fit `chunk_bytes` of one encoder layer's transient memory."""
        if self.chunk_rows:
            return self.chunk_rows
        if device.type in CHUNK_TOKENS:
            return max(1, CHUNK_TOKENS[device.type] // seq_len)
        per_row = _layer_bytes_per_row(_text_parts(self.text_encoder).config, seq_len, dtype)
        return max(1, self.chunk_bytes // per_row)

    def encode_rows(self, prompts: Sequence[TokenizedPrompt], prompt_index: torch.Tensor, t: torch.Tensor,
                    l: torch.Tensor, concepts: Mapping[str, nn.Module], truncation: int | None = None,
                    alpha: float = DEFAULT_BYPASS_ALPHA, into: torch.Tensor | None = None) -> Encoding:
        """Encodings of rows (prompts[prompt_index[n]], t[n], l[n]): keys (N, S, D) and the bypassed rows.
        `into`: an (N, S, D) tensor, possibly a view into a wider one, that receives the keys."""
        parts = _text_parts(self.text_encoder)
        weight = parts.embeddings.token_embedding.weight
        device, dtype = weight.device, weight.dtype
        ids = torch.tensor([p.ids for p in prompts], device=device)
        prompt_index = prompt_index.to(device)
        token_embeds = parts.embeddings.token_embedding(ids)  # (prompts, S, D)
        # the concepts' input embeddings at their (row, position) slots, and their bypass vectors
        slot_rows, slot_pos, slot_base, by_rows, by_pos, by_vec = [], [], [], [], [], []
        for token, concept in concepts.items():
            rows, pos = _slot_rows(prompts, prompt_index, token)
            if rows.numel() == 0:
                continue
            unique, inverse = torch.unique(rows, return_inverse=True)
            where = _device_of(concept, device)  # the concept stays where its owner put it
            out = concept(t[unique.cpu()].to(where), l[unique.cpu()].to(where), truncation)
            slot_rows.append(rows), slot_pos.append(pos), slot_base.append(out.base.to(device, dtype)[inverse])
            if out.bypass is not None and alpha != 0:
                by_rows.append(rows), by_pos.append(pos), by_vec.append(out.bypass.to(device)[inverse])
        slots = _concat(slot_rows, slot_pos, slot_base)
        bypass = _concat(by_rows, by_pos, by_vec)
        if bypass is not None:  # by row, so that the chunks below gather the placeholder rows in this order
            order = torch.sort(bypass[0], stable=True).indices
            bypass = tuple(x[order] for x in bypass)
        n, seq = len(prompt_index), ids.shape[1]
        step = self.rows_per_call(seq, device, dtype)
        keys, at = into, []  # at: the last hidden state before the final LayerNorm at the bypass slots
        for start in range(0, n, step):
            stop = min(n, start + step)
            embeds = token_embeds[prompt_index[start:stop]]  # (rows, S, D)
            if slots is not None:
                inside = (slots[0] >= start) & (slots[0] < stop)
                embeds = embeds.index_put((slots[0][inside] - start, slots[1][inside]), slots[2][inside])
            hidden = self._body(embeds)  # (rows, S, D)
            chunk_keys = self._output(hidden)
            if stop - start == n and keys is None:
                keys = chunk_keys
            else:
                if keys is None:
                    keys = chunk_keys.new_empty((n, *chunk_keys.shape[1:]))
                keys[start:stop] = chunk_keys
            if bypass is not None:
                inside = (bypass[0] >= start) & (bypass[0] < stop)
                at.append(hidden[bypass[0][inside] - start, bypass[1][inside]])
        if bypass is None:
            return Encoding(keys)
        rows, pos, vec = bypass
        at = torch.cat(at)  # (M, D)
        shifted = at + alpha * F.normalize(vec.to(at.dtype), dim=-1) * at.norm(dim=-1, keepdim=True)
        return _placeholder_rows(keys, rows, pos, self._output(shifted))

    def encode_grid(self, prompt: TokenizedPrompt, concepts: Mapping[str, nn.Module], timesteps: Sequence[float],
                    num_layers: int, truncation: int | None = None,
                    alpha: float = DEFAULT_BYPASS_ALPHA) -> GridEncoding:
        """All (timestep, layer) encodings of one prompt, (T, L, S, D) as a `GridEncoding`, cached at inference;
        rows no concept can tell apart are encoded once (`grid_plan`)."""
        _, key, hit, fresh = self._grid_rows(prompt, concepts, timesteps, num_layers, truncation, alpha)
        if hit is not None:
            return hit
        enc, _, step_rows = fresh
        return self._store(key, GridEncoding(enc, step_rows, num_layers))

    def _encoder_ids(self) -> int:
        return id(self.text_encoder)


def _layer_bytes_per_row(config, seq_len: int, dtype: torch.dtype) -> int:
    """Transient memory of one CLIP encoder layer per row, without gradients: the residual, LayerNorm, q, k, v and
    attention output (6 x D), the MLP's hidden and activation temporaries (3 x FFN), the attention scores."""
    width = 6 * config.hidden_size + 3 * config.intermediate_size + config.num_attention_heads * seq_len
    return seq_len * width * torch.tensor([], dtype=dtype).element_size()


def _concat(*lists: list) -> tuple[torch.Tensor, ...] | None:
    return tuple(torch.cat(x) for x in lists) if lists[0] else None


def _placeholder_rows(keys: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor, values: torch.Tensor) -> Encoding:
    """The encoding whose values are `keys` except `values` (M, D) at (rows, pos), rows sorted: each row's P
    (the most slots of any row) positions and values, a row with fewer slots padded with position 0 and its key
    there (position 0 is the start token, never a slot, so the padding rewrites the key it already holds)."""
    n, dim = keys.shape[0], keys.shape[-1]
    counts = torch.bincount(rows, minlength=n)
    first = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(rows), device=rows.device) - first[rows]  # each slot's index within its row
    width = int(counts.max())
    positions = torch.zeros(n, width, dtype=torch.long, device=keys.device).index_put((rows, rank), pos)
    bypassed = keys[:, :1].expand(n, width, dim).index_put((rows, rank), values.to(keys.dtype))
    return Encoding(keys, bypassed, positions)


def _device_of(module: nn.Module, default: torch.device) -> torch.device:
    first = next(iter(module.parameters()), None)
    return first.device if first is not None else default


def _slot_rows(prompts: Sequence[TokenizedPrompt], prompt_index: torch.Tensor, token: str):
    """(row, position) pairs of every occurrence of `token` over the rows."""
    rows, pos = [], []
    for p, prompt in enumerate(prompts):
        positions = [i for i, tok in prompt.slots if tok == token]
        if not positions:
            continue
        r = (prompt_index == p).nonzero().flatten()
        rows.append(r.repeat_interleave(len(positions)))
        pos.append(torch.tensor(positions, device=r.device).repeat(len(r)))
    if not rows:
        empty = torch.zeros(0, dtype=torch.long, device=prompt_index.device)
        return empty, empty
    return torch.cat(rows), torch.cat(pos)


def _identity(concepts: Mapping[str, nn.Module]) -> tuple:
    """Who the concepts are and how often their weights changed (in-place updates bump a tensor's version)."""
    return tuple(sorted((tok, getattr(c, "uid", id(c)), tuple(t._version for t in c.state_dict(keep_vars=True).values()))
                        for tok, c in concepts.items()))
