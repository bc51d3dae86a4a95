"""Specification of neti.generate and neti.images: generation with P* concepts on diffusers' own pipeline
(docs/method.md "Text conditioning and the textual bypass", "Truncation sweeps, decomposition and style mixing";
paper Sec. 3.3-3.4, Fig. 11, 12, 20).

Every image here comes from the tiny SD-shaped model (32 px, 16 cross-attention layers) in 2 denoising steps
with guidance 7.5. The tiny model's scheduler config has 'leading' timestep spacing, so DPM-Solver's 2 steps visit
t = 667 and t = 334.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import make_concept
from PIL import Image

from neti.concept import Concept
from neti.config import MapperConfig
from neti.generate import SCHEDULERS, Sampling
from neti.images import make_grid, read_settings, save_png

TWO_STEPS = Sampling(steps=2, guidance=7.5)
PLAIN = "a photo of the cat on a beach"


def diffusers_images(model_dir, prompt, scheduler="dpm", steps=2, seed=0, guidance=7.5):
    """The reference: diffusers' StableDiffusionPipeline loaded from the same folder, nothing of ours involved."""
    import diffusers
    from diffusers import StableDiffusionPipeline

    config = diffusers.PNDMScheduler.load_config(model_dir, subfolder="scheduler")
    sched = getattr(diffusers, SCHEDULERS[scheduler]).from_config(config)
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, scheduler=sched, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt, num_inference_steps=steps, guidance_scale=guidance,
                generator=torch.Generator("cpu").manual_seed(seed), output_type="np").images


def pixels(image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


# ---- equivalence with diffusers ------------------------------------------------------------------------------

def test_prompt_without_concept_equals_diffusers_pipeline_with_dpm_solver(generator, tiny_model_dir):
    ours = generator.generate(PLAIN, [], seeds=[0], sampling=TWO_STEPS, output_type="np").images
    expected = diffusers_images(tiny_model_dir, PLAIN, "dpm")
    assert ours[0].shape == (32, 32, 3)
    assert max_diff(ours[0], expected[0]) <= 1e-4


@pytest.mark.parametrize("scheduler", ["euler_a", "lms"])
def test_prompt_without_concept_equals_diffusers_pipeline_with_other_schedulers(generator, tiny_model_dir, scheduler):
    # euler_a draws noise at every step: equality also shows the seed drives the same generator as diffusers'
    sampling = Sampling(steps=2, guidance=7.5, scheduler=scheduler)
    ours = generator.generate(PLAIN, [], seeds=[3], sampling=sampling, output_type="np").images
    assert max_diff(ours[0], diffusers_images(tiny_model_dir, PLAIN, scheduler, seed=3)[0]) <= 1e-4


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "pndm"])  # euler_a, lms, dpm: above and below
def test_every_sd_scheduler_generates_with_a_concept(generator, tiny_pipe, scheduler):
    concept = make_concept(tiny_pipe, "<thing>")
    out = generator.generate("a photo of {}", [concept], seeds=[0], output_type="np",
                             sampling=Sampling(steps=2, scheduler=scheduler))
    assert out.images[0].shape == (32, 32, 3) and np.isfinite(out.images[0]).all()
    assert out.settings[0]["scheduler"] == scheduler


def test_mapper_is_queried_at_the_schedulers_own_timesteps(generator, tiny_pipe, tiny_model_dir):
    import diffusers

    config = diffusers.PNDMScheduler.load_config(tiny_model_dir, subfolder="scheduler")
    expected = {}
    for name, steps in (("dpm", 2), ("ddim", 2)):
        scheduler = getattr(diffusers, SCHEDULERS[name]).from_config(config)
        scheduler.set_timesteps(steps)
        expected[name] = [float(t) for t in scheduler.timesteps]
    assert expected == {"dpm": [667.0, 334.0], "ddim": [501.0, 1.0]}
    assert generator.timesteps(TWO_STEPS) == expected["dpm"]
    seen = []
    encode_grid = generator.conditioner.encode_grid
    generator.conditioner.encode_grid = lambda prompt, concepts, timesteps, *a, **k: (
        seen.append((list(timesteps), sorted(concepts))) or encode_grid(prompt, concepts, timesteps, *a, **k))
    concept = make_concept(tiny_pipe, "<thing>")
    generator.generate("a photo of {}", [concept], seeds=[0], sampling=Sampling(steps=2, scheduler="ddim"))
    assert ([501.0, 1.0], ["<thing>"]) in seen


# ---- NeTI controls -------------------------------------------------------------------------------------------

