"""Where each method's learned input embeddings sit (NeTI Sec. 3.3, Eq. 4: output rescaling).

NeTI rescales the mapper's output (v_base and v_pass together) to the norm of the super-category token's
embedding; XTI's per-layer vectors and Textual Inversion's one vector start at that embedding and are free to move.
For each concept file this reports, over the 25 sampling timesteps x every cross-attention layer, the norm of the
vector that replaces the placeholder's input embedding, its cosine to the super-category embedding, how much it
varies over the grid (mean cosine to the grid's mean vector), and, with the bypass, the norm of v_pass:

    python -m toyworld.vector_norms /tmp/cmp0/*-0-checkpoints/checkpoint-001000.safetensors --json norms.json
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)
FLAGS = ("use_time", "use_layer", "use_nested_dropout", "use_bypass", "use_rescaling")  # NeTI's ablation switches


def grid_vectors(concept, timesteps: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The concept's (v_base, v_pass) over the (timestep, layer) grid: (T * L, D) each, v_pass None without it."""
    layers = concept.config.num_layers
    t = torch.tensor(timesteps, dtype=torch.float32).repeat_interleave(layers)
    l = torch.arange(layers).repeat(len(timesteps))
    with torch.no_grad():
        out = concept.eval()(t, l)
    return out.base, out.bypass


def summary(concept, super_embedding: torch.Tensor, timesteps: list[int]) -> dict[str, float]:
    """Norms and cosines of one concept's vectors (see the module docstring)."""
    base, bypass = grid_vectors(concept, timesteps)
    norms = base.norm(dim=-1)
    mean = base.mean(0, keepdim=True)
    row = {"norm_mean": float(norms.mean()), "norm_min": float(norms.min()), "norm_max": float(norms.max()),
           "cos_super": float(F.cosine_similarity(base, super_embedding[None], dim=-1).mean()),
           "cos_grid_mean": float(F.cosine_similarity(base, mean, dim=-1).mean())}
    if bypass is not None:
        row["bypass_norm_mean"] = float(bypass.norm(dim=-1).mean())
    return row


def main(argv: list[str] | None = None) -> None:
    from neti import Concept, load_pipeline
    from neti.conditioning import TextConditioner, super_category_id

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("concepts", type=Path, nargs="+")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    pipe = load_pipeline(None, "cpu")
    pipe.scheduler.set_timesteps(25)
    timesteps = [int(t) for t in pipe.scheduler.timesteps]
    conditioner = TextConditioner(pipe.tokenizer, pipe.text_encoder)
    table = pipe.text_encoder.get_input_embeddings().weight.detach().float()
    report = {"vocabulary_norm_median": float(table.norm(dim=-1).median()), "concepts": {}}
    for path in args.concepts:
        concept = Concept.load(path)
        embedding = conditioner.embedding_of(super_category_id(pipe.tokenizer, concept.super_category)).float()
        off = [name for name in FLAGS if concept.method == "neti" and not getattr(concept.config, name)]
        row = {"method": concept.method, "off": off, "super_category": concept.super_category,
               "super_category_norm": float(embedding.norm()), **summary(concept, embedding, timesteps)}
        report["concepts"][str(path)] = row
        logger.info("%s %s", path, json.dumps(row))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
