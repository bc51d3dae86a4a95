"""Specification of neti.conditioning: batched P* text encodings and the textual bypass (docs/method.md "Text
conditioning and the textual bypass"; paper Sec. 3.1-3.3).

The tiny text encoder (D = 32, 2 layers) stands in for CLIP ViT-L/14; the UNet has SD's 16 cross-attention layers.
"""

from __future__ import annotations

import pytest
import torch
from helpers import make_concept

from neti.conditioning import (
    TextConditioner,
    check_placeholder_token,
    format_prompt,
    super_category_id,
)

L = 16


@pytest.fixture()
def conditioner(tiny_pipe):
    return TextConditioner(tiny_pipe.tokenizer, tiny_pipe.text_encoder)


def final_norm(text_encoder):
    return getattr(text_encoder, "text_model", text_encoder).final_layer_norm


def plain_ids(pipe, prompt):
    return pipe.tokenizer(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


# ---- the text encoder ----------------------------------------------------------------------------------------

def test_body_then_final_layernorm_equals_the_text_encoder_on_a_plain_prompt(tiny_pipe, conditioner):
    prompt = "a photo of the cat on a beach"
    tokenized = conditioner.tokenize(prompt)
    ids = torch.tensor([tokenized.ids])
    assert torch.equal(ids, plain_ids(tiny_pipe, prompt))  # same ids as diffusers' pipeline tokenises
    with torch.no_grad():
        embeds = tiny_pipe.text_encoder.get_input_embeddings()(ids)
        ours = final_norm(tiny_pipe.text_encoder)(conditioner._body(embeds))
        expected = tiny_pipe.text_encoder(ids).last_hidden_state
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)


def test_tokenize_puts_one_slot_per_concept_occurrence(conditioner, tiny_pipe):
    tokenized = conditioner.tokenize("a <a> and <b> on <a>", ["<a>", "<b>"])
    tok = tiny_pipe.tokenizer
    words = tok.convert_tokens_to_ids(["a</w>", "and</w>", "on</w>"])
    assert tokenized.slots == ((2, "<a>"), (4, "<b>"), (6, "<a>"))
    assert tokenized.ids[:8] == (tok.bos_token_id, words[0], tok.pad_token_id, words[1], tok.pad_token_id,
                                 words[2], tok.pad_token_id, tok.eos_token_id)
    assert len(tokenized.ids) == 77


# ---- batched grid versus a loop --------------------------------------------------------------------------------

def test_batched_grid_equals_a_loop_over_every_timestep_and_layer(tiny_pipe, conditioner):
    concept = make_concept(tiny_pipe, "<thing>")
    assert concept.config.has_bypass
    prompt = conditioner.tokenize("a photo of <thing> on a beach", ["<thing>"])
    timesteps = [999.0, 501.0, 0.0]
    with torch.no_grad():
        grid = conditioner.encode_grid(prompt, {"<thing>": concept}, timesteps, L, truncation=None, alpha=0.2)
        assert grid.keys.shape == grid.values.shape == (3, L, 77, 32)
        for i, t in enumerate(timesteps):
            for l in range(L):
                one = conditioner.encode_rows([prompt], torch.tensor([0]), torch.tensor([t]), torch.tensor([float(l)]),
                                              {"<thing>": concept}, None, 0.2)
                torch.testing.assert_close(grid.keys[i, l], one.keys[0], atol=1e-5, rtol=0)
                torch.testing.assert_close(grid.values[i, l], one.values[0], atol=1e-5, rtol=0)


def test_rows_differ_over_time_and_layers(tiny_pipe, conditioner):
    concept = make_concept(tiny_pipe, "<thing>")
    prompt = conditioner.tokenize("a photo of <thing>", ["<thing>"])
    with torch.no_grad():
        enc = conditioner.encode_grid(prompt, {"<thing>": concept}, [999.0, 0.0], L)
    assert not torch.allclose(enc.keys[0, 0], enc.keys[1, 0])
    assert not torch.allclose(enc.keys[0, 0], enc.keys[0, 15])


