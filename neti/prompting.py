"""Prompt ergonomics for the app: the token counter's words, and putting a concept's token into a prompt.

CLIP reads a fixed number of tokens (77 for Stable Diffusion, start and end tokens included); a longer prompt is
cut at the end without a word (`neti.conditioning.TextConditioner.tokenize`). The counter says so before it
happens.
"""

from __future__ import annotations

import re

NEAR_LIMIT = 0.9  # warn from this fraction of the model's tokens on


def token_counter_text(used: int, limit: int) -> str:
    """'12/77 tokens', with a warning near the limit and past it."""
    text = f"{used}/{limit} tokens"
    if used > limit:
        return f"{text}: too long, the last {used - limit} token(s) will be cut off; shorten the prompt"
    if used >= NEAR_LIMIT * limit:
        return f"{text}: near the limit; words past {limit} tokens are cut off"
    return text


def insert_token(prompt: str, token: str) -> str:
    """`prompt` with `token` in it: in place of a `{}`, else appended (nothing changes if it is already there)."""
    prompt = prompt or ""
    if not token or re.search(rf"(?<!\S){re.escape(token)}(?!\S)", prompt):
        return prompt
    if "{}" in prompt:
        return prompt.replace("{}", token, 1)
    return f"{prompt.rstrip()} {token}".strip()
