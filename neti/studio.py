"""NeTI Studio's service layer: what the Gradio app (app.py) calls, with no Gradio in it (NeTI Sec. 4-5 as a tool).

- the concept library (`neti.library`) and background training (`neti.jobs`), re-exported here;
- `check_uploads`: training uploads are accepted by content (`neti.data.load_images`), with a per-file size cap
  and a count cap, and one readable reason per rejected file.
- `Studio`: the loaded base model and its `Generator`, model switching, and generation (generate, sweep, mix,
  decompose) writing PNGs that carry their settings (`neti.images.save_png`).

Generation while a training runs: it runs at once on the same frozen pipeline (the trainer only trains its own
mapper, and the attention processors are stateless), sharing the CPU, so both are slower. Generation calls are
serialised among themselves by a lock, and a base-model switch waits for that lock and refuses while a training
runs.
"""

from __future__ import annotations

import json
import logging
import os
import random
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .concept import Concept, export_textual_inversion, import_official
from .config import DEFAULT_BYPASS_ALPHA
from .data import ImageInputError, LoadedImage, read_caption, read_image
from .generate import Generator, Result, Sampling
from .jobs import TrainingBusyError, TrainingManager, TrainingSnapshot  # noqa: F401 (re-exported for the app)
from .library import ConceptLibrary, check_name, name_from_token
from .models import default_model, load_pipeline, model_label
from .paths import BUNDLED_MODEL, DEFAULT_CONCEPTS_DIR, EXAMPLES_DIR, SHIPPED_CONCEPTS_DIR
from .train import TrainConfig

logger = logging.getLogger(__name__)

MAX_UPLOAD_FILES = 20  # NeTI uses 3-10 images
MAX_UPLOAD_BYTES = 20 * 1024 * 1024  # per file


# ---- uploads ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class UploadCheck:
    paths: list[Path]  # accepted files, in upload order
    images: list  # their decoded RGB images with their captions (`neti.data.LoadedImage`)
    rejected: list[tuple[str, str]]  # (file name, reason)

    def messages(self) -> list[str]:
        return [f"{name}: {reason}" for name, reason in self.rejected]


def check_uploads(paths: Sequence[str | os.PathLike], max_files: int = MAX_UPLOAD_FILES,
                  max_bytes: int = MAX_UPLOAD_BYTES) -> UploadCheck:
    """Accept image files by their content; reject others with a reason each. Too many files is an error."""
    paths = [Path(p) for p in paths or []]
    if len(paths) > max_files:
        raise ValueError(f"{len(paths)} files uploaded, but at most {max_files} are accepted (NeTI uses 3-10 "
                         "images of the concept); remove some")
    accepted, images, rejected = [], [], []
    for path in paths:
        try:
            size = path.stat().st_size
        except OSError as exc:
            rejected.append((path.name, f"cannot be read ({exc.strerror or exc})"))
            continue
        if size > max_bytes:
            rejected.append((path.name, f"{size / 2**20:.1f} MB, over the {max_bytes / 2**20:.0f} MB limit per file"))
            continue
        if size == 0:
            rejected.append((path.name, "empty file (0 bytes)"))
            continue
        try:
            image, reason = read_image(path)
        except ImageInputError as exc:  # a decompression bomb
            image, reason = None, str(exc)
        if image is None:
            rejected.append((path.name, f"not usable as an image ({reason})"))
            continue
        try:
            caption = read_caption(path)
        except ImageInputError as exc:
            rejected.append((path.name, str(exc)))
            continue
        accepted.append(path)
        images.append(LoadedImage(path, image, caption))
    return UploadCheck(accepted, images, rejected)


def example_names(folder: Path = EXAMPLES_DIR) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if (p / "concept.json").is_file()) if folder.is_dir() else []