def test_batched_grid_equals_loop_in_chunks(tiny_pipe):
    concept = make_concept(tiny_pipe, "<thing>")
    small = TextConditioner(tiny_pipe.tokenizer, tiny_pipe.text_encoder, chunk_rows=5)
    big = TextConditioner(tiny_pipe.tokenizer, tiny_pipe.text_encoder)
    prompt = big.tokenize("a photo of <thing>", ["<thing>"])
    with torch.no_grad():
        a = small.encode_grid(prompt, {"<thing>": concept}, [999.0], L)
        b = big.encode_grid(prompt, {"<thing>": concept}, [999.0], L)
    torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=0)


# ---- the textual bypass --------------------------------------------------------------------------------------

def test_alpha_0_gives_values_equal_to_keys(tiny_pipe, conditioner):
    concept = make_concept(tiny_pipe, "<thing>")
    prompt = conditioner.tokenize("a photo of <thing>", ["<thing>"])
    with torch.no_grad():
        enc = conditioner.encode_grid(prompt, {"<thing>": concept}, [999.0], L, alpha=0.0)
    assert torch.equal(enc.keys, enc.values)


def test_keys_do_not_depend_on_alpha_and_values_do(tiny_pipe, conditioner):
    concept = make_concept(tiny_pipe, "<thing>")
    prompt = conditioner.tokenize("a photo of <thing> on a beach", ["<thing>"])
    with torch.no_grad():
        encs = [conditioner.encode_grid(prompt, {"<thing>": concept}, [999.0], L, alpha=a)
                for a in (0.0, 0.2, 0.8)]
    assert torch.equal(encs[0].keys, encs[1].keys) and torch.equal(encs[0].keys, encs[2].keys)
    assert not torch.allclose(encs[1].values, encs[2].values)
    # the bypass enters at the placeholder (position 4) and, through the final LayerNorm only, nowhere else
    torch.testing.assert_close(encs[1].values[:, :, :4], encs[1].keys[:, :, :4], atol=1e-6, rtol=0)
    assert not torch.allclose(encs[1].values[:, :, 4], encs[1].keys[:, :, 4])


def test_bypass_adds_alpha_times_v_pass_scaled_to_the_hidden_norm_before_the_final_layernorm(tiny_pipe, conditioner):
    concept = make_concept(tiny_pipe, "<thing>")
    prompt = conditioner.tokenize("a photo of <thing>", ["<thing>"])
    t, l = torch.tensor([700.0]), torch.tensor([3.0])
    captured = []
    body = conditioner._body
    conditioner._body = lambda embeds: captured.append(body(embeds)) or captured[-1]
    with torch.no_grad():
        enc = conditioner.encode_rows([prompt], torch.tensor([0]), t, l, {"<thing>": concept}, None, 0.2)
        h = captured[0][0, 4]
        v_pass = concept(t, l).bypass[0]
        expected = final_norm(tiny_pipe.text_encoder)(h + 0.2 * v_pass / v_pass.norm() * h.norm())
    torch.testing.assert_close(enc.values[0, 4], expected, atol=1e-5, rtol=0)


def test_keys_before_the_placeholder_equal_the_plain_prompts_causal_attention(tiny_pipe, conditioner):
    concept = make_concept(tiny_pipe, "<thing>")
    prompt = conditioner.tokenize("a photo of <thing> on a beach", ["<thing>"])
    with torch.no_grad():
        enc = conditioner.encode_grid(prompt, {"<thing>": concept}, [999.0, 0.0], L)
        plain = tiny_pipe.text_encoder(plain_ids(tiny_pipe, "a photo of the cat")).last_hidden_state[0]
    # positions 0..3 are <bos> a photo of, identical in both prompts
    for i in range(2):
        for l in range(L):
            torch.testing.assert_close(enc.keys[i, l, :4], plain[:4], atol=1e-5, rtol=0)
    assert not torch.allclose(enc.keys[0, 0, 4], plain[4], atol=1e-3)


