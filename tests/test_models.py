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
