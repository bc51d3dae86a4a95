"""Specification of the exact savings in neti.conditioning and neti.generate (docs/efficiency.md; paper Sec. 3.1-3.3):
rows no concept can tell apart are encoded once, the values are stored as the keys plus the placeholder rows, the
inference cache is bounded in bytes, and text-encoder calls are chunked by a memory budget off the CPU.

Every encoding is compared, to 1e-5, with an independent per-row reference: the text encoder's own forward on the
prompt's token ids, a hook putting the concept's vector at its slot, the bypass added by hand.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import make_concept

from neti.conditioning import TextConditioner, storage_bytes
from neti.generate import Sampling

L = 16


@pytest.fixture()
def conditioner(tiny_pipe):
    return TextConditioner(tiny_pipe.tokenizer, tiny_pipe.text_encoder)


def reference_row(pipe, prompt, concepts, t, l, alpha=0.2, truncation=None):
    """Keys and values (S, D) of one (prompt, t, l) row through the text encoder's own forward."""
    encoder = pipe.text_encoder
    vectors = {pos: concepts[token](torch.tensor([float(t)]), torch.tensor([float(l)]), truncation)
               for pos, token in prompt.slots if token in concepts}

    def put_vectors(module, inputs, output):
        output = output.clone()
        for pos, out in vectors.items():
            output[0, pos] = out.base[0]
        return output

    hook = encoder.get_input_embeddings().register_forward_hook(put_vectors)
    try:
        out = encoder(torch.tensor([prompt.ids]), output_hidden_states=True)
    finally:
        hook.remove()
    keys, hidden = out.last_hidden_state[0], out.hidden_states[-1][0]  # after / before the final LayerNorm
    final_norm = getattr(encoder, "text_model", encoder).final_layer_norm
    values = keys.clone()
    for pos, v in vectors.items():
        if v.bypass is not None and alpha:
            h = hidden[pos]
            values[pos] = final_norm(h + alpha * F.normalize(v.bypass[0], dim=-1) * h.norm())
    return keys, values


def assert_grid_equals_reference(pipe, grid, prompt, concepts, timesteps, alpha=0.2, truncation=None):
    keys, values = grid.keys, grid.values  # (T, L, S, D); the first len(timesteps) steps are checked
    assert keys.shape[1] == values.shape[1] == L and keys.shape[0] >= len(timesteps)
    for i, t in enumerate(timesteps):
        for l in range(L):
            k, v = reference_row(pipe, prompt, concepts, t, l, alpha, truncation)
            torch.testing.assert_close(keys[i, l], k, atol=1e-5, rtol=0)
            torch.testing.assert_close(values[i, l], v, atol=1e-5, rtol=0)


def count_rows(conditioner):
    """Rows the text encoder runs on, counted at its calls."""
    rows = []
    body = conditioner._body
    conditioner._body = lambda embeds: rows.append(embeds.shape[0]) or body(embeds)
    return rows


# ---- encode only what differs ----------------------------------------------------------------------------------

def test_repeated_timesteps_are_encoded_once_and_equal_the_per_row_reference(tiny_pipe, conditioner):
    concept = make_concept(tiny_pipe, "<thing>")
    prompt = conditioner.tokenize("a photo of <thing> on a beach", ["<thing>"])
    timesteps = [999.0, 501.0, 501.0, 0.0, 999.0]
    rows = count_rows(conditioner)
    with torch.no_grad():
        grid = conditioner.encode_grid(prompt, {"<thing>": concept}, timesteps, L)
        assert sum(rows) == 3 * L  # three distinct timesteps
        assert grid.step_rows == (0, 1, 1, 2, 0)
        assert_grid_equals_reference(tiny_pipe, grid, prompt, {"<thing>": concept}, timesteps)


def test_a_fixed_timestep_encodes_one_timestep_of_rows(tiny_pipe, conditioner):
    concept = make_concept(tiny_pipe, "<thing>")
    prompt = conditioner.tokenize("a <thing> on the beach", ["<thing>"])
    rows = count_rows(conditioner)
    with torch.no_grad():
        grid = conditioner.encode_grid(prompt, {"<thing>": concept}, [600.0] * 50, L, truncation=8)
        assert sum(rows) == L and grid.rows.keys.shape[:2] == (1, L) and grid.num_steps == 50
        assert_grid_equals_reference(tiny_pipe, grid, prompt, {"<thing>": concept}, [600.0] * 2, truncation=8)


@pytest.mark.parametrize("method, rows_per_grid", [("xti", L), ("ti", 1)])
def test_xti_and_ti_encode_only_the_rows_they_can_tell_apart(tiny_pipe, conditioner, method, rows_per_grid):
    concept = make_concept(tiny_pipe, "<thing>", method=method)
    prompt = conditioner.tokenize("a <thing> on the beach", ["<thing>"])
    rows = count_rows(conditioner)
    with torch.no_grad():
        grid = conditioner.encode_grid(prompt, {"<thing>": concept}, [999.0, 10.0, 500.0], L)
        assert sum(rows) == rows_per_grid
        assert_grid_equals_reference(tiny_pipe, grid, prompt, {"<thing>": concept}, [999.0, 10.0, 500.0])


