"""Specification of neti.concept: concept files, the truncated export, official-checkpoint import and the plain
textual-inversion export (docs/method.md "The mapper", "Official checkpoint format"; paper Sec. 3, App. B).

The official fixture (conftest.py, helpers.write_official_checkpoint) is built from the format description
alone: a stand-in `models.positional_encoding` module exists only while the checkpoint is pickled, so no official
code is importable when it is read back.
"""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from helpers import make_concept
from safetensors.torch import load_file, save_file

from neti.concept import Concept, default_inference_timesteps, export_textual_inversion, file_info, import_official
from neti.config import MapperConfig

D, L = 768, 16
MB = 1_000_000


def sd_concept(bypass=True, seed=0, **overrides) -> Concept:
    cfg = MapperConfig(token_dim=D, num_layers=L, target_norm=0.39, use_bypass=bypass, seed=seed, **overrides)
    return Concept("<cat>", "cat", cfg, [f"layer{i}" for i in range(L)], "CompVis/stable-diffusion-v1-4", 500).eval()


def tl_grid(timesteps=(999.0, 613.0, 250.0, 0.0)):
    t, l = torch.meshgrid(torch.tensor(timesteps), torch.arange(L, dtype=torch.float32), indexing="ij")
    return t.reshape(-1), l.reshape(-1)


def outputs(concept, truncation=None):
    with torch.no_grad():
        out = concept(*tl_grid(), truncation)
    return torch.cat([out.base, out.bypass], -1) if out.bypass is not None else out.base


# ---- save and load -------------------------------------------------------------------------------------------

def test_save_then_load_is_exact(tmp_path):
    concept = sd_concept()
    with torch.no_grad():
        for p in concept.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # as if trained
    path = concept.save(tmp_path / "cat.safetensors")
    loaded = Concept.load(path).eval()
    original, restored = concept.mapper.state_dict(), loaded.mapper.state_dict()
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[k], restored[k]) for k in original)
    assert loaded.metadata() == concept.metadata()
    assert loaded.config == concept.config
    assert (loaded.token, loaded.super_category, loaded.train_steps) == ("<cat>", "cat", 500)
    assert torch.equal(outputs(loaded), outputs(concept))
    assert torch.equal(outputs(loaded, 16), outputs(concept, 16))


def test_file_carries_format_method_token_norm_width_layers_and_config(tmp_path):
    path = sd_concept().save(tmp_path / "cat.safetensors")
    info = file_info(path)
    assert info["format"] == "neti-studio-concept" and info["format_version"] == "1"
    assert (info["method"], info["token"], info["super_category"]) == ("neti", "<cat>", "cat")
    assert (json.loads(info["target_norm"]), info["token_dim"], info["num_layers"]) == (0.39, "768", "16")
    assert json.loads(info["layer_names"])[:2] == ["layer0", "layer1"]
    assert info["num_parameters"] == "563616"
    assert info["config"]["sigma_t"] == 0.03 and info["config"]["kept_units"] == 128
    assert info["file_size_bytes"] == os.path.getsize(path)
    assert "mapper.encoding.frequencies" in load_file(path)  # the frequencies travel with the weights


def test_fp32_file_with_bypass_is_at_most_2_3_mb_and_fp16_about_half(tmp_path):
    concept = sd_concept(bypass=True)
    fp32 = os.path.getsize(concept.save(tmp_path / "fp32.safetensors"))
    fp16 = os.path.getsize(concept.save(tmp_path / "fp16.safetensors", dtype=torch.float16))
    assert 563_616 * 4 < fp32 <= 2.3 * MB  # parameters + 8 kB of frequencies + metadata
    assert 0.45 <= fp16 / fp32 <= 0.55
    no_bypass = os.path.getsize(sd_concept(bypass=False).save(tmp_path / "nb.safetensors"))
    assert no_bypass <= 1.9 * MB  # the paper's 1.86 MB


def test_a_loaded_concept_is_ready_for_inference_in_eval_mode(tmp_path):
    # a concept file is an inference artefact: calling a freshly loaded concept must not apply the training-time
    # nested dropout (k ~ U{0..127} on half of the layers), or "load, then call" gives random outputs
    concept = sd_concept()
    loaded = Concept.load(concept.save(tmp_path / "cat.safetensors"))
    assert not loaded.training
    assert not concept.truncated(32).training
    assert torch.equal(outputs(loaded), outputs(concept))


