"""CLIP evaluation of concepts: Textual Inversion's protocol as NeTI uses it (NeTI Sec. 5.1, Table 3, Fig. 9).

Gal et al. (Textual Inversion, 2022, Sec. 4.2) score a personalised concept with CLIP on images generated from a
fixed prompt set and fixed seeds:
- image similarity (fidelity): the mean cosine similarity between the CLIP image embeddings of every
  (training image, generated image) pair of a concept, over the images of all prompts and seeds;
- text similarity (editability): the mean cosine similarity between each generated image's CLIP embedding and
  the CLIP text embedding of its prompt with the placeholder removed (`remove_placeholder`).
Embeddings are L2-normalised and not scaled (no logit scale). The paper uses CLIP ViT-B/32, 15 prompts
(`PAPER_PROMPTS`) and 32 seeds shared by all methods; the bundled toy model draws `TOY_PROMPTS` instead, scored
by the bundled toy CLIP. A truncation sweep re-renders a NeTI concept with its first k hidden units only
(Sec. 3.4): image similarity falls and text similarity rises as k shrinks, the dashed curve of Fig. 9.

Generated images are cached on disk as PNGs (written atomically, named by a hash of everything that determines
them: the concept file's contents, prompt, seed, truncation, bypass strength, base model (its name and a
fingerprint of its weights) and sampling settings),
so an interrupted evaluation resumes and more seeds or concepts cost only the missing images.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from .concept import Concept, atomic_write
from .conditioning import PLACEHOLDER
from .config import DEFAULT_BYPASS_ALPHA, DEFAULT_HIDDEN_DIM
from .generate import Generator, Row, Sampling, check_seeds
from .images import save_png
from .models import weights_fingerprint
from .paths import BUNDLED_CLIP

logger = logging.getLogger(__name__)

DEFAULT_CLIP = "openai/clip-vit-base-patch32"  # the original protocol's judge

# NeTI paper Table 2 (Textual Inversion's prompts), {} marks the concept.
PAPER_PROMPTS = (
    "A photo of a {}", "A photo of {} in the jungle", "A photo of {} on a beach", "A photo of {} in Times Square",
    "A photo of {} in the moon", "A painting of {} in the style of Monet", "Oil painting of {}",
    "A Marc Chagall painting of {}", "A manga drawing of {}", "A watercolor painting of {}", "A statue of {}",
    "App icon of {}", "A sand sculpture of {}", "Colorful graffiti of {}", "A photograph of two {} on a table",
)
# The same kinds of edit in the bundled model's vocabulary (toyworld/README.md): the plain concept, new
# backgrounds (for scenes), renderings (for painting styles), both together, and counts ("two {} on a table").
TOY_PROMPTS = (
    "a photo of a {}", "a {} on a blue background", "a {} on a green background", "a {} on a white background",
    "a {} on a black background", "a {} on a red background", "a sketch of a {}", "a blurry photo of a {}",
    "a pixelated image of a {}", "a rendering of a {}", "a sketch of a {} on a yellow background",
    "a pixelated image of a {} on a purple background", "a blurry photo of a {} on an orange background",
    "two {} on a white background", "an image of two {}",
)
PROMPT_SETS = {"paper": PAPER_PROMPTS, "toy": TOY_PROMPTS}
METHOD_NAMES = {"neti": "NeTI", "xti": "XTI", "ti": "TI"}


def remove_placeholder(prompt: str, token: str | None = None) -> str:
    """The prompt for text similarity: every `{}` (and `token`, if given) deleted, whitespace runs collapsed.

    Nothing else changes: articles and plurals stay ("A photo of a {}" -> "A photo of a",
    "A photo of {} on a beach" -> "A photo of on a beach"), as in Textual Inversion's evaluation, which
    deletes the placeholder string from the prompt.
    """
    text = prompt.replace(PLACEHOLDER, " ")
    if token:
        text = text.replace(token, " ")
    return re.sub(r"\s+", " ", text).strip()


# ---- the judge -----------------------------------------------------------------------------------------------

class ClipJudge:
    """A `transformers` CLIPModel and its processor: L2-normalised image and text embeddings."""

    def __init__(self, model, processor, name: str = "", device: str | torch.device = "cpu", batch_size: int = 64):
        self.model, self.processor, self.name = model.eval(), processor, name
        self.device, self.batch_size = torch.device(device), batch_size
        self.model.to(self.device)

    @classmethod
    def load(cls, name_or_path: str | os.PathLike = DEFAULT_CLIP, device: str | torch.device = "cpu",
             batch_size: int = 64) -> "ClipJudge":
        """Load a CLIP from a hub id or a local folder (`save_pretrained` layout of CLIPModel + CLIPProcessor)."""
        from transformers import CLIPModel, CLIPProcessor

        name = str(name_or_path)
        local = Path(name).expanduser()
        try:
            model = CLIPModel.from_pretrained(str(local) if local.exists() else name)
            processor = CLIPProcessor.from_pretrained(str(local) if local.exists() else name)
        except Exception as exc:  # hub, network and parsing errors all mean: this CLIP cannot be had here
            where = "the local folder" if local.exists() else "no local folder by that name, and the hub"
            raise ValueError(
                f"could not load CLIP model {name!r} ({where} did not provide a CLIPModel and CLIPProcessor: "
                f"{type(exc).__name__}: {exc}). Offline, use a local folder saved with `save_pretrained`, or the "
                f"bundled toy CLIP: --clip {BUNDLED_CLIP}"
            ) from None
        return cls(model, processor, name, device, batch_size)

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N, P) unit-norm image embeddings."""
        chunks = []
        for start in range(0, len(images), self.batch_size):
            batch = [im.convert("RGB") for im in images[start:start + self.batch_size]]
            pixels = self.processor(images=batch, return_tensors="pt")["pixel_values"].to(self.device)
            chunks.append(_features(self.model.get_image_features(pixel_values=pixels)).float().cpu())
        return F.normalize(torch.cat(chunks), dim=-1)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, P) unit-norm text embeddings."""
        chunks = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self.processor.tokenizer(list(texts[start:start + self.batch_size]), padding="max_length",
                                              truncation=True, return_tensors="pt").to(self.device)
            chunks.append(_features(self.model.get_text_features(**tokens)).float().cpu())
        return F.normalize(torch.cat(chunks), dim=-1)


def _features(output) -> torch.Tensor:
    """Projected embeddings from `get_*_features`: a tensor (transformers 4) or an output's `pooler_output` (5)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def image_similarity(training: torch.Tensor, generated: torch.Tensor) -> float:
    """Mean cosine over all (training, generated) pairs of unit-norm embeddings (M, P), (N, P)."""
    return float((generated @ training.T).mean())