def test_two_concepts_in_one_prompt_each_get_their_own_vector(tiny_pipe, conditioner):
    a = make_concept(tiny_pipe, "<a>", seed=1)
    b = make_concept(tiny_pipe, "<b>", "dog", seed=2)
    prompt = conditioner.tokenize("a <a> and <b>", ["<a>", "<b>"])  # slots at 2 and 4
    seen = []
    body = conditioner._body
    conditioner._body = lambda embeds: seen.append(embeds.clone()) or body(embeds)
    timesteps = [999.0, 0.0]
    with torch.no_grad():
        enc = conditioner.encode_grid(prompt, {"<a>": a, "<b>": b}, timesteps, L)
        t, l = torch.meshgrid(torch.tensor(timesteps), torch.arange(L, dtype=torch.float32), indexing="ij")
        t, l = t.reshape(-1), l.reshape(-1)
        embeds = torch.cat(seen)  # (T * L, S, D), t-major, over the text-encoder calls
        torch.testing.assert_close(embeds[:, 2], a(t, l).base, atol=1e-6, rtol=0)
        torch.testing.assert_close(embeds[:, 4], b(t, l).base, atol=1e-6, rtol=0)
        assert not torch.allclose(embeds[:, 2], embeds[:, 4])
        only_a = conditioner.encode_grid(conditioner.tokenize("a <a> and the", ["<a>"]), {"<a>": a}, timesteps, L)
    torch.testing.assert_close(enc.keys[:, :, :3], only_a.keys[:, :, :3], atol=1e-5, rtol=0)


def test_a_concept_not_in_the_prompt_is_ignored(tiny_pipe, conditioner):
    a = make_concept(tiny_pipe, "<a>")
    prompt = conditioner.tokenize("a photo of the cat")
    with torch.no_grad():
        with_unused = conditioner.encode_grid(prompt, {"<a>": a}, [999.0], L)
        plain = tiny_pipe.text_encoder(plain_ids(tiny_pipe, "a photo of the cat")).last_hidden_state[0]
    torch.testing.assert_close(with_unused.keys[0, 7], plain, atol=1e-5, rtol=0)


# ---- cache ---------------------------------------------------------------------------------------------------

def test_a_second_identical_call_returns_the_cached_encoding(tiny_pipe, conditioner):
    concept = make_concept(tiny_pipe, "<thing>")
    prompt = conditioner.tokenize("a photo of <thing>", ["<thing>"])
    with torch.no_grad():
        first = conditioner.encode_grid(prompt, {"<thing>": concept}, [999.0], L, truncation=8, alpha=0.2)
        second = conditioner.encode_grid(prompt, {"<thing>": concept}, [999.0], L, truncation=8, alpha=0.2)
        other_k = conditioner.encode_grid(prompt, {"<thing>": concept}, [999.0], L, truncation=9, alpha=0.2)
        other_alpha = conditioner.encode_grid(prompt, {"<thing>": concept}, [999.0], L, truncation=8, alpha=0.3)
    assert second is first and second.rows.keys is first.rows.keys
    assert other_k is not first and other_alpha is not first


def test_an_in_place_weight_change_invalidates_the_cache(tiny_pipe, conditioner):
    concept = make_concept(tiny_pipe, "<thing>")
    prompt = conditioner.tokenize("a photo of <thing>", ["<thing>"])
    with torch.no_grad():
        first = conditioner.encode_grid(prompt, {"<thing>": concept}, [999.0], L)
        keys_before = first.keys.clone()
        concept.mapper.output_layer.bias.add_(0.5)
        second = conditioner.encode_grid(prompt, {"<thing>": concept}, [999.0], L)
    assert second is not first
    assert not torch.allclose(second.keys, keys_before)


def test_nothing_is_cached_while_gradients_are_on(tiny_pipe, conditioner):
    concept = make_concept(tiny_pipe, "<thing>").train()
    prompt = conditioner.tokenize("a photo of <thing>", ["<thing>"])
    enc = conditioner.encode_grid(prompt, {"<thing>": concept}, [999.0], L)
    assert enc.keys.requires_grad
    assert len(conditioner._cache) == 0


# ---- prompt errors -------------------------------------------------------------------------------------------

def test_format_prompt_replaces_braces_with_the_concept_token():
    assert format_prompt("a photo of {} on a beach", ["<cat>"]) == "a photo of <cat> on a beach"
    assert format_prompt("a <a> and <b>", ["<a>", "<b>"]) == "a <a> and <b>"