def test_two_concepts_and_repeated_slots_equal_the_per_row_reference(tiny_pipe, conditioner):
    a, b = make_concept(tiny_pipe, "<a>", seed=1), make_concept(tiny_pipe, "<b>", "dog", seed=2)
    prompt = conditioner.tokenize("<a> and <b> with <a>", ["<a>", "<b>"])
    with torch.no_grad():
        grid = conditioner.encode_grid(prompt, {"<a>": a, "<b>": b}, [999.0, 10.0], L)
        assert grid.rows.positions.shape[-1] == 3  # three placeholder rows per (t, l)
        assert_grid_equals_reference(tiny_pipe, grid, prompt, {"<a>": a, "<b>": b}, [999.0, 10.0])


def test_rows_of_prompts_with_different_slot_counts_equal_the_per_row_reference(tiny_pipe, conditioner):
    concept = make_concept(tiny_pipe, "<a>").train()  # in training, with gradients
    prompts = [conditioner.tokenize("a photo of <a>", ["<a>"]), conditioner.tokenize("<a> on the beach with a <a>", ["<a>"]),
               conditioner.tokenize("a cat", [])]
    index, t, l = torch.tensor([0, 1, 2, 1, 0]), torch.tensor([5.0, 900.0, 3.0, 400.0, 77.0]), torch.tensor([0.0, 3.0, 15.0, 7.0, 2.0])
    torch.manual_seed(0)
    concept.eval()  # the reference draws no nested dropout; gradients stay on
    enc = conditioner.encode_rows(prompts, index, t, l, {"<a>": concept})
    assert enc.keys.requires_grad and enc.bypassed.requires_grad
    enc.values.sum().backward()
    assert concept.mapper.output_layer.weight.grad.abs().sum() > 0
    with torch.no_grad():
        for n in range(5):
            k, v = reference_row(tiny_pipe, prompts[int(index[n])], {"<a>": concept}, t[n], l[n])
            torch.testing.assert_close(enc.keys[n], k, atol=1e-5, rtol=0)
            torch.testing.assert_close(enc.values[n], v, atol=1e-5, rtol=0)


def test_decomposition_of_t_timesteps_encodes_t_times_l_rows(generator, tiny_pipe):
    concept = make_concept(tiny_pipe, "<thing>")
    with torch.no_grad():  # the negative prompt, cached
        generator.conditioner.encode_grid(generator.conditioner.tokenize(""), {}, [0.0], L)
    rows = count_rows(generator.conditioner)
    result = generator.decompose("a photo of {}", [concept], seed=0, fixed_timesteps=(999, 500, 0),
                                 sampling=Sampling(steps=4))
    assert sum(rows) == 3 * L and len(result.images) == 3


# ---- memory bounded by bytes ---------------------------------------------------------------------------------

def test_values_are_stored_as_the_keys_plus_the_placeholder_rows(tiny_pipe, conditioner):
    concept = make_concept(tiny_pipe, "<thing>")
    prompt = conditioner.tokenize("a photo of <thing>", ["<thing>"])
    with torch.no_grad():
        grid = conditioner.encode_grid(prompt, {"<thing>": concept}, [999.0, 500.0], L)
    keys_bytes = 2 * L * 77 * 32 * 4
    assert grid.nbytes == keys_bytes + 2 * L * 1 * 32 * 4 + 2 * L * 1 * 8  # keys, one bypassed row, its position
    assert storage_bytes(grid.keys, grid.values) == keys_bytes * 2  # the dense grid it stands for


def test_the_cache_never_exceeds_its_byte_budget_and_drops_the_oldest(tiny_pipe):
    concept = make_concept(tiny_pipe, "<thing>")
    one = 2 * L * (77 * 32 * 4 + 32 * 4 + 8)  # bytes of a 2-timestep encoding
    conditioner = TextConditioner(tiny_pipe.tokenizer, tiny_pipe.text_encoder, cache_bytes=3 * one)
    prompt = conditioner.tokenize("a photo of <thing>", ["<thing>"])
    grids = []
    with torch.no_grad():
        for t in range(6):
            grids.append(conditioner.encode_grid(prompt, {"<thing>": concept}, [float(t), 999.0], L))
            assert conditioner.cached_bytes <= 3 * one
        assert len(conditioner._cache) == 3
        assert conditioner.encode_grid(prompt, {"<thing>": concept}, [5.0, 999.0], L) is grids[5]
        assert conditioner.encode_grid(prompt, {"<thing>": concept}, [0.0, 999.0], L) is not grids[0]
        too_big = conditioner.encode_grid(prompt, {"<thing>": concept}, [float(t) for t in range(8)], L)
        assert too_big.nbytes > 3 * one and conditioner.cached_bytes <= 3 * one
        assert all(entry is not too_big for entry, _ in conditioner._cache.values())


