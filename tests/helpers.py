"""Plain helpers the tests share (fixtures are in conftest.py): the tiny models' vocabularies, a seeded concept for
a pipeline, an official NeTI checkpoint written from its format description (docs/method.md "Official checkpoint
format"), and waiting for an event."""

from __future__ import annotations

import sys
import time
import types
from pathlib import Path
from typing import Callable, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

WORDS = ["a", "photo", "of", "the", "cat", "dog", "teapot", "object", "on", "beach", "red", "blue", "painting",
         "in", "style", "rendering", "sketch", "two", "and", "with"]
# The app tests' tiny model: enough of the toy world's vocabulary for the prompts they write, 32 tokens.
APP_WORDS = ["a", "photo", "of", "the", "on", "background", "shape", "object", "white", "blue", "red", "green",
             "yellow", "black", "circle", "square", "heart", "two", "rendering", "picture"]


def make_concept(pipe, token="<thing>", super_category="cat", method="neti", seed=1, **config):
    """A concept for `pipe` with its own random (seeded) weights, so it visibly changes the output."""
    from neti.concept import Concept
    from neti.config import MapperConfig

    concept = Concept.for_pipeline(pipe, token, super_category, MapperConfig(method=method, seed=seed, **config), "tiny")
    if method != "neti":
        vectors = concept.mapper.vectors
        with torch.no_grad():
            vectors.add_(torch.randn_like(vectors, generator=torch.Generator().manual_seed(seed)) * vectors[0].norm() / 4)
    return concept.eval()


# ---- waiting for events -------------------------------------------------------------------------------------

HUNG_AFTER_S = 900  # a guard against a hung process only: every wait ends on its event, however slow the machine

T = TypeVar("T")


def square_images():
    """Three views of one simple thing: a red square on a blue ground, at different places (32 px PIL images)."""
    import numpy as np
    from PIL import Image

    out = []
    for shift in (4, 8, 12):
        pixels = np.zeros((32, 32, 3), dtype=np.uint8)
        pixels[...] = (30, 60, 200)
        pixels[shift:shift + 14, shift:shift + 14] = (220, 30, 30)
        out.append(Image.fromarray(pixels))
    return out


def wait_for(read: Callable[[], T], done: Callable[[T], bool], interval: float = 0.5) -> T:
    """Call `read()` until `done(value)` holds and return that value: the test waits for an event (a status, a
    file), not for a number of seconds. `done` should also accept the states that end the wait early (a run that
    finished or failed), so that the test's own assertions then say what went wrong."""
    deadline = time.monotonic() + HUNG_AFTER_S
    while not done(value := read()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no event after {HUNG_AFTER_S} s; last value: {value!r}")
        time.sleep(interval)
    return value


# ---- the official NeTI checkpoint format ---------------------------------------------------------------------

class OfficialEncoder(nn.Module):
    """The official NeTIPositionalEncoding as docs/method.md describes it: `w` is a plain attribute, not a buffer."""

    def __init__(self, sigma_t=0.03, sigma_l=2.0, num_w=1024):
        super().__init__()
        self.w = torch.randn(num_w, 2) * torch.tensor([sigma_t, sigma_l])

    def encode(self, t, l):
        x = torch.stack([t, l], dim=1)  # (N, 2)
        v = torch.cat([torch.sin(self.w @ x.T), torch.cos(self.w @ x.T)])  # (2F, N)
        return (v / v.norm(dim=0)).T


class ReferenceMapper(nn.Module):
    """The official mapper's layer structure and forward, rewritten from docs/method.md."""

    def __init__(self, encoder, token_dim, num_layers, target_norm, anchors=10):
        super().__init__()
        self.encoder, self.target_norm = encoder, target_norm
        t = torch.arange(anchors, dtype=torch.float32).repeat_interleave(num_layers) * 100  # t-major
        l = torch.arange(num_layers, dtype=torch.float32).repeat(anchors)
        self.input_layer = nn.Linear(2048, anchors * num_layers)
        with torch.no_grad():
            self.input_layer.weight.copy_(encoder.encode(t, l))
        self.net = nn.Sequential(self.input_layer, nn.Linear(anchors * num_layers, 128), nn.LayerNorm(128),
                                 nn.LeakyReLU(), nn.Linear(128, 128), nn.LayerNorm(128), nn.LeakyReLU())
        self.output_layer = nn.Sequential(nn.Linear(128, 2 * token_dim))

    def forward(self, t, l, truncation=None):
        h = self.net(self.encoder.encode(t, l))
        if truncation is not None:
            h = h.clone()
            h[:, truncation:] = 0
        return F.normalize(self.output_layer(h), dim=-1) * self.target_norm


def write_official_checkpoint(folder: Path, token_dim: int = 768, num_layers: int = 16):
    """(mapper-steps-500.pt, learned_embeds-steps-500.bin, the reference mapper) in `folder`, pickled as the official
    code does: a stand-in `models.positional_encoding` module exists only while the checkpoint is pickled, so no
    official code is importable when it is read back."""
    D, L = token_dim, num_layers
    fake = types.ModuleType("models.positional_encoding")
    OfficialEncoder.__module__, OfficialEncoder.__qualname__ = "models.positional_encoding", "NeTIPositionalEncoding"
    fake.NeTIPositionalEncoding = OfficialEncoder
    saved = {name: sys.modules.get(name) for name in ("models", "models.positional_encoding")}
    sys.modules["models"] = types.ModuleType("models")
    sys.modules["models.positional_encoding"] = fake
    try:
        torch.manual_seed(0)
        encoder = OfficialEncoder()
        ref = ReferenceMapper(encoder, D, L, target_norm=0.3836).eval()
        with torch.no_grad():
            for p in ref.parameters():
                p.add_(torch.randn_like(p) * 0.02)  # trained weights
        state = ref.state_dict()
        assert "input_layer.weight" in state and "net.0.weight" in state and "output_layer.0.weight" in state
        cfg = {"model": {"target_norm": 0.3836, "use_nested_dropout": True, "nested_dropout_prob": 0.5,
                         "use_positional_encoding": True, "num_pe_time_anchors": 10,
                         "pe_sigmas": {"sigma_t": 0.03, "sigma_l": 2.0}, "output_bypass": True,
                         "pretrained_model_name_or_path": "CompVis/stable-diffusion-v1-4"},
               "data": {"placeholder_token": "<x>", "super_category_token": "cat"}}
        mapper_path = folder / "mapper-steps-500.pt"
        torch.save({"state_dict": state, "cfg": cfg, "encoder": encoder}, mapper_path)
    finally:
        OfficialEncoder.__module__, OfficialEncoder.__qualname__ = __name__, "OfficialEncoder"
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    assert "models.positional_encoding" not in sys.modules  # nothing official is importable while loading
    embeds_path = folder / "learned_embeds-steps-500.bin"
    torch.save({"<x>": torch.randn(D)}, embeds_path)
    return mapper_path, embeds_path, ref
