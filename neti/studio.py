"""NeTI Studio's service layer: what the Gradio app (app.py) calls, with no Gradio in it.

- `ConceptLibrary`: the user's concepts in `concepts/` (read-write) plus the concepts shipped with the bundled
  model in `assets/concepts/` (read-only); names are checked so that no file outside the folder is touched.
- `TrainingManager`: one training at a time per server, in a background thread; the app polls a thread-safe
  `TrainingSnapshot` (loss history raw and smoothed, speed, time left, preview history from step 0).
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
import math
import os
import random
import re
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

from .concept import Concept, export_textual_inversion, file_info, import_official
from .data import ImageInputError, load_images
from .generate import Generator, Result, Sampling
from .images import save_png
from .models import BUNDLED_MODEL, REPO_ROOT, default_model, load_pipeline
from .train import TrainConfig, Trainer, TrainingCallback

logger = logging.getLogger(__name__)

CONCEPT_SUFFIX = ".safetensors"
DEFAULT_CONCEPTS_DIR = REPO_ROOT / "concepts"
SHIPPED_CONCEPTS_DIR = REPO_ROOT / "assets" / "concepts"
EXAMPLES_DIR = REPO_ROOT / "assets" / "examples"
MAX_UPLOAD_FILES = 20  # NeTI uses 3-10 images
MAX_UPLOAD_BYTES = 20 * 1024 * 1024  # per file
LOSS_EMA = 0.9  # smoothing of the displayed loss curve
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\- ]{0,79}$")


class TrainingBusyError(RuntimeError):
    """A training is already running on this server; the message says which and how far it is."""


# ---- names and the concept library ---------------------------------------------------------------------------

def check_name(name: str) -> str:
    """A concept name that is a plain file stem: no path separators, no '..', not absolute, not hidden."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError("the concept name is empty; give a name such as 'my-cat'")
    name = name.strip()
    if name.endswith(CONCEPT_SUFFIX):
        name = name[: -len(CONCEPT_SUFFIX)]
    if "/" in name or "\\" in name or ".." in name or os.path.isabs(name) or "\x00" in name:
        raise ValueError(f"concept name {name!r} is not allowed: it must be a plain name without '/', '\\' or '..' "
                         "(concepts stay inside the concepts folder)")
    if not _NAME.match(name):
        raise ValueError(f"concept name {name!r} is not allowed: use letters, digits, '-', '_', '.' and spaces "
                         "(at most 80 characters, not starting with '.' or '-')")
    return name


def name_from_token(token: str) -> str:
    """A file name for a token: '<dotted-crescent>' -> 'dotted-crescent'."""
    stem = re.sub(r"[^A-Za-z0-9_.\- ]+", "-", token or "").strip("-. ")
    return stem or "concept"


@dataclass(frozen=True)
class ConceptEntry:
    name: str
    path: Path
    shipped: bool  # read-only, from assets/concepts


class ConceptLibrary:
    """The concepts the app offers: `folder` (read-write) and `shipped_folder` (read-only, same names hidden)."""

    def __init__(self, folder: str | os.PathLike = DEFAULT_CONCEPTS_DIR,
                 shipped_folder: str | os.PathLike | None = SHIPPED_CONCEPTS_DIR):
        self.folder = Path(folder)
        self.shipped_folder = Path(shipped_folder) if shipped_folder else None
        self.folder.mkdir(parents=True, exist_ok=True)
        self._cache: dict[Path, tuple[tuple[int, int], Concept]] = {}
        self._lock = threading.Lock()

    def entries(self) -> list[ConceptEntry]:
        """User concepts, then shipped ones not shadowed by a user concept of the same name; sorted by name."""
        found: dict[str, ConceptEntry] = {}
        folders = [(self.folder, False)] + ([(self.shipped_folder, True)] if self.shipped_folder else [])
        for folder, shipped in folders:
            if not folder.is_dir():
                continue
            for path in sorted(folder.glob(f"*{CONCEPT_SUFFIX}")):
                name = path.name[: -len(CONCEPT_SUFFIX)]
                if name.startswith(".") or not path.is_file() or name in found:
                    continue
                found[name] = ConceptEntry(name, path, shipped)
        return sorted(found.values(), key=lambda e: (e.shipped, e.name.casefold()))

    def names(self) -> list[str]:
        return [e.name for e in self.entries()]

    def version(self) -> tuple:
        """Changes whenever a concept is added, removed, renamed or rewritten (for cheap UI refreshes)."""
        out = []
        for e in self.entries():
            try:
                st = e.path.stat()
            except OSError:
                continue
            out.append((e.name, e.shipped, st.st_mtime_ns, st.st_size))
        return tuple(out)

    def entry(self, name: str) -> ConceptEntry:
        name = check_name(name)
        for e in self.entries():
            if e.name == name:
                return e
        raise ValueError(f"there is no concept named {name!r}; available: {', '.join(self.names()) or 'none'}")

    def load(self, name: str) -> Concept:
        """The concept, re-read only when its file changed (mtime and size)."""
        path = self.entry(name).path
        st = path.stat()
        key = (st.st_mtime_ns, st.st_size)
        with self._lock:
            cached = self._cache.get(path)
            if cached and cached[0] == key:
                return cached[1]
        concept = Concept.load(path).eval()
        with self._lock:
            self._cache[path] = (key, concept)
        return concept

    def info(self, name: str) -> dict:
        e = self.entry(name)
        info = file_info(e.path)
        info["name"], info["shipped"] = e.name, e.shipped
        return info

    def path_for_new(self, name: str) -> Path:
        """Where a new concept named `name` goes; refuses a name already in use."""
        name = check_name(name)
        if name in self.names():
            raise ValueError(f"a concept named {name!r} already exists; choose another name, or rename or delete "
                             "the existing one")
        path = (self.folder / f"{name}{CONCEPT_SUFFIX}").resolve()
        if path.parent != self.folder.resolve():  # belt and braces: check_name already refuses separators
            raise ValueError(f"concept name {name!r} would leave the concepts folder")
        return path

    def save(self, concept: Concept, name: str) -> Path:
        path = concept.save(self.path_for_new(name))
        logger.info("saved concept %s to %s", concept.token, path)
        return path

    def _own(self, name: str, action: str) -> ConceptEntry:
        e = self.entry(name)
        if e.shipped:
            raise ValueError(f"{e.name!r} is a shipped example concept and is read-only; it cannot be {action}")
        return e

    def rename(self, old: str, new: str) -> str:
        e = self._own(old, "renamed")
        target = self.path_for_new(new)
        os.replace(e.path, target)
        with self._lock:
            self._cache.pop(e.path, None)
        logger.info("renamed concept %s -> %s", e.name, target.stem)
        return target.stem

    def delete(self, name: str) -> None:
        e = self._own(name, "deleted")
        e.path.unlink()
        with self._lock:
            self._cache.pop(e.path, None)
        logger.info("deleted concept %s", e.name)


