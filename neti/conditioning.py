"""Text conditioning in P*: every (timestep, layer) encoding of a prompt in one batched pass (NeTI Sec. 3.1-3.3).

For each row (prompt, t, l) the placeholder's input embedding is replaced by the concept's v_base(t, l) and the
CLIP text encoder runs on all rows at once (chunked only to bound memory), where the official code runs it once
per (t, l) pair. The textual bypass (Sec. 3.3, as in the official code) adds alpha * v_pass / ||v_pass|| * ||h||
to the encoder's last hidden state h at the placeholder, before the final LayerNorm: the plain sequence feeds
cross-attention keys, the bypassed one the values (docs/method.md "Text conditioning and the textual bypass").

Placeholder tokens are never added to the tokenizer: a prompt is split around them, so a shared tokenizer and
text encoder are never mutated and several concepts can share one prompt. A token matches only as a word of its
own (`token_pattern`), the one rule training, generation and the app share.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import DEFAULT_BYPASS_ALPHA

PLACEHOLDER = "{}"
# Tokens (rows x sequence length) per text-encoder call. On the CPU small chunks keep the activations in cache:
# 50 steps x 16 layers of the bundled model encode ~1.9x faster in chunks of 2,048 tokens than in one call
# (benchmarks/README.md). Accelerators take one call for 50 steps x 16 layers x 77 tokens.
CHUNK_TOKENS = {"cpu": 2048}
DEFAULT_CHUNK_TOKENS = 65536
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
    keys: torch.Tensor  # (..., S, D) plain encodings, for cross-attention keys
    values: torch.Tensor  # (..., S, D) bypassed encodings, for cross-attention values


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


class TextConditioner:
    """Batched P* text encodings for one tokenizer / text encoder pair, with a cache for inference."""

    def __init__(self, tokenizer, text_encoder: nn.Module, chunk_rows: int | None = None, cache_size: int = 16):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.chunk_rows = chunk_rows  # None: by CHUNK_TOKENS for the encoder's device
        self.cache_size = cache_size
        self._cache: OrderedDict = OrderedDict()

    @property
    def max_length(self) -> int:
        return self.tokenizer.model_max_length

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

    def _body(self, embeds: torch.Tensor) -> torch.Tensor:
        """CLIP text transformer on input embeddings (N, S, D) -> last hidden state before the final LayerNorm."""
        from transformers.masking_utils import create_causal_mask

        parts = _text_parts(self.text_encoder)
        rows = self.chunk_rows or max(1, CHUNK_TOKENS.get(embeds.device.type, DEFAULT_CHUNK_TOKENS) // embeds.shape[1])
        out = None
        for start in range(0, embeds.shape[0], rows):
            hidden = parts.embeddings(inputs_embeds=embeds[start:start + rows])
            mask = create_causal_mask(config=parts.config, inputs_embeds=hidden, attention_mask=None, cache=None)
            hidden = parts.encoder(inputs_embeds=hidden, attention_mask=mask, is_causal=True).last_hidden_state
            if rows >= embeds.shape[0]:
                return hidden
            if out is None:
                out = hidden.new_empty((embeds.shape[0], *hidden.shape[1:]))
            out[start:start + rows] = hidden
        return out

    def encode_rows(self, prompts: Sequence[TokenizedPrompt], prompt_index: torch.Tensor, t: torch.Tensor,
                    l: torch.Tensor, concepts: Mapping[str, nn.Module], truncation: int | None = None,
                    alpha: float = DEFAULT_BYPASS_ALPHA) -> Encoding:
        """Encodings of rows (prompts[prompt_index[n]], t[n], l[n]): keys and values, each (N, S, D)."""
        parts = _text_parts(self.text_encoder)
        weight = parts.embeddings.token_embedding.weight
        device, dtype = weight.device, weight.dtype
        ids = torch.tensor([p.ids for p in prompts], device=device)
        prompt_index = prompt_index.to(device)
        embeds = parts.embeddings.token_embedding(ids)[prompt_index]  # (N, S, D)
        bypass_rows, bypass_pos, bypass_vec = [], [], []
        for token, concept in concepts.items():
            rows, pos = _slot_rows(prompts, prompt_index, token)
            if rows.numel() == 0:
                continue
            unique, inverse = torch.unique(rows, return_inverse=True)
            where = _device_of(concept, device)  # the concept stays where its owner put it
            out = concept(t[unique.cpu()].to(where), l[unique.cpu()].to(where), truncation)
            embeds = embeds.index_put((rows, pos), out.base.to(device, dtype)[inverse])
            if out.bypass is not None and alpha != 0:
                bypass_rows.append(rows), bypass_pos.append(pos), bypass_vec.append(out.bypass.to(device)[inverse])
        hidden = self._body(embeds)  # (N, S, D) before the final LayerNorm
        keys = parts.final_layer_norm(hidden)
        if not bypass_rows:
            return Encoding(keys, keys)
        rows, pos, vec = torch.cat(bypass_rows), torch.cat(bypass_pos), torch.cat(bypass_vec)
        at = hidden[rows, pos]  # (M, D)
        shifted = at + alpha * F.normalize(vec.to(at.dtype), dim=-1) * at.norm(dim=-1, keepdim=True)
        # the final LayerNorm acts per token, so only the placeholder positions differ from the keys
        values = keys.index_put((rows, pos), parts.final_layer_norm(shifted))
        return Encoding(keys, values)

    def encode_grid(self, prompt: TokenizedPrompt, concepts: Mapping[str, nn.Module], timesteps: Sequence[float],
                    num_layers: int, truncation: int | None = None,
                    alpha: float = DEFAULT_BYPASS_ALPHA) -> Encoding:
        """All (timestep, layer) encodings of one prompt: keys and values, each (T, L, S, D), cached at inference.

        Rows a concept cannot tell apart (XTI ignores t, TI ignores t and l, a plain prompt ignores both) are
        encoded once and broadcast.
        """
        used = {tok: c for tok, c in concepts.items() if any(tok == s for _, s in prompt.slots)}
        key = None
        if not torch.is_grad_enabled():
            key = (prompt, tuple(timesteps), num_layers, truncation, float(alpha), _identity(used),
                   id(self.text_encoder))
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        by_time = any(getattr(c, "depends_on_time", True) for c in used.values())
        by_layer = any(getattr(c, "depends_on_layer", True) for c in used.values())
        ts = torch.as_tensor(list(timesteps) if by_time else [timesteps[0]], dtype=torch.float32)
        ls = torch.arange(num_layers if by_layer else 1, dtype=torch.float32)
        grid_t, grid_l = torch.meshgrid(ts, ls, indexing="ij")
        rows = torch.zeros(grid_t.numel(), dtype=torch.long)
        enc = self.encode_rows([prompt], rows, grid_t.reshape(-1), grid_l.reshape(-1), used, truncation, alpha)
        shape = (len(ts), len(ls), *enc.keys.shape[1:])
        full = (len(timesteps), num_layers, *enc.keys.shape[1:])
        keys = enc.keys.view(shape).expand(full)
        values = keys if enc.values is enc.keys else enc.values.view(shape).expand(full)
        result = Encoding(keys, values)
        if key is not None:
            self._cache[key] = result
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return result

    def clear_cache(self) -> None:
        self._cache.clear()


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