def test_fp16_file_loads_as_an_fp32_concept_close_to_the_original(tmp_path):
    concept = sd_concept()
    loaded = Concept.load(concept.save(tmp_path / "half.safetensors", dtype=torch.float16)).eval()
    assert all(v.dtype == torch.float32 for v in loaded.mapper.state_dict().values())
    error = (outputs(loaded) - outputs(concept)).norm(dim=-1) / outputs(concept).norm(dim=-1)
    assert error.max().item() < 0.01  # measured 0.26 %, most of it from the fp16 frequencies


def test_a_concept_file_rebuilds_xti_and_ti(tmp_path, tiny_pipe):
    for method in ("xti", "ti"):
        concept = make_concept(tiny_pipe, "<x>", method=method)
        loaded = Concept.load(concept.save(tmp_path / f"{method}.safetensors"))
        assert loaded.method == method
        assert torch.equal(loaded.mapper.vectors, concept.mapper.vectors)


# ---- truncated export (App. B) -------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [32, 8])
def test_truncated_concept_equals_the_full_one_at_truncation_k_and_is_smaller(tmp_path, k):
    concept = sd_concept()
    small = concept.truncated(k).eval()
    assert small.config.kept_units == k
    assert concept.num_parameters - small.num_parameters == (128 - k) * 2 * D
    torch.testing.assert_close(outputs(small), outputs(concept, truncation=k), atol=1e-6, rtol=0)
    reloaded = Concept.load(small.save(tmp_path / "small.safetensors")).eval()
    assert torch.equal(outputs(reloaded), outputs(small))
    assert os.path.getsize(tmp_path / "small.safetensors") < os.path.getsize(concept.save(tmp_path / "full.safetensors"))


def test_truncated_without_bypass_keeps_32_units_in_390816_parameters():
    assert sd_concept(bypass=False).truncated(32).num_parameters == 390_816


def test_truncation_beyond_kept_units_is_an_error():
    with pytest.raises(ValueError, match="keep_units must be in 1..32, got 64"):
        sd_concept().truncated(32).truncated(64)


# ---- bad files -----------------------------------------------------------------------------------------------

