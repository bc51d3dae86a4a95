"""The toy model's quality report (issue 4): what the classifier and the toy CLIP see.

    python -m toyworld.evaluate [--model assets/toy-sd] [--captions 200] [--steps 25] [--json report.json]
                                [--grid generations.png]

1. The attribute classifier's accuracy on held-out real images (World(1)), per attribute; and on images of
   unnamed attributes (World(1) with half of each attribute unnamed), on the images whose value is unnamed.
2. Its accuracy on the model's VAE reconstructions of those images (does the latent space keep colour?), named
   and unnamed apart; and the mean absolute error of the example concepts' photos after a VAE round trip.
3. Its agreement with the prompt on the model's generations for held-out captions (World(2) scenes, photos):
   the fraction of images that show the requested shape, colour, background, pattern and count.
4. The prior over unnamed attributes: how often "a shape on a white background" gives each unnamed shape,
   colour, pattern and a second colour (words cannot ask for them; the model must still draw them); and the
   blend response (`--blends N`): how often each unnamed value's blend, which no prompt can type, draws it.
5. The toy CLIP's zero-shot accuracy at naming shape, colour and background of held-out real images.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from toyworld.world import ATTRIBUTES, World, caption, dataset

logger = logging.getLogger(__name__)


@torch.no_grad()
def reconstruct(vae, images: np.ndarray, batch: int = 200) -> np.ndarray:
    """Encode (posterior mean) and decode uint8 (N, 64, 64, 3) images; returns uint8."""
    out = []
    for chunk in np.array_split(images, max(1, len(images) // batch)):
        x = torch.from_numpy(chunk).permute(0, 3, 1, 2).float() / 127.5 - 1
        y = vae.decode(vae.encode(x).latent_dist.mean).sample
        out.append(((y.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())
    return np.concatenate(out)


@torch.no_grad()
def generate(pipe, prompts: list[str], steps: int, guidance: float, seed: int, batch: int = 50) -> np.ndarray:
    """One image per prompt, seeded per index; uint8 (N, 64, 64, 3)."""
    out = []
    for first in range(0, len(prompts), batch):
        chunk = prompts[first:first + batch]
        generators = [torch.Generator().manual_seed(seed + first + i) for i in range(len(chunk))]
        images = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=generators,
                      output_type="np").images
        out.append((images * 255).round().astype(np.uint8))
        logger.info("generated %d/%d", first + len(chunk), len(prompts))
    return np.concatenate(out)


def generation_agreement(classifier, images: np.ndarray, scenes) -> dict[str, float]:
    predicted = classifier.predict(images)
    return {name: float(np.mean([p == getattr(s, name) for p, s in zip(predicted[name], scenes)]))
            for name in ("shape", "colour", "background", "pattern", "count")}


def unnamed_prior(pipe, classifier, count: int, steps: int, guidance: float, seed: int = 1000) -> dict:
    """Shares of `count` images of "a shape on a white background" that the classifier reads as each unnamed
    value (and as any unnamed value of each attribute)."""
    from toyworld.world import UNNAMED_COLOURS, UNNAMED_PATTERNS, UNNAMED_SHAPES

    predicted = classifier.predict(generate(pipe, ["a shape on a white background"] * count, steps, guidance, seed))
    found = {"images": count}
    for name, values in (("shape", UNNAMED_SHAPES), ("colour", UNNAMED_COLOURS), ("pattern", UNNAMED_PATTERNS)):
        for value in values:
            found[value] = float(np.mean([p == value for p in predicted[name]]))
        found[f"any unnamed {name}"] = float(np.mean([p in values for p in predicted[name]]))
    found["second colour"] = float(np.mean([p != "shade" for p in predicted["second"]]))
    return found


@torch.no_grad()
def blend_response(pipe, classifier, count: int, steps: int, guidance: float, seed: int = 2000) -> dict:
    """How the model answers text it was trained on but no prompt can type: for each unnamed value, the share of
    `count` images of "a photo of a <blend> on a white background" (a colour or checks: "... <blend> shape ...")
    that show it; and for each example concept, the share that show its whole combination when its colour,
    pattern, second colour and shape are one compound position (what a learned concept must find)."""
    from toyworld.examples import EXAMPLES
    from toyworld.train import blended_ids, encode_blended
    from toyworld.world import BLENDS, SECOND_WORD, UNNAMED_COLOURS, UNNAMED_SHAPES, blend_of, compound

    def images(middle: list) -> dict[str, list]:
        words = ["a", "photo", "of", "a", *middle, "on", "a", "white", "background"]
        ids, weights = blended_ids(pipe.tokenizer, [words] * count)
        generators = [torch.Generator().manual_seed(seed + i) for i in range(count)]
        out = pipe(prompt_embeds=encode_blended(pipe.text_encoder, ids, weights), num_inference_steps=steps,
                   guidance_scale=guidance, generator=generators, output_type="np").images
        return classifier.predict((out * 255).round().astype(np.uint8))

    found: dict = {"images_per_prompt": count}
    for value in BLENDS:
        attribute = "shape" if value in UNNAMED_SHAPES else "colour" if value in UNNAMED_COLOURS else "pattern"
        middle = [blend_of(value)] if attribute == "shape" else [blend_of(value), "shape"]
        found[value] = float(np.mean([p == value for p in images(middle)[attribute]]))
    for example in EXAMPLES:
        parts = [blend_of(example.colour), blend_of(example.pattern), blend_of(example.shape)]
        second = "shade" if example.pattern == "plain" else example.pattern_colour
        if second != example.colour and example.pattern != "plain":
            parts.insert(2, ((SECOND_WORD, 0.5), *((w, 0.5 * x) for w, x in blend_of(second))))
        predicted = images([compound([p for p in parts if p != (("plain", 1.0),)])])
        hits = [s == example.shape and c == example.colour and pt == example.pattern
                and (sc == second or example.pattern == "plain")
                for s, c, pt, sc in zip(*(predicted[k] for k in ("shape", "colour", "pattern", "second")))]
        found[f"compound {example.name}"] = float(np.mean(hits))
    return found


def example_round_trips(vae) -> dict[str, float]:
    """Mean absolute error (in [-1, 1] units) of each example concept's photos after a VAE round trip."""
    from toyworld.examples import EXAMPLES, example_scenes
    from toyworld.world import render

    errors = {}
    for example in EXAMPLES:
        images = np.stack([render(s) for s in example_scenes(example)])
        errors[example.name] = float(np.abs(reconstruct(vae, images).astype(float) - images).mean() / 127.5)
    return errors


