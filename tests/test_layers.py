"""Specification of neti.layers and neti.attention: the UNet's cross-attention layers in forward order with SD's
names (docs/method.md "Base model and layers"), and the per-layer key/value cross-attention processor (paper
Sec. 3.1, 3.3).
"""

from __future__ import annotations

import pytest
import torch

from neti.attention import NetiCrossAttnProcessor, install_processors, pack, unpack
from neti.layers import cross_attention_layers, resolve_layer_names

SD_NAMES = ["IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID",
            "OUT03", "OUT04", "OUT05", "OUT06", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11"]


def unet_call(unet, batch=1):
    cfg = unet.config
    sample = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=torch.Generator().manual_seed(0))
    text = torch.randn(batch, 77, cfg.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return unet(sample, torch.tensor([500]), encoder_hidden_states=text).sample


def test_tiny_unet_has_16_cross_attention_layers_with_sd_names(tiny_pipe):
    layers = cross_attention_layers(tiny_pipe.unet)
    assert [x.name for x in layers] == SD_NAMES
    assert [x.index for x in layers] == list(range(16))
    assert layers[0].path == "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    assert layers[6].path == "mid_block.attentions.0.transformer_blocks.0.attn2"
    assert layers[7].path == "up_blocks.1.attentions.0.transformer_blocks.0.attn2"
    assert layers[15].path == "up_blocks.3.attentions.2.transformer_blocks.0.attn2"


def test_layers_are_listed_in_the_order_the_unet_runs_them(tiny_pipe):
    unet = tiny_pipe.unet
    modules = dict(unet.named_modules())
    called = []
    handles = [modules[p].register_forward_hook(lambda m, a, o, p=p: called.append(p))
               for p in modules if p.endswith("attn2")]
    try:
        unet_call(unet)
    finally:
        for h in handles:
            h.remove()
    assert called == [x.path for x in cross_attention_layers(unet)]
    # diffusers' attn_processors lists the mid block last, which is why the order is rebuilt
    listed = [k.removesuffix(".processor") for k in unet.attn_processors if ".attn2." in k or k.endswith("attn2.processor")]
    assert listed != called and listed[-1].startswith("mid_block")


def test_resolve_layer_names_gives_forward_indices_case_insensitively(tiny_pipe):
    layers = cross_attention_layers(tiny_pipe.unet)
    assert resolve_layer_names(layers, ["IN07", "IN08", "MID"]) == [4, 5, 6]
    assert resolve_layer_names(layers, ["in07", " mid ", "Out11"]) == [4, 6, 15]


def test_unknown_layer_name_is_an_error_listing_the_valid_ones(tiny_pipe):
    layers = cross_attention_layers(tiny_pipe.unet)
    with pytest.raises(ValueError, match=r"unknown layer name 'IN03'.*IN01, IN02, IN04, IN05, IN07, IN08, MID, OUT03"):
        resolve_layer_names(layers, ["IN07", "IN03"])


def test_a_model_without_cross_attention_is_refused():
    with pytest.raises(ValueError, match="no cross-attention layers"):
        cross_attention_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))


# ---- attention -----------------------------------------------------------------------------------------------

def test_pack_then_unpack_returns_keys_and_values():
    keys, values = torch.randn(3, 16, 77, 8), torch.randn(3, 16, 77, 8)
    packed = pack(keys, values)
    assert packed.shape == (3, 16 * 2 * 77, 8)
    k, v = unpack(packed, 16)
    assert torch.equal(k, keys) and torch.equal(v, values)
    # layer l's keys then its values are contiguous: [K0, V0, K1, V1, ...]
    assert torch.equal(packed[:, 77:154], values[:, 0]) and torch.equal(packed[:, 154:231], keys[:, 1])


def test_unpack_rejects_a_length_that_is_not_a_multiple_of_2L():
    with pytest.raises(ValueError, match="77 is not a multiple of 2 x 16"):
        unpack(torch.randn(1, 77, 8), 16)


