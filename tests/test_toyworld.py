"""The toy world and its bundled model: deterministic data, an SD pipeline that loads offline and draws the
requested background, a training script whose every stage runs, and a toy CLIP that reads real images."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from toyworld.world import (BACKGROUNDS, COLOURS, RGB, UNNAMED_COLOURS, UNNAMED_PATTERNS, UNNAMED_SHAPES,
                            UNNAMED_WORDS, World, caption, parse_caption, render, vocabulary)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def nearest_colour(pixel: np.ndarray, names=BACKGROUNDS) -> str:
    return min(names, key=lambda n: float(np.sum((np.asarray(RGB[n], float) - pixel) ** 2)))


def border_colour(image: np.ndarray) -> np.ndarray:
    """Median colour of the outermost 3 pixels (objects rarely touch the border)."""
    border = np.concatenate([image[:3].reshape(-1, 3), image[-3:].reshape(-1, 3), image[:, :3].reshape(-1, 3),
                             image[:, -3:].reshape(-1, 3)])
    return np.median(border.astype(float), axis=0)


def test_world_is_a_pure_function_of_seed_and_index():
    a, b = World(0), World(0)
    assert all(np.array_equal(a.image(i), b.image(i)) for i in range(5))
    assert [a.caption(i, 3) for i in range(5)] == [b.caption(i, 3) for i in range(5)]
    assert not np.array_equal(World(1).image(0), a.image(0))
    image = a.image(0)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8


def test_captions_name_the_scene_in_the_vocabulary():
    world, words = World(0), set(vocabulary())
    for i in range(50):
        scene = world.scene(i)
        text = caption(scene)
        assert set(text.split()) <= words
        found = parse_caption(text)
        assert (found["shape"], found["colour"], found["background"]) == (scene.shape, scene.colour, scene.background)
        assert nearest_colour(border_colour(render(scene))) == scene.background or scene.rendering == "blurry"


def test_unnamed_attributes_are_drawn_but_never_said():
    """Over many world seeds, unnamed shapes, colours, checks and second colours appear in the images, and no
    caption (canonical, paraphrased, without colour) and no word of the generator's vocabulary names them."""
    from toyworld.model import build_tokenizer

    words, seen = set(vocabulary()), {"shape": set(), "colour": set(), "pattern": set(), "second": 0}
    assert not words & UNNAMED_WORDS and UNNAMED_WORDS <= set(vocabulary(unnamed=True))
    for seed in range(5):
        world = World(seed, unnamed=0.15)
        for i in range(300):
            scene = world.scene(i)
            seen["shape"].add(scene.shape), seen["colour"].add(scene.colour), seen["pattern"].add(scene.pattern)
            seen["second"] += scene.second != "shade"
            texts = [caption(scene), caption(scene, with_colour=False),
                     *(caption(scene, np.random.default_rng([seed, i, v])) for v in range(3))]
            for text in texts:
                assert set(text.split()) <= words and not set(text.split()) & UNNAMED_WORDS, text
            if not scene.named_shape:
                assert all(t.split(" on a ")[0].split()[-1] in ("shape", "object", "shapes", "objects") for t in texts)
            if scene.colour in UNNAMED_COLOURS or scene.second != "shade":  # no colour word at all
                assert not any(c in t.split(" on a ")[0].split() for t in texts for c in COLOURS)
    assert set(UNNAMED_SHAPES) <= seen["shape"] and set(UNNAMED_COLOURS) <= seen["colour"]
    assert set(UNNAMED_PATTERNS) <= seen["pattern"] and seen["second"] > 50
    vocab = build_tokenizer().get_vocab()
    assert not any(w + "</w>" in vocab for w in UNNAMED_WORDS)


def test_bundled_tokenizer_has_no_word_for_an_unnamed_attribute():
    from transformers import CLIPTokenizer

    from toyworld.model import TOY_SD_PATH

    tokenizer = CLIPTokenizer.from_pretrained(str(TOY_SD_PATH / "tokenizer"))
    assert not any(w + "</w>" in tokenizer.get_vocab() for w in UNNAMED_WORDS)
    assert len(tokenizer.tokenize("a pink checkered heart")) > 4  # spelled in pieces, no word for any of them


def test_unnamed_world_is_pure_and_keeps_the_named_draws():
    a, b, named = World(3, unnamed=0.2), World(3, unnamed=0.2), World(3)
    assert [a.scene(i) for i in range(100)] == [b.scene(i) for i in range(100)]
    assert all(np.array_equal(a.image(i), b.image(i)) for i in range(5))
    kept = [i for i in range(200) if a.scene(i).named]
    assert 60 < len(kept) < 190 and all(a.scene(i) == named.scene(i) for i in kept)


