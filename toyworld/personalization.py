"""Proof that personalization works on the bundled model: fidelity, editability and style mixing (NeTI Sec. 5,
Fig. 11 and Fig. 20), judged by the attribute classifier.

For each example concept (`toyworld.examples`), over many seeds:
- fidelity: "a photo of a {} on a white background" at full truncation; the share of images that show the
  concept's shape, its colours (body and pattern colour, as an unordered pair: checks have no "first" colour)
  and its pattern; and, as the reference, the share in which the super-category word alone gives that whole
  combination (the base model cannot be asked for it in words);
- editability: "a photo of a {} on a C background" for the six named colours C at several truncations k
  (nested dropout's knob: fewer hidden units, a coarser and more editable concept): the share of images whose
  background is C, and the share that keep the concept's shape;
- style mixing, for each pair of `MIX_PAIRS`: the geometry example's shape with the appearance example's colours
  and pattern, over mixing start timesteps (the geometry concept feeds every layer while t > start, its coarse
  layers always).
Also the toy CLIP's image similarity of the concept's images to its photos, against the word alone.

    python -m toyworld.personalization --json docs/personalization.json --sheets docs/
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from toyworld.examples import EXAMPLES, MIX_PAIRS, ExampleConcept, MixPair
from toyworld.world import COLOURS

REPO = Path(__file__).resolve().parent.parent
TRUNCATIONS = (2, 4, 8, 16, 32, None)  # the editability curve's k (None: all 128 units)
MIX_STARTS = tuple(range(500, 1000, 50))
FIDELITY_PROMPT = "a photo of a {} on a white background"
EDIT_PROMPT = "a photo of a {} on a %s background"
TARGETS = dict(shape=0.8, colours=0.8, pattern=0.7, word_alone=0.1, edit_background=0.8, edit_shape=0.7, mix=0.6)


def second_colour(example: ExampleConcept) -> str:
    return "shade" if example.pattern == "plain" or example.pattern_colour is None else example.pattern_colour


def judge(classifier, images) -> list[dict]:
    """The classifier's attributes of each PIL image."""
    predicted = classifier.predict(np.stack([np.asarray(x.convert("RGB")) for x in images]))
    return [{k: v[i] for k, v in predicted.items()} for i in range(len(images))]


def shows(found: dict, shape: str, colour: str, second: str, pattern: str) -> dict[str, bool]:
    """Which of the thing's parts an image shows: shape, colours (unordered pair), pattern, and all three."""
    parts = {"shape": found["shape"] == shape, "colours": {found["colour"], found["second"]} == {colour, second},
             "pattern": found["pattern"] == pattern}
    return {**parts, "all": all(parts.values())}


def share(flags: list[dict], key: str) -> float:
    return round(float(np.mean([f[key] for f in flags])), 4)


