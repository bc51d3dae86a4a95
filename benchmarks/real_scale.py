"""Real-scale costs of exact NeTI on SD 1.5- and SD 2.1-shaped random models (the published configs, a 49,408-row
CLIP vocabulary), on the CPU: rows encoded, conditioning time and memory, a generation's extra memory over
diffusers' plain pipeline, a training micro-batch's text-encoder memory against TI's (docs/efficiency.md).

    python -m benchmarks.real_scale --shape sd15 --part conditioning   # ~3 min with one thread
    python -m benchmarks.real_scale --shape sd15 --part generation     # ~5 min, ~6 GB
    python -m benchmarks.real_scale --shape sd21 --part training       # ~5 min
    python -m benchmarks.real_scale --shape sd15 --part step           # a whole training micro-batch, NeTI vs TI
    python -m benchmarks.real_scale --smoke                            # every part on a tiny shape, seconds

Memory is measured in fp32 on the CPU (peak resident set, `common.PeakMemory`) and reported with its
fp16-equivalent (half: every extra byte is a tensor of the model's dtype). The UNet is not what is measured: the
generation part runs it at a small resolution (`--resolution`, default 64 px), where its activations are small and
equal for both pipelines. Conditioning times of the 50-step grid are extrapolated from `--steps` steps (rows are
encoded independently, so time is linear in rows); decomposition is timed whole. Results are printed as a table
and written to benchmarks/results/real-scale-<shape>-<part>.json. Run one part at a time on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace

import torch

from neti.paths import REPO_ROOT

from neti.testing.sd_layout import CLIP_VOCAB_SIZE

from .common import PeakMemory, benchmark_tokenizer, environment, make_concept

PROMPT = "a photo of a {}"
TOKEN = "<bench>"
DECOMPOSITION_TIMESTEPS = (999, 800, 600, 400, 200, 0)  # the library's default
LAYERS = 16
VOCABULARY = {"name": "toy vocabulary"}  # which tokenizer the run used, for its results


def shape_of(name: str):
    from neti.testing.sd_layout import CLIP_VOCAB_SIZE, SD15, SD21, SDShape

    if name == "smoke":
        return SDShape(vocab_size=1000)
    return replace({"sd15": SD15, "sd21": SD21}[name], vocab_size=CLIP_VOCAB_SIZE)


def tokenizer_for(shape):
    """Stable Diffusion's real tokenizer at full size when its BPE file is available (common.benchmark_tokenizer)."""
    tokenizer, name = benchmark_tokenizer(shape.max_tokens, real=shape.vocab_size == CLIP_VOCAB_SIZE)
    VOCABULARY["name"] = name
    return tokenizer


def text_parts(shape):
    """Tokenizer and text encoder of `shape` (random weights), without the UNet and VAE."""
    from neti.testing.sd_layout import build_text_encoder

    tokenizer = tokenizer_for(shape)
    torch.manual_seed(0)
    return tokenizer, build_text_encoder(shape, shape.vocab_size or len(tokenizer)).eval()


def concepts_for(tokenizer, text_encoder) -> dict:
    width = text_encoder.config.hidden_size
    return {m: make_concept(None, m, token=TOKEN, token_dim=width, num_layers=LAYERS) for m in ("neti", "xti", "ti")}


def counted(conditioner, compute: bool = True) -> list[int]:
    """Count the rows the text encoder runs on; with compute=False skip the work (zeros), to count rows only."""
    rows = []
    body = conditioner._body

    def counting(embeds):
        rows.append(embeds.shape[0])
        return body(embeds) if compute else torch.zeros_like(embeds)

    conditioner._body = counting
    return rows


def mb(n: float) -> float:
    return round(n / 1e6, 1)


# ---- conditioning ----------------------------------------------------------------------------------------------