def test_colour_dropout_leaves_out_the_object_colour_only():
    from toyworld.model import build_tokenizer
    from toyworld.train import CaptionedLatents

    world = World(0)
    scene = next(world.scene(i) for i in range(50) if world.scene(i).pattern != "plain")
    text = caption(scene, with_colour=False)
    assert scene.colour not in text.split()[:-2] and f"{scene.pattern} " in text
    assert text.endswith(f"on a {scene.background} background")
    plain = next(world.scene(i) for i in range(50) if world.scene(i).pattern == "plain" and world.scene(i).count == 1)
    text = caption(plain, with_colour=False)
    assert f"a {plain.shape} on a " in text and "  " not in text and "an " not in text  # one space, the right article
    tokenizer = build_tokenizer()
    decoded = {}
    for share in (0.0, 1.0):
        data = CaptionedLatents(torch.zeros(64, 8, 2, 2), world, tokenizer, drop=0.0, seed=0, colour_drop=share)
        _, ids, weights = data.batch(0, 64)
        assert ids.shape[-1] == 1 and bool((weights == 1).all())  # no blends: one token per position
        decoded[share] = tokenizer.batch_decode(ids[..., 0], skip_special_tokens=True)
    objects = {share: [t.split(" on a ")[0].split() for t in texts] for share, texts in decoded.items()}
    assert all(any(c in words for c in COLOURS) for words in objects[0.0])  # every caption names a colour
    assert not any(c in words for words in objects[1.0] for c in COLOURS)  # none does


def test_blends_say_unnamed_values_with_named_words_only():
    """The UNet's blended captions: every word a blend uses is a word of the generator's vocabulary (one token
    each), no unnamed word appears, each unnamed value that is said is said by its own blend, and with no
    blends the words are exactly `caption`'s."""
    from toyworld.model import build_tokenizer
    from toyworld.world import BLENDS, described

    words, tokenizer, blended = set(vocabulary()), build_tokenizer(), set()
    for first, second in BLENDS.values():
        assert {first, second} <= words and all(len(tokenizer.tokenize(w)) == 1 for w in (first, second))
    for seed in range(3):
        world = World(seed, unnamed=0.25)
        for i in range(200):
            scene = world.scene(i)
            assert described(scene, world.rng(i, 2), share=0.0) == caption(scene, world.rng(i, 2)).split()
            parts = described(scene, world.rng(i, 2), share=1.0)
            flat = [w for p in parts for w in ([p] if isinstance(p, str) else [w for w, _ in p])]
            assert set(flat) <= words and not set(flat) & UNNAMED_WORDS, parts
            for part in parts:
                if not isinstance(part, str):
                    assert abs(sum(w for _, w in part) - 1) < 1e-9, part
                    blended |= {value for value, pair in BLENDS.items() if {w for w, _ in part} == set(pair)}
            if not scene.named_shape:  # share 1: the shape is said by its blend
                assert any(not isinstance(p, str) and {w for w, _ in p} == set(BLENDS[scene.shape]) for p in parts)
            squeezed = described(scene, world.rng(i, 2), share=1.0, compound_share=1.0)
            assert len(squeezed) <= len(parts) and sum(not isinstance(p, str) for p in squeezed) == 1
    assert blended == set(BLENDS)


def test_blended_text_encoding_equals_the_text_encoder_on_plain_words():
    from transformers import CLIPTextModel, CLIPTokenizer

    from toyworld.model import TOY_SD_PATH
    from toyworld.train import CaptionedLatents, blend_embeddings, encode_blended

    tokenizer = CLIPTokenizer.from_pretrained(str(TOY_SD_PATH / "tokenizer"))
    text_encoder = CLIPTextModel.from_pretrained(str(TOY_SD_PATH / "text_encoder")).eval()
    world = World(0, unnamed=0.25)
    plain = CaptionedLatents(torch.zeros(32, 8, 2, 2), world, tokenizer, drop=0.1, seed=0)
    _, ids, weights = plain.batch(0, 16)
    with torch.no_grad():
        assert torch.equal(encode_blended(text_encoder, ids, weights), text_encoder(ids[..., 0])[0])
        data = CaptionedLatents(torch.zeros(32, 8, 2, 2), world, tokenizer, drop=0.0, seed=0, blend_share=1.0)
        _, ids, weights = data.batch(0, 16)
        assert ids.shape[-1] > 1 and torch.allclose(weights.sum(-1), torch.ones(ids.shape[:2]))
        blended = encode_blended(text_encoder, ids, weights)
        assert not torch.allclose(blended, text_encoder(ids[..., 0])[0])  # the blends change the encoding
        rows = text_encoder.get_input_embeddings()(ids)
        b, s = (weights[..., 1] > 0).nonzero()[0].tolist()  # one blended position, checked by hand
        mix = (weights[b, s, :, None] * rows[b, s]).sum(0)
        expected = mix * (weights[b, s] * rows[b, s].norm(dim=-1)).sum() / mix.norm()
        got = blend_embeddings(text_encoder.get_input_embeddings(), ids, weights)[b, s]
        assert torch.allclose(got, expected, atol=1e-6)