def test_a_concept_changes_the_image(generator, tiny_pipe):
    concept = make_concept(tiny_pipe, "<thing>")
    with_concept = generator.generate("a photo of {}", [concept], seeds=[0], sampling=TWO_STEPS, output_type="np")
    plain = generator.generate("a photo of the cat", [], seeds=[0], sampling=TWO_STEPS, output_type="np")
    assert max_diff(with_concept.images[0], plain.images[0]) > 1e-2


def test_seeds_are_batched_and_each_equals_its_own_call(generator, tiny_pipe):
    concept = make_concept(tiny_pipe, "<thing>")
    both = generator.generate("a photo of {}", [concept], seeds=[0, 1], sampling=TWO_STEPS, output_type="np")
    one = generator.generate("a photo of {}", [concept], seeds=[1], sampling=TWO_STEPS, output_type="np")
    assert [s["seed"] for s in both.settings] == [0, 1]
    assert max_diff(both.images[1], one.images[0]) <= 1e-4
    assert max_diff(both.images[0], both.images[1]) > 1e-2


def test_alpha_0_equals_a_concept_without_bypass_that_has_the_same_v_base(generator, tiny_pipe):
    # With rescaling the official code normalises the whole 2D output, so v_base of a bypass mapper is not the
    # output of any no-bypass mapper. Without rescaling it is: a no-bypass mapper whose output layer is the
    # first D rows of the bypass mapper's has exactly the same v_base.
    with_bypass = make_concept(tiny_pipe, "<thing>", use_bypass=True, use_rescaling=False)
    no_bypass = make_concept(tiny_pipe, "<thing>", use_bypass=False, use_rescaling=False)
    state = with_bypass.mapper.state_dict()
    state["output_layer.weight"] = state["output_layer.weight"][:32]
    state["output_layer.bias"] = state["output_layer.bias"][:32]
    no_bypass.mapper.load_state_dict(state)
    t, l = torch.tensor([999.0, 500.0]), torch.tensor([0.0, 15.0])
    assert torch.equal(with_bypass(t, l).base, no_bypass(t, l).base)

    def image(concept, alpha):
        return generator.generate("a photo of {}", [concept], seeds=[0], sampling=TWO_STEPS, alpha=alpha,
                                  output_type="np").images[0]

    off = image(with_bypass, 0.0)
    assert max_diff(off, image(no_bypass, 0.2)) <= 1e-4  # alpha means nothing without a bypass
    assert max_diff(off, image(with_bypass, 1.0)) > 1e-3  # and the bypass does change the image


def test_generating_leaves_a_concept_in_training_mode_in_training_mode(generator, tiny_pipe):
    # validation images during training must not switch nested dropout off for the rest of training
    concept = make_concept(tiny_pipe, "<thing>").train()
    generator.generate("a photo of {}", [concept], seeds=[0], sampling=Sampling(steps=1), output_type="np")
    assert concept.training and concept.mapper.training


def test_truncation_128_equals_no_truncation(generator, tiny_pipe):
    # (that a small k changes the image is shown by the sweep below)
    concept = make_concept(tiny_pipe, "<thing>")
    images = {k: generator.generate("a photo of {}", [concept], seeds=[0], sampling=TWO_STEPS, truncation=k,
                                    output_type="np").images[0] for k in (None, 128)}
    assert max_diff(images[None], images[128]) <= 1e-4


def test_sweep_equals_separate_calls_in_a_truncations_by_seeds_grid(generator, tiny_pipe):
    concept = make_concept(tiny_pipe, "<thing>")
    sweep = generator.sweep("a photo of {}", [concept], seeds=[0, 1], truncations=[None, 4], sampling=TWO_STEPS)
    assert len(sweep.images) == 4
    assert sweep.grid.size == (2 * 32 + 2, 2 * 32 + 2)  # rows: truncations, columns: seeds, 2 px padding
    assert [(s["truncation"], s["seed"]) for s in sweep.settings] == [(None, 0), (None, 1), (4, 0), (4, 1)]
    for row, k in enumerate([None, 4]):
        alone = generator.generate("a photo of {}", [concept], seeds=[0, 1], sampling=TWO_STEPS, truncation=k)
        for col in range(2):
            # sweep returns 8-bit images only: equal to one grey level (float outputs agree to 1e-4)
            assert np.abs(pixels(sweep.images[row * 2 + col]) - pixels(alone.images[col])).max() <= 1
    assert np.abs(pixels(sweep.images[0]) - pixels(sweep.images[2])).max() > 0


