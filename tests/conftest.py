"""Shared fixtures: a tiny SD-1.x-shaped pipeline (random weights, 16 cross-attention layers) saved with
`save_pretrained` and loaded back through `neti.models.load_pipeline`, the loader real models use."""

from __future__ import annotations

import logging
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)  # tiny models are overhead-bound; more threads only thrash on 2 shared cores

WORDS = ["a", "photo", "of", "the", "cat", "dog", "teapot", "object", "on", "beach", "red", "blue", "painting",
         "in", "style", "rendering", "sketch", "two", "and", "with"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from toyworld.sd_layout import SDShape, build_pipeline
    from toyworld.tokenizer import build_clip_tokenizer

    folder = tmp_path_factory.mktemp("tiny-sd")
    tokenizer = build_clip_tokenizer(WORDS, folder / "vocab")
    build_pipeline(SDShape(), tokenizer, seed=0).save_pretrained(folder / "model")
    return folder / "model"


@pytest.fixture()
def tiny_pipe(tiny_model_dir):
    from neti.models import load_pipeline

    return load_pipeline(tiny_model_dir, device="cpu")


@pytest.fixture()
def generator(tiny_pipe, tiny_model_dir):
    from neti.generate import Generator

    return Generator(tiny_pipe, str(tiny_model_dir))


def make_concept(pipe, token="<thing>", super_category="cat", method="neti", seed=1, **config):
    """A concept for `pipe` with its own random (seeded) weights, so it visibly changes the output."""
    from neti.concept import Concept
    from neti.conditioning import super_category_id
    from neti.config import MapperConfig
    from neti.layers import cross_attention_layers

    layers = cross_attention_layers(pipe.unet)
    emb = pipe.text_encoder.get_input_embeddings().weight[super_category_id(pipe.tokenizer, super_category)]
    cfg = MapperConfig(method=method, token_dim=pipe.text_encoder.config.hidden_size, num_layers=len(layers),
                       target_norm=float(emb.detach().norm()), seed=seed, **config)
    concept = Concept(token, super_category, cfg, [x.name for x in layers], "tiny")
    if method != "neti":
        concept.mapper.initialize(emb.detach())
        with torch.no_grad():
            concept.mapper.vectors.add_(torch.randn_like(concept.mapper.vectors, generator=torch.Generator().manual_seed(seed)) * emb.norm() / 4)
    return concept.eval()


@pytest.fixture(autouse=True)
def _quiet_logs(caplog):
    caplog.set_level(logging.INFO, logger="neti")