def example(name: str, folder: Path = EXAMPLES_DIR) -> tuple[list[Path], dict]:
    """A bundled example's image files and its concept.json (suggested token and super-category)."""
    if name not in example_names(folder):
        raise ValueError(f"there is no bundled example {name!r}; choose one of {', '.join(example_names(folder))}")
    meta = json.loads((folder / name / "concept.json").read_text())
    files = [folder / name / f for f in meta.get("images", [])] or sorted((folder / name).glob("*.png"))
    return files, meta


# ---- the studio ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Rendered:
    """Generated images written as PNGs with their settings, plus a caption per image."""

    paths: list[Path]
    captions: list[str]
    grid_path: Path | None = None
    settings: list[dict] = field(default_factory=list)


def pick_seed(seed: int | None) -> int:
    return random.randrange(2**31) if seed is None or seed < 0 else int(seed)


class Studio:
    """The app's state: the base model and its generator, the concept library, the training manager."""

    def __init__(self, model: str | None = None, concepts_dir: str | os.PathLike = DEFAULT_CONCEPTS_DIR,
                 shipped_dir: str | os.PathLike | None = SHIPPED_CONCEPTS_DIR, device: str | None = None,
                 output_dir: str | os.PathLike | None = None, cache_bytes: int | None = None,
                 offload_cache: bool = False):
        self.cache_bytes, self.offload_cache = cache_bytes, offload_cache  # the encodings cache (TextConditioner)
        self.library = ConceptLibrary(concepts_dir, shipped_dir)
        self.training = TrainingManager()
        self.device = device
        self.output_dir = Path(output_dir or Path(tempfile.gettempdir()) / "neti-studio" / "outputs")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()  # generation and model switches
        self.model_name = ""
        self.pipe = None
        self.generator: Generator | None = None
        self.load_model(model or default_model())

    # ---- base model --------------------------------------------------------------------------------------------
    def load_model(self, model: str) -> str:
        """Load (or switch to) a base model: a hub id or a local diffusers folder."""
        model = (model or "").strip()
        if not model:
            raise ValueError("give a base model: a hub id such as 'runwayml/stable-diffusion-v1-5' or a local "
                             f"diffusers folder (the bundled one is {BUNDLED_MODEL})")
        if self.training.running:
            s = self.training.snapshot()
            raise TrainingBusyError(f"cannot switch the base model while {s.name} is training on {s.model} "
                                    f"(step {s.step}/{s.total}); stop the training first")
        started = time.perf_counter()
        pipe = load_pipeline(model, self.device)  # ValueError with a readable message when unreachable
        with self._lock:
            self.pipe, self.model_name = pipe, model
            self.generator = Generator(pipe, model, self.cache_bytes, self.offload_cache)
        logger.info("base model %s ready in %.1f s", model, time.perf_counter() - started)
        return model

    def model_description(self) -> str:
        pipe = self.pipe
        size = pipe.unet.config.sample_size * pipe.vae_scale_factor
        return (f"{model_label(self.model_name)} ({size}x{size} px, token width {pipe.text_encoder.config.hidden_size}, "
                f"{self.generator.num_layers} cross-attention layers, {pipe.device})")

    def is_compatible(self, concept: Concept) -> bool:
        """Whether `concept` fits the loaded model (token width and number of cross-attention layers)."""
        return (concept.config.token_dim, concept.config.num_layers) == \
            (self.pipe.text_encoder.config.hidden_size, self.generator.num_layers)

    @property
    def resolution(self) -> int:
        return self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor

    # ---- generation --------------------------------------------------------------------------------------------
    def _concepts(self, names: Sequence[str]) -> list[Concept]:
        return [self.library.load(n) for n in names or []]

    def _write(self, result: Result, captions: list[str], grid_settings: dict | None = None) -> Rendered:
        paths, grid = result.save(self.output_dir / uuid.uuid4().hex[:12], "neti", "grid.png", grid_settings)
        return Rendered(paths, captions, grid, list(result.settings))

    def generate(self, prompt: str, concept_names: Sequence[str], seed: int | None, num_images: int,
                 sampling: Sampling, truncation: int | None, alpha: float) -> Rendered:
        seed = pick_seed(seed)
        seeds = [seed + i for i in range(max(1, int(num_images)))]
        with self._lock:
            result = self.generator.generate(prompt, self._concepts(concept_names), seeds, sampling, truncation, alpha)
        k = "full" if truncation is None else truncation
        return self._write(result, [f"seed {s} · truncation {k}" for s in seeds])

    def sweep(self, prompt: str, concept_names: Sequence[str], seed: int | None, num_images: int,
              sampling: Sampling, truncations: Sequence[int | None], alpha: float) -> Rendered:
        seed = pick_seed(seed)
        seeds = [seed + i for i in range(max(1, int(num_images)))]
        with self._lock:
            result = self.generator.sweep(prompt, self._concepts(concept_names), seeds, list(truncations), sampling,
                                          alpha)
        captions = [f"truncation {'full' if k is None else k} · seed {s}" for k in truncations for s in seeds]
        return self._write(result, captions)

    def mix(self, prompt: str, geometry: str, appearance: str, seed: int | None, starts: Sequence[float],
            geometry_layers: Sequence[str], sampling: Sampling, truncation: int | None, alpha: float) -> Rendered:
        if not geometry or not appearance:
            raise ValueError("choose both a geometry concept and an appearance concept")
        seed = pick_seed(seed)
        with self._lock:
            result = self.generator.mix(prompt, self.library.load(geometry), self.library.load(appearance), [seed],
                                        list(starts), list(geometry_layers), sampling, truncation, alpha)
        return self._write(result, [f"start t={int(s)} · seed {seed}" for s in starts])

    def decompose(self, prompt: str, concept: str, seed: int | None, timesteps: Sequence[float],
                  sampling: Sampling, truncation: int | None = None,
                  alpha: float = DEFAULT_BYPASS_ALPHA) -> Rendered:
        if not concept:
            raise ValueError("choose a concept to decompose")
        seed = pick_seed(seed)
        with self._lock:
            result = self.generator.decompose(prompt, [self.library.load(concept)], seed, list(timesteps), sampling,
                                              truncation, alpha)
        return self._write(result, [f"t = {int(t)} · seed {seed}" for t in timesteps])

    # ---- training ----------------------------------------------------------------------------------------------
    def start_training(self, images: Sequence, name: str, token: str, super_category: str,
                       config: TrainConfig) -> TrainingSnapshot:
        """Train a new concept in the background; it is saved to concepts/<name>.safetensors on finish or stop."""
        self.training.check_idle()
        if not images:
            raise ValueError("add training images first (upload 3-10 photos, or pick a bundled example)")
        token = (token or "").strip()
        name = check_name(name or name_from_token(token))
        out = self.library.path_for_new(name)
        owner = self.library.token_owner(token)
        if owner is not None:
            raise ValueError(f"the token {token!r} is already used by concept {owner!r}; choose another token (two "
                             "concepts with one token cannot share a prompt), or rename or delete that concept")
        return self.training.start(self.pipe, self.model_name, images, name, token, (super_category or "").strip(),
                                   config, out)

    # ---- concept files -----------------------------------------------------------------------------------------
    def import_official(self, mapper_path: str, embeds_path: str | None, name: str | None) -> str:
        if not mapper_path:
            raise ValueError("upload the official mapper checkpoint (mapper-steps-N.pt)")
        concept = import_official(mapper_path, embeds_path or None, self.generator.layer_names)
        name = check_name(name or name_from_token(concept.token))
        self.library.save(concept, name)
        return name

    def export_textual_inversion(self, name: str, truncation: int | None = None) -> Path:
        concept = self.library.load(name)
        path = self.output_dir / uuid.uuid4().hex[:12] / f"{check_name(name)}-textual-inversion.safetensors"
        return export_textual_inversion(concept, path, truncation=truncation)