def test_decompose_renders_one_image_per_fixed_timestep(generator, tiny_pipe):
    concept = make_concept(tiny_pipe, "<thing>")
    out = generator.decompose("a photo of {}", [concept], seed=0, fixed_timesteps=(999, 0), sampling=TWO_STEPS)
    assert len(out.images) == 2
    assert [s["fixed_timestep"] for s in out.settings] == [999.0, 0.0]
    assert out.grid.size == (2 * 32 + 2, 32)
    assert np.abs(pixels(out.images[0]) - pixels(out.images[1])).max() > 0


def test_decompose_of_a_time_independent_concept_equals_plain_generation(generator, tiny_pipe):
    xti = make_concept(tiny_pipe, "<thing>", method="xti")
    out = generator.decompose("a photo of {}", [xti], seed=0, fixed_timesteps=(300,), sampling=TWO_STEPS)
    plain = generator.generate("a photo of {}", [xti], seeds=[0], sampling=TWO_STEPS)
    assert np.abs(pixels(out.images[0]) - pixels(plain.images[0])).max() <= 1


def test_mixing_a_concept_with_itself_equals_generating_with_it(generator, tiny_pipe):
    concept = make_concept(tiny_pipe, "<thing>")
    mixed = generator.mix("a photo of {}", concept, concept, seeds=[0], starts=[700], sampling=TWO_STEPS)
    plain = generator.generate("a photo of {}", [concept], seeds=[0], sampling=TWO_STEPS)
    assert np.abs(pixels(mixed.images[0]) - pixels(plain.images[0])).max() <= 1


def test_mix_start_decides_from_which_timestep_the_appearance_concept_feeds_the_other_layers(generator, tiny_pipe):
    geometry = make_concept(tiny_pipe, "<geo>", seed=1)
    appearance = make_concept(tiny_pipe, "<app>", "dog", seed=2)
    # no geometry layers: start 0 keeps the geometry concept at both steps (667, 334 > 0), start 1000 never does
    edge = generator.mix("a photo of {}", geometry, appearance, seeds=[0], starts=[0, 1000], geometry_layers=[],
                         sampling=TWO_STEPS)
    only_geo = generator.generate("a photo of {}", [geometry], seeds=[0], sampling=TWO_STEPS)
    only_app = generator.generate("a photo of {}", [appearance], seeds=[0], sampling=TWO_STEPS)
    assert np.abs(pixels(edge.images[0]) - pixels(only_geo.images[0])).max() <= 1
    assert np.abs(pixels(edge.images[1]) - pixels(only_app.images[0])).max() <= 1
    # default geometry layers IN07, IN08, MID; start 500 switches at the second step (t = 334), 1000 at the first
    mixed = generator.mix("a photo of {}", geometry, appearance, seeds=[0], starts=[500, 1000], sampling=TWO_STEPS)
    assert [s["mix_start"] for s in mixed.settings] == [500.0, 1000.0]
    assert mixed.settings[0]["geometry_layers"] == ["IN07", "IN08", "MID"]
    assert mixed.grid.size == (32, 2 * 32 + 2)
    a, b = pixels(mixed.images[0]), pixels(mixed.images[1])
    assert np.abs(a - b).max() > 0
    for image in (a, b):
        assert np.abs(image - pixels(only_geo.images[0])).max() > 0
        assert np.abs(image - pixels(only_app.images[0])).max() > 0


# ---- bad input -----------------------------------------------------------------------------------------------

def test_unknown_layer_names_in_mix_are_an_error(generator, tiny_pipe):
    concept = make_concept(tiny_pipe, "<thing>")
    with pytest.raises(ValueError, match=r"unknown layer name 'IN03'.*IN01, IN02, IN04"):
        generator.mix("a photo of {}", concept, concept, geometry_layers=["IN07", "IN03"], sampling=TWO_STEPS)


@pytest.mark.parametrize("steps", [0, -1, 2.5, True])
def test_zero_negative_or_non_integer_step_counts_are_an_error(steps):
    with pytest.raises(ValueError, match=f"steps must be a positive integer, got {steps!r}"):
        Sampling(steps=steps)


def test_unknown_scheduler_is_an_error_listing_the_known_ones():
    with pytest.raises(ValueError, match="scheduler 'heun' is unknown; use one of dpm, ddim, euler, euler_a, pndm, lms"):
        Sampling(scheduler="heun")


@pytest.mark.parametrize("k", [0, 129])
def test_truncation_outside_1_to_128_is_an_error(generator, tiny_pipe, k):
    concept = make_concept(tiny_pipe, "<thing>")
    with pytest.raises(ValueError, match=f"truncation {k} is out of range"):
        generator.generate("a photo of {}", [concept], seeds=[0], sampling=TWO_STEPS, truncation=k)
    with pytest.raises(ValueError, match=f"truncation {k} is out of range"):
        generator.sweep("a photo of {}", [concept], seeds=[0], truncations=[None, k], sampling=TWO_STEPS)


