"""A word-level CLIP byte-pair tokenizer for a closed vocabulary, for tiny test models and the toy model.

NeTI (Sec. 3) learns a new token's representation in CLIP's text space; the tiny models need a real
`CLIPTokenizer` so that placeholders, super-categories and prompts tokenize as they do on Stable Diffusion.

`transformers.CLIPTokenizer` reads a `vocab.json` and `merges.txt` in OpenAI CLIP's byte-level BPE format. For
a small world we write such files ourselves: every byte as a symbol (so any text still tokenizes, letter by
letter), plus one merge chain per vocabulary word so that each known word becomes a single token.
"""

from __future__ import annotations

import json
from pathlib import Path

END_OF_WORD = "</w>"
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


def byte_symbols() -> list[str]:
    """The 256 printable stand-ins for bytes used by byte-level BPE (GPT-2 / CLIP), in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            symbols[byte] = chr(byte)
        else:
            symbols[byte] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def write_clip_vocabulary(words: list[str], folder: str | Path) -> Path:
    """Write `vocab.json` and `merges.txt` in which each of `words` (lowercase ASCII letters) is one token."""
    for word in words:
        if not word or not word.isascii() or not word.isalpha() or word != word.lower():
            raise ValueError(f"vocabulary word {word!r} must be non-empty lowercase ASCII letters")
    symbols = byte_symbols()
    vocab: dict[str, int] = {}
    for suffix in ("", END_OF_WORD):
        for symbol in symbols:
            vocab[symbol + suffix] = len(vocab)
    merges: list[str] = []
    for word in dict.fromkeys(words):
        pieces = list(word)
        pieces[-1] += END_OF_WORD
        merged = pieces[0]
        for piece in pieces[1:]:
            rule = f"{merged} {piece}"
            if rule not in merges:
                merges.append(rule)
            merged += piece
            vocab.setdefault(merged, len(vocab))
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder


def build_clip_tokenizer(words: list[str], folder: str | Path, max_length: int = 77):
    """A `CLIPTokenizer` over `words`, its files written to `folder` (use `save_pretrained` to ship it)."""
    from transformers import CLIPTokenizer

    folder = write_clip_vocabulary(words, folder)
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)
