"""GPU benchmark on full-size SD 1.5- and SD 2.1-shaped pipelines with random weights (nothing is downloaded):
the published configs and CLIP's real vocabulary size (49,408 token embeddings).

    python -m benchmarks.gpu                  # SD 1.5, one command, ~5-8 minutes on an H100 / H200
    python -m benchmarks.gpu --shape sd21     # SD 2.1 (768 px, v-prediction, 23-layer 1024-wide text encoder)
    python -m benchmarks.gpu --smoke          # a tiny shape on the CPU, to check the script itself
    python -m benchmarks.gpu --smoke --shape sd21
    python -m benchmarks.gpu --shape sdxl     # SDXL (1024 px, two text encoders, 70 layers; no per-layer loop)

Measures, for NeTI (all layers' conditioning in one batched text-encoder pass) and for the official per-layer
conditioning loop (NeTI Sec. 4; `common.per_layer_trainer()` in training, one text-encoder call per
(t, l) pair at inference):
- training: optimisation steps per second and peak GPU memory, paper settings (batch 2, accumulation 4, 512 px),
  in fp32 and in fp16 (frozen model in fp16, autocast; bf16 on the CPU) with and without gradient checkpointing
  (without: the default, which still checkpoints the text encoder; with: the UNet too);
- generation: one image at the model's resolution, 50 DPM-Solver steps, guidance 7.5, fp32 and fp16, NeTI vs the
  per-layer conditioning vs diffusers' plain `StableDiffusionPipeline` on the same weights;
- conditioning (docs/efficiency.md): the 50 x 16 grid's time and peak memory chunked by the memory budget against
  one call (the old accelerator default), a decomposition's 6 fixed timesteps, the cache's bytes per encoding.
Results go to $OUT/gpu-benchmark.json if $OUT is set, else benchmarks/results/, and are rewritten after every
measurement, so a run cut short keeps what it measured. `--budget` seconds stops starting new measurements.
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
from neti.train import text_encoder_checkpointing

from .common import (PeakMemory, benchmark_tokenizer, choose_threads, environment, make_concept, median,
                     official_loop_encoding, per_layer_trainer, side_by_side, time_call)

PROMPT = "a photo of a {}"


def build_model(name: str, device: torch.device, smoke: bool):
    """SD 1.5's or SD 2.1's architecture with random weights and CLIP's vocabulary size, built directly on `device`
    (a tiny shape with the same kinds of blocks for --smoke)."""
    from dataclasses import replace

    from neti.testing.sd_layout import CLIP_VOCAB_SIZE, SD15, SD21, SDShape, build_pipeline
    if name == "sdxl":
        return _build_xl(device, smoke)
    if smoke:
        shape = SDShape(max_tokens=16, vocab_size=1000)
        if name == "sd21":
            shape = replace(shape, unet_head_dim=(2, 2, 4, 4), linear_projection=True, text_act="gelu",
                            prediction_type="v_prediction")
    else:
        shape = replace({"sd15": SD15, "sd21": SD21}[name], vocab_size=CLIP_VOCAB_SIZE)
    tokenizer, vocabulary_name = benchmark_tokenizer(shape.max_tokens, real=not smoke)
    with torch.device(device):
        pipe = build_pipeline(shape, tokenizer, seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device), shape, vocabulary_name


def _build_xl(device: torch.device, smoke: bool):
    """SDXL base's architecture with random weights (tiny with --smoke); both tokenizers are CLIP's BPE (SDXL's
    differ only in the pad token) or the toy vocabulary, as `benchmark_tokenizer` finds."""
    from neti.testing.sdxl_layout import SDXL, SDXLShape, build_xl_pipeline

    shape = SDXLShape() if smoke else SDXL
    tokenizer, vocabulary_name = benchmark_tokenizer(shape.max_tokens, real=not smoke)
    with torch.device(device):
        pipe = build_xl_pipeline(shape, tokenizer, seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device), shape, vocabulary_name


class Results:
    def __init__(self, path: Path, env: dict, settings: dict):
        self.path, self.data = path, {"environment": env, "settings": settings, "training": [], "generation": [],
                                      "conditioning": []}

    def add(self, kind: str, row: dict) -> None:
        self.data[kind].append(row)
        print(json.dumps(row), flush=True)
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        os.replace(tmp, self.path)


def _fresh_accelerator_state() -> None:
    """`neti.train.Trainer` creates an `Accelerator` per trainer, but accelerate keeps one process-wide state
    that refuses a different mixed precision; reset it between configurations."""
    try:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
    except (ImportError, AttributeError):
        pass


def bench_training(pipe, args, results: Results, half: torch.dtype, deadline: float) -> None:
    from PIL import Image

    from neti.train import TrainConfig, Trainer, TrainingCallback

    device = pipe.device
    res = pipe.unet.config.sample_size * pipe.vae_scale_factor
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (res, res, 3), dtype=np.uint8)) for _ in range(4)]
    half_name = "fp16" if half == torch.float16 else "bf16"

    class Steps(TrainingCallback):
        def __init__(self):
            self.seconds, self.losses = [], []

        def on_step(self, info):
            self.seconds.append(info.seconds_per_step)
            self.losses.append(info.loss)

    for precision in ("fp32", half_name):
        pipe.to(torch.float32 if precision == "fp32" else half)
        for checkpointing in (False, True):
            for variant in ("NeTI",) if args.shape == "sdxl" else ("NeTI", "NeTI per-layer"):
                if time.perf_counter() > deadline:
                    print(f"budget spent: skipping training {variant} {precision} checkpointing={checkpointing}")
                    continue
                _fresh_accelerator_state()
                config = TrainConfig(steps=1 + args.train_steps, batch_size=2, grad_accum=args.grad_accum,
                                     checkpoint_every=0, mixed_precision="no" if precision == "fp32" else precision,
                                     gradient_checkpointing=checkpointing)
                probe = Steps()
                trainer_cls = per_layer_trainer() if variant == "NeTI per-layer" else Trainer
                trainer = trainer_cls(pipe, images, "<bench>", "shape", config, f"random {args.shape} shape", [probe])
                before = [p.detach().clone() for p in trainer.concept.parameters()]
                row = dict(variant=variant, precision=precision, gradient_checkpointing=checkpointing,
                           batch_size=2, grad_accum=args.grad_accum, resolution=res)
                try:
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                        torch.cuda.reset_peak_memory_stats(device)
                        base = torch.cuda.memory_allocated(device)
                    trainer.train(Path(args.tmp) / "concept.safetensors")
                    timed = probe.seconds[1:] or probe.seconds  # the first step warms up
                    row.update(seconds_per_step=median(timed), steps_per_second=1 / median(timed),
                               step_seconds=probe.seconds, losses=probe.losses,
                               mapper_updated=any(not torch.equal(a, b.detach()) for a, b in
                                                  zip(before, trainer.concept.parameters())))
                    if device.type == "cuda":
                        peak = torch.cuda.max_memory_allocated(device)
                        row.update(peak_memory_gib=peak / 2**30, peak_extra_over_weights_gib=(peak - base) / 2**30)
                except Exception as exc:  # record and go on: one failing configuration must not lose the rest
                    row["error"] = f"{type(exc).__name__}: {exc}"
                finally:
                    if checkpointing:
                        pipe.unet.disable_gradient_checkpointing()
                        for encoder in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
                            if encoder is not None:
                                text_encoder_checkpointing(encoder, False)
                    del trainer
                results.add("training", row)
    pipe.to(torch.float32)


def each_precision(pipe, half: torch.dtype, deadline: float, what: str):
    """fp32, then `half`, with `pipe` moved to each; none once the budget is spent; `pipe` ends in fp32."""
    for precision in ("fp32", "fp16" if half == torch.float16 else "bf16"):
        if time.perf_counter() > deadline:
            print(f"budget spent: skipping {what} {precision}")
            continue
        pipe.to(torch.float32 if precision == "fp32" else half)
        yield precision
    pipe.to(torch.float32)


def bench_generation(pipe, original: dict, args, results: Results, half: torch.dtype, deadline: float) -> None:
    """`original`: diffusers' own attention processors of the UNet, for the plain pipeline."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    from neti.generate import Generator, Row, Sampling

    sampling = Sampling(steps=args.gen_steps, guidance=7.5)
    device = pipe.device
    for precision in each_precision(pipe, half, deadline, "generation"):
        pipe.unet.set_attn_processor(dict(original))  # training installed NeTI's; start from diffusers' own
        gen = Generator(pipe, f"random {args.shape} shape")
        neti_processors = dict(pipe.unet.attn_processors)
        concept = make_concept(pipe, "neti").to(device)
        scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
        if args.shape == "sdxl":
            plain = StableDiffusionXLPipeline(**{**pipe.components, "scheduler": scheduler})
        else:
            plain = StableDiffusionPipeline(**{**pipe.components, "scheduler": scheduler}, requires_safety_checker=False)
        plain.set_progress_bar_config(disable=True)

        def neti():
            pipe.unet.set_attn_processor(dict(neti_processors))  # diffusers pops from the dict
            gen.conditioner.clear_cache()
            return gen.generate(PROMPT, [concept], [0], sampling)

        def per_layer():
            pipe.unet.set_attn_processor(dict(neti_processors))  # diffusers pops from the dict
            tokenized, by_token, _ = gen.prepare(PROMPT, [concept])
            with torch.no_grad():
                enc = official_loop_encoding(gen.conditioner, tokenized, by_token, gen.timesteps(sampling),
                                             gen.num_layers)
            return gen.render([Row(enc, 0)], sampling)

        def base():
            pipe.unet.set_attn_processor(dict(original))
            return plain(PROMPT.format("shape"), num_inference_steps=sampling.steps, guidance_scale=sampling.guidance,
                         generator=torch.Generator("cpu").manual_seed(0))

        row = dict(precision=precision, steps=sampling.steps, guidance=sampling.guidance,
                   resolution=pipe.unet.config.sample_size * pipe.vae_scale_factor, images=1)
        try:
            contenders = {"neti": neti, "plain": base} if args.shape == "sdxl" else \
                {"neti": neti, "per_layer": per_layer, "plain": base}  # the official loop is SD 1.x-only
            times = side_by_side(contenders, args.gen_repeats, warmup=0 if args.smoke else 1, device=device)
            med = {k: median(v) for k, v in times.items()}
            row.update(seconds={k: round(v, 4) for k, v in med.items()}, raw=times,
                       neti_over_plain=med["neti"] / med["plain"],
                       per_layer_over_neti=med.get("per_layer", float("nan")) / med["neti"])
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            pipe.unet.set_attn_processor(dict(original))
        results.add("generation", row)