def test_a_cut_file_is_a_clear_error(tmp_path):
    path = sd_concept(bypass=False).save(tmp_path / "cat.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"is not a readable concept file.*truncated or not a safetensors file"):
        Concept.load(path)


def test_a_non_safetensors_file_is_a_clear_error(tmp_path):
    path = tmp_path / "cat.safetensors"
    torch.save({"a": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match="is not a readable concept file"):
        Concept.load(path)
    (tmp_path / "text.safetensors").write_text("hello")
    with pytest.raises(ValueError, match="is not a readable concept file"):
        Concept.load(tmp_path / "text.safetensors")


def test_a_safetensors_file_without_our_metadata_is_a_clear_error(tmp_path):
    save_file({"<cat>": torch.zeros(768)}, tmp_path / "ti.safetensors")
    with pytest.raises(ValueError, match="is a safetensors file but not a NeTI Studio concept"):
        Concept.load(tmp_path / "ti.safetensors")


def test_a_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Concept.load(tmp_path / "nope.safetensors")


def test_a_newer_format_version_is_refused(tmp_path):
    concept = sd_concept(bypass=False)
    tensors = {f"mapper.{k}": v.contiguous() for k, v in concept.mapper.state_dict().items()}
    save_file(tensors, tmp_path / "new.safetensors", metadata={**concept.metadata(), "format_version": "2"})
    with pytest.raises(ValueError, match="format version 2, newer than this NeTI Studio reads"):
        Concept.load(tmp_path / "new.safetensors")


def test_loading_never_unpickles(tmp_path, monkeypatch):
    path = sd_concept().save(tmp_path / "cat.safetensors")

    def refuse(*args, **kwargs):
        raise AssertionError("a concept file must load without pickle")

    for module, name in (pickle, "loads"), (pickle, "load"), (pickle, "Unpickler"), (torch, "load"):
        monkeypatch.setattr(module, name, refuse)
    concept = Concept.load(path)
    assert concept.token == "<cat>"


# ---- official checkpoint import ------------------------------------------------------------------------------

def test_official_checkpoint_import_reproduces_the_official_mapper(official_checkpoint):
    mapper_path, embeds_path, ref = official_checkpoint
    concept = import_official(mapper_path, embeds_path).eval()
    assert (concept.token, concept.super_category, concept.train_steps) == ("<x>", "cat", 500)
    assert concept.base_model == "CompVis/stable-diffusion-v1-4"
    assert (concept.config.token_dim, concept.config.num_layers, concept.config.has_bypass) == (D, L, True)
    assert concept.num_parameters == 563_616
    assert torch.equal(concept.mapper.encoding.frequencies, ref.encoder.w)
    generator = torch.Generator().manual_seed(5)
    t = torch.randint(0, 1000, (64,), generator=generator).float()
    l = torch.randint(0, L, (64,), generator=generator).float()
    for k in (None, 1, 16, 100):
        with torch.no_grad():
            expected = ref(t, l, k)
            out = concept(t, l, k)
        torch.testing.assert_close(out.base, expected[:, :D], atol=1e-5, rtol=0)
        torch.testing.assert_close(out.bypass, expected[:, D:], atol=1e-5, rtol=0)


def test_imported_concept_saves_and_loads_as_a_concept_file(official_checkpoint, tmp_path):
    mapper_path, embeds_path, ref = official_checkpoint
    concept = import_official(mapper_path, embeds_path)
    loaded = Concept.load(concept.save(tmp_path / "x.safetensors")).eval()
    t, l = tl_grid()
    with torch.no_grad():
        expected = ref(t, l)
    torch.testing.assert_close(outputs(loaded), expected, atol=1e-5, rtol=0)


def test_official_import_refuses_a_pickle_that_would_run_code(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path = tmp_path / "mapper-steps-10.pt"
    torch.save({"state_dict": {}, "cfg": {}, "encoder": Exploit()}, path)
    with pytest.raises(ValueError, match="is not an official NeTI mapper checkpoint that loads safely"):
        import_official(path)
    assert not marker.exists()


def test_official_import_of_something_else_is_a_clear_error(tmp_path):
    path = tmp_path / "mapper-steps-10.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="has no 'state_dict' and 'cfg'"):
        import_official(path)
    with pytest.raises(FileNotFoundError):
        import_official(tmp_path / "missing.pt")


# ---- textual-inversion export --------------------------------------------------------------------------------

def test_default_inference_timesteps_are_dpm_solvers_50_linspace_steps():
    ts = default_inference_timesteps()
    assert len(ts) == 50 and ts[:3] == [999.0, 979.0, 959.0] and ts[-1] == 20.0


def test_textual_inversion_export_is_the_mean_v_base_over_inference_timesteps_and_layers(tmp_path):
    concept = sd_concept()
    path = export_textual_inversion(concept, tmp_path / "cat-ti.safetensors")
    exported = load_file(path)
    assert list(exported) == ["<cat>"] and exported["<cat>"].shape == (D,)
    t, l = torch.meshgrid(torch.tensor(default_inference_timesteps()), torch.arange(L, dtype=torch.float32),
                          indexing="ij")
    with torch.no_grad():
        expected = concept(t.reshape(-1), l.reshape(-1)).base.reshape(50, L, D).mean(dim=(0, 1))
    torch.testing.assert_close(exported["<cat>"], expected, atol=1e-6, rtol=0)


def test_textual_inversion_export_loads_in_diffusers_and_its_token_works(tmp_path, tiny_model_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    concept = make_concept(pipe, "<thing>")
    path = export_textual_inversion(concept, tmp_path / "thing.safetensors")
    pipe.load_textual_inversion(str(path))
    token_id = pipe.tokenizer.convert_tokens_to_ids("<thing>")
    assert pipe.tokenizer.tokenize("a photo of <thing>")[-1] == "<thing>"
    torch.testing.assert_close(pipe.text_encoder.get_input_embeddings().weight[token_id].detach(),
                               load_file(path)["<thing>"], atol=0, rtol=0)
    image = pipe("a photo of <thing>", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                 output_type="np").images[0]
    assert image.shape == (32, 32, 3)


def test_saved_files_get_the_usual_permissions_not_owner_only(tmp_path):
    import os

    from neti.concept import _UMASK

    path = Concept("<p>", "cat", MapperConfig(method="ti", token_dim=8, num_layers=2)).save(tmp_path / "p.safetensors")
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~_UMASK