def text_similarity(generated: torch.Tensor, texts: torch.Tensor) -> float:
    """Mean cosine between each generated image (N, P) and its own prompt's embedding (N, P)."""
    return float((generated * texts).sum(dim=-1).mean())


# ---- what to evaluate ----------------------------------------------------------------------------------------

@dataclass
class ConceptEntry:
    """A concept file, its training images and how it is reported."""

    path: Path
    images: list  # PIL training images
    label: str = ""  # the method/step-count group it is averaged into; default from its metadata
    sweep: bool = True  # render the truncation sweep for it (NeTI concepts only)
    concept: Concept | None = None
    digest: str = ""

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        if self.concept is None:
            self.concept = Concept.load(self.path)
        if not self.digest:
            self.digest = file_digest(self.path)
        if not self.label:
            self.label = default_label(self.concept)
        if not self.images:
            raise ValueError(f"concept {self.path} has no training images: image similarity compares with them")

    @property
    def name(self) -> str:
        return self.path.stem


def build_entries(concept_paths: Sequence[str | os.PathLike], images_for: dict[str, str] | None = None,
                  default_images: str | os.PathLike | None = None, labels: dict[str, str] | None = None,
                  sweep_for: Sequence[str] | None = None) -> list[ConceptEntry]:
    """Concept entries from files; dict keys and `sweep_for` name a concept by file stem, path or token.

    Training images come from `images_for[name]` (a folder or an image file) or else `default_images`;
    `sweep_for` None sweeps every NeTI concept.
    """
    from .data import load_images

    paths = [Path(p) for p in concept_paths]
    if not paths:
        raise ValueError("give at least one concept file to evaluate (--concept FILE)")
    concepts = [Concept.load(p) for p in paths]

    def index_of(name: str, option: str) -> int:
        found = [i for i, (p, c) in enumerate(zip(paths, concepts))
                 if name in (p.stem, p.name, str(p), c.token)]
        if len(found) != 1:
            known = ", ".join(p.stem for p in paths)
            why = "matches none" if not found else "matches several"
            raise ValueError(f"{option} {name!r} {why} of the concepts (name one by its file stem, path or "
                             f"token; the concepts are: {known})")
        return found[0]

    folders: dict[int, str] = {index_of(k, "--images-for"): v for k, v in (images_for or {}).items()}
    names: dict[int, str] = {index_of(k, "--label"): v for k, v in (labels or {}).items()}
    swept = None if sweep_for is None else {index_of(k, "--sweep-for") for k in sweep_for}
    entries, loaded = [], {}
    for i, (path, concept) in enumerate(zip(paths, concepts)):
        source = folders.get(i, default_images)
        if source is None:
            raise ValueError(f"no training images for concept {path.stem}: pass --images-for {path.stem}=FOLDER "
                             "(the folder it was trained on) or --images FOLDER for all concepts")
        if str(source) not in loaded:
            loaded[str(source)] = list(load_images(str(source)).pil_images)
        entries.append(ConceptEntry(path, loaded[str(source)], names.get(i, ""), swept is None or i in swept,
                                    concept))
    return entries


