"""Shared fixtures: a tiny SD-1.x-shaped pipeline (random weights, 16 cross-attention layers) saved with
`save_pretrained` and loaded back through `neti.models.load_pipeline`, the loader real models use; an official
NeTI checkpoint. Plain helper functions are in helpers.py."""

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


@pytest.fixture()
def official_checkpoint(tmp_path):
    """(mapper-steps-500.pt, learned_embeds-steps-500.bin, the reference mapper), pickled as the official code does
    (SD 1.x sizes: D = 768, 16 layers)."""
    return write_official_checkpoint(tmp_path)


@pytest.fixture(autouse=True)
def _quiet_logs(caplog):
    caplog.set_level(logging.INFO, logger="neti")
