"""The bundled model's two user-facing speed targets, on this machine: training a concept with the defaults
(500 NeTI steps, batch 2 x accumulation 4) within 4 minutes, and one 50-step image with guidance, prompt
encoding included, within 2 seconds (`Generator.generate` on a prompt not encoded before), beside diffusers'
own `StableDiffusionPipeline` on the same prompt without a concept.

    python -m benchmarks.bundled                 # both, ~5 minutes on an idle 2-core CPU
    python -m benchmarks.bundled --steps 100     # a shorter training run, scaled to 500 steps
    python -m benchmarks.bundled --accumulation sequential   # the micro-batches one UNet pass each

Writes benchmarks/results/bundled-<UTC time>.json (or --json PATH); exits 1 if a target is missed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import choose_threads, environment
from neti.config import ACCUMULATION
from neti.paths import REPO_ROOT

TRAIN_TARGET_S, IMAGE_TARGET_S, TARGET_STEPS = 240.0, 2.0, 500
BACKGROUNDS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")


def time_images(pipe, gen, concept, count: int) -> tuple[list[float], list[float]]:
    """Seconds per 50-step image with guidance: `gen` with `concept` on prompts it has not encoded before, and
    diffusers' pipeline on the same prompts without a concept, interleaved."""
    from neti.config import Sampling

    sampling, neti_s, plain_s = Sampling(steps=50, guidance=7.5), [], []
    if count:
        gen.generate("a photo of a {} on a white background", [concept], [0], sampling)  # warm-up
    for i, background in enumerate(BACKGROUNDS[:count]):
        started = time.perf_counter()
        gen.generate(f"a rendering of a {{}} on a {background} background", [concept], [i], sampling)
        neti_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        pipe(f"a rendering of a shape on a {background} background", num_inference_steps=50, guidance_scale=7.5,
             generator=torch.Generator().manual_seed(i))
        plain_s.append(time.perf_counter() - started)
    return neti_s, plain_s


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(REPO_ROOT / "assets" / "toy-sd"))
    p.add_argument("--images", default=str(REPO_ROOT / "assets" / "examples" / "red-hexagon"))
    p.add_argument("--steps", type=int, default=TARGET_STEPS, help="training steps timed (scaled to 500)")
    p.add_argument("--accumulation", default="auto", choices=ACCUMULATION, help="TrainConfig.accumulation")
    p.add_argument("--images-timed", type=int, default=5, choices=range(0, len(BACKGROUNDS) + 1), metavar="0-8",
                   help="50-step images timed, each a new prompt (0: time the training alone)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's, 1 on a busy machine)")
    p.add_argument("--json", help="where to write the results")
    args = p.parse_args(argv)
    threads = choose_threads(args.threads)

    from neti.config import TrainConfig
    from neti.data import load_images
    from neti.generate import Generator
    from neti.models import load_pipeline
    from neti.train import Trainer

    pipe = load_pipeline(args.model, "cpu", torch.float32)
    config = TrainConfig(steps=args.steps, accumulation=args.accumulation)
    trainer = Trainer(pipe, load_images(args.images), "<bench>", "shape", config, args.model)
    with tempfile.TemporaryDirectory(prefix="neti-bundled-") as tmp:
        started = time.perf_counter()
        result = trainer.train(Path(tmp) / "concept.safetensors")
        train_s = time.perf_counter() - started
    per_500 = train_s / result.steps_done * TARGET_STEPS

    neti_s, plain_s = time_images(pipe, Generator(pipe, args.model), result.concept.eval(), args.images_timed)
    image_s = statistics.median(neti_s) if neti_s else None
    plain_image_s = statistics.median(plain_s) if plain_s else None

    env = environment("cpu")
    env["threads"] = threads
    rows = {
        "train_500_steps_s": round(per_500, 1), "train_steps_timed": result.steps_done,
        "train_s_per_step": round(train_s / result.steps_done, 3), "fused": trainer.fused,
        "image_50_steps_s": image_s, "image_50_steps_all_s": [round(s, 3) for s in neti_s],
        "plain_pipeline_50_steps_s": plain_image_s,
        "train_target_s": TRAIN_TARGET_S, "image_target_s": IMAGE_TARGET_S,
    }
    passed = per_500 <= TRAIN_TARGET_S and (image_s is None or image_s <= IMAGE_TARGET_S)
    print(f"bundled model, {env['date_utc']} UTC, torch threads {threads}, load average {env.get('load_average')}")
    print(f"500 NeTI steps: {per_500:.0f} s ({train_s / result.steps_done:.3f} s/step over {result.steps_done}; "
          f"accumulation {'fused' if trainer.fused else 'sequential'}), target <= {TRAIN_TARGET_S:.0f} s")
    if image_s is not None:
        print(f"one 50-step image, encoding included: {image_s:.2f} s (median of {len(neti_s)}; diffusers' "
              f"pipeline without a concept {plain_image_s:.2f} s), target <= {IMAGE_TARGET_S:.0f} s")
    out = Path(args.json) if args.json else (REPO_ROOT / "benchmarks" / "results" /
                                             f"bundled-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"environment": env, "settings": vars(args), "results": rows, "passed": passed},
                              indent=1) + "\n")
    print(f"wrote {out}")
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