def conditioning(shape, steps: int, prefix_rows: int) -> dict:
    from neti.conditioning import TextConditioner
    from neti.generate import inference

    tokenizer, encoder = text_parts(shape)
    concepts = concepts_for(tokenizer, encoder)
    conditioner = TextConditioner(tokenizer, encoder)
    prompt = conditioner.tokenize(PROMPT.format(TOKEN), [TOKEN])
    grid_50 = [float(t) for t in torch.linspace(999, 0, 50).round()]
    out = {"rows": {}, "seconds": {}, "peak_mb_fp32": {}}
    # rows encoded per call (counted without running the encoder)
    count = counted(conditioner, compute=False)
    with inference(concepts.values()):
        for label, method, timesteps in [("generation, 50 steps", "neti", [grid_50]),
                                         ("decomposition, 6 fixed timesteps x 50 steps", "neti",
                                          [[float(t)] * 50 for t in DECOMPOSITION_TIMESTEPS]),
                                         ("XTI generation, 50 steps", "xti", [grid_50]),
                                         ("TI generation, 50 steps", "ti", [grid_50])]:
            conditioner.clear_cache()
            count.clear()
            for ts in timesteps:
                conditioner.encode_grid(prompt, {TOKEN: concepts[method]}, ts, LAYERS)
            out["rows"][label] = sum(count)
    conditioner = TextConditioner(tokenizer, encoder)
    count = counted(conditioner)
    with inference(concepts.values()):
        sub = grid_50[:steps]
        with PeakMemory() as peak:
            started = time.perf_counter()
            conditioner.encode_grid(prompt, {TOKEN: concepts["neti"]}, sub, LAYERS)
            seconds = time.perf_counter() - started
        per_row = seconds / sum(count)
        out["seconds"][f"{steps} steps x 16 layers (measured)"] = round(seconds, 2)
        out["seconds"]["50 steps x 16 layers (extrapolated)"] = round(per_row * 50 * LAYERS, 1)
        out["peak_mb_fp32"][f"{steps} steps x 16 layers"] = mb(peak.peak_bytes)
        conditioner.clear_cache()
        count.clear()
        started = time.perf_counter()
        for t in DECOMPOSITION_TIMESTEPS:
            conditioner.encode_grid(prompt, {TOKEN: concepts["neti"]}, [float(t)] * 50, LAYERS)
        decomposition = time.perf_counter() - started
        out["seconds"]["decomposition, 6 fixed timesteps (measured)"] = round(decomposition, 2)
        out["seconds"]["decomposition at 800 rows per timestep (per-row time x 4,800)"] = round(per_row * 4800, 1)
    if prefix_rows:
        out["prefix"] = prefix_bound(conditioner, prompt, prefix_rows)
    return out


