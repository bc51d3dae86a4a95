"""Shared fixtures: a tiny SD-1.x-shaped pipeline (random weights, 16 cross-attention layers) saved with
`save_pretrained` and loaded back through `neti.models.load_pipeline`, the loader real models use; a tiny random
CLIP; an official NeTI checkpoint. Plain helper functions are in helpers.py."""

from __future__ import annotations

import copy
import logging
import os

import pytest
import torch
from helpers import WORDS, write_official_checkpoint

from neti.testing import tiny_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)  # tiny models are overhead-bound; more threads only thrash on 2 shared cores


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("tiny-sd"), WORDS)


@pytest.fixture(scope="session")
def loaded_tiny_pipe(tiny_model_dir):
    """The tiny pipeline as `neti.models.load_pipeline` loads it, once per session; tests use copies of it."""
    from neti.models import load_pipeline

    return load_pipeline(tiny_model_dir, device="cpu")


@pytest.fixture()
def tiny_pipe(loaded_tiny_pipe):
    """A fresh copy of the loaded tiny pipeline: a test may change its weights, processors or modes."""
    return copy.deepcopy(loaded_tiny_pipe)


@pytest.fixture()
def generator(tiny_pipe, tiny_model_dir):
    from neti.generate import Generator

    return Generator(tiny_pipe, str(tiny_model_dir))


@pytest.fixture(scope="session")
def xl_model_dir(tmp_path_factory):
    """A tiny SDXL-shaped pipeline (two text encoders 16 and 32 wide, 70 cross-attention layers) saved with
    `save_pretrained`, as diffusers' own SDXL tests build theirs."""
    from neti.testing import tiny_xl_model

    return tiny_xl_model(tmp_path_factory.mktemp("tiny-sdxl"), WORDS)


@pytest.fixture(scope="session")
def loaded_xl_pipe(xl_model_dir):
    from neti.models import load_pipeline

    return load_pipeline(xl_model_dir, device="cpu")


@pytest.fixture()
def xl_pipe(xl_model_dir):
    """A fresh load per test, not a deep copy: on this project's AMD EPYC CI machine (2026-12-08) a deep-copied SDXL
    pipeline's images differed from diffusers' by up to 8e-7, which breaks the bit-for-bit equality tests."""
    from neti.models import load_pipeline

    return load_pipeline(xl_model_dir, device="cpu")


@pytest.fixture()
def xl_generator(xl_pipe, xl_model_dir):
    from neti.generate import Generator

    return Generator(xl_pipe, str(xl_model_dir))


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory):
    """A tiny random CLIPModel + CLIPProcessor saved with `save_pretrained`, loaded as a real CLIP would be."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTextConfig, CLIPVisionConfig

    from neti.testing.tokenizer import build_clip_tokenizer

    folder = tmp_path_factory.mktemp("tiny-clip")
    tokenizer = build_clip_tokenizer(WORDS, folder / "vocab", max_length=16)
    n = len(tokenizer)
    text = CLIPTextConfig(vocab_size=n, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, max_position_embeddings=16, projection_dim=8,
                          bos_token_id=n - 2, eos_token_id=n - 1, pad_token_id=n - 1)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=8)
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=8))
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    model.save_pretrained(folder / "clip")
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder / "clip")
    return folder / "clip"


@pytest.fixture()
def official_checkpoint(tmp_path):
    """(mapper-steps-500.pt, learned_embeds-steps-500.bin, the reference mapper), pickled as the official code does
    (SD 1.x sizes: D = 768, 16 layers)."""
    return write_official_checkpoint(tmp_path)


@pytest.fixture(autouse=True)
def _quiet_logs(caplog):
    caplog.set_level(logging.INFO, logger="neti")