def test_judges_read_what_the_image_shows():
    """A sketch draws its pattern in the body colour, so its label has no second colour; two-coloured checks and
    stripes have no body colour to tell apart, so their colours count as an unordered pair, and nothing else does."""
    from dataclasses import replace

    from toyworld.classifier import hits
    from toyworld.world import Labels, SECOND_COLOURS, Thing, shown, symmetric_colours
    from toyworld.world import Scene

    checks = Scene("heart", "pink", "checkered", "white", "photo", (Thing(32, 32, 15),), pattern_colour="teal")
    dots = replace(checks, pattern="dotted")
    sketch = replace(checks, rendering="sketch")
    stripes = replace(checks, pattern="striped")
    assert symmetric_colours(checks) and symmetric_colours(stripes)
    assert not symmetric_colours(dots) and not symmetric_colours(sketch)
    assert not symmetric_colours(replace(stripes, pattern_colour=None))  # a darker shade: the body is clear
    assert shown(sketch, "second") == "shade" and Labels.of(sketch).second == SECOND_COLOURS.index("shade")
    assert shown(checks, "second") == "teal" and np.array_equal(render(sketch), render(replace(sketch, pattern_colour=None)))
    swapped = {"colour": ["teal", "teal", "pink"], "second": ["pink", "pink", "shade"]}
    assert hits(swapped, [checks, dots, sketch], "colour") == [True, False, True]
    assert hits(swapped, [checks, dots, sketch], "second") == [True, False, True]
    assert hits(swapped, [stripes, dots], "colour") == [True, False]


