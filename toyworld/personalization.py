"""Proof that personalization works on the bundled model (issue 4, item 8; NeTI paper Sec. 5's two measures).

For each example concept: render "a photo of a {}" with the concept and with its super-category word alone
(same seeds), and score both by the toy CLIP's image similarity to the concept's training images (Textual
Inversion's protocol, `neti.evaluate`). Then render the concept on every background of the world ("a {} on a
<colour> background") and let the attribute classifier name each image's background: the share that matches
is how well the concept still follows background edits, at full truncation and at a lower truncation k (the
paper's editability knob: fewer hidden units, a coarser concept), next to the same edits of the super-category
word alone (the base model's own rate).

    python -m toyworld.personalization --concepts assets/concepts --json personalization.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from toyworld.world import BACKGROUNDS

REPO = Path(__file__).resolve().parent.parent


def measure(generator, concept, images, judge, classifier, seeds: list[int], sampling, low_k: int = 8) -> dict:
    from neti.evaluate import image_similarity

    training = judge.embed_images(images)
    word = concept.super_category
    with_concept = generator.generate("a photo of a {}", [concept], seeds, sampling).images
    with_word = generator.generate(f"a photo of a {word}", [], seeds, sampling).images
    hits: dict = {None: [], low_k: [], "word": []}
    for background in BACKGROUNDS:
        for k, found in hits.items():
            if k == "word":  # the reference: what the base model does with the super-category word
                rendered = generator.generate(f"a {word} on a {background} background", [], seeds, sampling).images
            else:
                rendered = generator.generate(f"a {{}} on a {background} background", [concept], seeds, sampling,
                                              truncation=k).images
            predicted = classifier.predict(np.stack([np.asarray(x) for x in rendered]))["background"]
            found += [p == background for p in predicted]
    return {
        "image_similarity_concept": round(image_similarity(training, judge.embed_images(with_concept)), 4),
        "image_similarity_super_category": round(image_similarity(training, judge.embed_images(with_word)), 4),
        "super_category": word,
        "background_edits_followed": round(float(np.mean(hits[None])), 4),
        f"background_edits_followed_truncation_{low_k}": round(float(np.mean(hits[low_k])), 4),
        "background_edits_followed_super_category": round(float(np.mean(hits["word"])), 4),
        "background_edit_images": len(hits[None]),
    }


def main(argv: list[str] | None = None) -> None:
    from neti import Concept, Generator, Sampling, load_images, load_pipeline
    from neti.evaluate import BUNDLED_CLIP, ClipJudge
    from toyworld.classifier import load_classifier

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concepts", type=Path, default=REPO / "assets" / "concepts",
                        help="a folder of <example name>.safetensors files (or one file)")
    parser.add_argument("--examples", type=Path, default=REPO / "assets" / "examples")
    parser.add_argument("--model", default=None, help="base model (default: the bundled one)")
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    files = sorted(args.concepts.glob("*.safetensors")) if args.concepts.is_dir() else [args.concepts]
    generator = Generator(load_pipeline(args.model, "cpu"), args.model)
    judge, classifier = ClipJudge.load(BUNDLED_CLIP), load_classifier()
    sampling = Sampling(steps=args.steps)
    report = {}
    for path in files:
        images = list(load_images(args.examples / path.stem).pil_images)
        report[path.stem] = measure(generator, Concept.load(path), images, judge, classifier,
                                    list(range(args.seeds)), sampling)
        print(path.stem, json.dumps(report[path.stem]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