def measure_concept(generator, concept, example: ExampleConcept, photos, classifier, clip, seeds: list[int],
                    edit_seeds: list[int], sampling) -> tuple[dict, dict]:
    """The fidelity and editability figures of one concept, and the images for its sheet."""
    from neti.evaluate import image_similarity

    thing = dict(shape=example.shape, colour=example.colour, second=second_colour(example), pattern=example.pattern)
    word = concept.super_category
    mine = generator.generate(FIDELITY_PROMPT, [concept], seeds, sampling).images
    alone = generator.generate(FIDELITY_PROMPT.replace("{}", word), [], seeds, sampling).images
    fidelity = [shows(f, **thing) for f in judge(classifier, mine)]
    reference = [shows(f, **thing) for f in judge(classifier, alone)]
    curve = {str(k): {"background": [], "shape": []} for k in TRUNCATIONS}
    edits = {}
    for colour in COLOURS:
        result = generator.sweep(EDIT_PROMPT % colour, [concept], edit_seeds, list(TRUNCATIONS), sampling)
        found = judge(classifier, result.images)
        for i, (image, f) in enumerate(zip(result.images, found)):
            k = str(TRUNCATIONS[i // len(edit_seeds)])
            curve[k]["background"].append(f["background"] == colour)
            curve[k]["shape"].append(f["shape"] == example.shape)
        edits[colour] = result.images[-len(edit_seeds)]  # full truncation, first seed
    curve = {k: {"background": round(float(np.mean(v["background"])), 4), "shape": round(float(np.mean(v["shape"])), 4)}
             for k, v in curve.items()}
    def meets(v: dict) -> bool:
        return v["background"] >= TARGETS["edit_background"] and v["shape"] >= TARGETS["edit_shape"]

    best = max(((k, v) for k, v in curve.items() if k == "None" or int(k) <= 32),
               key=lambda kv: (meets(kv[1]), kv[1]["background"] + kv[1]["shape"]))
    strip = generator.sweep(FIDELITY_PROMPT, [concept], [seeds[0]], list(TRUNCATIONS), sampling).images
    training = clip.embed_images(photos)
    similarity = {"concept": round(image_similarity(training, clip.embed_images(mine)), 4),
                  "super_category_alone": round(image_similarity(training, clip.embed_images(alone)), 4)}
    report = {
        "super_category": word, "seeds": len(seeds), "edit_images_per_k": len(edit_seeds) * len(COLOURS),
        "fidelity": {k: share(fidelity, k) for k in ("shape", "colours", "pattern", "all")},
        "super_category_alone": {k: share(reference, k) for k in ("shape", "colours", "pattern", "all")},
        "editability": curve, "best_k": best[0],
        "clip_image_similarity": similarity,
    }
    report["meets_targets"] = bool(
        report["fidelity"]["shape"] >= TARGETS["shape"] and report["fidelity"]["colours"] >= TARGETS["colours"]
        and report["fidelity"]["pattern"] >= TARGETS["pattern"]
        and report["super_category_alone"]["all"] <= TARGETS["word_alone"]
        and meets(best[1]))
    images = dict(photos=photos, concept=mine[:5], alone=alone[:5], edits=list(edits.values()), strip=strip)
    return report, images


def measure_mix(generator, geometry, appearance, seeds: list[int], classifier, sampling,
                pair: MixPair = MIX_PAIRS[0]) -> tuple[dict, list]:
    """Share of mixed images with the geometry example's shape and the appearance example's colours and pattern
    (`pair`), per start timestep; and one image per start for the strip."""
    shape_of = next(e for e in EXAMPLES if e.name == pair.geometry)
    look = next(e for e in EXAMPLES if e.name == pair.appearance)
    thing = dict(shape=shape_of.shape, colour=look.colour, second=second_colour(look), pattern=look.pattern)
    first, second = (appearance, geometry) if pair.swapped else (geometry, appearance)
    result = generator.mix(FIDELITY_PROMPT, first, second, seeds, list(MIX_STARTS), sampling=sampling)
    flags = [shows(f, **thing) for f in judge(classifier, result.images)]
    curve = {}
    for i, start in enumerate(MIX_STARTS):
        part = flags[i * len(seeds):(i + 1) * len(seeds)]
        curve[str(start)] = {k: share(part, k) for k in ("shape", "colours", "pattern", "all")}
    best = max(curve, key=lambda s: curve[s]["all"])
    report = {"geometry": pair.geometry, "appearance": pair.appearance, "swapped": pair.swapped, "seeds": len(seeds), "curve": curve,
              "best_start": int(best), "best": curve[best]["all"], "meets_target": curve[best]["all"] >= TARGETS["mix"]}
    return report, [result.images[i * len(seeds)] for i in range(len(MIX_STARTS))]


def sheet(rows: list[tuple[str, list]], path: Path, scale: int = 2) -> None:
    """A labelled grid: one row per (label, images), images upscaled `scale` times."""
    from PIL import Image, ImageDraw

    side, label_width = 64 * scale, 150
    width = label_width + side * max(len(images) for _, images in rows)
    canvas = Image.new("RGB", (width, side * len(rows)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (label, images) in enumerate(rows):
        draw.text((6, r * side + side // 2 - 6), label, fill="black")
        for c, image in enumerate(images):
            canvas.paste(image.convert("RGB").resize((side, side), Image.NEAREST), (label_width + c * side, r * side))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def main(argv: list[str] | None = None) -> None:
    from neti import Concept, Generator, Sampling, load_images, load_pipeline
    from neti.evaluate import BUNDLED_CLIP, ClipJudge
    from toyworld.classifier import load_classifier

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concepts", type=Path, default=REPO / "assets" / "concepts",
                        help="a folder of <example name>.safetensors files")
    parser.add_argument("--examples", type=Path, default=REPO / "assets" / "examples")
    parser.add_argument("--only", nargs="*", help="example names to measure (default: every one found)")
    parser.add_argument("--model", default=None, help="base model (default: the bundled one)")
    parser.add_argument("--classifier", type=Path, default=None, help="default: assets/toy-classifier")
    parser.add_argument("--seeds", type=int, default=32, help="fidelity and mixing seeds")
    parser.add_argument("--edit-seeds", type=int, default=6, help="seeds per edit colour and truncation")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--sheets", type=Path, help="folder for the personalization sheets and the mix strip")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    generator = Generator(load_pipeline(args.model, "cpu"), args.model)
    clip = ClipJudge.load(BUNDLED_CLIP)
    classifier = load_classifier(args.classifier) if args.classifier else load_classifier()
    sampling, seeds = Sampling(steps=args.steps), list(range(args.seeds))
    report, concepts = {"targets": TARGETS, "steps": args.steps, "concepts": {}}, {}
    for example in EXAMPLES:
        path = args.concepts / f"{example.name}.safetensors"
        if not path.exists() or (args.only and example.name not in args.only):
            continue
        concepts[example.name] = concept = Concept.load(path)
        photos = list(load_images(args.examples / example.name).pil_images)
        found, images = measure_concept(generator, concept, example, photos, classifier, clip, seeds,
                                        list(range(args.edit_seeds)), sampling)
        report["concepts"][example.name] = found
        print(example.name, json.dumps(found), flush=True)
        if args.sheets:
            sheet([("training photos", images["photos"]), ("concept", images["concept"]),
                   (f"'{concept.super_category}' alone", images["alone"]), ("on the 6 colours", images["edits"]),
                   (f"k = {TRUNCATIONS[0]} ... 128", images["strip"])],
                  args.sheets / f"personalization-{example.name}.png")
    strips = []
    for pair in MIX_PAIRS:
        if pair.geometry in concepts and pair.appearance in concepts:
            found, strip = measure_mix(generator, concepts[pair.geometry], concepts[pair.appearance], seeds, classifier, sampling,
                                       pair)
            report.setdefault("mixes", []).append(found)
            print("mix", json.dumps(found), flush=True)
            strips.append((f"{pair.geometry}\n+ {pair.appearance}" + ("\n(swapped)" if pair.swapped else ""), strip))
    if args.sheets and strips:  # one row per pair, starts 500 ... 950 left to right
        sheet(strips, args.sheets / "style-mix.png")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
