"""An attribute classifier for the toy world: the judge of what an image shows.

A small CNN with one head per attribute (shape, colour, pattern, background, count, rendering; see
`toyworld.world.ATTRIBUTES`). It is trained on real world images with mild pixel noise, so that it also reads
VAE reconstructions and generated images, and it measures the base model's quality (issue 4: each attribute at
least 95% on held-out real images; generations must show the prompt's shape, colour and background).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from toyworld.world import (ALL_COLOURS, ATTRIBUTES, SECOND_COLOURS, UNNAMED_COLOURS, UNNAMED_PATTERNS, UNNAMED_SHAPES,
                            Labels, Scene, shown, symmetric_colours)

UNNAMED_VALUES = {"shape": set(UNNAMED_SHAPES), "colour": set(UNNAMED_COLOURS), "pattern": set(UNNAMED_PATTERNS),
                  "second": set(SECOND_COLOURS) - {"shade"}}  # any second colour makes an object two-coloured

logger = logging.getLogger(__name__)

POOL = 40000  # training images, rendered once
CLASSIFIER_PATH = Path(__file__).resolve().parent.parent / "assets" / "toy-classifier"


class AttributeClassifier(nn.Module):
    """(B, 3, 64, 64) images in [-1, 1] -> one logit vector per attribute."""

    def __init__(self, width: int = 32, attributes: dict[str, tuple] | None = None):
        super().__init__()
        self.attributes = dict(attributes or ATTRIBUTES)
        layers, channels = [], 3
        for out in (width, 2 * width, 4 * width, 4 * width):  # 64 -> 32 -> 16 -> 8 -> 4 pixels
            layers += [nn.Conv2d(channels, out, 3, padding=1), nn.GroupNorm(8, out), nn.SiLU(),
                       nn.Conv2d(out, out, 3, stride=2, padding=1), nn.SiLU()]
            channels = out
        self.features = nn.Sequential(*layers)
        self.heads = nn.ModuleDict({name: nn.Linear(channels * 2, len(values))
                                    for name, values in self.attributes.items()})
        self.width = width

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(images)  # (B, C, 4, 4)
        h = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)
        return {name: head(h) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: np.ndarray | torch.Tensor) -> dict[str, list]:
        """Attribute values for uint8 (B, 64, 64, 3) arrays or float (B, 3, 64, 64) tensors in [-1, 1]."""
        x = to_tensor(images)
        logits = {k: [] for k in self.heads}
        for chunk in x.split(256):
            for k, v in self(chunk).items():
                logits[k].append(v.argmax(dim=1))
        return {k: [self.attributes[k][i] for i in torch.cat(v).tolist()] for k, v in logits.items()}


def to_tensor(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(images, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return images.float()


def label_tensors(scenes: list[Scene]) -> dict[str, torch.Tensor]:
    labels = [Labels.of(s) for s in scenes]
    return {name: torch.tensor([getattr(label, name) for label in labels]) for name in ATTRIBUTES}


def hits(predicted: dict[str, list], scenes: list[Scene], name: str) -> list[bool]:
    """Whether each prediction of attribute `name` is what the image shows (`toyworld.world.shown`); the colour
    and second colour of two-coloured checks count as an unordered pair (`symmetric_colours`)."""
    out = []
    for i, scene in enumerate(scenes):
        if name in ("colour", "second") and symmetric_colours(scene):
            out.append({predicted["colour"][i], predicted["second"][i]} == {scene.colour, scene.second})
        else:
            out.append(predicted[name][i] == shown(scene, name))
    return out


def accuracy(classifier: AttributeClassifier, images, scenes: list[Scene]) -> dict[str, float]:
    """Fraction of images whose predicted attribute is the one the image shows, per attribute the classifier
    knows."""
    predicted = classifier.predict(images)
    return {name: float(np.mean(hits(predicted, scenes, name))) for name in predicted}


def unnamed_accuracy(classifier: AttributeClassifier, images, scenes: list[Scene]) -> dict[str, float]:
    """Accuracy on the images that show an unnamed value of the attribute (a heart, pink, checks, a second
    colour), per attribute that has unnamed values."""
    predicted = classifier.predict(images)
    found = {}
    for name, unnamed in UNNAMED_VALUES.items():
        if name not in predicted:  # a classifier of the named world alone
            continue
        flags = [h for h, s in zip(hits(predicted, scenes, name), scenes) if shown(s, name) in unnamed]
        if flags:
            found[name] = float(np.mean(flags))
    return found


def colour_loss(logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor], symmetric: torch.Tensor
                ) -> torch.Tensor:
    """Cross-entropy of the colour and second-colour heads; for two-coloured checks (`symmetric`), the better of
    the two ways to assign the colours."""
    ce = lambda head, labels: F.cross_entropy(logits[head], labels, reduction="none")  # noqa: E731
    ordered = ce("colour", targets["colour"]) + ce("second", targets["second"])
    colour_of_second = torch.tensor([ALL_COLOURS.index(SECOND_COLOURS[i]) if SECOND_COLOURS[i] in ALL_COLOURS else 0
                                     for i in targets["second"].tolist()])
    second_of_colour = torch.tensor([SECOND_COLOURS.index(ALL_COLOURS[i]) for i in targets["colour"].tolist()])
    swapped = ce("colour", colour_of_second) + ce("second", second_of_colour)
    return torch.where(symmetric, torch.minimum(ordered, swapped), ordered).mean()


def degrade(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random pixel noise, the kind of damage a VAE or a weak generator does (no blur: "blurry" is a label)."""
    noise = torch.rand(len(x), 1, 1, 1, generator=generator) * 0.1
    return x + noise * torch.randn(x.shape, generator=generator)