def test_the_cache_budget_defaults_by_device_and_zero_turns_it_off(tiny_pipe):
    from neti.conditioning import CACHE_BYTES

    assert TextConditioner(tiny_pipe.tokenizer, tiny_pipe.text_encoder).cache_budget == CACHE_BYTES["cpu"]
    off = TextConditioner(tiny_pipe.tokenizer, tiny_pipe.text_encoder, cache_bytes=0)
    concept = make_concept(tiny_pipe, "<thing>")
    with torch.no_grad():
        off.encode_grid(off.tokenize("a <thing>", ["<thing>"]), {"<thing>": concept}, [1.0], L)
    assert len(off._cache) == 0
    with pytest.raises(ValueError, match="cache_bytes must be a non-negative integer"):
        TextConditioner(tiny_pipe.tokenizer, tiny_pipe.text_encoder, cache_bytes=-1)
    from neti.generate import Generator

    assert Generator(tiny_pipe, cache_bytes=12345).conditioner.cache_budget == 12345


def test_an_offloaded_cache_renders_the_same_images(tiny_pipe, tiny_model_dir, generator):
    from neti.generate import Generator

    concept = make_concept(tiny_pipe, "<thing>")
    offloaded = Generator(tiny_pipe, str(tiny_model_dir), offload_cache=True)
    sampling = Sampling(steps=3)
    a = generator.generate("a photo of {}", [concept], [0, 1], sampling, output_type="np").images
    b = offloaded.generate("a photo of {}", [concept], [0, 1], sampling, output_type="np").images
    assert all(entry.rows.keys.device.type == "cpu" for entry, _ in offloaded.conditioner._cache.values())
    for x, y in zip(a, b):
        assert float(abs(x - y).max()) <= 1e-5


def test_accelerators_chunk_by_a_memory_budget(tiny_pipe):
    from transformers import CLIPTextConfig

    sd15 = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12)
    conditioner = TextConditioner(tiny_pipe.tokenizer, tiny_pipe.text_encoder, chunk_bytes=256 * 2**20)
    conditioner.text_encoder = type("Encoder", (), {"config": sd15, "embeddings": None})()
    per_row = 77 * (6 * 768 + 3 * 3072 + 12 * 77) * 2  # bytes of one layer's fp16 activations for one row
    assert conditioner.rows_per_call(77, torch.device("cuda"), torch.float16) == 256 * 2**20 // per_row == 118
    assert conditioner.rows_per_call(77, torch.device("cpu"), torch.float16) == 2048 // 77


def test_chunked_calls_equal_one_call(tiny_pipe):
    concept = make_concept(tiny_pipe, "<thing>")
    chunked = TextConditioner(tiny_pipe.tokenizer, tiny_pipe.text_encoder, chunk_rows=5)
    whole = TextConditioner(tiny_pipe.tokenizer, tiny_pipe.text_encoder, chunk_rows=10_000)
    prompt = whole.tokenize("<thing> and a photo of <thing>", ["<thing>"])
    with torch.no_grad():
        a = chunked.encode_grid(prompt, {"<thing>": concept}, [999.0, 3.0], L)
        b = whole.encode_grid(prompt, {"<thing>": concept}, [999.0, 3.0], L)
    torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=0)


# ---- training memory -----------------------------------------------------------------------------------------

def test_training_checkpoints_the_text_encoder_by_default_exactly_and_switches_it_off_after(tiny_pipe, tmp_path):
    import numpy as np
    from PIL import Image

    from neti.train import TrainConfig, Trainer, TrainingCallback, is_checkpointing

    image = Image.fromarray(np.full((32, 32, 3), 120, dtype=np.uint8))
    seen = []

    class Probe(TrainingCallback):
        def on_step(self, info):
            seen.append((is_checkpointing(tiny_pipe.text_encoder), tiny_pipe.unet.is_gradient_checkpointing))

    settings = dict(steps=2, batch_size=2, grad_accum=1, checkpoint_every=0)
    checkpointed = Trainer(tiny_pipe, [image], "<thing>", "cat", TrainConfig(**settings), callbacks=[Probe()])
    assert checkpointed.config.text_encoder_checkpointing
    a = checkpointed.train(tmp_path / "a.safetensors").concept
    assert seen == [(True, False)] * 2  # the text encoder only: the UNet keeps its speed
    assert not is_checkpointing(tiny_pipe.text_encoder) and not tiny_pipe.text_encoder.training
    plain = Trainer(tiny_pipe, [image], "<thing>", "cat", TrainConfig(**settings, text_encoder_checkpointing=False))
    b = plain.train(tmp_path / "b.safetensors").concept
    for (name, x), (_, y) in zip(a.mapper.state_dict().items(), b.mapper.state_dict().items()):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=0, msg=name)
