"""NeTI Studio's service layer: what the Gradio app (app.py) calls, with no Gradio in it (NeTI Sec. 4-5 as a tool).

- the concept library (`neti.library`) and background training (`neti.jobs`), re-exported here;
- `check_uploads`: training uploads are judged by content as `neti.data.load_images` judges files
  (`neti.data.check_image`), with a per-file size cap and a count cap, and one readable reason per rejected file.
- `Studio`: the loaded base model and its `Generator`, model switching, and generation (generate, sweep, X/Y
  grid, mix with its references, decompose) writing PNGs that carry their settings (`neti.images.save_png`),
  with per-step progress and an Interrupt (`neti.progress`);
- `ConceptStatus`: what a concept picker shows of a concept, unusable ones (no training step, another model,
  unreadable) flagged; a concept's thumbnail is the last preview of its training (`ConceptLibrary.thumbnail`).

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

from .checkpoints import resumable_checkpoint
from .concept import Concept, export_textual_inversion, import_official
from .config import DEFAULT_BYPASS_ALPHA, PreviewConfig, TrainConfig
from .data import ImageInputError, check_image
from .fidelity import default_judge, step_path
from .generate import DEFAULT_GEOMETRY_LAYERS, Generator, Result, Sampling
from .jobs import TrainingBusyError, TrainingManager, TrainingSnapshot  # noqa: F401 (re-exported for the app)
from .library import ConceptLibrary, check_name, name_from_token
from .models import default_model, load_pipeline, model_label
from .paths import BUNDLED_MODEL, DEFAULT_CONCEPTS_DIR, EXAMPLES_DIR, SHIPPED_CONCEPTS_DIR
from .progress import StepReporter
from .xy import Axis

logger = logging.getLogger(__name__)

MAX_UPLOAD_FILES = 20  # NeTI uses 3-10 images
MAX_UPLOAD_BYTES = 20 * 1024 * 1024  # per file
TRAINING_PRESETS = {  # name -> (optimisation steps, preview every N steps); the paper trains 500 steps (Sec. 5)
    "Quick look: 100 steps": (100, 25),
    "Paper: 500 steps": (500, 50),
}


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
            loaded, reason = check_image(path, max_bytes)
        except ImageInputError as exc:  # a decompression bomb, a malformed caption
            loaded, reason = None, str(exc)
        if loaded is None:
            rejected.append((path.name, reason))
        else:
            accepted.append(path)
            images.append(loaded)
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
    interrupted_at: int | None = None  # sampler steps done when Interrupt ended the run
    references: "Rendered | None" = None  # style mixing: each concept alone


@dataclass(frozen=True)
class ConceptStatus:
    """A library concept as a picker shows it; `problem` says why it cannot be used with the loaded model."""

    name: str
    token: str
    steps: int
    shipped: bool
    problem: str = ""  # "": usable

    @property
    def label(self) -> str:
        """'crescent · <crescent> · 40 steps', and the problem or '(shipped)' after it."""
        head = f"{self.name} · {self.token or '?'} · {self.steps} steps"
        if self.problem:
            return f"⚠ {head} · unusable: {self.problem}"
        return head + (" · shipped" if self.shipped else "")


def pick_seed(seed: int | None) -> int:
    return random.randrange(2**31) if seed is None or seed < 0 else int(seed)


class Studio:
    """The app's state: the base model and its generator, the concept library, the training manager."""

    def __init__(self, model: str | None = None, concepts_dir: str | os.PathLike = DEFAULT_CONCEPTS_DIR,
                 shipped_dir: str | os.PathLike | None = SHIPPED_CONCEPTS_DIR, device: str | None = None,
                 output_dir: str | os.PathLike | None = None, clip: str | os.PathLike | None = None,
                 cache_bytes: int | None = None, offload_cache: bool = False):
        self.cache_bytes, self.offload_cache = cache_bytes, offload_cache  # the encodings cache (TextConditioner)
        self.library = ConceptLibrary(concepts_dir, shipped_dir)
        self.clip = clip  # the CLIP that scores training previews (None: the bundled toy CLIP for the bundled model)
        self.training = TrainingManager()
        self.device = device
        self.output_dir = Path(output_dir or Path(tempfile.gettempdir()) / "neti-studio" / "outputs")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()  # generation and model switches
        self._interrupt = threading.Event()  # set by `interrupt()`, cleared when a generation starts
        self._judges: dict[str, object] = {}  # base model -> the CLIP that scores its training previews (or None)
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
        width = " + ".join(map(str, self.generator.token_widths))  # SDXL: 768 + 1280
        return (f"{model_label(self.model_name)} ({size}x{size} px, token width {width}, "
                f"{self.generator.num_layers} cross-attention layers, {pipe.device})")

    @property
    def resolution(self) -> int:
        return self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor

    # ---- the library as pickers show it ------------------------------------------------------------------------
    def concept_statuses(self) -> list[ConceptStatus]:
        """Every library concept, usable ones first (library order), then the unusable ones."""
        out = []
        for e in self.library.entries():
            try:
                concept = self.library.load(e.name)
            except (ValueError, OSError):
                out.append(ConceptStatus(e.name, "", 0, e.shipped, "unreadable file"))
                continue
            fits = concept.fits(self.generator.token_dim, self.generator.num_layers, self.generator.token_widths)
            problem = "" if fits else "made for another base model"
            problem = problem or ("" if concept.train_steps else "0 training steps")
            out.append(ConceptStatus(e.name, concept.token, int(concept.train_steps or 0), e.shipped, problem))
        return [c for c in out if not c.problem] + [c for c in out if c.problem]

    def library_cards(self) -> list[tuple[Path | None, str, str]]:
        """(thumbnail or None, label, name) of every concept, in `concept_statuses` order."""
        out = []
        for c in self.concept_statuses():
            try:
                thumb = self.library.thumbnail(c.name)
            except ValueError:
                thumb = None
            out.append((thumb, c.label, c.name))
        return out

    def token_count(self, prompt: str, concept_names: Sequence[str]) -> tuple[int, int]:
        """(tokens the prompt takes, tokens the model reads); unknown concepts are left out of the count."""
        concepts = []
        for name in concept_names or []:
            try:
                concepts.append(self.library.load(name))
            except (ValueError, OSError):
                continue
        return self.generator.token_count(prompt or "", concepts), self.generator.max_tokens

    # ---- progress ----------------------------------------------------------------------------------------------
    def interrupt(self) -> bool:
        """Ask the running generation to stop after its current sampler step; False if none runs."""
        running = self._busy
        if running:
            self._interrupt.set()
        return running

    @property
    def _busy(self) -> bool:
        acquired = self._lock.acquire(blocking=False)
        if acquired:
            self._lock.release()
        return not acquired

    def _reporter(self, progress) -> StepReporter:  # call with the lock held
        self._interrupt.clear()
        return StepReporter(progress, self._interrupt)

    # ---- generation --------------------------------------------------------------------------------------------
    def _concepts(self, names: Sequence[str]) -> list[Concept]:
        return [self.library.load(n) for n in names or []]

    def _write(self, result: Result, captions: list[str], grid_settings: dict | None = None) -> Rendered:
        folder = self.output_dir / uuid.uuid4().hex[:12]
        paths, grid = result.save(folder, "neti", "grid.png", grid_settings)
        if result.interrupted_at is not None:
            captions = [f"{c} · interrupted at step {result.interrupted_at}" for c in captions]
        references = None
        if result.references is not None:
            ref_paths, _ = result.references.save(folder, "reference")
            references = Rendered(ref_paths, [f"{s['reference']} alone ({s['concepts'][0]}) · seed {s['seed']}"
                                              for s in result.references.settings], None,
                                  list(result.references.settings))
        return Rendered(paths, captions, grid, list(result.settings), result.interrupted_at, references)

    def generate(self, prompt: str, concept_names: Sequence[str], seed: int | None, num_images: int,
                 sampling: Sampling, truncation: int | None, alpha: float, progress=None) -> Rendered:
        """`progress(done, total, text)` is called after every sampler step; `interrupt()` ends the run early."""
        seed = pick_seed(seed)
        seeds = [seed + i for i in range(max(1, int(num_images)))]
        with self._lock:
            result = self.generator.generate(prompt, self._concepts(concept_names), seeds, sampling, truncation, alpha,
                                             on_step=self._reporter(progress))
        k = "full" if truncation is None else truncation
        return self._write(result, [f"seed {s} · truncation {k}" for s in seeds])

    def sweep(self, prompt: str, concept_names: Sequence[str], seed: int | None, num_images: int,
              sampling: Sampling, truncations: Sequence[int | None], alpha: float, progress=None) -> Rendered:
        """The truncation sweep as an X/Y grid: rows truncations, columns seeds, labelled."""
        seed = pick_seed(seed)
        seeds = tuple(seed + i for i in range(max(1, int(num_images))))
        return self.xy(prompt, concept_names, Axis("seed", seeds), Axis("truncation", tuple(truncations)), seed,
                       sampling, None, alpha, progress=progress)

    def xy(self, prompt: str, concept_names: Sequence[str], x: Axis, y: Axis, seed: int | None, sampling: Sampling,
           truncation: int | None, alpha: float, mix_start: float | None = None, appearance: str | None = None,
           geometry_layers: Sequence[str] | None = None, progress=None) -> Rendered:
        """An X/Y grid (neti.xy); with an `appearance` concept every cell is a style mix."""
        seed = pick_seed(seed)
        extra = {} if geometry_layers is None else {"geometry_layers": list(geometry_layers)}
        with self._lock:
            result = self.generator.xy(prompt, self._concepts(concept_names), x, y, seed, sampling, truncation,
                                       alpha, mix_start, self.library.load(appearance) if appearance else None,
                                       on_step=self._reporter(progress), **extra)
        captions = [f"{y.name} {yl} · {x.name} {xl}" for yl in y.labels() for xl in x.labels()]
        return self._write(result, captions, {"x": x.name, "y": y.name, "items": result.settings})

    def mix(self, prompt: str, geometry: str, appearance: str, seed: int | None, starts: Sequence[float],
            geometry_layers: Sequence[str], sampling: Sampling, truncation: int | None, alpha: float,
            references: bool = False, progress=None) -> Rendered:
        if not geometry or not appearance:
            raise ValueError("choose both a geometry concept and an appearance concept")
        if not geometry_layers:
            raise ValueError("choose at least one geometry layer (the default: "
                             + ", ".join(DEFAULT_GEOMETRY_LAYERS) + ")")
        seed = pick_seed(seed)
        with self._lock:
            result = self.generator.mix(prompt, self.library.load(geometry), self.library.load(appearance), [seed],
                                        list(starts), list(geometry_layers), sampling, truncation, alpha,
                                        references, on_step=self._reporter(progress))
        return self._write(result, [f"start t={int(s)} · seed {seed}" for s in starts])

    def decompose(self, prompt: str, concept: str, seed: int | None, timesteps: Sequence[float],
                  sampling: Sampling, truncation: int | None = None,
                  alpha: float = DEFAULT_BYPASS_ALPHA, progress=None) -> Rendered:
        if not concept:
            raise ValueError("choose a concept to decompose")
        seed = pick_seed(seed)
        with self._lock:
            result = self.generator.decompose(prompt, [self.library.load(concept)], seed, list(timesteps), sampling,
                                              truncation, alpha, on_step=self._reporter(progress))
        return self._write(result, [f"t = {int(t)} · seed {seed}" for t in timesteps])

    # ---- training ----------------------------------------------------------------------------------------------
    def start_training(self, images: Sequence, name: str, token: str, super_category: str,
                       config: TrainConfig, previews: PreviewConfig = PreviewConfig(),
                       resume: bool = False) -> TrainingSnapshot:
        """Train a new concept in the background; it is saved to concepts/<name>.safetensors on finish or stop.
        With `resume`, the user concept `name` continues from its latest checkpoint to `config.steps`."""
        self.training.check_idle()
        if not images:
            raise ValueError("add training images first (upload 3-10 photos, or pick a bundled example)")
        token = (token or "").strip()
        name = check_name(name or name_from_token(token))
        if resume:
            out = self.library.entry(name).path
            if self.library.entry(name).shipped:
                raise ValueError(f"{name!r} is a shipped example concept; it cannot be trained further")
            resumable_checkpoint(out)  # a readable error now if there is nothing to resume from
        else:
            out = self.library.path_for_new(name)
        owner = self.library.token_owner(token)
        if owner is not None and not (resume and owner == name):
            raise ValueError(f"the token {token!r} is already used by concept {owner!r}; choose another token (two "
                             "concepts with one token cannot share a prompt), or rename or delete that concept")
        judge = self.judge() if previews.every else None
        steps_dir = self.output_dir / "steps" / f"{name}-{uuid.uuid4().hex[:8]}" if previews.every else None
        return self.training.start(self.pipe, self.model_name, images, name, token, (super_category or "").strip(),
                                   config, out, on_done=lambda path: self._save_thumbnail(name), previews=previews,
                                   resume=out if resume else None, judge=judge, steps_dir=steps_dir)

    def judge(self):
        """The CLIP that scores training previews for the loaded model (`neti.fidelity.default_judge`), loaded
        once; None when there is none (the fidelity/editability curve is then absent)."""
        if self.model_name not in self._judges:
            self._judges[self.model_name] = default_judge(self.model_name, self.clip)
        return self._judges[self.model_name]

    def keep_step(self, step: int) -> str:
        """Make the last training's concept the one it was at preview step `step`; returns the concept's name."""
        snap = self.training.snapshot()
        if snap.running:
            raise ValueError(f"{snap.name} is still training; stop it or wait for it to end, then keep a step")
        if not snap.steps_dir or int(step) not in snap.kept_steps:
            kept = ", ".join(map(str, snap.kept_steps)) or "none (previews were off)"
            raise ValueError(f"step {step} was not kept; the last training kept the steps: {kept}")
        if not snap.saved and not Path(snap.output_path).is_file():
            raise ValueError(f"the concept {snap.name!r} was not saved, so no step can replace it")
        concept = Concept.load(step_path(snap.steps_dir, int(step)))
        concept.save(snap.output_path)
        logger.info("kept step %d of %s as the concept %s", step, snap.token, snap.output_path)
        return snap.name

    def _save_thumbnail(self, name: str) -> None:
        """The training's last preview becomes the concept's thumbnail (if it saved a concept and has previews)."""
        snap = self.training.snapshot()
        if snap.saved and snap.previews and snap.previews[-1][1]:
            try:
                self.library.save_thumbnail(name, snap.previews[-1][1][0])
            except (ValueError, OSError) as exc:
                logger.warning("no thumbnail for %s: %s", name, exc)

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