# ---- uploads ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class UploadCheck:
    paths: list[Path]  # accepted files, in upload order
    images: list  # their decoded RGB images
    rejected: list[tuple[str, str]]  # (file name, reason)

    def messages(self) -> list[str]:
        return [f"{name}: {reason}" for name, reason in self.rejected]


_READ_REASON = re.compile(r"could be read as an image \([^:]*: (.*)\)\. Re-export", re.S)


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
            image = load_images([path]).pil_images[0]
        except ImageInputError as exc:
            match = _READ_REASON.search(str(exc))
            rejected.append((path.name, f"not usable as an image ({match.group(1) if match else exc})"))
            continue
        accepted.append(path)
        images.append(image)
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


# ---- training --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainingSnapshot:
    """What the app shows of the current (or last) training; immutable, safe to read from any thread."""

    status: str = "idle"  # idle, running, stopping, finished, stopped, failed
    name: str = ""
    token: str = ""
    model: str = ""
    step: int = 0
    total: int = 0
    losses: tuple[float, ...] = ()
    smoothed: tuple[float, ...] = ()
    seconds_per_step: float | None = None
    eta_seconds: float | None = None
    previews: tuple[tuple[int, tuple], ...] = ()  # (step, images) from step 0 on
    preview_prompts: tuple[str, ...] = ()
    error: str = ""
    output_path: str = ""
    version: int = 0  # increases with every change

    @property
    def running(self) -> bool:
        return self.status in ("running", "stopping")

    def summary(self) -> str:
        if self.status == "idle":
            return "No training has run on this server yet."
        speed = f", {self.seconds_per_step:.2f} s/step" if self.seconds_per_step else ""
        eta = f", about {format_seconds(self.eta_seconds)} left" if self.running and self.eta_seconds else ""
        loss = f", loss {self.losses[-1]:.4f} (smoothed {self.smoothed[-1]:.4f})" if self.losses else ""
        head = f"{self.name} (`{self.token}`): {self.status}, step {self.step}/{self.total}{loss}{speed}{eta}"
        if self.status == "failed":
            return f"{head}. Error: {self.error}"
        if self.status in ("finished", "stopped"):
            return f"{head}. Saved as concept '{self.name}'."
        return head