def save_classifier(classifier: AttributeClassifier, folder: Path) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(classifier.state_dict(), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"width": classifier.width,
                                                    "attributes": {k: list(map(str, v)) for k, v in ATTRIBUTES.items()}}))


def load_classifier(folder: str | Path = CLASSIFIER_PATH) -> AttributeClassifier:
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / "model.safetensors").exists():
        raise FileNotFoundError(f"no classifier in {folder}: train one with `python -m toyworld.train classifier`")
    config = json.loads((folder / "config.json").read_text())
    attributes = {k: tuple(int(x) if k == "count" else x for x in v) for k, v in config["attributes"].items()}
    classifier = AttributeClassifier(config["width"], attributes)
    classifier.load_state_dict(load_file(str(folder / "model.safetensors")))
    return classifier.eval()


def train_classifier(args) -> None:
    """Train on World(seed) images rendered on the fly; report accuracy on World(seed + 1)."""
    from toyworld.loop import Progress, image_pool, load_checkpoint, optimise, pool_batch, save_atomic, step_generator
    from toyworld.world import World, dataset

    path = args.checkpoints / "classifier.pt"
    torch.manual_seed(args.seed)
    classifier = AttributeClassifier()
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=args.lr or 2e-3, weight_decay=1e-4)
    state, step = load_checkpoint(path), 0
    if state:
        classifier.load_state_dict(state["model"]), optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
    elif args.init:  # fine-tune a saved classifier (a fresh optimiser and schedule)
        classifier.load_state_dict(load_classifier(args.init).state_dict())
        logger.info("starting from the classifier in %s", args.init)
    # a fixed pool of images apart from those the VAE and UNet see, reused with random damage
    pool, scenes = image_pool(World(args.seed, unnamed=args.unnamed), 20_000_000, min(POOL, args.steps * args.batch))
    targets = label_tensors(scenes)
    symmetric = torch.tensor([symmetric_colours(s) for s in scenes])
    progress = Progress(args.save_minutes, args.minutes)

    def save() -> None:
        save_atomic(dict(model=classifier.state_dict(), optimizer=optimizer.state_dict(), step=step), path)

    classifier.train()
    while step < args.steps and not progress.out_of_time():
        lr = (args.lr or 2e-3) * 0.5 * (1 + np.cos(np.pi * step / args.steps))
        for group in optimizer.param_groups:
            group["lr"] = float(lr)  # a numpy scalar would not load with weights_only=True
        x, indices = pool_batch(pool, step, args.batch)
        generator = step_generator(args.seed, step)
        x = degrade(torch.where(torch.rand(len(x), 1, 1, 1, generator=generator) < 0.5, x, x.flip(3)), generator)
        logits = classifier(x)
        batch_targets = {k: v[indices] for k, v in targets.items()}
        loss = colour_loss(logits, batch_targets, symmetric[indices]) + sum(
            F.cross_entropy(logits[k], batch_targets[k]) for k in logits if k not in ("colour", "second"))
        optimise(optimizer, loss)
        step += 1
        progress.after_step(f"classifier step {step} loss {loss.item():.4f}", save)
    progress.close()
    save()
    classifier.eval()
    images, scenes = dataset(World(args.seed + 1), 0, args.eval_count)
    print("held-out accuracy:", json.dumps({k: round(v, 4) for k, v in accuracy(classifier, images, scenes).items()}))
    images, scenes = dataset(World(args.seed + 1, unnamed=0.5), 0, args.eval_count)
    print("held-out accuracy on unnamed values:",
          json.dumps({k: round(v, 4) for k, v in unnamed_accuracy(classifier, images, scenes).items()}))
    save_classifier(classifier, args.out or CLASSIFIER_PATH)
    print(f"saved to {args.out or CLASSIFIER_PATH}")


__all__ = ["AttributeClassifier", "load_classifier", "save_classifier", "accuracy", "train_classifier",
           "CLASSIFIER_PATH"]
