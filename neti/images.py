"""Image grids and PNGs that carry their generation settings (NeTI Fig. 11/12/20-style sweeps and strips).

A PNG carries two text chunks: `neti` (the settings as JSON, read back by `read_settings`) and `parameters` in
the exact form of AUTOMATIC1111's web UI (prompt line, `Negative prompt:` line, then `Key: value` pairs), so that
A1111's PNG Info tab, civitai and other tools read the prompt, seed and sampler.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from .concept import atomic_write

SETTINGS_KEY = "neti"
A1111_SAMPLERS = {"dpm": "DPM++ 2M", "ddim": "DDIM", "euler": "Euler", "euler_a": "Euler a", "pndm": "PLMS",
                  "lms": "LMS", "unipc": "UniPC"}  # our scheduler names -> A1111's sampler names
GRID_CELL_MIN = 128  # cells of a labelled grid are upscaled (nearest) to at least this many pixels


def make_grid(images: Sequence[Image.Image], rows: int, cols: int, pad: int = 2) -> Image.Image:
    """Images laid out row-major into a rows x cols grid with `pad` white pixels between them."""
    if len(images) != rows * cols:
        raise ValueError(f"a {rows}x{cols} grid needs {rows * cols} images, got {len(images)}")
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w + (cols - 1) * pad, rows * h + (rows - 1) * pad), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % cols) * (w + pad), (i // cols) * (h + pad)))
    return grid


def labelled_grid(images: Sequence[Image.Image], x_labels: Sequence[str], y_labels: Sequence[str],
                  x_title: str = "", y_title: str = "", pad: int = 2) -> Image.Image:
    """A1111's X/Y plot: images row-major (rows are y values), each column headed by its x label and each row
    by its y label; the axis titles, if any, prefix the labels ("truncation: 8")."""
    rows, cols = len(y_labels), len(x_labels)
    if len(images) != rows * cols:
        raise ValueError(f"a {rows}x{cols} grid needs {rows * cols} images, got {len(images)}")
    w, h = images[0].size
    scale = max(1, -(-GRID_CELL_MIN // min(w, h)))  # ceil: tiny model images stay readable next to their labels
    cells = [image.resize((w * scale, h * scale), Image.NEAREST) if scale > 1 else image for image in images]
    body = make_grid(cells, rows, cols, pad)
    font = ImageFont.load_default(size=14)
    xs = [f"{x_title}: {x}" if x_title else str(x) for x in x_labels]
    ys = [f"{y_title}: {y}" if y_title else str(y) for y in y_labels]
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = lambda s: measure.textbbox((0, 0), s, font=font)[2]
    left = max(text_w(s) for s in ys) + 12
    top = 26
    grid = Image.new("RGB", (left + body.width, top + body.height), "white")
    grid.paste(body, (left, top))
    draw = ImageDraw.Draw(grid)
    cw, ch = w * scale, h * scale
    for i, s in enumerate(xs):
        draw.text((left + i * (cw + pad) + (cw - text_w(s)) / 2, 5), s, fill="black", font=font)
    for j, s in enumerate(ys):
        draw.text((6, top + j * (ch + pad) + ch / 2 - 8), s, fill="black", font=font)
    return grid


def _a1111_quote(value) -> str:
    """A1111's `quote()`: a value with a comma, colon or newline is written as a JSON string."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def a1111_parameters(settings: dict, size: tuple[int, int] | None = None) -> str:
    """The `parameters` text A1111 writes: the prompt (resolved: concept tokens in place of `{}`), a
    `Negative prompt:` line when there is one, and `Steps: 25, Sampler: DPM++ 2M, CFG scale: 7.5, Seed: 5,
    Size: 64x64, Model: ...` followed by the NeTI settings."""
    prompt = settings.get("resolved_prompt") or settings.get("prompt", "")
    if size is None and settings.get("width") and settings.get("height"):
        size = (settings["width"], settings["height"])
    lines = [prompt]
    if settings.get("negative_prompt"):
        lines.append(f"Negative prompt: {settings['negative_prompt']}")
    pairs = [("Steps", settings.get("steps")),
             ("Sampler", A1111_SAMPLERS.get(settings.get("scheduler"), settings.get("scheduler"))),
             ("CFG scale", settings.get("guidance")), ("Seed", settings.get("seed")),
             ("Size", f"{size[0]}x{size[1]}" if size else None), ("Model", settings.get("base_model") or None),
             ("NeTI concepts", " ".join(settings.get("concepts") or []) or None),
             ("NeTI truncation", "full" if settings.get("truncation") is None else settings["truncation"]),
             ("NeTI bypass strength", settings.get("alpha")),
             ("NeTI appearance", settings.get("appearance")),
             ("NeTI geometry layers", " ".join(settings["geometry_layers"]) if settings.get("geometry_layers")
              else None),
             ("NeTI mix start", _number(settings.get("mix_start"))),
             ("NeTI fixed timestep", _number(settings.get("fixed_timestep")))]
    lines.append(", ".join(f"{k}: {_a1111_quote(v)}" for k, v in pairs if v is not None and v != ""))
    return "\n".join(lines)


def _number(value):
    return int(value) if isinstance(value, float) and value.is_integer() else value


def file_name(stem: str, index: int, settings: dict) -> str:
    """`{stem}-{index:02d}-{concepts}-k{truncation}-a{alpha}-seed{seed}.png`, e.g.
    `image-00-crescent-k8-a0.2-seed4.png`: what a file is, readable in a folder listing."""
    concepts = "+".join(re.sub(r"[^A-Za-z0-9_.-]+", "", c) or "token" for c in settings.get("concepts") or [])
    if settings.get("appearance"):
        concepts += "+" + (re.sub(r"[^A-Za-z0-9_.-]+", "", settings["appearance"]) or "token")
    k = settings.get("truncation")
    parts = [stem, f"{index:02d}", concepts[:60] or "base", f"k{'full' if k is None else k}"]
    if settings.get("alpha") is not None:
        parts.append(f"a{settings['alpha']:g}")
    if settings.get("mix_start") is not None:
        parts.append(f"t{_number(settings['mix_start'])}")
    return "-".join(parts + [f"seed{settings['seed']}"]) + ".png"


def png_info(settings: dict, size: tuple[int, int] | None = None) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_text(SETTINGS_KEY, json.dumps(settings, sort_keys=True))
    if "seed" in settings:  # a grid's settings list its images instead
        info.add_text("parameters", a1111_parameters(settings, size))
    return info


def save_png(image: Image.Image, path: str | os.PathLike, settings: dict) -> Path:
    """Save atomically with the settings in PNG text chunks ('neti' as JSON, 'parameters' for other tools)."""
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=png_info(settings, image.size)))


def read_settings(path: str | os.PathLike) -> dict:
    """The settings a PNG written by `save_png` carries."""
    with Image.open(path) as image:
        return json.loads(image.text[SETTINGS_KEY])
