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


OPENAI_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"  # OpenAI's CLIP merges, shipped inside the open_clip_torch wheel
OPENAI_BPE_ENV = "NETI_CLIP_BPE"  # or a path to that file


def openai_bpe_path() -> Path | None:
    """OpenAI CLIP's BPE merges file: `$NETI_CLIP_BPE`, else the copy inside an installed `open_clip` package (found
    without importing it), else None."""
    import importlib.util
    import os

    if os.environ.get(OPENAI_BPE_ENV):
        path = Path(os.environ[OPENAI_BPE_ENV])
        return path if path.is_file() else None
    spec = importlib.util.find_spec("open_clip")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / OPENAI_BPE_FILE).is_file():
            return Path(folder) / OPENAI_BPE_FILE
    return None


def openai_clip_tokenizer(folder: str | Path, max_length: int = 77):
    """Stable Diffusion's own tokenizer (OpenAI CLIP's 49,408-token BPE vocabulary) written to `folder` from the BPE
    file (`openai_bpe_path`), or None when that file is not available (`pip install open_clip_torch` ships it)."""
    import gzip

    from transformers import CLIPTokenizer

    path = openai_bpe_path()
    if path is None:
        return None
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]  # the 48,894 merges CLIP uses, as in OpenAI's SimpleTokenizer
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols = byte_symbols()
    ordered = [symbols[b] for b in printable] + [symbols[b] for b in range(256) if b not in printable]  # CLIP's order
    vocab = ordered + [s + END_OF_WORD for s in ordered] + ["".join(m.split()) for m in merges] + list(SPECIAL_TOKENS)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)