def format_seconds(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


class _Recorder(TrainingCallback):
    def __init__(self, job: "TrainingManager"):
        self.job = job

    def on_step(self, info) -> None:
        self.job._record_step(info)

    def on_preview(self, info) -> None:
        self.job._record_preview(info)


class TrainingManager:
    """Runs at most one `Trainer` at a time in a background thread; `snapshot()` is always safe to call."""

    def __init__(self):
        self._lock = threading.Lock()
        self._snap = TrainingSnapshot()
        self._trainer: Trainer | None = None
        self._thread: threading.Thread | None = None
        self._sps_ema: float | None = None

    def snapshot(self) -> TrainingSnapshot:
        with self._lock:
            return self._snap

    def _update(self, **changes) -> None:  # call with the lock held
        self._snap = replace(self._snap, version=self._snap.version + 1, **changes)

    @property
    def running(self) -> bool:
        return self.snapshot().running

    def check_idle(self) -> None:
        """Raise `TrainingBusyError` naming the running job and its progress, if there is one."""
        with self._lock:
            self._check_idle()

    def _check_idle(self) -> None:  # call with the lock held
        s = self._snap
        if s.running:
            left = f", about {format_seconds(s.eta_seconds)} left" if s.eta_seconds else ""
            raise TrainingBusyError(
                f"a training is already running on this server: '{s.name}' ({s.token}) at step {s.step}/{s.total}"
                f"{left}; wait for it or stop it first (one training at a time)")

    def start(self, pipe, model_name: str, images: Sequence, name: str, token: str, super_category: str,
              config: TrainConfig, out_path: Path, on_done=None) -> TrainingSnapshot:
        """Build the trainer (bad token, super-category or settings raise here) and train in the background."""
        with self._lock:
            self._check_idle()
            previous = self._snap
            self._snap = TrainingSnapshot(status="running", name=name, token=token, model=model_name, total=config.steps,
                                          preview_prompts=tuple(config.preview_prompts), output_path=str(out_path),
                                          version=self._snap.version + 1)
            self._sps_ema = None
        try:
            trainer = Trainer(pipe, list(images), token, super_category, config, model_name, [_Recorder(self)])
        except BaseException:  # bad token, super-category or settings: nothing started, keep the last job's view
            with self._lock:
                self._snap = replace(previous, version=self._snap.version + 1)
            raise
        self._trainer = trainer
        self._thread = threading.Thread(target=self._run, args=(trainer, Path(out_path), on_done),
                                        name=f"neti-train-{name}", daemon=True)
        self._thread.start()
        logger.info("training %s (%s) for %d steps -> %s", name, token, config.steps, out_path)
        return self.snapshot()

    def _run(self, trainer: Trainer, out_path: Path, on_done) -> None:
        try:
            result = trainer.train(out_path)
            with self._lock:
                self._update(status="stopped" if result.cancelled else "finished", step=result.steps_done,
                             eta_seconds=None)
        except Exception as exc:  # shown to the user; the trainer saved what it had
            logger.exception("training %s failed", out_path.name)
            with self._lock:
                self._update(status="failed", error=f"{type(exc).__name__}: {exc}", eta_seconds=None)
        finally:
            self._trainer = None
            if on_done is not None:
                try:
                    on_done(out_path)
                except Exception:  # pragma: no cover - a notification must not kill the thread
                    logger.exception("on_done failed")

    def _record_step(self, info) -> None:
        with self._lock:
            s = self._snap
            prev = s.smoothed[-1] if s.smoothed else info.loss
            smoothed = info.loss if not s.smoothed else LOSS_EMA * prev + (1 - LOSS_EMA) * info.loss
            self._sps_ema = info.seconds_per_step if self._sps_ema is None else \
                0.8 * self._sps_ema + 0.2 * info.seconds_per_step
            eta = (info.total_steps - info.step) * self._sps_ema
            self._update(step=info.step, total=info.total_steps, losses=s.losses + (float(info.loss),),
                         smoothed=s.smoothed + (float(smoothed),), seconds_per_step=self._sps_ema, eta_seconds=eta)

    def _record_preview(self, info) -> None:
        with self._lock:
            self._update(previews=self._snap.previews + ((info.step, tuple(info.images)),))

    def stop(self) -> TrainingSnapshot:
        """Ask the running training to stop after its current micro-batch; it then saves the concept."""
        with self._lock:
            if not self._snap.running:
                raise ValueError("no training is running")
            self._update(status="stopping")
            trainer = self._trainer
        if trainer is not None:
            trainer.cancel()
        return self.snapshot()

    def wait(self, timeout: float | None = None) -> TrainingSnapshot:
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return self.snapshot()


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
                 output_dir: str | os.PathLike | None = None):
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
            self.generator = Generator(pipe, model)
        logger.info("base model %s ready in %.1f s", model, time.perf_counter() - started)
        return model

    def model_description(self) -> str:
        pipe = self.pipe
        size = pipe.unet.config.sample_size * pipe.vae_scale_factor
        return (f"{self.model_name} ({size}x{size} px, token width {pipe.text_encoder.config.hidden_size}, "
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
        folder = self.output_dir / uuid.uuid4().hex[:12]
        paths = []
        for i, (image, settings) in enumerate(zip(result.images, result.settings)):
            paths.append(save_png(image, folder / f"neti-{i:02d}-seed{settings['seed']}.png", settings))
        grid = None
        if result.grid is not None:
            grid = save_png(result.grid, folder / "grid.png", grid_settings or {"items": result.settings})
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
                  sampling: Sampling, truncation: int | None = None, alpha: float = 0.2) -> Rendered:
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
