"""Training precision is safe by default (neti.precision, docs/efficiency.md "Precision"): fp16 frozen weights
train only with loss scaling, "no" means an fp32 gradient path, and bf16 weights train on the CPU."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from neti.precision import resolve_mixed_precision, training_weights_dtype
from neti.train import TrainConfig, Trainer


@pytest.mark.parametrize("requested, weights, device, mode", [
    ("auto", torch.float32, "cpu", "no"), ("auto", torch.float32, "cuda", "no"),
    ("auto", torch.float16, "cuda", "fp16"),  # the loader's CUDA default: loss scaling
    ("auto", torch.bfloat16, "cpu", "bf16"), ("auto", torch.bfloat16, "cuda", "bf16"),
    ("no", torch.float32, "cuda", "no"), ("fp16", torch.float32, "cuda", "fp16"), ("bf16", torch.float32, "cpu", "bf16"),
])
def test_mixed_precision_follows_the_weights_unless_asked(requested, weights, device, mode):
    assert resolve_mixed_precision(requested, weights, device) == mode


@pytest.mark.parametrize("requested, device, message", [
    ("no", "cuda", "without loss scaling"),  # the old CLI default on CUDA's fp16 weights
    ("auto", "cpu", "needs a CUDA GPU"), ("fp16", "mps", "needs a CUDA GPU"),
])
def test_fp16_weights_without_loss_scaling_are_refused(requested, device, message):
    with pytest.raises(ValueError, match=message):
        resolve_mixed_precision(requested, torch.float16, device)


def test_no_mixed_precision_loads_fp32_weights_and_auto_keeps_the_loaders_default():
    assert training_weights_dtype("no") == torch.float32
    assert training_weights_dtype("bf16") == torch.bfloat16 and training_weights_dtype("fp16") == torch.float16
    assert training_weights_dtype("auto") is None
    with pytest.raises(ValueError, match="mixed_precision 'fp32' is unknown"):
        training_weights_dtype("fp32")


def test_the_train_command_defaults_to_auto():
    from neti.__main__ import _config, build_parser

    args = build_parser().parse_args(["train", "--images", "x", "--token", "<t>", "--out", "c.safetensors"])
    assert _config(TrainConfig, args).mixed_precision == "auto" == TrainConfig().mixed_precision
    assert "auto" in build_parser()._subparsers._group_actions[0].choices["train"].format_help()


def test_bf16_weights_train_with_finite_nonzero_gradients_and_a_falling_loss(tiny_pipe, tmp_path):
    pipe = tiny_pipe.to(dtype=torch.bfloat16)
    with torch.no_grad():  # let the text steer the random UNet (as tests/test_train.py's listening_pipe)
        for name, module in pipe.unet.named_modules():
            if name.endswith("attn2"):
                module.to_out[0].weight.mul_(100.0)
    pixels = np.zeros((32, 32, 3), dtype=np.uint8)
    pixels[...] = (30, 60, 200)
    pixels[6:20, 6:20] = (220, 30, 30)
    trainer = Trainer(pipe, [Image.fromarray(pixels)], "<thing>", "cat",
                      TrainConfig(steps=20, batch_size=2, grad_accum=1, checkpoint_every=0))
    assert trainer._accelerator.mixed_precision == "bf16"
    norms = []
    weight = trainer.concept.mapper.output_layer.weight
    assert weight.dtype == torch.float32  # the mapper and its optimiser stay in fp32
    weight.register_hook(lambda grad: norms.append(float(grad.float().norm())))
    fixed = trainer.make_batch(10**6)
    before = trainer.evaluation_loss(fixed)
    result = trainer.train(tmp_path / "c.safetensors")
    after = trainer.evaluation_loss(fixed)
    assert len(norms) == 20 and all(math.isfinite(n) and n > 0 for n in norms)
    assert all(math.isfinite(x) for x in result.losses)
    assert after < 0.98 * before, (before, after)
