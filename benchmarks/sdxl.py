"""What a NeTI concept costs on SDXL (docs/sdxl.md "Cost"): its parameters and file size, the anchor projection's
choice of input layer, and the batched two-encoder conditioning of a 50-step image on full-size, random-weight
SDXL text encoders (CLIP ViT-L: 768 wide, 12 layers; OpenCLIP ViT-bigG: 1280 wide, 32 layers; 49,408-token
vocabulary; nothing is downloaded).

    python -m benchmarks.sdxl --part cost                    # seconds, no model
    python -m benchmarks.sdxl --part conditioning --rows 26  # CPU: time and peak memory of 26 of the 3,500 rows
    python -m benchmarks.sdxl --part conditioning --device cuda --rows 3500   # the whole grid on a GPU

The 50-step grid is 50 timesteps x 70 layers = 3,500 rows of 77 tokens per encoder, plus 50 pooled rows (one
full bigG pass per timestep, the virtual layer). On a CPU the full grid takes many minutes, so `--rows N` encodes
the first N rows in the conditioner's own chunks and the report extrapolates linearly to 3,500 (labelled as
such): the work per row is the same for every row, and memory is bounded by the chunk, not by the row count,
except for the result itself (3,500 x 77 x 2048 keys, reported separately).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROWS_50_STEPS = 50 * 70


def sdxl_config(num_time_anchors: int = 10):
    """The MapperConfig `Concept.for_pipeline` fills in on SDXL (super-category norms of CLIP's typical size)."""
    from neti.config import MapperConfig

    return MapperConfig(token_dim=2048, token_widths=(768, 1280), num_layers=70, pooled_layer=True,
                        target_norms=(0.39, 0.53), target_norm=0.66, num_time_anchors=num_time_anchors)


def anchor_coverage(num_layer_anchors: int, num_positions: int = 71, steps: int = 50) -> tuple[float, float]:
    """How much of an input's Fourier encoding the initial anchor projection sees: the norm of f(t, l) inside the
    span of the anchors' encodings, min and mean over the 50 inference timesteps x every layer, for anchors at
    `num_layer_anchors` evenly spaced layer positions (x 10 time anchors)."""
    from neti.positional_encoding import FourierEncoding

    encoding = FourierEncoding(1024, 0.03, 2.0, 0)
    ts = torch.linspace(0, 999, steps + 1).round()[:-1]
    grid_t, grid_l = torch.meshgrid(ts, torch.arange(num_positions).float(), indexing="ij")
    x = encoding(grid_t.reshape(-1), grid_l.reshape(-1)).double()
    at_t, at_l = torch.meshgrid(torch.arange(0, 1000, 100).float(),
                                torch.linspace(0, num_positions - 1, num_layer_anchors).round(), indexing="ij")
    basis, _ = torch.linalg.qr(encoding(at_t.reshape(-1), at_l.reshape(-1)).double().T)
    seen = (x @ basis).norm(dim=1)
    return float(seen.min()), float(seen.mean())


def cost() -> dict:
    from neti.concept import Concept
    from neti.mapper import count_parameters

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        concept = Concept("<bench>", "object", sdxl_config(), [f"L{i}" for i in range(70)], "random SDXL shape")
        sizes = {dtype: Path(concept.save(Path(tmp) / f"c-{dtype}.safetensors",
                                          getattr(torch, dtype))).stat().st_size for dtype in ("float32", "float16")}
        parts = {name: count_parameters(module) for name, module in concept.mapper.named_children()}
        rows["concept"] = dict(parameters=concept.num_parameters, by_part=parts, file_bytes_fp32=sizes["float32"],
                               file_bytes_fp16=sizes["float16"])
    anchors = {}
    for label, layer_anchors in (("every layer + pooled (chosen)", 71), ("SD 1.x's 16, spread", 16),
                                 ("one per block (11) + pooled", 12)):
        inputs = 10 * layer_anchors
        low, mean = anchor_coverage(layer_anchors)
        anchors[label] = dict(anchors=inputs, input_layer_parameters=2048 * inputs + inputs,
                              first_hidden_parameters=inputs * 128 + 128, seen_min=round(low, 3),
                              seen_mean=round(mean, 3))
    low, mean = anchor_coverage(16, num_positions=16)
    anchors["SD 1.x for comparison (16 of 16 layers)"] = dict(anchors=160, seen_min=round(low, 3), seen_mean=round(mean, 3))
    rows["anchors"] = anchors
    return rows


def build_encoders(device: torch.device, dtype: torch.dtype):
    """Full-size SDXL text encoders (random weights) and a tokenizer for them."""
    from benchmarks.common import benchmark_tokenizer
    from neti.testing.sd_layout import CLIP_VOCAB_SIZE
    from neti.testing.sdxl_layout import SDXL, build_text_encoder

    tokenizer, vocabulary = benchmark_tokenizer(77, real=True)
    torch.manual_seed(0)
    with torch.device(device):
        encoders = [build_text_encoder(SDXL.text, CLIP_VOCAB_SIZE), build_text_encoder(SDXL.text_2, CLIP_VOCAB_SIZE)]
    return [e.to(dtype).eval().requires_grad_(False) for e in encoders], tokenizer, vocabulary


def conditioning(rows: int, device: torch.device, dtype: torch.dtype) -> dict:
    from benchmarks.common import PeakMemory, time_call
    from neti.concept import Concept
    from neti.conditioning_xl import XLTextConditioner

    started = time.perf_counter()
    encoders, tokenizer, vocabulary = build_encoders(device, dtype)
    built = time.perf_counter() - started
    conditioner = XLTextConditioner((tokenizer, tokenizer), encoders, cache_bytes=0)
    concept = Concept("<bench>", "object", sdxl_config(), [f"L{i}" for i in range(70)]).eval().to(device)
    prompt = conditioner.tokenize("a photo of a <bench>", ["<bench>"])
    ts = torch.linspace(0, 999, 51).round()[:-1].flip(0)
    grid_t, grid_l = torch.meshgrid(ts, torch.arange(70).float(), indexing="ij")
    t, l = grid_t.reshape(-1)[:rows], grid_l.reshape(-1)[:rows]
    per_call = conditioner.parts[1].rows_per_call(77, device, dtype)
    with torch.no_grad():
        with PeakMemory(device) as peak:
            seconds = time_call(lambda: conditioner.encode_rows([prompt], torch.zeros(rows, dtype=torch.long), t, l,
                                                                {"<bench>": concept}), device)
        pooled_rows = max(1, rows // 70)
        pooled_seconds = time_call(lambda: conditioner.pooled_rows(
            [prompt], torch.zeros(pooled_rows, dtype=torch.long), ts[:pooled_rows], 70, {"<bench>": concept}), device)
    element = torch.tensor([], dtype=dtype).element_size()
    full = seconds / rows * ROWS_50_STEPS + pooled_seconds / pooled_rows * 50
    return dict(device=str(device), dtype=str(dtype).removeprefix("torch."), vocabulary=vocabulary,
                threads=torch.get_num_threads(), build_seconds=round(built, 1), rows_encoded=rows,
                rows_per_encoder_call=per_call, tokens_per_row=77, encoders=2, seconds=round(seconds, 2),
                seconds_per_row=round(seconds / rows, 4), pooled_rows=pooled_rows,
                pooled_seconds=round(pooled_seconds, 2), peak_extra_mib=round(peak.peak_bytes / 2**20, 1),
                peak_method=peak.method,
                extrapolated_50_steps=dict(rows=ROWS_50_STEPS, pooled_rows=50, seconds=round(full, 1),
                                           keys_mib=round(ROWS_50_STEPS * 77 * 2048 * element / 2**20, 1),
                                           note="linear in rows from the rows encoded; not measured"
                                           if rows < ROWS_50_STEPS else "measured"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["cost", "conditioning", "all"], default="all")
    p.add_argument("--rows", type=int, default=26, help="rows of the 3,500 to encode (default: one CPU chunk)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="default: float16 on CUDA, float32 elsewhere")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if not 1 <= args.rows <= ROWS_50_STEPS:
        p.error(f"--rows must be in 1..{ROWS_50_STEPS}, got {args.rows}")
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    out = {}
    if args.part in ("cost", "all"):
        out["cost"] = cost()
        print(json.dumps(out["cost"], indent=1), flush=True)
    if args.part in ("conditioning", "all"):
        out["conditioning"] = conditioning(args.rows, device, dtype)
        print(json.dumps(out["conditioning"], indent=1), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