def bench_conditioning(pipe, args, results: Results, half: torch.dtype, deadline: float) -> None:
    """The 50 x 16 conditioning grid: chunked by the memory budget (now) against one call (the old default on
    accelerators), a decomposition's 6 fixed timesteps, and the bytes one cached encoding keeps."""
    from neti.conditioning_xl import conditioner_for
    from neti.generate import DEFAULT_DECOMPOSITION_TIMESTEPS, Generator, Sampling, inference

    device = pipe.device
    for precision in each_precision(pipe, half, deadline, "conditioning"):
        gen = Generator(pipe, f"random {args.shape} shape")
        concept = make_concept(pipe, "neti").to(device)
        tokenized, by_token, _ = gen.prepare(PROMPT, [concept])
        timesteps = gen.timesteps(Sampling(steps=args.gen_steps))
        for label, chunk_rows in (("memory budget", None), ("one call", len(timesteps) * gen.num_layers)):
            conditioner = conditioner_for(pipe, chunk_rows=chunk_rows, cache_bytes=0)
            widest = conditioner.parts[-1] if hasattr(conditioner, "parts") else conditioner  # SDXL: bigG's chunks
            row = dict(precision=precision, chunking=label, rows=len(timesteps) * gen.num_layers,
                       rows_per_call=widest.rows_per_call(conditioner.max_length, device, pipe.text_encoder.dtype))
            try:
                with inference(by_token.values()):
                    conditioner.encode_grid(tokenized, by_token, timesteps, gen.num_layers)  # warm-up
                    with PeakMemory(device) as peak:
                        seconds = time_call(lambda: conditioner.encode_grid(tokenized, by_token, timesteps,
                                                                            gen.num_layers), device)
                    enc = conditioner.encode_grid(tokenized, by_token, timesteps, gen.num_layers)
                    row.update(seconds=round(seconds, 4), peak_extra_mib=round(peak.peak_bytes / 2**20, 1),
                               encoding_mib=round(enc.nbytes / 2**20, 1))
                    if chunk_rows is None:
                        fixed = [[float(t)] * len(timesteps) for t in DEFAULT_DECOMPOSITION_TIMESTEPS]
                        row["decomposition_seconds"] = round(time_call(lambda: [
                            conditioner.encode_grid(tokenized, by_token, ts, gen.num_layers) for ts in fixed], device), 4)
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {exc}"
            results.add("conditioning", row)


