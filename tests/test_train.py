"""The trainer: learning, exact resume, cancel, crash safety, callbacks and bad inputs (issue 3)."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from neti.concept import Concept
from neti.config import PreviewConfig
from neti.previews import Previews
from neti.train import TrainConfig, Trainer, TrainingCallback

from helpers import square_images


@pytest.fixture()
def listening_pipe(tiny_pipe):
    """The tiny pipeline with its cross-attention outputs amplified, so that the text visibly steers the
    prediction of the random-weight UNet and a learned concept can lower the loss within a few steps."""
    with torch.no_grad():
        for name, module in tiny_pipe.unet.named_modules():
            if name.endswith("attn2"):
                module.to_out[0].weight.mul_(100.0)
    return tiny_pipe


@pytest.fixture(scope="module")
def images():
    """Three views of one simple thing: a red square on a blue ground, at different places."""
    return square_images()


def quick(**overrides) -> TrainConfig:
    values = dict(steps=6, batch_size=2, grad_accum=1, checkpoint_every=0)
    values.update(overrides)
    return TrainConfig(**values)


@pytest.mark.parametrize("method", ["neti", "xti", "ti"])
def test_thirty_steps_lower_the_loss_on_a_fixed_batch_and_the_concept_generates(
        listening_pipe, images, tmp_path, method):
    trainer = Trainer(listening_pipe, images, "<thing>", "cat", quick(method=method, steps=30))
    fixed = trainer.make_batch(10**6)  # images, noise and timesteps never seen in training
    before = trainer.evaluation_loss(fixed)
    result = trainer.train(tmp_path / "c.safetensors")
    after = trainer.evaluation_loss(fixed)
    assert after < 0.98 * before, (method, before, after)
    concept = Concept.load(tmp_path / "c.safetensors")
    assert concept.method == method and concept.train_steps == 30 == result.steps_done
    from neti.generate import Generator, Sampling

    image = Generator(listening_pipe).generate("a photo of a {}", [concept], [0], Sampling(steps=2)).images[0]
    assert image.size == (32, 32)


def test_resume_equals_an_uninterrupted_run(tiny_pipe, images, tmp_path):
    """Training 6 steps equals training 3, stopping, resuming from the checkpoint and training 3 more."""
    cfg = quick(steps=6, grad_accum=2, checkpoint_every=3)
    straight = Trainer(tiny_pipe, images, "<thing>", "cat", cfg).train(tmp_path / "a.safetensors").concept
    first = Trainer(tiny_pipe, images, "<thing>", "cat", cfg)
    first.callbacks.append(_StopAt(first, 3))
    assert first.train(tmp_path / "b.safetensors").steps_done == 3
    checkpoints = sorted((tmp_path / "b-checkpoints").glob("*.safetensors"))
    assert [p.name for p in checkpoints] == ["checkpoint-000003.safetensors"]
    resumed = Trainer(tiny_pipe, images, "<thing>", "cat", cfg)
    result = resumed.train(tmp_path / "b.safetensors", resume=tmp_path / "b-checkpoints")
    assert result.steps_done == 6
    for (name, a), (_, b) in zip(straight.mapper.state_dict().items(), result.concept.mapper.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), name
    assert not torch.equal(straight.mapper.state_dict()["output_layer.weight"],
                           first.concept.mapper.state_dict()["output_layer.weight"])  # 3 steps differ from 6


def test_fused_accumulation_computes_the_loss_and_gradients_of_sequential_accumulation(tiny_pipe, images):
    """One UNet pass over a step's three micro-batches (the CPU's default) gives the loss and the gradients of
    three passes, nested dropout included: each micro-batch keeps its own draws."""
    from neti.train import _accumulate_gradients

    found = {}
    for mode in ("fused", "sequential"):
        trainer = Trainer(tiny_pipe, images, "<thing>", "cat", quick(grad_accum=3, accumulation=mode))
        assert trainer.fused == (mode == "fused")
        trainer.concept.train()
        loss, _ = _accumulate_gradients(trainer)
        found[mode] = loss, {n: p.grad for n, p in trainer.concept.named_parameters() if p.grad is not None}
    (fused_loss, fused), (sequential_loss, sequential) = found["fused"], found["sequential"]
    assert fused_loss == pytest.approx(sequential_loss, rel=1e-6)
    assert fused.keys() == sequential.keys() and "mapper.output_layer.weight" in fused
    for name, grad in fused.items():
        scale = float(sequential[name].abs().max())
        assert scale > 0 and torch.allclose(grad, sequential[name], rtol=1e-4, atol=1e-5 * scale), name
    with pytest.raises(ValueError, match="accumulation 'both' is unknown"):
        quick(accumulation="both")


def test_each_training_photo_is_encoded_once_to_the_vaes_own_latent(tiny_pipe, images, tmp_path, monkeypatch):
    """The frozen VAE sees each distinct image (3 photos, flipped or not) once, alone; the remembered latent is
    the VAE's scaled posterior mean of it."""
    trainer = Trainer(tiny_pipe, images, "<thing>", "cat", quick(steps=6))
    vae, encoded = tiny_pipe.vae, []
    real = vae.encode
    monkeypatch.setattr(vae, "encode", lambda x, *a, **k: encoded.append(len(x)) or real(x, *a, **k))
    batch = trainer.make_batch(0)
    with torch.no_grad():
        expected = real(batch.pixel_values).latent_dist.mean * vae.config.scaling_factor
    assert torch.allclose(trainer._latents(vae, batch.pixel_values, tiny_pipe.device), expected, atol=1e-5)
    trainer.train(tmp_path / "c.safetensors")  # 12 more items drawn from 6 distinct images
    assert set(encoded) == {1} and len(encoded) == len(trainer._latents.found) <= 2 * len(images)