def test_processor_with_plain_text_equals_diffusers_attnprocessor2_0():
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    torch.manual_seed(0)
    attn = Attention(query_dim=32, cross_attention_dim=8, heads=4, dim_head=8)
    hidden, text = torch.randn(2, 64, 32), torch.randn(2, 77, 8)
    with torch.no_grad():
        expected = AttnProcessor2_0()(attn, hidden, encoder_hidden_states=text)
        ours = NetiCrossAttnProcessor(index=3, num_layers=16)(attn, hidden, encoder_hidden_states=text)
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)


def test_processor_with_known_seq_len_runs_a_plain_32_token_prompt_with_16_layers():
    """The bundled model's prompts are 32 tokens and 2 x 16 layers = 32: without `seq_len` such a plain
    encoding would be read as packed (1 token per layer)."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    torch.manual_seed(0)
    attn = Attention(query_dim=32, cross_attention_dim=8, heads=4, dim_head=8)
    hidden, text = torch.randn(2, 64, 32), torch.randn(2, 32, 8)
    keys, values = torch.randn(2, 16, 32, 8), torch.randn(2, 16, 32, 8)
    with torch.no_grad():
        expected = AttnProcessor2_0()(attn, hidden, encoder_hidden_states=text)
        ours = NetiCrossAttnProcessor(index=3, num_layers=16, seq_len=32)(attn, hidden, encoder_hidden_states=text)
        guessing = NetiCrossAttnProcessor(index=3, num_layers=16)(attn, hidden, encoder_hidden_states=text)
        packed = NetiCrossAttnProcessor(index=3, num_layers=16, seq_len=32)(
            attn, hidden, encoder_hidden_states=pack(keys, values))
        reference = NetiCrossAttnProcessor(index=3, num_layers=16)(attn, hidden, encoder_hidden_states=pack(keys, values))
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)
    assert not torch.allclose(guessing, expected, atol=1e-3)
    torch.testing.assert_close(packed, reference, atol=0, rtol=0)


def test_processor_uses_its_own_layers_keys_and_values():
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    torch.manual_seed(0)
    attn = Attention(query_dim=32, cross_attention_dim=8, heads=4, dim_head=8)
    hidden = torch.randn(2, 64, 32)
    keys, values = torch.randn(2, 16, 77, 8), torch.randn(2, 16, 77, 8)
    with torch.no_grad():
        ours = NetiCrossAttnProcessor(index=5, num_layers=16)(attn, hidden, encoder_hidden_states=pack(keys, values))
        # reference: softmax(q k^T / sqrt(d)) v with k from keys[:, 5] and v from values[:, 5]
        q = attn.to_q(hidden).view(2, 64, 4, 8).transpose(1, 2)
        k = attn.to_k(keys[:, 5]).view(2, 77, 4, 8).transpose(1, 2)
        v = attn.to_v(values[:, 5]).view(2, 77, 4, 8).transpose(1, 2)
        weights = (q @ k.transpose(-1, -2) / 8 ** 0.5).softmax(-1)
        expected = attn.to_out[0]((weights @ v).transpose(1, 2).reshape(2, 64, 32))
        same_kv = AttnProcessor2_0()(attn, hidden, encoder_hidden_states=keys[:, 5])
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(ours, same_kv, atol=1e-4)


def test_installed_processors_leave_a_plain_unet_call_unchanged(tiny_pipe):
    unet = tiny_pipe.unet
    before = unet_call(unet)
    layers = cross_attention_layers(unet)
    install_processors(unet, layers, seq_len=tiny_pipe.tokenizer.model_max_length)
    processors = unet.attn_processors
    assert sum(isinstance(p, NetiCrossAttnProcessor) for p in processors.values()) == 16
    assert not isinstance(processors["down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor"],
                          NetiCrossAttnProcessor)  # self-attention keeps diffusers' processor
    torch.testing.assert_close(unet_call(unet), before, atol=1e-5, rtol=0)
