"""Base models load through diffusers' `from_pretrained`, whatever their width; failures name the way out."""

from __future__ import annotations

import pytest
import torch

from neti.generate import Generator
from neti.models import BUNDLED_MODEL, default_dtype, load_pipeline, resolve_device


def test_a_local_folder_loads_with_token_width_and_layers_read_from_the_model(tiny_model_dir):
    pipe = load_pipeline(tiny_model_dir, device="cpu")
    gen = Generator(pipe, str(tiny_model_dir))
    assert gen.token_dim == 32 and gen.num_layers == 16
    assert pipe.unet.dtype == torch.float32 and pipe.device.type == "cpu"


def test_a_folder_that_is_not_a_diffusers_model_says_what_is_expected(tmp_path):
    with pytest.raises(ValueError, match="no model_index.json") as err:
        load_pipeline(tmp_path, device="cpu")
    assert str(BUNDLED_MODEL) in str(err.value)


def test_an_unreachable_hub_id_offline_names_the_alternatives(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="could not load base model 'runwayml/stable-diffusion-v1-5'") as err:
        load_pipeline("runwayml/stable-diffusion-v1-5", device="cpu")
    assert "local folder" in str(err.value) and "bundled" in str(err.value)


def test_devices_and_dtypes():
    assert resolve_device("auto").type in {"cpu", "cuda", "mps"}
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="device 'gpu0' is not understood"):
        resolve_device("gpu0")
    assert default_dtype(torch.device("cuda")) == torch.float16
    assert default_dtype(torch.device("cpu")) == torch.float32


@pytest.fixture(scope="module")
def sd2_like_dir(tmp_path_factory):
    """An SD-2.x-like tiny model: another token width (48) and a v-prediction scheduler."""
    from helpers import WORDS

    from neti.testing import tiny_model

    return tiny_model(tmp_path_factory.mktemp("sd2"), WORDS, prediction_type="v_prediction", text_width=48,
                      text_heads=4)


def test_another_width_and_v_prediction_train_against_the_velocity(sd2_like_dir):
    from PIL import Image

    from neti.train import TrainConfig, Trainer

    pipe = load_pipeline(sd2_like_dir, device="cpu")
    trainer = Trainer(pipe, [Image.new("RGB", (32, 32), "red")], "<thing>", "cat",
                      TrainConfig(steps=1, grad_accum=1, checkpoint_every=0))
    assert trainer.concept.config.token_dim == 48
    batch = trainer.make_batch(0)
    trainer.concept.eval()
    with torch.no_grad():
        latents = pipe.vae.encode(batch.pixel_values).latent_dist.mean * pipe.vae.config.scaling_factor
        velocity = trainer.noise_scheduler.get_velocity(latents, batch.noise, batch.timesteps)
        noisy = trainer.noise_scheduler.add_noise(latents, batch.noise, batch.timesteps)
        pred = pipe.unet(noisy, batch.timesteps, trainer.encoder_states(batch.prompts, batch.timesteps)).sample
        expected = torch.nn.functional.mse_loss(pred, velocity)
        assert float(trainer.loss(batch)) == pytest.approx(float(expected), rel=1e-6)
        assert float(expected) != pytest.approx(float(torch.nn.functional.mse_loss(pred, batch.noise)), rel=1e-3)


def test_model_label_is_portable_for_the_bundled_model(tmp_path):
    from neti.models import BUNDLED_MODEL, model_label

    assert model_label(BUNDLED_MODEL) == "assets/toy-sd"
    assert model_label(str(BUNDLED_MODEL / ".." / "toy-sd")) == "assets/toy-sd"
    assert model_label("runwayml/stable-diffusion-v1-5") == "runwayml/stable-diffusion-v1-5"
    assert model_label(tmp_path) == str(tmp_path.resolve())
    assert model_label(None) == ""


def test_trained_concepts_and_pngs_name_the_bundled_model_portably(tiny_pipe):
    from PIL import Image

    from neti.train import TrainConfig, Trainer

    trainer = Trainer(tiny_pipe, [Image.new("RGB", (32, 32), "red")], "<thing>", "cat", TrainConfig(steps=1),
                      str(BUNDLED_MODEL))
    assert trainer.concept.base_model == "assets/toy-sd"
    assert Generator(tiny_pipe, str(BUNDLED_MODEL)).model_name == "assets/toy-sd"


def test_openai_clip_tokenizer_from_a_bpe_file(tmp_path, monkeypatch):
    """Stable Diffusion's tokenizer is rebuilt from OpenAI's BPE file (CLIP's symbol order, merges, specials);
    without the file there is none. With the real file (open_clip_torch installed) it gives CLIP's own ids."""
    import gzip

    from neti.testing.tokenizer import openai_bpe_path, openai_clip_tokenizer

    monkeypatch.setenv("NETI_CLIP_BPE", str(tmp_path / "missing.txt.gz"))
    assert openai_bpe_path() is None and openai_clip_tokenizer(tmp_path / "none") is None
    bpe = tmp_path / "bpe.txt.gz"
    bpe.write_bytes(gzip.compress("\n".join(["#version: 0.2", "c a", "ca t</w>", "d o", "do g</w>"]).encode()))
    monkeypatch.setenv("NETI_CLIP_BPE", str(bpe))
    tokenizer = openai_clip_tokenizer(tmp_path / "tok")
    vocab = tokenizer.get_vocab()
    assert len(vocab) == 512 + 4 + 2 and vocab["!"] == 0 and vocab["!</w>"] == 256 and vocab["cat</w>"] == 513
    assert tokenizer("a cat").input_ids == [vocab["<|startoftext|>"], vocab["a</w>"], vocab["cat</w>"],
                                             vocab["<|endoftext|>"]]
    monkeypatch.delenv("NETI_CLIP_BPE")
    if openai_bpe_path() is None:
        pytest.skip("open_clip_torch is not installed: the real-vocabulary check needs its BPE file")
    assert openai_clip_tokenizer(tmp_path / "real")("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368,
                                                                                       49407]
