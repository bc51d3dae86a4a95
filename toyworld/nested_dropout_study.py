"""Why a concept can lose its shape or colours (NeTI Sec. 3.4), measured method against method on one concept.

By default a purple dotted star on five backgrounds: every attribute has a word, so the base model can draw it
and the classifier can judge it; `--concept` picks one of the shipped examples instead. Each variant trains from
the same seed, on the photos with their captions, with checkpoints along the way; each checkpoint renders
"a photo of a {} on a white background" over many seeds at full truncation (and at a few truncations k), and the
classifier counts the concept's shape, body colour, colour pair and pattern.

    python -m toyworld.nested_dropout_study --variants default no_nested_dropout --steps 1000 --json study.json
    python -m toyworld.nested_dropout_study --concept dotted-crescent --variants default no_nested_dropout xti \
        --steps 500 --every 500 --truncations --json crescent.json
    python -m toyworld.nested_dropout_study --concept checkered-hexagon --variants default xti ti \
        --lr-scales 0.25 1 4 --steps 500 --every 500 --truncations --json sweep.json   # a learning-rate sweep
    python -m toyworld.nested_dropout_study --concept checkered-heart --variants time_only space_only \
        no_nested_dropout no_rescaling --steps 1000 --every 250 --truncations --json ablations.json   # controls

`checkered-hexagon` is shipped nowhere: it is the learning-rate sweep's concept, kept apart from the
concepts that the methods are compared on.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from toyworld.examples import EXAMPLES, ExampleConcept, write_examples

STAR = ExampleConcept("purple-dotted-star", "star", "purple", "dotted", None,
                      ("white", "green", "yellow", "black", "orange"), "shape", "a purple dotted star (all named)")
SWEEP = ExampleConcept("checkered-hexagon", "hexagon", "yellow", "checkered", "blue",
                       ("white", "purple", "green", "black", "red"), "shape",
                       "a hexagon with yellow and blue checks (the learning-rate sweep's concept, not shipped)")
PROMPT = "a photo of a {} on a white background"
VARIANTS = {  # name -> TrainConfig overrides
    "default": {},
    "no_nested_dropout": {"ablations": ("no_nested_dropout",)},
    "time_only": {"ablations": ("time_only",)},
    "space_only": {"ablations": ("space_only",)},
    "no_bypass": {"ablations": ("no_bypass",)},
    "no_rescaling": {"ablations": ("no_rescaling",)},
    "lr_x0.25": {"learning_rate": 2.5e-4},
    "xti": {"method": "xti"},
    "ti": {"method": "ti"},
}


CONCEPTS = {concept.name: concept for concept in (STAR, SWEEP, *EXAMPLES)}


def scene_examples(thing: ExampleConcept, folder: Path) -> Path:
    """Write the concept's five captioned photos with the examples' writer."""
    import toyworld.examples as examples

    saved = examples.EXAMPLES
    try:
        examples.EXAMPLES = (thing,)
        write_examples(folder)
    finally:
        examples.EXAMPLES = saved
    return folder / thing.name


def rates(generator, concept, thing: ExampleConcept, classifier, seeds: list[int], sampling,
          truncation=None) -> dict[str, float]:
    """Shares of images with the thing's shape, body colour, pattern and (unordered) colour pair."""
    from toyworld.personalization import judge, second_colour, shows

    found = judge(classifier, generator.generate(PROMPT, [concept], seeds, sampling, truncation=truncation).images)
    flags = [shows(f, thing.shape, thing.colour, second_colour(thing), thing.pattern) for f in found]
    return {"shape": float(np.mean([f["shape"] for f in flags])),
            "colour": float(np.mean([f["colour"] == thing.colour for f in found])),
            "colours": float(np.mean([f["colours"] for f in flags])),
            "pattern": float(np.mean([f["pattern"] for f in flags]))}


def main(argv: list[str] | None = None) -> None:
    from neti import Concept, Generator, Sampling, TrainConfig, Trainer, load_images, load_pipeline
    from toyworld.classifier import load_classifier

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concept", default=STAR.name, choices=list(CONCEPTS))
    parser.add_argument("--variants", nargs="+", default=["default", "no_nested_dropout"], choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--every", type=int, default=250, help="checkpoint (and measurement) interval")
    parser.add_argument("--seeds", type=int, default=16)
    parser.add_argument("--train-seed", type=int, default=0)
    parser.add_argument("--lr-scales", type=float, nargs="+", default=[1.0],
                        help="train each variant at these multiples of its method's default learning rate")
    parser.add_argument("--lr", nargs="*", default=[], metavar="METHOD=LR",
                        help="base learning rates by method (neti, xti, ti), e.g. the best of a sweep")
    parser.add_argument("--truncations", type=int, nargs="*", default=[8, 32])
    parser.add_argument("--truncations-last", action="store_true",
                        help="measure the truncations at the last checkpoint only")
    parser.add_argument("--measure-at", type=int, nargs="*", default=None,
                        help="the steps whose checkpoints are measured (default: every checkpoint)")
    parser.add_argument("--classifier", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="nd-study-")))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(None, "cpu")
    generator = Generator(pipe)
    classifier = load_classifier(args.classifier) if args.classifier else load_classifier()
    thing = CONCEPTS[args.concept]
    images = list(load_images(scene_examples(thing, args.out)))  # with their captions, as the CLI trains
    sampling, seeds, report = Sampling(steps=25), list(range(100, 100 + args.seeds)), {}
    rates_by_method = {method: float(lr) for method, lr in (item.split("=") for item in args.lr)}
    runs = [(variant, scale) for variant in args.variants for scale in args.lr_scales]
    for variant, scale in runs:
        config = TrainConfig(**{"steps": args.steps, "checkpoint_every": args.every, "seed": args.train_seed,
                                "keep_checkpoints": args.steps // args.every + 1, **VARIANTS[variant]})
        config = replace(config, learning_rate=rates_by_method.get(config.method, config.learning_rate))
        name = variant if args.lr_scales == [1.0] else f"{variant}@lr{config.base_learning_rate() * scale:g}"
        config = replace(config, learning_rate=config.base_learning_rate() * scale)
        out = args.out / f"{name}-{args.train_seed}.safetensors"
        Trainer(pipe, images, f"<{thing.name}-{variant}>", thing.super_category, config).train(out)
        report[name] = {}
        checkpoints = sorted((args.out / f"{out.stem}-checkpoints").glob("*.safetensors"))
        steps = {checkpoint: int(checkpoint.stem.rsplit("-", 1)[1]) for checkpoint in checkpoints}
        checkpoints = [c for c in checkpoints if args.measure_at is None or steps[c] in args.measure_at]
        for checkpoint in checkpoints:
            concept = Concept.load(checkpoint)
            row = {"full": rates(generator, concept, thing, classifier, seeds, sampling)}
            truncate = concept.config.method == "neti" and (checkpoint == checkpoints[-1] or not args.truncations_last)
            for k in args.truncations if truncate else ():
                row[str(k)] = rates(generator, concept, thing, classifier, seeds, sampling, truncation=k)
            report[name][checkpoint.stem] = row
            print(name, checkpoint.stem, json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
