"""The toy model's quality report (issue 4): what the classifier and the toy CLIP see.

    python -m toyworld.evaluate [--model assets/toy-sd] [--captions 200] [--steps 25] [--json report.json]
                                [--grid generations.png]

1. The attribute classifier's accuracy on held-out real images (World(1)), per attribute.
2. Its accuracy on the model's VAE reconstructions of those images (does the latent space keep colour?).
3. Its agreement with the prompt on the model's generations for held-out captions (World(2) scenes, photos):
   the fraction of images that show the requested shape, colour, background, pattern and count.
4. The toy CLIP's zero-shot accuracy at naming shape, colour and background of held-out real images.
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


def save_grid(images: np.ndarray, path: Path, columns: int = 10) -> None:
    """The first `columns` rows of images as one PNG, row-major."""
    from PIL import Image

    n = min(len(images), columns * columns) // columns * columns
    rows = images[:n].reshape(-1, columns, *images.shape[1:])
    Image.fromarray(np.concatenate([np.concatenate(list(row), axis=1) for row in rows], axis=0)).save(path)


def evaluate(model: str | Path, captions: int = 200, steps: int = 25, guidance: float = 7.5, real: int = 1000,
             seed: int = 0, grid: Path | None = None) -> dict:
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPModel, CLIPProcessor

    from toyworld.classifier import accuracy, load_classifier
    from toyworld.clip import CLIP_PATH, zero_shot_accuracy

    classifier = load_classifier()
    images, scenes = dataset(World(1), 0, real)
    report: dict = {"classifier_real": accuracy(classifier, images, scenes)}
    pipe = StableDiffusionPipeline.from_pretrained(str(model), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    report["classifier_vae_reconstructions"] = accuracy(classifier, reconstruct(pipe.vae, images), scenes)
    if captions:
        world = World(2, renderings=("photo",), rendering_weights=(1.0,))
        held_out = [world.scene(i) for i in range(captions)]
        start = time.time()
        generated = generate(pipe, [caption(s) for s in held_out], steps, guidance, seed)
        report["generation_agreement"] = generation_agreement(classifier, generated, held_out)
        if grid:
            save_grid(generated, grid)
            (grid.with_suffix(".txt")).write_text("\n".join(caption(s) for s in held_out) + "\n")
        report["generation"] = dict(captions=captions, steps=steps, guidance=guidance,
                                    seconds_per_image=(time.time() - start) / captions)
    if (CLIP_PATH / "config.json").exists():
        clip, processor = CLIPModel.from_pretrained(CLIP_PATH).eval(), CLIPProcessor.from_pretrained(CLIP_PATH)
        report["clip_zero_shot"] = zero_shot_accuracy(clip, processor, images, scenes)
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
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    report = evaluate(args.model, args.captions, args.steps, args.guidance, grid=args.grid)
    rounded = json.loads(json.dumps(report), parse_float=lambda x: round(float(x), 4))
    text = json.dumps(rounded, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()


__all__ = ["evaluate", "reconstruct", "generate", "generation_agreement", "ATTRIBUTES"]
