"""Image grids and PNGs that carry their generation settings (NeTI Fig. 11/12/20-style sweeps and strips)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from PIL import Image, PngImagePlugin

from .concept import atomic_write

SETTINGS_KEY = "neti"


def make_grid(images: Sequence[Image.Image], rows: int, cols: int, pad: int = 2) -> Image.Image:
    """Images laid out row-major into a rows x cols grid with `pad` white pixels between them."""
    if len(images) != rows * cols:
        raise ValueError(f"a {rows}x{cols} grid needs {rows * cols} images, got {len(images)}")
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w + (cols - 1) * pad, rows * h + (rows - 1) * pad), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % cols) * (w + pad), (i // cols) * (h + pad)))
    return grid


def png_info(settings: dict) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_text(SETTINGS_KEY, json.dumps(settings, sort_keys=True))
    readable = ", ".join(f"{k}: {v}" for k, v in settings.items() if k != "prompt")
    info.add_text("parameters", f"{settings.get('prompt', '')}\n{readable}")  # the A1111 convention
    return info


def save_png(image: Image.Image, path: str | os.PathLike, settings: dict) -> Path:
    """Save atomically with the settings in PNG text chunks ('neti' as JSON, 'parameters' for other tools)."""
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=png_info(settings)))


def read_settings(path: str | os.PathLike) -> dict:
    """The settings a PNG written by `save_png` carries."""
    with Image.open(path) as image:
        return json.loads(image.text[SETTINGS_KEY])