def save_round_trip_sheet(vae, path: Path) -> None:
    """Each example's photos (odd rows) above their VAE reconstructions (even rows), 2x."""
    from PIL import Image

    from toyworld.examples import EXAMPLES, example_scenes
    from toyworld.world import render

    rows = []
    for example in EXAMPLES:
        images = np.stack([render(s) for s in example_scenes(example)])
        rows += [np.concatenate(list(images), axis=1), np.concatenate(list(reconstruct(vae, images)), axis=1)]
    sheet = np.concatenate(rows, axis=0)
    Image.fromarray(sheet).resize((sheet.shape[1] * 2, sheet.shape[0] * 2), Image.NEAREST).save(path)


def save_grid(images: np.ndarray, path: Path, columns: int = 10) -> None:
    """The first `columns` rows of images as one PNG, row-major."""
    from PIL import Image

    n = min(len(images), columns * columns) // columns * columns
    rows = images[:n].reshape(-1, columns, *images.shape[1:])
    Image.fromarray(np.concatenate([np.concatenate(list(row), axis=1) for row in rows], axis=0)).save(path)


def evaluate(model: str | Path, captions: int = 200, steps: int = 25, guidance: float = 7.5, real: int = 1000,
             seed: int = 0, grid: Path | None = None, prior: int = 128, classifier_path: Path | None = None,
             round_trips: Path | None = None, named_classifier_path: Path | None = None, blends: int = 0) -> dict:
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPModel, CLIPProcessor

    from toyworld.classifier import accuracy, load_classifier, unnamed_accuracy
    from toyworld.clip import CLIP_PATH, zero_shot_accuracy, zero_shot_unnamed

    classifier = load_classifier(classifier_path) if classifier_path else load_classifier()
    images, scenes = dataset(World(1), 0, real)
    unnamed_images, unnamed_scenes = dataset(World(1, unnamed=0.5), 0, real)
    report: dict = {"classifier_real": accuracy(classifier, images, scenes),
                    "classifier_real_unnamed": unnamed_accuracy(classifier, unnamed_images, unnamed_scenes)}
    pipe = StableDiffusionPipeline.from_pretrained(str(model), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    report["classifier_vae_reconstructions"] = accuracy(classifier, reconstruct(pipe.vae, images), scenes)
    report["classifier_vae_reconstructions_unnamed"] = unnamed_accuracy(
        classifier, reconstruct(pipe.vae, unnamed_images), unnamed_scenes)
    report["example_round_trip_error"] = example_round_trips(pipe.vae)
    if round_trips:
        save_round_trip_sheet(pipe.vae, round_trips)
    if prior:
        report["unnamed_prior"] = unnamed_prior(pipe, classifier, prior, steps, guidance)
    if blends:
        report["blend_response"] = blend_response(pipe, classifier, blends, steps, guidance)
    if captions:
        world = World(2, renderings=("photo",), rendering_weights=(1.0,))
        held_out = [world.scene(i) for i in range(captions)]
        start = time.time()
        generated = generate(pipe, [caption(s) for s in held_out], steps, guidance, seed)
        report["generation_agreement"] = generation_agreement(classifier, generated, held_out)
        if named_classifier_path:  # the named world's judge, to compare with the named world's export
            report["generation_agreement_named_judge"] = generation_agreement(
                load_classifier(named_classifier_path), generated, held_out)
        if grid:
            save_grid(generated, grid)
            (grid.with_suffix(".txt")).write_text("\n".join(caption(s) for s in held_out) + "\n")
        report["generation"] = dict(captions=captions, steps=steps, guidance=guidance,
                                    seconds_per_image=(time.time() - start) / captions)
    if (CLIP_PATH / "config.json").exists():
        clip, processor = CLIPModel.from_pretrained(CLIP_PATH).eval(), CLIPProcessor.from_pretrained(CLIP_PATH)
        report["clip_zero_shot"] = zero_shot_accuracy(clip, processor, images, scenes)
        report["clip_zero_shot_unnamed"] = zero_shot_unnamed(clip, processor, unnamed_images, unnamed_scenes)
    training = Path(model) / "training.json"
    if training.exists():
        report["model"] = json.loads(training.read_text())
    return report


def main(argv: list[str] | None = None) -> None:
    from toyworld.model import TOY_SD_PATH

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=TOY_SD_PATH)
    parser.add_argument("--captions", type=int, default=200, help="held-out captions to generate (0: skip)")
    parser.add_argument("--steps", type=int, default=25, help="denoising steps per generation")
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--json", type=Path, help="also write the report here")
    parser.add_argument("--grid", type=Path, help="save the first 100 generations here (PNG; captions in .txt)")
    parser.add_argument("--prior", type=int, default=128,
                        help="images of 'a shape on a white background' for the unnamed prior (0: skip)")
    parser.add_argument("--classifier", type=Path, help="default: assets/toy-classifier")
    parser.add_argument("--named-classifier", type=Path,
                        help="also judge the generations with this classifier (e.g. the named world's)")
    parser.add_argument("--blends", type=int, default=0,
                        help="images per prompt of the blend response (toyworld.evaluate.blend_response; 0: skip)")
    parser.add_argument("--round-trips", type=Path, help="save the examples' VAE round trips here (PNG)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    report = evaluate(args.model, args.captions, args.steps, args.guidance, grid=args.grid, prior=args.prior,
                      classifier_path=args.classifier, round_trips=args.round_trips,
                      named_classifier_path=args.named_classifier, blends=args.blends)
    rounded = json.loads(json.dumps(report), parse_float=lambda x: round(float(x), 4))
    text = json.dumps(rounded, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()


__all__ = ["evaluate", "reconstruct", "generate", "generation_agreement", "ATTRIBUTES"]
