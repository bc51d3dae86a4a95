"""Helpers for the app tests: a tiny base model on disk (the app itself runs through `neti.testing.AppServer`)."""

from __future__ import annotations

from pathlib import Path

# Enough of the toy world's vocabulary for the prompts the tests write.
APP_WORDS = ["a", "photo", "of", "the", "on", "background", "shape", "object", "white", "blue", "red", "green",
             "yellow", "black", "circle", "square", "heart", "two", "rendering", "picture"]


def build_tiny_model(folder: Path, resolution: int = 32) -> Path:
    """A random-weight SD-1.x-shaped pipeline (16 cross-attention layers) saved in diffusers layout."""
    from toyworld.sd_layout import SDShape, build_pipeline
    from toyworld.tokenizer import build_clip_tokenizer

    tokenizer = build_clip_tokenizer(APP_WORDS, folder / "vocab", max_length=32)
    model = folder / "model"
    build_pipeline(SDShape(resolution=resolution, max_tokens=32), tokenizer, seed=0).save_pretrained(model)
    return model