def parse_assignments(items: Sequence[str], option: str) -> dict[str, str]:
    """['a=x', 'b=y'] -> {'a': 'x', 'b': 'y'}, with an error naming the option for a malformed item."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise ValueError(f"{option} expects NAME=VALUE (e.g. {option} my-cat=images/my-cat), got {item!r}")
        out[name] = value
    return out


def load_prompts(name_or_path: str) -> tuple[str, ...]:
    """'toy', 'paper', or a text file with one prompt (with {}) per line."""
    if name_or_path in PROMPT_SETS:
        return PROMPT_SETS[name_or_path]
    path = Path(name_or_path)
    if not path.is_file():
        raise ValueError(f"prompt set {name_or_path!r} is neither {' nor '.join(PROMPT_SETS)} nor a text file")
    prompts = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    if not prompts:
        raise ValueError(f"prompt file {name_or_path!r} is empty")
    return prompts


def default_label(concept: Concept) -> str:
    """'NeTI 500', 'NeTI w/o bypass 500', 'XTI 500', 'TI 5000': the method and its training steps."""
    name = METHOD_NAMES.get(concept.method, concept.method)
    if concept.method == "neti" and not concept.config.use_bypass:
        name += " w/o bypass"
    return f"{name} {concept.train_steps}"


def file_digest(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class EvalConfig:
    prompts: tuple[str, ...] = TOY_PROMPTS
    seeds: tuple[int, ...] = tuple(range(8))
    sweep: tuple[int, ...] = ()  # truncation values k for the sweep (NeTI concepts); () for none
    sampling: Sampling = Sampling()
    alpha: float = DEFAULT_BYPASS_ALPHA  # textual-bypass strength (0 = off)
    batch_size: int = 8  # images per generator call

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ValueError("give at least one prompt")
        for p in self.prompts:
            if PLACEHOLDER not in p:
                raise ValueError(f"evaluation prompt {p!r} has no {{}} where the concept goes")
        check_seeds(list(self.seeds))
        for k in self.sweep:
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise ValueError(f"sweep truncation {k!r} must be a positive integer (1..{DEFAULT_HIDDEN_DIM})")
        if not 0.0 <= float(self.alpha) <= 1.0:
            raise ValueError(f"bypass strength alpha must be in [0, 1] (0 turns the bypass off), got {self.alpha!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass
class Point:
    """One concept (or one group's mean over concepts) at one truncation."""

    label: str
    concept: str  # concept file stem, or "mean" for a group's mean over its concepts
    truncation: int | None
    image_similarity: float
    text_similarity: float
    num_generated: int
    num_training: int
    per_prompt_text_similarity: dict = field(default_factory=dict)
    per_prompt_image_similarity: dict = field(default_factory=dict)


@dataclass
class EvalReport:
    points: list[Point]  # per concept
    groups: list[Point]  # per label: the mean over its concepts (what the paper reports)
    settings: dict
    generated: int = 0  # images rendered by this run (the rest came from the cache)

    def to_json(self) -> dict:
        return {"settings": self.settings, "groups": [asdict(p) for p in self.groups],
                "concepts": [asdict(p) for p in self.points], "generated_this_run": self.generated}


# ---- the image cache -----------------------------------------------------------------------------------------

class ImageCache:
    """Generated images on disk, one PNG per (concept contents, prompt, seed, truncation, alpha, model, sampling)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)

    @staticmethod
    def key(digest: str, prompt: str, seed: int, truncation: int | None, alpha: float, model: str,
            sampling: Sampling, weights: str = "") -> dict:
        """`model` names the base model, `weights` fingerprints its weights (`neti.models.weights_fingerprint`):
        a model retrained or replaced under the same name renders anew."""
        return {"concept_sha256": digest, "prompt": prompt, "seed": seed, "truncation": truncation,
                "alpha": float(alpha), "base_model": model, "base_weights": weights, "sampling": asdict(sampling)}

    def path(self, key: dict) -> Path:
        name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
        return self.folder / key["concept_sha256"][:16] / f"{name}.png"

    def has(self, key: dict) -> bool:
        return self.path(key).is_file()

    def put(self, key: dict, image: Image.Image) -> Path:
        return save_png(image, self.path(key), key)

    def get(self, key: dict) -> Image.Image:
        with Image.open(self.path(key)) as im:
            return im.convert("RGB")


# ---- the evaluation ------------------------------------------------------------------------------------------

def _truncations(entry: ConceptEntry, sweep: Sequence[int]) -> list[int | None]:
    """None (all units) first, then the sweep's k for NeTI concepts; k at or above the kept units equals None."""
    values: list[int | None] = [None]
    if entry.sweep and entry.concept.method == "neti":
        kept = entry.concept.config.kept_units
        values += sorted({k for k in sweep if k < kept}, reverse=True)
    return values


def evaluate(generator: Generator, entries: Sequence[ConceptEntry], judge: ClipJudge, config: EvalConfig,
             cache_dir: str | os.PathLike, progress: bool = True,
             on_generated: Callable[[int], None] | None = None) -> EvalReport:
    """Render what the cache lacks, embed everything with CLIP, and score each concept and each group."""
    from tqdm import tqdm

    cache = ImageCache(cache_dir)
    model, weights = generator.model_name, weights_fingerprint(generator.pipe)

    def key(entry: ConceptEntry, prompt: str, seed: int, k: int | None) -> dict:
        return cache.key(entry.digest, prompt, seed, k, config.alpha, model, config.sampling, weights)

    seeds = list(config.seeds)
    for entry in entries:  # concepts load on the CPU; the mapper runs where the text encoder is
        entry.concept.to(generator.pipe.device)
    todo = []  # (entry, prompt, truncation, seed) not in the cache
    for entry in entries:
        for k in _truncations(entry, config.sweep):
            for prompt in config.prompts:
                todo += [(entry, prompt, k, s) for s in seeds if not cache.has(key(entry, prompt, s, k))]
    bar = tqdm(total=len(todo), desc="generating", unit="img", disable=not progress or not todo)
    timesteps = generator.timesteps(config.sampling)
    for start in range(0, len(todo), config.batch_size):
        batch = todo[start:start + config.batch_size]  # any mix of concepts, prompts and truncations: one batch
        rows = [Row(generator.encode(prompt, [entry.concept], timesteps, k, config.alpha), seed,
                    {"prompt": prompt, "concepts": [entry.concept.token], "truncation": k, "alpha": config.alpha})
                for entry, prompt, k, seed in batch]
        result = generator.render(rows, config.sampling)
        for (entry, prompt, k, seed), image in zip(batch, result.images):
            cache.put(key(entry, prompt, seed, k), image)
        bar.update(len(batch))
        if on_generated is not None:
            on_generated(len(batch))
    bar.close()
    generated = len(todo)

    text_embeddings = judge.embed_texts([remove_placeholder(p) for p in config.prompts])  # (P, E)
    points = []
    scoring = tqdm(total=sum(len(_truncations(e, config.sweep)) for e in entries), desc="scoring", unit="set",
                   disable=not progress)
    for entry in entries:
        training = judge.embed_images(entry.images)  # (M, E)
        for k in _truncations(entry, config.sweep):
            images = [cache.get(key(entry, p, s, k)) for p in config.prompts for s in seeds]
            generated_emb = judge.embed_images(images).view(len(config.prompts), len(seeds), -1)  # (P, S, E)
            flat = generated_emb.reshape(-1, generated_emb.shape[-1])
            texts = text_embeddings[:, None, :].expand_as(generated_emb).reshape(flat.shape)
            points.append(Point(
                entry.label, entry.name, k, image_similarity(training, flat), text_similarity(flat, texts),
                flat.shape[0], training.shape[0],
                {p: text_similarity(generated_emb[i], text_embeddings[i].expand_as(generated_emb[i]))
                 for i, p in enumerate(config.prompts)},
                {p: image_similarity(training, generated_emb[i]) for i, p in enumerate(config.prompts)},
            ))
            scoring.update(1)
    scoring.close()
    settings = {"prompts": list(config.prompts), "seeds": seeds, "sweep": list(config.sweep),
                "alpha": config.alpha, "sampling": asdict(config.sampling), "base_model": model,
                "clip": judge.name, "concepts": [{"path": str(e.path), "label": e.label, "sha256": e.digest,
                                                   "method": e.concept.method, "train_steps": e.concept.train_steps,
                                                   "num_training_images": len(e.images)} for e in entries]}
    return EvalReport(points, group_means(points), settings, generated)


def group_means(points: Sequence[Point]) -> list[Point]:
    """Per (label, truncation): the mean over concepts, as the paper averages its concepts."""
    groups: dict[tuple, list[Point]] = {}
    for p in points:
        groups.setdefault((p.label, p.truncation), []).append(p)
    out = []
    for (label, k), members in groups.items():
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        out.append(Point(label, "mean", k, mean([m.image_similarity for m in members]),
                         mean([m.text_similarity for m in members]), sum(m.num_generated for m in members),
                         sum(m.num_training for m in members)))
    return out


# ---- outputs -------------------------------------------------------------------------------------------------

CSV_FIELDS = ("label", "concept", "truncation", "image_similarity", "text_similarity", "num_generated",
              "num_training")


def write_outputs(report: EvalReport, out_dir: str | os.PathLike) -> dict[str, Path]:
    """results.json, results.csv (group means first, concept = 'mean'; then each concept) and plot.png."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "csv": out / "results.csv", "plot": out / "plot.png"}
    atomic_write(paths["json"], lambda tmp: Path(tmp).write_text(json.dumps(report.to_json(), indent=1) + "\n"))

    def write_csv(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, CSV_FIELDS, extrasaction="ignore")
            writer.writeheader()
            for p in [*report.groups, *report.points]:
                row = asdict(p)
                row["truncation"] = "" if p.truncation is None else p.truncation
                row["image_similarity"] = f"{p.image_similarity:.4f}"
                row["text_similarity"] = f"{p.text_similarity:.4f}"
                writer.writerow(row)

    atomic_write(paths["csv"], write_csv)
    atomic_write(paths["plot"], lambda tmp: plot(report.groups, tmp))
    return paths


def plot(groups: Sequence[Point], path: str | os.PathLike, title: str = "") -> None:
    """Image similarity (y) against text similarity (x): one labelled point per group, sweeps dashed (Fig. 9)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    labels = list(dict.fromkeys(p.label for p in groups))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, label in enumerate(labels):
        colour = colours[i % len(colours)]
        members = [p for p in groups if p.label == label]
        full = [p for p in members if p.truncation is None]
        sweep = sorted((p for p in members if p.truncation is not None), key=lambda p: p.truncation)
        if sweep:
            line = sweep + full
            ax.plot([p.text_similarity for p in line], [p.image_similarity for p in line], "--", color=colour,
                    marker=".", linewidth=1)
            for p in sweep:
                ax.annotate(f"k={p.truncation}", (p.text_similarity, p.image_similarity), fontsize=7,
                            textcoords="offset points", xytext=(4, -8), color=colour)
        for p in full:
            ax.scatter([p.text_similarity], [p.image_similarity], color=colour, s=40, zorder=3)
            ax.annotate(label, (p.text_similarity, p.image_similarity), fontsize=8, textcoords="offset points",
                        xytext=(5, 4))
    ax.set_xlabel("text similarity (CLIP, prompt without the concept)")
    ax.set_ylabel("image similarity (CLIP, to the training images)")
    ax.set_title(title or "Fidelity against editability (NeTI Fig. 9)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def format_table(groups: Sequence[Point]) -> str:
    """A markdown table of the group means."""
    lines = ["| method | truncation | image sim. | text sim. | images |", "|---|---|---|---|---|"]
    for p in groups:
        k = "none" if p.truncation is None else str(p.truncation)
        lines.append(f"| {p.label} | {k} | {p.image_similarity:.4f} | {p.text_similarity:.4f} | {p.num_generated} |")
    return "\n".join(lines)

