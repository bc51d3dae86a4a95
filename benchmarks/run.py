"""NeTI Studio benchmarks: speed and memory against the approaches the library replaces, side by side.

    python -m benchmarks.run --quick          # < 2 minutes on a 2-core CPU
    python -m benchmarks.run                  # more repeats, paper settings (50 steps, accumulation 4)
    python -m benchmarks.run --model assets/toy-sd --device cuda --json out.json

Every comparison is measured in the same run, interleaved (a, b, a, b, ...) after a warm-up, and reported as
the median's ratio, so a busy machine slows all contenders alike. Rows (see benchmarks/README.md):
conditioning (batched vs the official one-pair-per-call loop), training step (NeTI, XTI, TI, NeTI with the
official per-layer conditioning), peak memory of a training step, generation (NeTI vs diffusers' plain
`StableDiffusionPipeline`), truncation sweep (one batch vs separate calls), concept file sizes.
The model is random-weight and SD-1.x-shaped (16 cross-attention layers), built from `neti.testing.sd_layout`
(`--shape toy`: the bundled model's sizes, the default; `sd15-text`: SD 1.5's text encoder, D = 768 and 77
tokens, on the toy UNet; `sd15`: full size), or any diffusers folder / hub id given with `--model`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from neti.paths import REPO_ROOT

from .common import (PeakMemory, build_model, choose_threads, environment, make_concept, mb, median,
                     official_loop_encoding, per_layer_trainer, shapes, side_by_side)

PROMPT = "a photo of a {}"
SWEEP = (2, 8, 32, None)


class Table:
    """Rows of the report: a measurement, what it is compared with, the ratio, the target and the verdict."""

    def __init__(self):
        self.rows: list[dict] = []

    def add(self, section: str, what: str, value: str, ratio: float | None = None, target: str = "",
            passed: bool | None = None, **raw) -> None:
        self.rows.append(dict(section=section, what=what, value=value, ratio=ratio, target=target, passed=passed,
                              **raw))
        verdict = "" if passed is None else ("PASS" if passed else "FAIL")
        print(f"  {section}: {what}: {value}" + (f" ({ratio:.2f}x)" if ratio is not None else "")
              + (f" target {target} {verdict}" if target else ""), flush=True)

    def markdown(self) -> str:
        lines = ["| section | measurement | value | ratio | target | result |", "|---|---|---|---|---|---|"]
        for r in self.rows:
            ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}x"
            result = "" if r["passed"] is None else ("pass" if r["passed"] else "**fail**")
            lines.append(f"| {r['section']} | {r['what']} | {r['value']} | {ratio} | {r['target']} | {result} |")
        return "\n".join(lines)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


# ---- rows ----------------------------------------------------------------------------------------------------

def bench_conditioning(gen, concept, table: Table, args) -> None:
    """All (t, l) encodings of one prompt for 50 steps x L layers: one batched pass vs one call per pair."""
    from neti.generate import Sampling

    timesteps = gen.timesteps(Sampling(steps=50))
    tokenized, by_token, _ = gen.prepare(PROMPT, [concept])
    L = gen.num_layers

    def batched():
        gen.conditioner.clear_cache()  # measure the encoding, not the inference cache
        with torch.no_grad():
            return gen.conditioner.encode_grid(tokenized, by_token, timesteps, L)

    # --quick times the loop over the first timesteps only and scales up: every call costs the same
    loop_steps = timesteps[: args.loop_steps or len(timesteps)]
    scale = len(timesteps) / len(loop_steps)

    def loop():
        with torch.no_grad():
            return official_loop_encoding(gen.conditioner, tokenized, by_token, loop_steps, L)

    n = len(loop_steps)
    diff = float((batched().values[:n].float() - loop().values.float()).abs().max())
    times = side_by_side({"batched": batched, "loop": loop}, args.cond_repeats, warmup=0, device=args.device)
    b, l = median(times["batched"]), median(times["loop"]) * scale
    pairs = len(timesteps) * L
    table.add("conditioning", f"{len(timesteps)} steps x {L} layers, one batched pass", _ms(b), raw=times["batched"])
    how = "" if scale == 1 else f" (timed over the first {n * L} calls, x{scale:g})"
    table.add("conditioning", f"official loop: {pairs} calls of one (t, l) pair{how}", _ms(l),
              raw=times["loop"], scale=scale)
    table.add("conditioning", f"speed-up of batching (max abs diff {diff:.1e})", "", l / b, ">= 10x", l / b >= 10)


def bench_training(pipe, model_name: str, table: Table, args, tmp: Path) -> None:
    """Seconds per optimisation step for NeTI, XTI, TI and NeTI with the official per-layer conditioning."""
    from neti.train import TrainConfig, Trainer, TrainingCallback

    res = pipe.unet.config.sample_size * pipe.vae_scale_factor
    rng = np.random.default_rng(0)
    from PIL import Image

    images = [Image.fromarray(rng.integers(0, 256, (res, res, 3), dtype=np.uint8)) for _ in range(4)]
    per_layer = per_layer_trainer()
    contenders = {"NeTI": (Trainer, "neti"), "XTI": (Trainer, "xti"), "TI": (Trainer, "ti"),
                  "NeTI per-layer": (per_layer, "neti")}

    class StepTimes(TrainingCallback):
        def __init__(self):
            self.seconds = []

        def on_step(self, info):
            if info.step >= 2:  # step 1 warms up (optimiser state, autograd buffers)
                self.seconds.append(info.seconds_per_step)

    def timed_steps(trainer_cls, method):
        # a fresh trainer per round; its steps after the first are timed
        config = TrainConfig(steps=1 + args.train_steps, batch_size=2, grad_accum=args.grad_accum,
                             checkpoint_every=0, method=method)
        probe = StepTimes()
        trainer_cls(pipe, images, "<bench>", args.super_category, config, model_name, [probe]).train(
            tmp / "t.safetensors")
        return probe.seconds

    times = {name: [] for name in contenders}
    for _ in range(args.train_rounds):  # interleaved rounds, so a busy spell slows every method alike
        for name, (trainer_cls, method) in contenders.items():
            times[name].extend(timed_steps(trainer_cls, method))
    med = {k: median(v) for k, v in times.items()}
    micro = f"batch 2 x accumulation {args.grad_accum}"
    for name in contenders:
        table.add("training step", f"{name} ({micro})", _ms(med[name]), raw=times[name])
    table.add("training step", "NeTI / TI", "", med["NeTI"] / med["TI"], "<= 1.3x", med["NeTI"] / med["TI"] <= 1.3)
    table.add("training step", "NeTI / XTI", "", med["NeTI"] / med["XTI"])
    ratio = med["NeTI"] / med["NeTI per-layer"]
    table.add("training step", "NeTI / NeTI per-layer", "", ratio, "< 1x", ratio < 1)

    if args.skip_memory:
        return
    for name, (trainer_cls, method) in contenders.items():  # one step each, after the timings (memory mode slows
        config = TrainConfig(steps=1, batch_size=2, grad_accum=args.grad_accum, checkpoint_every=0,  # allocation)
                             method=method)
        trainer = trainer_cls(pipe, images, "<bench>", args.super_category, config, model_name)
        with PeakMemory(args.device) as peak:
            trainer.train(tmp / "m.safetensors")
        table.add("peak memory", f"training step, {name} ({micro})", mb(peak.peak_bytes),
                  bytes=peak.peak_bytes, method=peak.method)


def bench_generation(gen, plain, concept, table: Table, args) -> None:
    """One image with guidance: NeTI (concept, bypass) vs the plain pipeline on the same weights and scheduler."""
    from diffusers import DPMSolverMultistepScheduler

    from neti.generate import Sampling

    sampling = Sampling(steps=args.gen_steps, guidance=7.5)
    plain.scheduler = DPMSolverMultistepScheduler.from_config(plain.scheduler.config)
    plain.set_progress_bar_config(disable=True)
    plain_prompt = PROMPT.format(args.super_category)

    def neti():
        gen.conditioner.clear_cache()  # a first render pays for its encodings
        return gen.generate(PROMPT, [concept], [0], sampling)

    def base():
        return plain(plain_prompt, num_inference_steps=sampling.steps, guidance_scale=sampling.guidance,
                     generator=torch.Generator("cpu").manual_seed(0))

    times = side_by_side({"neti": neti, "plain": base}, args.gen_repeats, warmup=1, device=args.device)
    n, p = median(times["neti"]), median(times["plain"])
    what = f"{sampling.steps} steps, guidance 7.5, 1 image"
    table.add("generation", f"NeTI Generator.generate ({what})", _ms(n), raw=times["neti"])
    table.add("generation", f"plain StableDiffusionPipeline ({what})", _ms(p), raw=times["plain"])
    table.add("generation", "NeTI / plain", "", n / p, "<= 1.15x", n / p <= 1.15)

    def swept():
        gen.conditioner.clear_cache()
        return gen.sweep(PROMPT, [concept], [0], list(SWEEP), sampling)

    def separate():
        gen.conditioner.clear_cache()
        return [gen.generate(PROMPT, [concept], [0], sampling, k) for k in SWEEP]

    times = side_by_side({"sweep": swept, "separate": separate}, args.sweep_repeats, warmup=1, device=args.device)
    s, c = median(times["sweep"]), median(times["separate"])
    ks = ", ".join("none" if k is None else str(k) for k in SWEEP)
    table.add("truncation sweep", f"k = {ks}: one batched sweep call", _ms(s), raw=times["sweep"])
    table.add("truncation sweep", "4 separate generate calls", _ms(c), raw=times["separate"])
    table.add("truncation sweep", "speed-up of batching", "", c / s, "> 1x", c / s > 1)


def bench_file_sizes(table: Table, tmp: Path) -> None:
    """Concept file sizes for SD 1.x (D = 768, L = 16), as in the paper (Sec. 4, App. B)."""
    cases = {}
    neti = make_concept(None, "neti", token_dim=768, num_layers=16)
    plain = make_concept(None, "neti", use_bypass=False, token_dim=768, num_layers=16)
    cases["NeTI with bypass, fp32"] = (neti, torch.float32)
    cases["NeTI with bypass, fp16"] = (neti, torch.float16)
    cases["NeTI with bypass, truncated to 32 units"] = (neti.truncated(32), torch.float32)
    cases["NeTI with bypass, truncated to 8 units"] = (neti.truncated(8), torch.float32)
    cases["NeTI without bypass, fp32 (paper: 1.86 MB)"] = (plain, torch.float32)
    cases["NeTI without bypass, truncated to 32 (paper: 1.56 MB)"] = (plain.truncated(32), torch.float32)
    cases["NeTI without bypass, truncated to 8 (paper: 1.49 MB)"] = (plain.truncated(8), torch.float32)
    cases["XTI (16 vectors), fp32"] = (make_concept(None, "xti", token_dim=768, num_layers=16), torch.float32)
    cases["TI (1 vector), fp32"] = (make_concept(None, "ti", token_dim=768, num_layers=16), torch.float32)
    for i, (name, (concept, dtype)) in enumerate(cases.items()):
        size = concept.save(tmp / f"size-{i}.safetensors", dtype=dtype).stat().st_size
        target, passed = ("<= 2.3 MB", size <= 2.3e6) if name == "NeTI with bypass, fp32" else ("", None)
        table.add("concept file", f"{name}, {concept.num_parameters:,} parameters", mb(size), target=target,
                  passed=passed, bytes=size)


# ---- main ----------------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer repeats and steps: under 2 minutes on a small CPU")
    p.add_argument("--model", default=None, help="diffusers folder or hub id (default: build --shape)")
    p.add_argument("--shape", choices=list(shapes()), default="toy", help="random-weight model to build")
    p.add_argument("--super-category", default="shape", help="one token of the model's vocabulary")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's, or 1 when the machine is busy)")
    p.add_argument("--json", default=None, help="where to write the results (default: benchmarks/results/)")
    p.add_argument("--only", nargs="+", default=None,
                   choices=["conditioning", "training", "generation", "files"], help="run only these sections")
    p.add_argument("--skip-memory", action="store_true")
    args = p.parse_args(argv)
    quick = args.quick
    args.cond_repeats = 3 if quick else 5
    args.loop_steps = 5 if quick else None  # timesteps of the official loop actually timed
    args.train_rounds = 2 if quick else 5
    args.train_steps = 1 if quick else 3  # timed steps per round and method
    args.grad_accum = 1 if quick else 4
    args.gen_steps = 20 if quick else 50
    args.gen_repeats = 2 if quick else 5
    args.sweep_repeats = 1 if quick else 3
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from neti.generate import Generator
    from neti.models import load_pipeline, resolve_device

    args.device = resolve_device(args.device)
    threads = choose_threads(args.threads)
    started = time.perf_counter()
    sections = set(args.only or ["conditioning", "training", "generation", "files"])
    table = Table()
    with tempfile.TemporaryDirectory(prefix="neti-bench-") as tmp_name:
        tmp = Path(tmp_name)
        model = args.model or str(build_model(args.shape, tmp / "model"))
        shape = shapes()[args.shape]
        model_label = args.model or (
            f"random weights, '{args.shape}' shape: UNet {shape.unet_channels}, D = {shape.text_width}, "
            f"{shape.text_layers} text layers, {shape.max_tokens} tokens, {shape.resolution} px")
        print(f"model: {model_label}\ndevice: {args.device}, torch threads {threads}, load average "
              f"{os.getloadavg()}", flush=True)
        needs_pipe = sections & {"conditioning", "training", "generation"}
        if needs_pipe:
            pipe = load_pipeline(model, args.device, torch.float32 if args.device.type == "cpu" else None)
            gen = Generator(pipe, model)
            concept = make_concept(pipe, "neti", super_category=args.super_category).to(args.device)
        if "conditioning" in sections:
            bench_conditioning(gen, concept, table, args)
        if "generation" in sections:
            plain = load_pipeline(model, args.device, pipe.unet.dtype)
            bench_generation(gen, plain, concept, table, args)
            del plain
        if "training" in sections:
            bench_training(pipe, model, table, args, tmp)
        if "files" in sections:
            bench_file_sizes(table, tmp)
    env = environment(args.device)
    env["wall_seconds"] = round(time.perf_counter() - started, 1)
    env["threads"] = threads
    print()
    print(f"NeTI Studio benchmarks ({'quick' if args.quick else 'full'}), {env['date_utc']} UTC, device "
          f"{env['device']}, torch threads {threads}, load average {env.get('load_average')}, "
          f"{env['wall_seconds']} s")
    print(f"model: {model_label}\n")
    print(table.markdown())
    out = Path(args.json) if args.json else (
        REPO_ROOT / "benchmarks" / "results" / f"run-{'quick' if args.quick else 'full'}-"
        f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"environment": env, "model": model_label, "quick": args.quick,
                               "settings": {k: v for k, v in vars(args).items() if k not in ("device",)},
                               "rows": table.rows}, indent=1, default=str) + "\n")
    print(f"\nwrote {out}")
    failed = [r for r in table.rows if r["passed"] is False]
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