def prefix_bound(conditioner, prompt, rows: int, repeats: int = 2) -> dict:
    """What encoding the tokens before the first placeholder once could save at most: the time of `rows` rows
    of the full sequence against the same rows without those tokens (their keys and values would still be read by
    the later tokens, so a real implementation saves less), in CPU-sized chunks and in one call (GPU-like)."""
    first = min(pos for pos, _ in prompt.slots)
    encoder = conditioner.text_encoder
    width = encoder.config.hidden_size
    full = torch.randn(rows, len(prompt.ids), width)
    cut = full[:, first:].contiguous()
    out = {"prefix_tokens": first, "sequence": len(prompt.ids), "rows": rows}
    chunk = max(1, 2048 // len(prompt.ids))
    modes = {"cpu chunks": chunk, "one call": rows}
    times = {(mode, name): [] for mode in modes for name in ("full", "without prefix")}
    with torch.no_grad():
        conditioner._body(full[:2]), conditioner._body(cut[:2])  # warm-up
        for _ in range(repeats):  # interleaved, so that the machine's load hits all alike; the minimum counts
            for mode, step in modes.items():
                for name, embeds in (("full", full), ("without prefix", cut)):
                    started = time.perf_counter()
                    for start in range(0, rows, step):
                        conditioner._body(embeds[start:start + step])
                    times[mode, name].append(time.perf_counter() - started)
    for mode in modes:
        full_s, cut_s = min(times[mode, "full"]), min(times[mode, "without prefix"])
        out[mode] = {"full": round(full_s, 2), "without prefix": round(cut_s, 2),
                     "saving at most": f"{1 - cut_s / full_s:.1%}"}
    return out


# ---- generation ------------------------------------------------------------------------------------------------

def generation(shape, resolution: int, steps: int) -> dict:
    from diffusers import StableDiffusionPipeline

    from neti.generate import Generator, Sampling
    from neti.testing.sd_layout import build_pipeline

    pipe = build_pipeline(shape, tokenizer_for(shape), seed=0)
    pipe.set_progress_bar_config(disable=True)
    concept = make_concept(pipe, token=TOKEN)
    plain = StableDiffusionPipeline(**{**pipe.components})
    plain.set_progress_bar_config(disable=True)
    out = {"resolution": resolution, "steps": steps}
    gen = Generator(pipe, "random")
    from diffusers import DPMSolverMultistepScheduler

    plain.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)

    def run_plain(steps=steps):
        plain("a photo of a shape", num_inference_steps=steps, guidance_scale=7.5, height=resolution,
              width=resolution, generator=torch.Generator().manual_seed(0), output_type="np")

    def run_neti(steps=steps):
        gen.generate(PROMPT, [concept], [0], Sampling(steps=steps, height=resolution, width=resolution),
                     output_type="np")

    run_plain(2), run_neti(2)  # warm-up: first-call allocations are neither pipeline's cost
    gen.conditioner.clear_cache()
    for name, fn in (("plain pipeline", run_plain), ("NeTI generate", run_neti)):
        with PeakMemory() as peak:
            started = time.perf_counter()
            fn()
            seconds = time.perf_counter() - started
        out[name] = {"seconds": round(seconds, 1), "peak_mb_fp32": mb(peak.peak_bytes)}
    cached = getattr(gen.conditioner, "cached_bytes", None)
    if cached is None:  # an older neti: the cache holds whole encodings
        cached = sum(e.keys.nbytes + (0 if e.values is e.keys else e.values.nbytes)
                     for e in gen.conditioner._cache.values())
    out["cache after the call, MB fp32"] = mb(cached)
    extra = out["NeTI generate"]["peak_mb_fp32"] - out["plain pipeline"]["peak_mb_fp32"]
    out["extra peak, MB fp32"] = round(extra, 1)
    out["extra peak, MB fp16-equivalent"] = round(extra / 2, 1)
    return out


# ---- training --------------------------------------------------------------------------------------------------