def test_prompt_without_the_concepts_token_is_an_error():
    with pytest.raises(ValueError, match=r"does not contain the concept's token '<cat>'"):
        format_prompt("a photo of a dog", ["<cat>"])


def test_braces_with_two_concepts_is_an_error_asking_for_their_tokens():
    with pytest.raises(ValueError, match=r"uses \{\} but 2 concepts are selected.*<a>, <b>"):
        format_prompt("a photo of {}", ["<a>", "<b>"])


def test_unknown_token_in_the_prompt_is_an_error():
    with pytest.raises(ValueError, match=r"the token '<other>', which is not a selected concept \(selected: <cat>\)"):
        format_prompt("a <cat> and <other>", ["<cat>"])


@pytest.mark.parametrize("empty", ["", "   "])
def test_empty_prompt_is_an_error(empty):
    with pytest.raises(ValueError, match="the prompt is empty"):
        format_prompt(empty, ["<cat>"])


def test_concept_token_beyond_77_tokens_is_an_error(conditioner):
    long = " ".join(["cat"] * 80) + " <thing>"
    with pytest.raises(ValueError, match=r"too long \(83 tokens, the model reads 77\).*<thing> falls beyond"):
        conditioner.tokenize(long, ["<thing>"])


def test_a_long_prompt_with_the_token_inside_77_is_truncated_like_clip(conditioner):
    tokenized = conditioner.tokenize("<thing> " + " ".join(["cat"] * 100), ["<thing>"])
    assert len(tokenized.ids) == 77 and tokenized.slots == ((1, "<thing>"),)
    assert tokenized.ids[-1] == conditioner.tokenizer.eos_token_id


@pytest.mark.parametrize("bad, why", [("cat", "already in the tokenizer's vocabulary"),
                                      ("Teapot", "already in the tokenizer's vocabulary"),
                                      ("my cat", "one word without spaces"),
                                      (" <x>", "one word without spaces"),
                                      ("", "one word without spaces")])
def test_placeholder_token_must_be_a_new_single_word(tiny_pipe, bad, why):
    with pytest.raises(ValueError, match=why):
        check_placeholder_token(tiny_pipe.tokenizer, bad)


def test_a_new_placeholder_token_is_accepted(tiny_pipe):
    check_placeholder_token(tiny_pipe.tokenizer, "<my-cat>")


def test_super_category_is_one_existing_token(tiny_pipe):
    assert super_category_id(tiny_pipe.tokenizer, "teapot") == tiny_pipe.tokenizer.convert_tokens_to_ids("teapot</w>")


def test_multi_token_super_category_is_an_error_showing_the_split(tiny_pipe):
    with pytest.raises(ValueError, match=r"'zebra' must be exactly one existing token.*\['z', 'e', 'b', 'r', 'a</w>'\]"):
        super_category_id(tiny_pipe.tokenizer, "zebra")
    with pytest.raises(ValueError, match=r"splits it into \['red</w>', 'cat</w>'\]"):
        super_category_id(tiny_pipe.tokenizer, "red cat")


# ---- issue 13: tokens are whole words ---------------------------------------------------------------------------

def test_a_token_matches_only_as_a_word_of_its_own(conditioner):
    tokenized = conditioner.tokenize("a art next to a heart, art's and (art)", ["art"])
    assert [t for _, t in tokenized.slots] == ["art", "art", "art"]
    assert len(conditioner.tokenize("a <dc>s and x<dc>y", ["<dc>"]).slots) == 0
    assert format_prompt("a {} next to a red heart", ["dc"]) == "a dc next to a red heart"
    with pytest.raises(ValueError, match="does not contain the concept's token 'art' as a word of its own"):
        format_prompt("a red heart", ["art"])


@pytest.mark.parametrize("token, message", [
    ("my-cat", "without angle brackets must be letters, digits and '_' only"), ("<a<b>", "must be '<name>'"),
    ("<cat", "must be '<name>'"), ("x" * 65, "more than 64"),
])
def test_tokens_that_break_the_whole_word_rule_are_refused_with_the_reason(tiny_pipe, token, message):
    with pytest.raises(ValueError, match=message):
        check_placeholder_token(tiny_pipe.tokenizer, token)
    check_placeholder_token(tiny_pipe.tokenizer, "dc")  # bare words are fine
