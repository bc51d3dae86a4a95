"""Fidelity and editability while a concept trains (Textual Inversion's CLIP protocol, NeTI Sec. 5.1, Fig. 9, as
a live curve): every preview is scored, a copy of the concept is kept at every preview step, and the step with
the best trade-off is marked, so that a user can keep an earlier step than the last.

At a preview the trainer renders its preview prompts at fixed seeds (`neti.train.PreviewInfo`). With a CLIP
(`neti.evaluate.ClipJudge`: the bundled toy CLIP for the bundled model; for another model a CLIP the user names,
and no curve when none can be loaded offline):
- image similarity (fidelity): the mean cosine similarity between the CLIP image embeddings of the first preview
  prompt's images and the training photos;
- text similarity (editability): the mean cosine similarity between the images of the other preview prompts (the
  edit prompts; the first one when it is the only one) and their prompt's CLIP text embedding with the
  placeholder removed (`neti.evaluate.remove_placeholder`).
The best trade-off is the step whose two scores, each min-max normalised over the steps so far, sum highest;
step 0 (the untrained concept) is the curve's baseline, never the best and never kept.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from PIL import Image

from .concept import atomic_write
from .evaluate import ClipJudge, image_similarity, remove_placeholder, text_similarity
from .models import model_label
from .paths import BUNDLED_CLIP, BUNDLED_MODEL
from .train import PreviewInfo, TrainingCallback

logger = logging.getLogger(__name__)

STEP_SUFFIX = ".safetensors"


@dataclass(frozen=True)
class StepScore:
    step: int
    image_similarity: float  # fidelity to the training photos
    text_similarity: float  # editability: the edit prompts' images against their text


def best_tradeoff(scores: Sequence[StepScore]) -> int | None:
    """The step whose image and text similarity, each min-max normalised over `scores`, sum highest (the
    earliest on a tie); None without scores."""
    if not scores:
        return None

    def normalised(values: list[float]) -> list[float]:
        low, high = min(values), max(values)
        return [0.0 if high == low else (v - low) / (high - low) for v in values]

    image = normalised([s.image_similarity for s in scores])
    text = normalised([s.text_similarity for s in scores])
    totals = [i + t for i, t in zip(image, text)]
    return scores[totals.index(max(totals))].step


def default_judge(model_name: str, clip: str | os.PathLike | None = None) -> ClipJudge | None:
    """The CLIP that scores previews: `clip` if given, else the bundled toy CLIP for the bundled model; None (and
    a log line) when there is none, e.g. another model offline."""
    if clip is None:
        bundled = Path(model_name).expanduser().resolve() == BUNDLED_MODEL.resolve() if model_name else False
        if not bundled or not (BUNDLED_CLIP / "config.json").is_file():
            logger.info("no CLIP for %s: training previews are not scored (give a CLIP to score them)",
                        model_label(model_name))
            return None
        clip = BUNDLED_CLIP
    try:
        return ClipJudge.load(clip)
    except ValueError as exc:
        logger.warning("training previews are not scored: %s", exc)
        return None


class FidelityTracker(TrainingCallback):
    """Scores each preview, keeps the concept at each preview step after 0 in `steps_dir`, and calls
    `on_score(score, best_step)` and `on_kept(step)`.

    `concept` is the trainer's concept (its weights are saved as they are at the preview); `judge` None keeps
    the checkpoints without scores."""

    def __init__(self, judge: ClipJudge | None, training_images: Sequence[Image.Image], concept,
                 steps_dir: str | os.PathLike | None, on_score=None, on_kept=None):
        self.judge, self.concept, self.on_score, self.on_kept = judge, concept, on_score, on_kept
        self.steps_dir = Path(steps_dir) if steps_dir is not None else None
        self.scores: list[StepScore] = []
        self._training = judge.embed_images(list(training_images)) if judge is not None else None

    def score(self, info: PreviewInfo) -> StepScore | None:
        if self.judge is None or not info.images:
            return None
        first = info.prompts[0]
        plain = [im for im, p in zip(info.images, info.prompts) if p == first]
        edits = [(im, p) for im, p in zip(info.images, info.prompts) if p != first] or list(zip(info.images,
                                                                                                 info.prompts))
        texts = [remove_placeholder(p, self.concept.token) for _, p in edits]
        image = image_similarity(self._training, self.judge.embed_images(plain))
        text = text_similarity(self.judge.embed_images([im for im, _ in edits]), self.judge.embed_texts(texts))
        return StepScore(info.step, image, text)

    def on_preview(self, info: PreviewInfo) -> None:
        if self.steps_dir is not None and info.step > 0:
            self.save_step(info.step)
            if self.on_kept is not None:
                self.on_kept(info.step)
        score = self.score(info)
        if score is None:
            return
        self.scores.append(score)
        best = best_tradeoff(self.trained_scores())
        logger.info("step %d: image similarity %.4f, text similarity %.4f (best trade-off so far: step %s)",
                    score.step, score.image_similarity, score.text_similarity, best)
        if self.on_score is not None:
            self.on_score(score, best)

    def save_step(self, step: int) -> Path:
        """The concept as it is now, as a loadable concept file `steps_dir/step-000150.safetensors`."""
        steps = self.concept.train_steps
        try:
            self.concept.train_steps = step
            return self.concept.save(step_path(self.steps_dir, step))
        finally:
            self.concept.train_steps = steps

    def trained_scores(self) -> list[StepScore]:
        """The scores after step 0 (step 0 is the untrained baseline: plotted, never the best, never kept)."""
        return [s for s in self.scores if s.step > 0]

    def to_json(self) -> dict:
        return {"scores": [asdict(s) for s in self.scores], "best_step": best_tradeoff(self.trained_scores())}


def step_path(steps_dir: str | os.PathLike, step: int) -> Path:
    return Path(steps_dir) / f"step-{int(step):06d}{STEP_SUFFIX}"


def kept_steps(steps_dir: str | os.PathLike) -> list[int]:
    """The steps whose concept was kept in `steps_dir`, ascending."""
    folder = Path(steps_dir)
    out = []
    for path in folder.glob(f"step-*{STEP_SUFFIX}") if folder.is_dir() else ():
        try:
            out.append(int(path.name[len("step-"):-len(STEP_SUFFIX)]))
        except ValueError:
            continue
    return sorted(out)


def write_scores(tracker: FidelityTracker, path: str | os.PathLike) -> Path:
    """The scores so far and the best step as JSON (the CLI's PREVIEWS/scores.json)."""
    text = json.dumps(tracker.to_json(), indent=2)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))