def training(shape, batch: int) -> dict:
    """One micro-batch's conditioning with gradients (forward and backward), as `Trainer.encoder_states` runs it:
    NeTI and XTI encode batch x 16 rows, TI batch rows; with and without text-encoder gradient checkpointing."""
    from neti.attention import pack
    from neti.conditioning import TextConditioner
    from neti.train import text_encoder_checkpointing

    tokenizer, encoder = text_parts(shape)
    encoder.requires_grad_(False)
    concepts = concepts_for(tokenizer, encoder)
    conditioner = TextConditioner(tokenizer, encoder)
    prompts = [conditioner.tokenize(PROMPT.format(TOKEN), [TOKEN]),
               conditioner.tokenize(f"a rendering of a {TOKEN}", [TOKEN])] * (batch // 2 + 1)
    prompts = prompts[:batch]
    timesteps = torch.tensor([901.0, 77.0, 500.0, 250.0])[:batch] if batch <= 4 else torch.rand(batch) * 999
    out = {"batch": batch}
    for method, checkpointing in (("neti", False), ("neti", True), ("ti", False), ("ti", True)):
        concept = concepts[method].train()
        if checkpointing:
            text_encoder_checkpointing(encoder, True)
        per = LAYERS if concept.depends_on_layer else 1
        rows = torch.arange(batch).repeat_interleave(per)
        with PeakMemory() as peak:
            started = time.perf_counter()
            enc = conditioner.encode_rows(prompts, rows, timesteps.repeat_interleave(per),
                                          torch.arange(per).repeat(batch).float(), {TOKEN: concept})
            keys, values = (x.view(batch, per, *x.shape[1:]).expand(-1, LAYERS, -1, -1)
                            for x in (enc.keys, enc.values))
            states = pack(keys, values)  # (B, 2 L S, D), what the UNet reads
            (states * torch.randn_like(states)).sum().backward()
            seconds = time.perf_counter() - started
        del enc, keys, values, states
        concept.zero_grad(set_to_none=True)
        if checkpointing:
            text_encoder_checkpointing(encoder, False)
        label = f"{method.upper()}{' + text-encoder checkpointing' if checkpointing else ''}"
        out[label] = {"rows": batch * per, "seconds": round(seconds, 2), "peak_mb_fp32": mb(peak.peak_bytes),
                      "peak_mb_fp16_equivalent": mb(peak.peak_bytes / 2)}
    return out


def step(shape, batch: int) -> dict:
    """One whole training micro-batch of the paper's setting (batch 2 at the model's resolution: VAE encoding, the
    text encoder over the per-layer rows, the UNet forward and backward) through `neti.Trainer` with its defaults,
    NeTI against TI: peak memory and time. Accumulation repeats micro-batches, so it does not raise the peak."""
    import numpy as np
    from PIL import Image

    from neti.config import TrainConfig
    from neti.testing.sd_layout import build_pipeline
    from neti.train import Trainer

    torch.manual_seed(0)
    pipe = build_pipeline(shape, tokenizer_for(shape), seed=0)
    pipe.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (shape.resolution,) * 2 + (3,), dtype=np.uint8)) for _ in range(4)]
    out = {"batch": batch, "resolution": shape.resolution}
    with tempfile.TemporaryDirectory(prefix="real-scale-step-") as tmp:
        for method in ("neti", "ti"):
            config = TrainConfig(method=method, steps=1, batch_size=batch, grad_accum=1, checkpoint_every=0)
            trainer = Trainer(pipe, images, TOKEN, "shape", config)
            with PeakMemory() as peak:
                started = time.perf_counter()
                trainer.train(f"{tmp}/{method}.safetensors")
                seconds = time.perf_counter() - started
            out[method.upper()] = {"seconds": round(seconds, 1), "peak_mb_fp32": mb(peak.peak_bytes),
                                   "peak_mb_fp16_equivalent": mb(peak.peak_bytes / 2)}
            del trainer
    return out


PARTS = {"conditioning": conditioning, "generation": generation, "training": training, "step": step}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["sd15", "sd21"], default="sd15")
    parser.add_argument("--part", choices=[*PARTS, "all"], default="conditioning")
    parser.add_argument("--steps", type=int, default=None,
                        help="conditioning: steps timed (default 10); generation: denoising steps (default 50)")
    parser.add_argument("--prefix-rows", type=int, default=52, help="rows timed for the prefix bound (0: skip it)")
    parser.add_argument("--resolution", type=int, default=64, help="generation: image side in pixels")
    parser.add_argument("--batch", type=int, default=2, help="training: samples per micro-batch (paper: 2)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="every part on a tiny shape (checks the script)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    name = "smoke" if args.smoke else args.shape
    shape = shape_of(name)
    parts = list(PARTS) if args.part == "all" or args.smoke else [args.part]
    results = {"environment": environment("cpu"), "shape": name}
    for part in parts:
        if part == "conditioning":
            results[part] = conditioning(shape, args.steps or (2 if args.smoke else 10),
                                         4 if args.smoke else args.prefix_rows)
        elif part == "generation":
            results[part] = generation(shape, 32 if args.smoke else args.resolution,
                                       args.steps or (3 if args.smoke else 50))
        else:
            results[part] = PARTS[part](shape, args.batch)
        print(json.dumps({part: results[part]}, indent=1), flush=True)
    results["vocabulary"] = VOCABULARY["name"]
    print(f"tokenizer: {VOCABULARY['name']}")
    folder = REPO_ROOT / "benchmarks" / "results"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"real-scale-{name}-{args.part if not args.smoke else 'smoke'}.json"
    path.write_text(json.dumps(results, indent=1))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
