"""SDXL (docs/sdxl.md): a tiny SDXL-shaped random pipeline (two text encoders, 70 cross-attention layers, built as
diffusers' own SDXL tests build theirs) loaded through `load_pipeline`. Without a concept our images equal
`StableDiffusionXLPipeline`'s bit for bit; with one they equal an independent reference that encodes every
(t, l) pair on its own through transformers' public API (the placeholder added to a copy of each tokenizer and
encoder) and feeds each layer's keys and values by hand. Training: test_sdxl_train.py; fixtures: conftest.py."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from helpers import make_concept

from neti.config import SCHEDULERS, Sampling

TOKEN = "<thing>"


def diffusers_xl(model_dir, prompt, scheduler, steps, guidance, seed=0, negative_prompt=None):
    import diffusers

    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(model_dir)
    ref.scheduler = getattr(diffusers, SCHEDULERS[scheduler]).from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    return ref(prompt, num_inference_steps=steps, guidance_scale=guidance, output_type="np",
               negative_prompt=negative_prompt, generator=[torch.Generator().manual_seed(seed)]).images[0]


# ---- loading and layers ----------------------------------------------------------------------------------------

def test_load_pipeline_reads_an_sdxl_folder_as_stable_diffusion_xl(loaded_xl_pipe):
    assert type(loaded_xl_pipe).__name__ == "StableDiffusionXLPipeline"
    assert loaded_xl_pipe.text_encoder.config.hidden_size == 16 and loaded_xl_pipe.text_encoder_2.config.hidden_size == 32


def test_other_pipeline_classes_are_refused_by_name(tmp_path):
    from neti.models import load_pipeline

    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionXLImg2ImgPipeline"}')
    with pytest.raises(ValueError, match="is a StableDiffusionXLImg2ImgPipeline; NeTI Studio runs "
                                         "StableDiffusionPipeline and StableDiffusionXLPipeline"):
        load_pipeline(tmp_path, device="cpu")


def test_sdxl_has_70_cross_attention_layers_named_by_ldm_block_and_stack_position(loaded_xl_pipe):
    from neti.layers import cross_attention_layers

    layers = cross_attention_layers(loaded_xl_pipe.unet)
    names = [x.name for x in layers]
    assert len(layers) == 70 and len(set(names)) == 70
    assert names[:5] == ["IN04.0", "IN04.1", "IN05.0", "IN05.1", "IN07.0"]
    assert names[24] == "MID.0" and names[33] == "MID.9" and names[34] == "OUT00.0" and names[-1] == "OUT05.1"
    called = []
    modules = dict(loaded_xl_pipe.unet.named_modules())
    hooks = [modules[x.path].register_forward_pre_hook(lambda m, a, n=x.name: called.append(n)) for x in layers]
    unet = loaded_xl_pipe.unet
    with torch.no_grad():
        unet(torch.randn(1, 4, 16, 16), 10, torch.randn(1, 77, 48),
             added_cond_kwargs={"text_embeds": torch.randn(1, 32), "time_ids": torch.randn(1, 6)})
    for h in hooks:
        h.remove()
    assert called == names  # forward order


def test_a_concept_for_sdxl_covers_both_widths_70_layers_and_the_pooled_layer(xl_pipe):
    concept = make_concept(xl_pipe, TOKEN)
    cfg = concept.config
    assert (cfg.token_dim, cfg.token_widths, cfg.num_layers, cfg.pooled_layer) == (48, (16, 32), 70, True)
    assert concept.mapper.input_layer.out_features == 10 * 71
    out = concept(torch.tensor([500.0]), torch.tensor([3.0]))
    assert out.base.shape == (1, 48) and out.bypass.shape == (1, 48)
    for part, norm, start, width in zip((0, 1), cfg.target_norms, (0, 16), (16, 32)):
        share = torch.cat([out.base[0, start:start + width], out.bypass[0, start:start + width]])
        assert share.norm().item() == pytest.approx(norm, rel=1e-5)  # each encoder's share at its own e_super norm


def test_a_full_size_sdxl_concept_has_2_091_206_parameters_most_in_the_anchor_projection():
    from dataclasses import replace

    from neti.config import MapperConfig
    from neti.mapper import NetiMapper, count_parameters

    with torch.device("meta"):  # sizes only, nothing allocated
        config = MapperConfig(token_dim=2048, token_widths=(768, 1280), num_layers=70, pooled_layer=True,
                              target_norms=(0.4, 0.5), target_norm=0.64)
        mapper = NetiMapper(config)
        assert count_parameters(mapper) == 2_091_206
        assert count_parameters(mapper.input_layer) == 2048 * 710 + 710  # 10 time anchors x (70 + 1) positions
        assert count_parameters(NetiMapper(replace(config, use_bypass=False))) == 2_091_206 - 128 * 2048 - 2048


# ---- generation equals diffusers -------------------------------------------------------------------------------

@pytest.mark.parametrize("scheduler", ["euler", "dpm", "ddim"])
@pytest.mark.parametrize("guidance", [1.0, 7.5])
def test_prompt_without_concept_equals_stable_diffusion_xl_pipeline_bit_for_bit(xl_generator, xl_model_dir,
                                                                                scheduler, guidance):
    sampling = Sampling(steps=3, guidance=guidance, scheduler=scheduler)
    ours = xl_generator.generate("a photo of a cat", seeds=[0], sampling=sampling, output_type="np").images[0]
    assert np.array_equal(ours, diffusers_xl(xl_model_dir, "a photo of a cat", scheduler, 3, guidance))


def test_a_written_negative_prompt_equals_the_pipelines_on_both_encoders(xl_generator, xl_model_dir):
    sampling = Sampling(steps=2, guidance=7.5, scheduler="euler", negative_prompt="a red dog")
    ours = xl_generator.generate("a photo of a cat", seeds=[0], sampling=sampling, output_type="np").images[0]
    expected = diffusers_xl(xl_model_dir, "a photo of a cat", "euler", 2, 7.5, negative_prompt="a red dog")
    assert np.array_equal(ours, expected)
    assert not np.array_equal(ours, diffusers_xl(xl_model_dir, "a photo of a cat", "euler", 2, 7.5))


def test_encoders_whose_placeholders_sit_at_different_positions_keep_exact_values():
    from neti.conditioning import Encoding
    from neti.conditioning_xl import _join

    joined_keys = torch.randn(3, 6, 6)  # each encoder's keys are views of it, as `encode_rows` writes them
    keys = [joined_keys[..., :2], joined_keys[..., 2:]]
    a = Encoding(keys[0], torch.randn(3, 1, 2), torch.tensor([[2], [2], [3]]))
    b = Encoding(keys[1], torch.randn(3, 1, 4), torch.tensor([[2], [4], [3]]))
    joined = _join([a, b], joined_keys)
    assert torch.equal(joined.keys, torch.cat(keys, -1))
    assert torch.equal(joined.values, torch.cat([a.values, b.values], -1))
    same = _join([a, Encoding(keys[1], torch.randn(3, 1, 4), a.positions)], joined_keys)
    assert same.bypassed.shape == (3, 1, 6)  # shared positions stay compact


def reference_rows(pipe, concept, prompt, t, layers, alpha):
    """Per (t, l) on its own, through transformers' public API: the placeholder added to copies of both tokenizers
    and encoders with its embedding row set to that encoder's share of v_base(t, l); the penultimate hidden state,
    plus alpha * v_pass / |v_pass| * |h| at the placeholder. Returns keys, values (L, S, 48) and pooled (P,)."""
    widths, keys, values = (16, 32), [], []
    out = concept(torch.full((len(layers) + 1,), float(t)), torch.arange(len(layers) + 1).float())
    pairs = ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2))
    pooled = None
    for i, (tokenizer, encoder) in enumerate(pairs):
        tok, enc = copy.deepcopy(tokenizer), copy.deepcopy(encoder)
        tok.add_tokens([TOKEN])
        enc.resize_token_embeddings(len(tok))
        new_id = tok.convert_tokens_to_ids(TOKEN)
        ids = tok(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        where = int((ids[0] == new_id).nonzero())
        start = sum(widths[:i])
        k_rows, v_rows = [], []
        for l in range(len(layers) + 1):
            enc.get_input_embeddings().weight.data[new_id] = out.base[l, start:start + widths[i]]
            result = enc(ids, output_hidden_states=True)
            if l == len(layers):  # the virtual pooled layer
                if i == 1:
                    pooled = result.text_embeds[0]
                continue
            h = result.hidden_states[-2][0]
            v = h.clone()
            v_pass = out.bypass[l, start:start + widths[i]]
            v[where] = h[where] + alpha * v_pass / v_pass.norm() * h[where].norm()
            k_rows.append(h), v_rows.append(v)
        keys.append(torch.stack(k_rows)), values.append(torch.stack(v_rows))
    return torch.cat(keys, -1), torch.cat(values, -1), pooled


@torch.no_grad()
def test_batched_encodings_equal_a_per_pair_reference_through_transformers(xl_pipe, xl_generator):
    concept = make_concept(xl_pipe, TOKEN)
    grid = xl_generator.encode(f"a photo of a {TOKEN}", [concept], [999.0, 500.0], None, 0.2)
    for step, t in enumerate((999.0, 500.0)):
        keys, values, pooled = reference_rows(xl_pipe, concept, f"a photo of a {TOKEN}", t,
                                              xl_generator.layers, 0.2)
        enc = grid.step(step)
        torch.testing.assert_close(enc.keys, keys, atol=1e-5, rtol=0)
        torch.testing.assert_close(enc.values, values, atol=1e-5, rtol=0)
        torch.testing.assert_close(grid.pooled_step(step), pooled, atol=1e-5, rtol=0)
    assert not torch.equal(grid.step(0).keys[0], grid.step(0).keys[40])  # layers differ
    assert not torch.equal(grid.pooled_step(0), grid.pooled_step(1))  # the pooled embedding follows t


@torch.no_grad()
def test_images_with_a_concept_equal_a_reference_that_feeds_every_layer_by_hand(xl_pipe, xl_generator, xl_model_dir):
    import diffusers

    concept = make_concept(xl_pipe, TOKEN)
    prompt, sampling = f"a photo of a {TOKEN}", Sampling(steps=2, guidance=7.5, scheduler="euler")
    ours = xl_generator.generate(prompt, [concept], seeds=[0], sampling=sampling, output_type="np").images[0]

    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(xl_model_dir)
    ref.set_progress_bar_config(disable=True)
    timesteps = xl_generator.timesteps(sampling)
    rows = [reference_rows(xl_pipe, concept, prompt, t, xl_generator.layers, 0.2) for t in timesteps]
    state = {"step": 0}
    modules = dict(ref.unet.named_modules())
    hooks = []
    for layer in xl_generator.layers:  # to_k reads layer l's keys, to_v its values; the negative half stays zero
        attn = modules[layer.path]
        for proj, part in ((attn.to_k, 0), (attn.to_v, 1)):
            def feed(module, args, l=layer.index, part=part):
                cond = rows[state["step"]][part][l][None]
                return (torch.cat([torch.zeros_like(cond), cond]),)
            hooks.append(proj.register_forward_pre_hook(feed))

    def next_step(pipeline, i, t, kwargs):
        state["step"] = min(i + 1, len(timesteps) - 1)
        return {"add_text_embeds": torch.stack([torch.zeros_like(rows[0][2]), rows[state["step"]][2]])}

    expected = ref(prompt_embeds=torch.zeros(1, 77, 48), pooled_prompt_embeds=rows[0][2][None], num_inference_steps=2,
                   guidance_scale=7.5, output_type="np", generator=[torch.Generator().manual_seed(0)],
                   callback_on_step_end=next_step, callback_on_step_end_tensor_inputs=["add_text_embeds"]).images[0]
    assert np.abs(ours - expected).max() < 1e-5
    plain = xl_generator.generate("a photo of a cat", seeds=[0], sampling=sampling, output_type="np").images[0]
    assert np.abs(ours - plain).max() > 1e-3  # the concept is visible


# ---- concept files ---------------------------------------------------------------------------------------------

def test_an_sdxl_concept_file_records_both_widths_and_70_layers_and_round_trips(xl_pipe, tmp_path):
    from neti.concept import Concept, file_info

    concept = make_concept(xl_pipe, TOKEN)
    path = concept.save(tmp_path / "thing.safetensors")
    info = file_info(path)
    assert (info["token_dim"], info["token_widths"], info["num_layers"]) == ("48", "[16, 32]", "70")
    assert len(eval(info["layer_names"])) == 70
    loaded = Concept.load(path)
    assert loaded.config == concept.config
    t, l = torch.tensor([999.0, 10.0, 10.0]), torch.tensor([0.0, 69.0, 70.0])
    with torch.no_grad():
        assert torch.equal(loaded(t, l).base, concept(t, l).base)
        assert torch.equal(loaded(t, l).bypass, concept(t, l).bypass)


def test_an_sd1_concept_is_refused_on_sdxl_and_an_sdxl_concept_on_sd1_naming_the_model(xl_pipe, xl_generator,
                                                                                       tiny_pipe):
    from neti.generate import Generator

    sd1_concept = make_concept(tiny_pipe, TOKEN)
    sd1_concept.base_model = "tiny-sd15"
    with pytest.raises(ValueError, match=r"token width 32 and 16 cross-attention layers \(tiny-sd15\).*width 16 \+ 32 "
                                         r"and 70 layers"):
        xl_generator.generate(f"a photo of a {TOKEN}", [sd1_concept], sampling=Sampling(steps=1))
    xl_concept = make_concept(xl_pipe, TOKEN)
    xl_concept.base_model = "tiny-sdxl"
    with pytest.raises(ValueError, match=r"token width 16 \+ 32 and 70 cross-attention layers \(tiny-sdxl\).*width 32 "
                                         r"and 16 layers"):
        Generator(tiny_pipe, "tiny").generate(f"a photo of a {TOKEN}", [xl_concept], sampling=Sampling(steps=1))


def test_export_writes_clip_l_and_clip_g_that_diffusers_loads_into_both_encoders(xl_pipe, tmp_path):
    from safetensors.torch import load_file

    from neti.concept import default_inference_timesteps, export_textual_inversion

    concept = make_concept(xl_pipe, TOKEN)
    path = export_textual_inversion(concept, tmp_path / "thing-sdxl.safetensors")
    state = load_file(str(path))
    assert sorted(state) == ["clip_g", "clip_l"] and state["clip_l"].shape == (1, 16) and state["clip_g"].shape == (1, 32)
    ts = torch.tensor(default_inference_timesteps()).repeat_interleave(70)
    with torch.no_grad():
        mean = concept(ts, torch.arange(70).float().repeat(50)).base.mean(0)
    torch.testing.assert_close(torch.cat([state["clip_l"][0], state["clip_g"][0]]), mean)
    pipe = copy.deepcopy(xl_pipe)
    pipe.load_textual_inversion(state["clip_l"], token=TOKEN, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state["clip_g"], token=TOKEN, text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    for tokenizer, encoder, key in ((pipe.tokenizer, pipe.text_encoder, "clip_l"),
                                    (pipe.tokenizer_2, pipe.text_encoder_2, "clip_g")):
        row = encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(TOKEN)]
        assert torch.equal(row, state[key][0])
    image = pipe(f"a photo of a {TOKEN}", num_inference_steps=1, output_type="np").images[0]
    assert np.isfinite(image).all()


# ---- controls: truncation, bypass strength, sweep, decomposition, style mixing --------------------------------

TWO_STEPS = Sampling(steps=2, scheduler="euler")


def np_images(result):
    return [np.asarray(image, dtype=np.int16) for image in result.images]


def test_truncation_bypass_strength_and_the_sweep_change_the_sdxl_image_as_on_sd1(xl_pipe, xl_generator):
    concept = make_concept(xl_pipe, TOKEN)
    prompt = f"a photo of a {TOKEN}"
    full = np_images(xl_generator.generate(prompt, [concept], [0], TWO_STEPS))[0]
    assert np.array_equal(np_images(xl_generator.generate(prompt, [concept], [0], TWO_STEPS, truncation=128))[0], full)
    no_bypass = np_images(xl_generator.generate(prompt, [concept], [0], TWO_STEPS, alpha=0.0))[0]
    assert np.abs(no_bypass - full).max() > 0
    with torch.no_grad():  # alpha 0: the values are the keys
        grid = xl_generator.encode(prompt, [concept], [999.0], None, 0.0)
        assert torch.equal(grid.step(0).keys, grid.step(0).values)
    sweep = xl_generator.sweep(prompt, [concept], [0], [4, None], TWO_STEPS)
    coarse, same = np_images(sweep)
    assert np.abs(same - full).max() <= 1 and np.abs(coarse - full).max() > 0


def test_decomposition_of_a_time_independent_concept_equals_plain_generation_on_sdxl(xl_pipe, xl_generator):
    xti = make_concept(xl_pipe, TOKEN, method="xti")
    out = xl_generator.decompose("a photo of {}", [xti], seed=0, fixed_timesteps=(300,), sampling=TWO_STEPS)
    plain = xl_generator.generate("a photo of {}", [xti], seeds=[0], sampling=TWO_STEPS)
    assert np.abs(np_images(out)[0] - np_images(plain)[0]).max() <= 1


def test_style_mixing_on_sdxl_uses_the_coarsest_blocks_as_geometry_and_switches_at_the_start(xl_pipe, xl_generator):
    from neti.layers import layer_groups, resolve_layer_names

    layers = xl_generator.layers
    geometry_idx = resolve_layer_names(layers, ["IN07", "IN08", "MID"])  # the default, by block on SDXL
    assert [layers[i].name for i in geometry_idx] == [f"{b}.{k}" for b in ("IN07", "IN08", "MID") for k in range(10)]
    assert layer_groups(layers) == ["IN04", "IN05", "IN07", "IN08", "MID", "OUT00", "OUT01", "OUT02", "OUT03",
                                    "OUT04", "OUT05"]
    geometry = make_concept(xl_pipe, "<geo>", seed=1)
    appearance = make_concept(xl_pipe, "<app>", "dog", seed=2)
    edge = xl_generator.mix("a photo of {}", geometry, appearance, seeds=[0], starts=[0, 1000], geometry_layers=[],
                            sampling=TWO_STEPS)  # start 0: the geometry concept everywhere (pooled too), 1000: never
    only_geo = np_images(xl_generator.generate("a photo of {}", [geometry], seeds=[0], sampling=TWO_STEPS))[0]
    only_app = np_images(xl_generator.generate("a photo of {}", [appearance], seeds=[0], sampling=TWO_STEPS))[0]
    first, second = np_images(edge)
    assert np.abs(first - only_geo).max() <= 1 and np.abs(second - only_app).max() <= 1
    mixed = np_images(xl_generator.mix("a photo of {}", geometry, appearance, seeds=[0], starts=[500],
                                       sampling=TWO_STEPS))[0]
    assert np.abs(mixed - only_geo).max() > 0 and np.abs(mixed - only_app).max() > 0


def test_every_ablation_builds_and_encodes_on_sdxl(xl_pipe, xl_generator):
    from neti.concept import Concept
    from neti.config import ABLATIONS
    from neti.train import TrainConfig

    for ablation in ABLATIONS:
        concept = Concept.for_pipeline(xl_pipe, TOKEN, "cat", TrainConfig(ablations=(ablation,)).mapper_config())
        with torch.no_grad():
            grid = xl_generator.encode(f"a photo of a {TOKEN}", [concept], [999.0, 10.0], None, 0.2)
        assert grid.keys.shape == (2, 70, 77, 48) and grid.pooled.shape[-1] == 32, ablation
        assert torch.isfinite(grid.keys).all() and torch.isfinite(grid.pooled).all(), ablation


def test_the_studio_switches_to_sdxl_and_flags_sd1_concepts_as_made_for_another_model(xl_model_dir, tmp_path):
    from neti.studio import Studio

    studio = Studio(None, concepts_dir=tmp_path / "concepts", device="cpu", output_dir=tmp_path / "out")
    shipped = studio.concept_statuses()
    assert shipped and all(s.problem == "" for s in shipped)
    studio.load_model(str(xl_model_dir))
    assert "token width 16 + 32, 70 cross-attention layers" in studio.model_description()
    assert all(s.problem == "made for another base model" for s in studio.concept_statuses())
