"""Why a concept can lose its shape under nested dropout (NeTI Sec. 3.4), measured on a drawable concept.

A purple dotted star on five backgrounds: every attribute has a word, so the base model can draw it and the
classifier can judge it. Each variant trains NeTI from the same seed with checkpoints along the way; each
checkpoint renders "a photo of a {} on a white background" over many seeds at full truncation (and at a few
truncations k), and the classifier counts stars, purple objects and dots.

    python -m toyworld.nested_dropout_study --variants default no_nested_dropout --steps 1000 --json study.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from toyworld.examples import ExampleConcept, write_examples

STAR = ExampleConcept("purple-dotted-star", "star", "purple", "dotted", None,
                      ("white", "green", "yellow", "black", "orange"), "shape", "a purple dotted star (all named)")
PROMPT = "a photo of a {} on a white background"
VARIANTS = {  # name -> TrainConfig overrides
    "default": {},
    "no_nested_dropout": {"ablations": ("no_nested_dropout",)},
    "time_only": {"ablations": ("time_only",)},
    "space_only": {"ablations": ("space_only",)},
    "lr_x0.25": {"learning_rate": 2.5e-4},
    "xti": {"method": "xti"},
}


def star_scene_examples(folder: Path) -> Path:
    """Write the star's five captioned photos with the examples' writer."""
    import toyworld.examples as examples

    saved = examples.EXAMPLES
    try:
        examples.EXAMPLES = (STAR,)
        write_examples(folder)
    finally:
        examples.EXAMPLES = saved
    return folder / STAR.name


def rates(generator, concept, classifier, seeds: list[int], sampling, truncation=None) -> dict[str, float]:
    from toyworld.personalization import judge

    found = judge(classifier, generator.generate(PROMPT, [concept], seeds, sampling, truncation=truncation).images)
    return {"star": float(np.mean([f["shape"] == "star" for f in found])),
            "purple": float(np.mean([f["colour"] == "purple" for f in found])),
            "dotted": float(np.mean([f["pattern"] == "dotted" for f in found]))}


def main(argv: list[str] | None = None) -> None:
    from neti import Concept, Generator, Sampling, TrainConfig, Trainer, load_images, load_pipeline
    from toyworld.classifier import load_classifier

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["default", "no_nested_dropout"], choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--every", type=int, default=250, help="checkpoint (and measurement) interval")
    parser.add_argument("--seeds", type=int, default=16)
    parser.add_argument("--train-seed", type=int, default=0)
    parser.add_argument("--truncations", type=int, nargs="*", default=[8, 32])
    parser.add_argument("--classifier", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="nd-study-")))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(None, "cpu")
    generator = Generator(pipe)
    classifier = load_classifier(args.classifier) if args.classifier else load_classifier()
    images = list(load_images(star_scene_examples(args.out)).pil_images)
    sampling, seeds, report = Sampling(steps=25), list(range(100, 100 + args.seeds)), {}
    for name in args.variants:
        config = TrainConfig(**{"steps": args.steps, "checkpoint_every": args.every, "seed": args.train_seed,
                                "keep_checkpoints": args.steps // args.every + 1, **VARIANTS[name]})
        out = args.out / f"{name}-{args.train_seed}.safetensors"
        Trainer(pipe, images, f"<star-{name}>", STAR.super_category, config).train(out)
        report[name] = {}
        for checkpoint in sorted((args.out / f"{out.stem}-checkpoints").glob("*.safetensors")):
            concept = Concept.load(checkpoint)
            row = {"full": rates(generator, concept, classifier, seeds, sampling)}
            for k in args.truncations if concept.config.method == "neti" else ():
                row[str(k)] = rates(generator, concept, classifier, seeds, sampling, truncation=k)
            report[name][checkpoint.stem] = row
            print(name, checkpoint.stem, json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