class _StopAt(TrainingCallback):
    def __init__(self, trainer, step):
        self.trainer, self.step = trainer, step

    def on_step(self, info):
        if info.step == self.step:
            self.trainer.cancel()


def test_cancel_stops_within_one_step_and_leaves_a_loadable_concept(tiny_pipe, images, tmp_path):
    trainer = Trainer(tiny_pipe, images, "<thing>", "cat", quick(steps=50))
    trainer.callbacks.append(_StopAt(trainer, 2))
    result = trainer.train(tmp_path / "c.safetensors")
    assert result.cancelled and result.steps_done == 2
    assert Concept.load(tmp_path / "c.safetensors").train_steps == 2


def test_a_crash_mid_training_still_saves_the_concept_so_far(tiny_pipe, images, tmp_path, monkeypatch):
    trainer = Trainer(tiny_pipe, images, "<thing>", "cat", quick(steps=10))
    real = trainer.make_batch

    def failing(micro_step):
        if micro_step == 4:
            raise RuntimeError("simulated out-of-memory")
        return real(micro_step)

    monkeypatch.setattr(trainer, "make_batch", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        trainer.train(tmp_path / "c.safetensors")
    assert Concept.load(tmp_path / "c.safetensors").train_steps == 4


def test_a_kill_between_write_and_rename_never_leaves_a_partial_file(tiny_pipe, images, tmp_path, monkeypatch):
    trainer = Trainer(tiny_pipe, images, "<thing>", "cat", quick(steps=2))
    trainer.train(tmp_path / "c.safetensors")
    good = (tmp_path / "c.safetensors").read_bytes()

    def killed(src, dst):
        raise KeyboardInterrupt("killed between write and rename")

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        trainer.concept.save(tmp_path / "c.safetensors")
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint(tmp_path / "c.safetensors")
    assert (tmp_path / "c.safetensors").read_bytes() == good
    leftovers = [p for p in tmp_path.rglob("*") if p.is_file() and p.name != "c.safetensors"]
    assert leftovers == []
    assert Concept.load(tmp_path / "c.safetensors").train_steps == 2


class Recorder(TrainingCallback):
    def __init__(self):
        self.steps, self.previews, self.checkpoints = [], [], []

    def on_step(self, info):
        self.steps.append(info)

    def on_preview(self, info):
        self.previews.append(info)

    def on_checkpoint(self, info):
        self.checkpoints.append(info)


def test_callbacks_fire_with_documented_values_including_a_step_zero_preview(tiny_pipe, images, tmp_path):
    cfg = quick(steps=4, grad_accum=2, checkpoint_every=2, keep_checkpoints=1)
    previews = PreviewConfig(every=2, prompts=("a photo of a {}", "a sketch of a {}"), seeds=(5, 6), steps=2)
    rec = Recorder()
    trainer = Trainer(tiny_pipe, images, "<thing>", "cat", cfg, callbacks=[rec, Previews("<thing>", previews)])
    trainer.train(tmp_path / "c.safetensors")
    assert [s.step for s in rec.steps] == [1, 2, 3, 4]
    assert all(s.total_steps == 4 and math.isfinite(s.loss) and s.seconds_per_step > 0 for s in rec.steps)
    assert all(s.learning_rate == pytest.approx(1e-3 * 2 * 2) for s in rec.steps)  # scaled by batch x accum
    assert [p.step for p in rec.previews] == [0, 2, 4]
    assert all(len(p.images) == 4 and p.seeds == [5, 6, 5, 6] for p in rec.previews)
    assert rec.previews[0].prompts == ["a photo of a {}"] * 2 + ["a sketch of a {}"] * 2
    assert [c.step for c in rec.checkpoints] == [2, 4]  # the final step too: a finished run can be extended
    again = Recorder()  # a second run's step-0 preview (the run stops there) is the same image
    second = Trainer(tiny_pipe, images, "<thing>", "cat", cfg, callbacks=[Previews("<thing>", previews), again])
    again.on_preview = lambda info: (again.previews.append(info), second.cancel())
    second.train(tmp_path / "d.safetensors")
    assert np.array_equal(np.asarray(rec.previews[0].images[0]), np.asarray(again.previews[0].images[0]))


def test_a_checkpoint_is_itself_a_loadable_concept_and_old_ones_are_pruned(tiny_pipe, images, tmp_path):
    Trainer(tiny_pipe, images, "<thing>", "cat", quick(steps=7, checkpoint_every=2, keep_checkpoints=2)).train(
        tmp_path / "c.safetensors")
    files = sorted(p.name for p in (tmp_path / "c-checkpoints").iterdir())
    assert files == ["checkpoint-000006.safetensors", "checkpoint-000007.safetensors"]  # 7: the final step
    assert Concept.load(tmp_path / "c-checkpoints" / files[0]).train_steps == 6


@pytest.mark.parametrize("ablation, field, value", [
    ("no_positional_encoding", "use_positional_encoding", False), ("no_nested_dropout", "use_nested_dropout", False),
    ("no_bypass", "use_bypass", False), ("no_rescaling", "use_rescaling", False),
    ("time_only", "use_layer", False), ("space_only", "use_time", False),
])
def test_each_ablation_switches_its_part_of_the_mapper_off(tiny_pipe, images, ablation, field, value):
    trainer = Trainer(tiny_pipe, images, "<thing>", "cat", quick(ablations=(ablation,)))
    assert getattr(trainer.concept.config, field) is value


@pytest.mark.parametrize("token, message", [
    ("cat", "already in the tokenizer's vocabulary"), ("<my thing>", "one word without spaces"),
    ("", "one word without spaces"),
])
def test_bad_placeholder_tokens_are_refused(tiny_pipe, images, token, message):
    with pytest.raises(ValueError, match=message):
        Trainer(tiny_pipe, images, token, "cat", quick())


def test_a_super_category_that_is_not_one_token_shows_the_split(tiny_pipe, images):
    with pytest.raises(ValueError, match=r"splits it into \['ca', 'r</w>'\]"):
        Trainer(tiny_pipe, images, "<thing>", "car", quick())


def test_no_images_is_refused(tiny_pipe):
    with pytest.raises(ValueError, match="at least one image"):
        Trainer(tiny_pipe, [], "<thing>", "cat", quick())


@pytest.mark.parametrize("overrides, message", [
    (dict(steps=0), "steps must be a positive integer"), (dict(method="dreambooth"), "method 'dreambooth'"),
    (dict(ablations=("no_mapper",)), "unknown ablation"), (dict(method="ti", ablations=("no_bypass",)), "NeTI"),
    (dict(mixed_precision="fp8"), "mixed_precision"), (dict(learning_rate=-1.0), "learning_rate"),
    (dict(templates="poem"), "poem"), (dict(flip_p=1.5), "flip_p"), (dict(crop="zoom"), "crop 'zoom'"),
    (dict(resolution=0), "resolution"),
])
def test_bad_training_settings_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        quick(**overrides)


def test_fp16_mixed_precision_needs_cuda(tiny_pipe, images):
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        Trainer(tiny_pipe, images, "<thing>", "cat", quick(mixed_precision="fp16"))


def test_resuming_from_a_plain_concept_file_is_refused(tiny_pipe, images, tmp_path):
    trainer = Trainer(tiny_pipe, images, "<thing>", "cat", quick(steps=1))
    trainer.train(tmp_path / "c.safetensors")
    with pytest.raises(ValueError, match="not a training checkpoint"):
        Trainer(tiny_pipe, images, "<thing>", "cat", quick(steps=2)).train(tmp_path / "e.safetensors",
                                                                         resume=tmp_path / "c.safetensors")


def test_gradient_checkpointing_gives_the_same_weights_and_is_switched_off_afterwards(tiny_pipe, images, tmp_path):
    plain = Trainer(tiny_pipe, images, "<thing>", "cat", quick(steps=2)).train(tmp_path / "a.safetensors").concept
    checkpointed = Trainer(tiny_pipe, images, "<thing>", "cat", quick(steps=2, gradient_checkpointing=True))
    result = checkpointed.train(tmp_path / "b.safetensors").concept
    for (name, a), (_, b) in zip(plain.mapper.state_dict().items(), result.mapper.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), name
    assert not tiny_pipe.unet.is_gradient_checkpointing and not tiny_pipe.text_encoder.training


def test_trainers_with_different_mixed_precision_can_follow_each_other(tiny_pipe, images, tmp_path):
    Trainer(tiny_pipe, images, "<thing>", "cat", quick(steps=1)).train(tmp_path / "a.safetensors")
    result = Trainer(tiny_pipe, images, "<thing>", "cat", quick(steps=1, mixed_precision="bf16")).train(
        tmp_path / "b.safetensors")
    assert result.steps_done == 1 and math.isfinite(result.losses[0])


def test_images_with_captions_train_on_their_captions_and_the_choice_is_saved(tiny_pipe, images, tmp_path):
    from PIL.PngImagePlugin import PngInfo

    from neti.data import LoadedImage, read_caption
    from neti.studio import check_uploads

    paths = []
    for i, image in enumerate(images):
        info = PngInfo()
        info.add_text("caption", f"a {{}} on a background number {i}")
        image.save(tmp_path / f"{i}.png", pnginfo=info)
        paths.append(tmp_path / f"{i}.png")
    check = check_uploads(paths)  # what the app's uploads go through: the caption travels inside the PNG
    assert [x.caption for x in check.images] == [read_caption(p) for p in paths]
    assert all(isinstance(x, LoadedImage) for x in check.images)
    trainer = Trainer(tiny_pipe, check.images, "<thing>", "cat", quick(batch_size=4))
    for step in range(3):
        for prompt in trainer.make_batch(step).prompts:
            assert prompt.startswith("a <thing> on a background number "), prompt
    ignoring = Trainer(tiny_pipe, check.images, "<thing>", "cat", quick(batch_size=4, use_captions=False))
    assert all("background number" not in p for s in range(3) for p in ignoring.make_batch(s).prompts)
    (tmp_path / "1.txt").write_text("no placeholder here")
    check = check_uploads(paths)
    assert len(check.images) == 2 and check.rejected[0][0] == "1.png" and "exactly one '{}'" in check.rejected[0][1]
    assert TrainConfig.from_json(quick(use_captions=False).to_json()).use_captions is False  # saved in checkpoints


# ---- issue 13: divergence, 0-step runs, extending finished runs -------------------------------------------------

def _nan_from(trainer, monkeypatch, micro_step):
    real = trainer.loss

    def loss(batch, conditions=None):
        value = real(batch, conditions)
        return value * float("nan") if trainer.step * trainer.config.grad_accum >= micro_step else value

    monkeypatch.setattr(trainer, "loss", loss)


def test_divergence_keeps_the_last_finite_checkpoint_as_the_concept(tiny_pipe, images, tmp_path, monkeypatch):
    from neti.train import TrainingDiverged

    trainer = Trainer(tiny_pipe, images, "<thing>", "cat", quick(steps=10, checkpoint_every=2))
    _nan_from(trainer, monkeypatch, 5)  # step 6 diverges; the checkpoint of step 4 is the last finite one
    with pytest.raises(TrainingDiverged, match=r"the loss became nan at step 6; the concept is kept at step 4"):
        trainer.train(tmp_path / "c.safetensors")
    concept = Concept.load(tmp_path / "c.safetensors")
    kept = Concept.load(tmp_path / "c-checkpoints" / "checkpoint-000004.safetensors")
    assert concept.train_steps == 4
    for (name, a), (_, b) in zip(concept.mapper.state_dict().items(), kept.mapper.state_dict().items()):
        assert torch.equal(a, b), name
    assert sorted(p.name for p in (tmp_path / "c-checkpoints").iterdir()) == [
        "checkpoint-000002.safetensors", "checkpoint-000004.safetensors"]


def test_divergence_without_a_checkpoint_writes_nothing_and_nan_weights_are_never_saved(tiny_pipe, images, tmp_path):
    from neti.train import TrainingDiverged

    trainer = Trainer(tiny_pipe, images, "<thing>", "cat", quick(steps=3, learning_rate=1e6))
    with pytest.raises(TrainingDiverged, match="nothing was saved .* Lower the learning rate"):
        trainer.train(tmp_path / "c.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_a_run_stopped_before_its_first_step_saves_no_concept(tiny_pipe, images, tmp_path):
    rec = Recorder()
    trainer = Trainer(tiny_pipe, images, "<thing>", "cat", quick(),
                      callbacks=[rec, Previews("<thing>", PreviewConfig(every=1, steps=1))])
    trainer.cancel()  # e.g. Stop pressed while the app was still setting up
    result = trainer.train(tmp_path / "c.safetensors")
    assert result.cancelled and result.steps_done == 0 and not result.saved
    assert rec.previews == [] and list(tmp_path.iterdir()) == []


def test_a_preview_prompt_without_the_concept_is_refused_at_set_up():
    with pytest.raises(ValueError, match=r"'a photo of a cat' does not contain the concept's token '<thing>'"):
        Previews("<thing>", PreviewConfig(every=1, prompts=("a photo of a cat",)))


@pytest.mark.parametrize("resume_from", ["concept", "checkpoints"])
def test_a_finished_run_extends_exactly_from_its_concept_or_its_checkpoints(tiny_pipe, images, tmp_path, resume_from):
    """2 steps, finished, then extended to 3 equals 3 steps straight (to 1e-6 on the CPU)."""
    straight = Trainer(tiny_pipe, images, "<thing>", "cat", quick(steps=3, checkpoint_every=5))
    straight = straight.train(tmp_path / "a.safetensors").concept
    Trainer(tiny_pipe, images, "<thing>", "cat", quick(steps=2, checkpoint_every=5)).train(tmp_path / "b.safetensors")
    assert Concept.load(tmp_path / "b.safetensors").train_steps == 2
    source = tmp_path / ("b.safetensors" if resume_from == "concept" else "b-checkpoints")
    extended = Trainer(tiny_pipe, images, "<thing>", "cat", quick(steps=3, checkpoint_every=5))
    result = extended.train(tmp_path / "b.safetensors", resume=source)
    assert result.steps_done == 3 and Concept.load(tmp_path / "b.safetensors").train_steps == 3
    for (name, a), (_, b) in zip(straight.mapper.state_dict().items(), result.concept.mapper.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), name
    with pytest.raises(ValueError, match="checkpoint-000003.safetensors' is already at step 3 and steps is 3"):
        Trainer(tiny_pipe, images, "<thing>", "cat", quick(steps=3)).train(tmp_path / "b.safetensors", resume=source)