def markdown(data: dict) -> str:
    lines = ["| training | precision | grad. ckpt | steps/s | s/step | peak GiB | error |", "|---|---|---|---|---|---|---|"]
    for r in data["training"]:
        lines.append(f"| {r['variant']} | {r['precision']} | {'yes' if r['gradient_checkpointing'] else 'no'} | "
                     f"{r.get('steps_per_second', float('nan')):.3f} | {r.get('seconds_per_step', float('nan')):.3f} | "
                     f"{r.get('peak_memory_gib', float('nan')):.2f} | {r.get('error', '')} |")
    lines += ["", "| generation | NeTI s | per-layer s | plain s | NeTI / plain | per-layer / NeTI |", "|---|---|---|---|---|---|"]
    for r in data["generation"]:
        s = r.get("seconds", {})
        lines.append(f"| {r['precision']}, {r['steps']} steps | {s.get('neti', float('nan')):.2f} | "
                     f"{s.get('per_layer', float('nan')):.2f} | {s.get('plain', float('nan')):.2f} | "
                     f"{r.get('neti_over_plain', float('nan')):.2f}x | {r.get('per_layer_over_neti', float('nan')):.2f}x |"
                     + (f" {r['error']}" if "error" in r else ""))
    lines += ["", "| conditioning | chunking | rows per call | s | peak extra MiB | encoding MiB | decomposition s |",
              "|---|---|---|---|---|---|---|"]
    for r in data["conditioning"]:
        lines.append(f"| {r['precision']}, {r['rows']} rows | {r['chunking']} | {r['rows_per_call']} | "
                     f"{r.get('seconds', float('nan')):.3f} | {r.get('peak_extra_mib', float('nan'))} | "
                     f"{r.get('encoding_mib', float('nan'))} | {r.get('decomposition_seconds', '')} |"
                     + (f" {r['error']}" if "error" in r else ""))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shape on the CPU, a few steps: checks the script")
    p.add_argument("--device", default=None, help="default: cuda if available (cpu with --smoke)")
    p.add_argument("--train-steps", type=int, default=None, help="timed optimisation steps after one warm-up")
    p.add_argument("--gen-repeats", type=int, default=None)
    p.add_argument("--budget", type=float, default=None,
                   help="seconds after which no new measurement starts (default 420; none with --smoke)")
    p.add_argument("--json", default=None)
    p.add_argument("--only", choices=["training", "generation", "conditioning"], default=None)
    p.add_argument("--shape", choices=["sd15", "sd21", "sdxl"], default="sd15")
    args = p.parse_args(argv)
    started = time.perf_counter()
    deadline = started + (args.budget or (float("inf") if args.smoke else 420))
    device = torch.device(args.device or ("cpu" if args.smoke or not torch.cuda.is_available() else "cuda"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32
    half = torch.float16 if device.type == "cuda" else torch.bfloat16
    threads = choose_threads(None) if device.type == "cpu" else str(torch.get_num_threads())
    args.train_steps = args.train_steps if args.train_steps is not None else (0 if args.smoke else 3)
    args.grad_accum = 1 if args.smoke else 4
    args.gen_steps = 2 if args.smoke else 50
    args.gen_repeats = args.gen_repeats or (1 if args.smoke else 3)
    out = Path(args.json) if args.json else (Path(os.environ["OUT"]) / "gpu-benchmark.json" if os.environ.get("OUT")
                                             else REPO_ROOT / "benchmarks" / "results" /
                                             f"gpu-{'smoke-' if args.smoke else ''}{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.json")
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as tmp:
        args.tmp = tmp
        pipe, shape, vocabulary_name = build_model(args.shape, device, args.smoke)
        original = dict(pipe.unet.attn_processors)  # diffusers' SDPA processors, before NeTI installs its own
        results = Results(out, environment(device), {k: v for k, v in vars(args).items() if k != "tmp"}
                          | {"shape": repr(shape), "vocabulary": vocabulary_name, "threads": threads,
                             "build_seconds": round(time.perf_counter() - started, 1)})
        print(f"built {shape} ({vocabulary_name}) on {device} in {time.perf_counter() - started:.1f} s", flush=True)
        if args.only in (None, "training"):
            bench_training(pipe, args, results, half, deadline)
        if args.only in (None, "conditioning"):
            bench_conditioning(pipe, args, results, half, deadline)
        if args.only in (None, "generation"):
            bench_generation(pipe, original, args, results, half, deadline)
        results.data["environment"]["wall_seconds"] = round(time.perf_counter() - started, 1)
        results.save()
    print()
    print(markdown(results.data))
    print(f"\nwrote {out}")
    return 0 if not any("error" in r for k in ("training", "generation", "conditioning")
                        for r in results.data[k]) else 1


if __name__ == "__main__":
    sys.exit(main())