@pytest.fixture(scope="module")
def toy_pipeline():
    from diffusers import StableDiffusionPipeline

    from toyworld.model import TOY_SD_PATH

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    pipe = StableDiffusionPipeline.from_pretrained(str(TOY_SD_PATH), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_bundled_model_has_sd_layout(toy_pipeline):
    from toyworld.model import TOY_SD_PATH

    unet = toy_pipeline.unet
    cross = [n for n in unet.attn_processors if "attn2" in n]
    assert len(cross) == 16 and "down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor" in cross
    assert unet.config.layers_per_block == 2 and unet.config.cross_attention_dim == toy_pipeline.text_encoder.config.hidden_size
    assert toy_pipeline.scheduler.config.beta_schedule == "scaled_linear"
    assert toy_pipeline.tokenizer("a red star").input_ids == [toy_pipeline.tokenizer.bos_token_id,
                                                              *toy_pipeline.tokenizer.convert_tokens_to_ids(
                                                                  ["a</w>", "red</w>", "star</w>"]),
                                                              toy_pipeline.tokenizer.eos_token_id]
    size = sum(f.stat().st_size for f in TOY_SD_PATH.rglob("*") if f.is_file())
    assert size <= 30e6


def test_bundled_model_generates_offline(toy_pipeline):
    image = toy_pipeline("a red star on a blue background", num_inference_steps=5,
                         generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()


@pytest.mark.parametrize("background,seed", [("blue", 0), ("yellow", 1), ("white", 2), ("red", 3), ("black", 4),
                                             ("purple", 5)])
def test_bundled_model_draws_the_requested_background(toy_pipeline, background, seed):
    image = toy_pipeline(f"a green circle on a {background} background", num_inference_steps=20, guidance_scale=7.5,
                         generator=torch.Generator().manual_seed(seed), output_type="np").images[0]
    assert nearest_colour(border_colour(image * 255)) == background


def test_training_script_runs_two_steps_of_every_stage(tmp_path):
    from toyworld.train import main

    ck = ["--checkpoints", str(tmp_path)]
    main(["vae", *ck, "--steps", "2", "--batch", "2"])
    main(["latents", *ck, "--count", "4"])
    main(["unet", *ck, "--steps", "2", "--batch", "2"])
    main(["unet", *ck, "--steps", "3", "--batch", "2"])  # resumes from step 2
    assert torch.load(tmp_path / "unet.pt", weights_only=True)["step"] == 3
    main(["compact", *ck])  # fp16 EMA, bf16 moments; the run resumes from it
    assert torch.load(tmp_path / "unet.pt", weights_only=True)["ema_unet"]["conv_in.weight"].dtype == torch.float16
    main(["unet", *ck, "--steps", "4", "--batch", "2"])
    assert torch.load(tmp_path / "unet.pt", weights_only=True)["step"] == 4
    # the compacted VAE resumes too; from step 2 the learning rate anneals on a cosine to 0 at step 4
    main(["vae", *ck, "--steps", "4", "--batch", "2", "--decoder-only", "--anneal-from", "2", "--lr", "1e-3"])
    vae_state = torch.load(tmp_path / "vae.pt", weights_only=True)
    assert vae_state["step"] == 4
    assert vae_state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(5e-4)  # the last step ran at t = 1/2
    main(["export", *ck, "--out", str(tmp_path / "sd")])
    assert json.loads((tmp_path / "sd" / "model_index.json").read_text())["unet"][1] == "UNet2DConditionModel"
    main(["classifier", *ck, "--steps", "2", "--batch", "4", "--eval-count", "8", "--out", str(tmp_path / "cls")])
    main(["clip", *ck, "--steps", "2", "--batch", "4", "--eval-count", "8", "--out", str(tmp_path / "clip")])
    for stage in ("classifier", "clip"):  # their checkpoints load with weights_only=True and resume
        main([stage, *ck, "--steps", "3", "--batch", "4", "--eval-count", "8", "--out", str(tmp_path / stage)])
        assert torch.load(tmp_path / f"{stage}.pt", weights_only=True)["step"] == 3
    assert (tmp_path / "clip" / "model.safetensors").exists() and (tmp_path / "cls" / "model.safetensors").exists()


def test_toy_clip_ranks_the_right_caption_first():
    from transformers import CLIPModel, CLIPProcessor

    from toyworld.clip import CLIP_PATH

    model, processor = CLIPModel.from_pretrained(CLIP_PATH).eval(), CLIPProcessor.from_pretrained(CLIP_PATH)
    world = World(1)
    indices = [i for i in range(40) if world.scene(i).rendering == "photo"][:6]
    images, captions = [world.image(i) for i in indices], [world.caption(i) for i in indices]
    with torch.no_grad():
        logits = model(**processor(text=captions, images=images, return_tensors="pt", padding="max_length")).logits_per_image
    assert logits.argmax(dim=1).tolist() == list(range(len(indices)))


def test_toy_clip_captions_name_unnamed_values_the_generator_cannot():
    """The judge's training captions say "heart", "pink", "checkered" (its vocabulary has them); the generator's
    captions of the same scenes never do."""
    from toyworld.clip import partial_caption

    world, said = World(3, unnamed=0.5), set()
    for i in range(300):
        scene = world.scene(i)
        words = set(partial_caption(scene, np.random.default_rng(i)).split())
        said |= words & UNNAMED_WORDS
        assert not set(world.caption(i).split()) & UNNAMED_WORDS
        assert words <= set(vocabulary(unnamed=True))
    assert {"crescent", "heart", "hexagon", "pink", "teal", "brown", "checkered", "hearts"} <= said


def test_toy_clip_knows_the_unnamed_attributes():
    """Zero-shot among all nine shapes (colours; all four patterns), the bundled toy CLIP names unnamed values in
    held-out photos; the toy CLIP trained on the named world alone did so in 3%."""
    from transformers import CLIPModel, CLIPProcessor

    from toyworld.clip import CLIP_PATH, zero_shot_unnamed

    model, processor = CLIPModel.from_pretrained(CLIP_PATH).eval(), CLIPProcessor.from_pretrained(CLIP_PATH)
    world = World(1, unnamed=0.5)
    indices = [i for i in range(400) if world.scene(i).rendering == "photo"][:120]
    scores = zero_shot_unnamed(model, processor, np.stack([world.image(i) for i in indices]),
                               [world.scene(i) for i in indices])
    assert set(scores) == {"shape", "colour", "pattern"}
    assert min(scores.values()) >= 0.6, scores


def test_the_vae_loss_weights_pattern_pixels_by_detail():
    """`--detail` raises the weight of pixels unlike their neighbours (a dot in a second colour) and leaves the
    loss of flat regions alone."""
    from toyworld.train import vae_loss

    target = torch.full((1, 3, 16, 16), -1.0)
    target[:, 0, 4:12, 4:12] = 1.0  # a red square on black
    target[:, 2, 7, 7] = 1.0  # one magenta dot in it
    kl = torch.zeros(1)
    on_dot, on_flat = target.clone(), target.clone()
    on_dot[:, 2, 7, 7] = 0.0
    on_flat[:, 2, 5, 10] = 1.0
    plain = [float(vae_loss(r, target, kl, 0.0)) for r in (on_dot, on_flat)]
    detailed = [float(vae_loss(r, target, kl, 0.0, detail=8.0)) for r in (on_dot, on_flat)]
    assert detailed[0] / detailed[1] > 1.3 * plain[0] / plain[1]  # measured: 1.5x
    assert float(vae_loss(target, target, kl, 0.0, detail=8.0)) == 0.0


def test_vector_norms_reads_where_each_method_puts_its_embeddings(tiny_pipe):
    """TI starts at the super-category's embedding; NeTI's output is rescaled to its norm; XTI's vectors are free."""
    from dataclasses import replace

    from neti import Concept, MapperConfig
    from neti.conditioning import TextConditioner, super_category_id
    from toyworld.vector_norms import summary

    word = TextConditioner(tiny_pipe.tokenizer, tiny_pipe.text_encoder).embedding_of(
        super_category_id(tiny_pipe.tokenizer, "teapot")).float()
    timesteps = [999, 500, 1]
    ti = summary(Concept.for_pipeline(tiny_pipe, "<t>", "teapot", MapperConfig(method="ti")), word, timesteps)
    assert ti["norm_mean"] == pytest.approx(float(word.norm()), rel=1e-5)
    assert ti["cos_super"] == pytest.approx(1.0, abs=1e-5) and ti["cos_grid_mean"] == pytest.approx(1.0, abs=1e-5)
    neti = Concept.for_pipeline(tiny_pipe, "<n>", "teapot", replace(MapperConfig(), use_bypass=False))
    rescaled = summary(neti, word, timesteps)
    assert rescaled["norm_min"] == pytest.approx(float(word.norm()), rel=1e-5)
    assert rescaled["norm_max"] == pytest.approx(float(word.norm()), rel=1e-5)
    assert rescaled["cos_grid_mean"] < 0.999 and "bypass_norm_mean" not in rescaled  # it varies over (t, l)
    with_bypass = summary(Concept.for_pipeline(tiny_pipe, "<b>", "teapot"), word, timesteps)
    assert with_bypass["norm_max"] < float(word.norm()) and with_bypass["bypass_norm_mean"] > 0
    xti = Concept.for_pipeline(tiny_pipe, "<x>", "teapot", MapperConfig(method="xti"))
    with torch.no_grad():
        xti.mapper.vectors[3] *= 4
    free = summary(xti, word, timesteps)
    layers = xti.config.num_layers
    assert free["norm_max"] == pytest.approx(4 * float(word.norm()), rel=1e-5)
    assert free["norm_mean"] == pytest.approx((layers + 3) / layers * float(word.norm()), rel=1e-5)


def test_style_mix_report_judges_the_geometry_shape_with_the_appearance_look_in_either_role_order():
    """`measure_mix` asks for the geometry example's shape and the appearance example's colours and pattern; a
    swapped pair hands the mixer the appearance concept first (early, coarse layers), judged the same way."""
    from types import SimpleNamespace

    from PIL import Image

    from toyworld.examples import MixPair
    from toyworld.personalization import MIX_STARTS, measure_mix

    calls = []

    class Generator:
        def mix(self, prompt, geometry, appearance, seeds, starts, sampling=None):
            calls.append((geometry, appearance))
            return SimpleNamespace(images=[Image.new("RGB", (64, 64))] * (len(seeds) * len(starts)))

    class Classifier:  # a pink-and-teal checkered heart in every image but the first start's
        def predict(self, images):
            n = len(images)
            return {"shape": ["circle"] * 2 + ["heart"] * (n - 2), "colour": ["teal"] * n, "second": ["pink"] * n,
                    "pattern": ["checkered"] * n}

    for swapped in (False, True):
        report, strip = measure_mix(Generator(), "G", "A", [0, 1], Classifier(), None,
                                    MixPair("yellow-heart", "checkered-circle", swapped))
        assert calls[-1] == (("A", "G") if swapped else ("G", "A")) and report["swapped"] is swapped
        assert report["curve"]["500"] == dict(shape=0.0, colours=1.0, pattern=1.0, all=0.0)
        assert report["curve"]["550"]["all"] == 1.0 and report["best_start"] == 550 and report["meets_target"]
        assert len(strip) == len(MIX_STARTS)