def test_truncation_is_validated_even_for_a_prompt_without_concepts(generator):
    # validation belongs to the boundary: a bad k must not be accepted (and written into the PNG settings) just
    # because the prompt happens to use no concept
    with pytest.raises(ValueError, match="truncation 0 is out of range"):
        generator.generate("a photo of the cat", [], seeds=[0], sampling=Sampling(steps=1), truncation=0)


def test_empty_seed_list_is_an_error(generator, tiny_pipe):
    with pytest.raises(ValueError, match="give at least one seed"):
        generator.generate("a photo of the cat", [], seeds=[], sampling=TWO_STEPS)


def test_prompt_without_the_concepts_token_is_an_error(generator, tiny_pipe):
    concept = make_concept(tiny_pipe, "<thing>")
    with pytest.raises(ValueError, match="does not contain the concept's token '<thing>'"):
        generator.generate("a photo of the cat", [concept], seeds=[0], sampling=TWO_STEPS)


def test_a_concept_for_another_token_width_is_an_error_naming_both_widths(generator):
    wide = Concept("<wide>", "cat", MapperConfig(token_dim=48, num_layers=16, target_norm=1.0),
                   base_model="some-sd-2-model")
    with pytest.raises(ValueError, match=r"token width 48 and 16 cross-attention layers \(some-sd-2-model\).*"
                                         r"has width 32 and 16 layers"):
        generator.generate("a photo of {}", [wide], seeds=[0], sampling=TWO_STEPS)


def test_a_concept_for_another_layer_count_is_an_error(generator):
    other = Concept("<x>", "cat", MapperConfig(token_dim=32, num_layers=12, target_norm=1.0))
    with pytest.raises(ValueError, match="12 cross-attention layers.*has width 32 and 16 layers"):
        generator.generate("a photo of {}", [other], seeds=[0], sampling=TWO_STEPS)


def test_alpha_outside_0_to_1_is_an_error(generator, tiny_pipe):
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\].*got 1.5"):
        generator.generate("a photo of the cat", [], seeds=[0], sampling=TWO_STEPS, alpha=1.5)


# ---- images --------------------------------------------------------------------------------------------------

def test_png_settings_round_trip(tmp_path):
    settings = {"prompt": "a photo of <cat>", "seed": 7, "concepts": ["<cat>"], "truncation": 32, "alpha": 0.2,
                "scheduler": "dpm", "steps": 50}
    path = save_png(Image.new("RGB", (8, 8), "red"), tmp_path / "out" / "a.png", settings)
    assert read_settings(path) == settings
    with Image.open(path) as image:
        assert image.text["parameters"].startswith("a photo of <cat>\n")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["a.png"]  # no temp file left behind


def test_make_grid_lays_out_rows_by_columns_with_padding():
    images = [Image.new("RGB", (10, 6), c) for c in ("red", "green", "blue", "black", "white", "yellow")]
    grid = make_grid(images, rows=2, cols=3, pad=2)
    assert grid.size == (3 * 10 + 2 * 2, 2 * 6 + 2)
    assert grid.getpixel((12, 0)) == (0, 128, 0)  # row 0, column 1
    assert grid.getpixel((0, 8)) == (0, 0, 0)  # row 1, column 0
    with pytest.raises(ValueError, match="a 2x2 grid needs 4 images, got 6"):
        make_grid(images, 2, 2)


# ---- issue 13: schedulers follow the model's config ------------------------------------------------------------

def test_ddim_keeps_the_models_clip_sample_and_every_offered_scheduler_builds(generator, tiny_pipe):
    import diffusers

    for clip_sample in (True, False):
        tiny_pipe.register_modules(scheduler=diffusers.DDIMScheduler.from_config(tiny_pipe.scheduler.config,
                                                                                 clip_sample=clip_sample))
        assert generator.make_scheduler("ddim").config.clip_sample is clip_sample
    for name in SCHEDULERS:  # LMS needs scipy (requirements.txt)
        scheduler = generator.make_scheduler(name)
        scheduler.set_timesteps(3)
        assert len(scheduler.timesteps) >= 3, name  # PNDM adds one


def test_ddim_equals_diffusers_pipeline_with_the_same_config(generator, tiny_model_dir):
    sampling = Sampling(steps=2, guidance=7.5, scheduler="ddim")
    ours = generator.generate(PLAIN, [], seeds=[2], sampling=sampling, output_type="np").images
    assert max_diff(ours[0], diffusers_images(tiny_model_dir, PLAIN, "ddim", seed=2)[0]) <= 1e-4
