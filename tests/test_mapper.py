"""Specification of the NeTI mapper M(t, l) (docs/method.md "The mapper", "Nested dropout"; paper Sec. 3.2-3.4,
App. A-B).

Numbers are those of the paper and the official code: D = 768 and L = 16 give 464,544 trainable parameters
without the textual bypass and 563,616 with it; the anchors are t = 0, 100, ..., 900 times every layer.
"""

from __future__ import annotations

import pytest
import torch

from neti.config import MapperConfig
from neti.mapper import NetiMapper, VectorTable, build_mapper, check_truncation, count_parameters, parse_truncations
from neti.positional_encoding import FourierEncoding

D, L = 768, 16


def sd_config(**overrides) -> MapperConfig:
    """The SD 1.x shape: D = 768, L = 16, a super-category norm of about CLIP's (0.39)."""
    return MapperConfig(**{"token_dim": D, "num_layers": L, "target_norm": 0.39, **overrides})


def expected_neti_parameters(token_dim: int, num_layers: int, bypass: bool, kept_units: int = 128) -> int:
    """Anchor projection (2048 -> 160), two 128-wide Linear + LayerNorm layers, output Linear (k -> D or 2D)."""
    anchors = 10 * num_layers
    out = token_dim * (2 if bypass else 1)
    return ((2048 * anchors + anchors) + (anchors * 128 + 128) + 2 * 128 + (128 * 128 + 128) + 2 * 128
            + (kept_units * out + out))


def grid(timesteps, layers):
    t, l = torch.meshgrid(torch.tensor(timesteps, dtype=torch.float32),
                          torch.tensor(layers, dtype=torch.float32), indexing="ij")
    return t.reshape(-1), l.reshape(-1)


# ---- parameter counts ----------------------------------------------------------------------------------------

def test_neti_without_bypass_has_464544_trainable_parameters():
    mapper = NetiMapper(sd_config(use_bypass=False))
    assert count_parameters(mapper) == 464_544
    assert expected_neti_parameters(D, L, bypass=False) == 464_544


def test_neti_with_bypass_has_563616_trainable_parameters():
    mapper = NetiMapper(sd_config(use_bypass=True))
    assert count_parameters(mapper) == 563_616
    assert expected_neti_parameters(D, L, bypass=True) == 563_616


@pytest.mark.parametrize("kept, expected", [(32, 390_816), (8, 372_384)])
def test_keeping_fewer_hidden_units_shrinks_only_the_output_layer(kept, expected):
    # 464,544 - (128 - k) * 768 weights of the output layer (paper App. B: ~390k for k = 32)
    mapper = NetiMapper(sd_config(use_bypass=False, kept_units=kept))
    assert count_parameters(mapper) == expected_neti_parameters(D, L, bypass=False, kept_units=kept) == expected
    assert mapper.output_layer.weight.shape == (D, kept)


def test_xti_has_one_vector_per_layer_and_ti_one_vector():
    assert count_parameters(build_mapper(sd_config(method="xti"))) == L * D == 12_288
    assert count_parameters(build_mapper(sd_config(method="ti"))) == D == 768


def test_frequencies_are_a_buffer_in_the_state_dict_and_not_counted():
    mapper = NetiMapper(sd_config())
    state = mapper.state_dict()
    assert state["encoding.frequencies"].shape == (1024, 2)
    assert "encoding.frequencies" in dict(mapper.named_buffers())
    assert "encoding.frequencies" not in dict(mapper.named_parameters())
    total = sum(v.numel() for v in state.values())
    assert total == count_parameters(mapper) + 1024 * 2


def test_frequencies_follow_sigma_t_003_and_sigma_l_2():
    w = FourierEncoding(1024, sigma_t=0.03, sigma_l=2.0, seed=0).frequencies
    assert w[:, 0].std().item() == pytest.approx(0.03, rel=0.1)
    assert w[:, 1].std().item() == pytest.approx(2.0, rel=0.1)


def test_same_seed_gives_same_frequencies_and_other_seed_other_ones():
    a, b, c = (FourierEncoding(seed=s).frequencies for s in (3, 3, 4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# ---- positional encoding and anchors -------------------------------------------------------------------------

def test_positional_encoding_rows_are_unit_norm_sin_cos_of_w_x():
    enc = FourierEncoding(seed=0)
    t, l = torch.tensor([0.0, 999.0, 421.5]), torch.tensor([0.0, 15.0, 7.0])
    f = enc(t, l)
    assert f.shape == (3, 2048)
    torch.testing.assert_close(f.norm(dim=-1), torch.ones(3), atol=1e-6, rtol=0)
    phase = torch.stack([t, l], -1) @ enc.frequencies.T
    raw = torch.cat([phase.sin(), phase.cos()], -1)
    torch.testing.assert_close(f, raw / raw.norm(dim=-1, keepdim=True), atol=1e-6, rtol=0)
    # sin^2 + cos^2 = 1 per frequency, so the norm before dividing is sqrt(1024) = 32
    torch.testing.assert_close(raw.norm(dim=-1), torch.full((3,), 32.0), atol=1e-4, rtol=0)


def test_anchor_projection_is_initialised_with_encodings_of_t_0_to_900_times_l_t_major():
    mapper = NetiMapper(sd_config())
    weight = mapper.input_layer.weight.detach()
    assert weight.shape == (160, 2048)
    for row, (t, l) in enumerate((t, l) for t in range(0, 1000, 100) for l in range(L)):
        expected = mapper.encoding(torch.tensor([float(t)]), torch.tensor([float(l)]))[0]
        torch.testing.assert_close(weight[row], expected, atol=1e-6, rtol=0)
    assert mapper.input_layer.bias is not None and mapper.input_layer.weight.requires_grad  # trainable [code]


# ---- output rescaling ----------------------------------------------------------------------------------------

def test_with_bypass_the_whole_2d_output_has_the_super_category_norm_and_v_base_alone_less():
    mapper = NetiMapper(sd_config(target_norm=0.39)).eval()
    t, l = grid([999, 500, 0], range(L))
    out = mapper(t, l)
    assert out.base.shape == out.bypass.shape == (48, D)
    whole = torch.cat([out.base, out.bypass], -1).norm(dim=-1)
    torch.testing.assert_close(whole, torch.full((48,), 0.39), atol=1e-5, rtol=0)
    assert (out.base.norm(dim=-1) < 0.39 - 1e-3).all()


def test_without_bypass_v_base_has_the_super_category_norm():
    mapper = NetiMapper(sd_config(use_bypass=False, target_norm=0.39)).eval()
    out = mapper(*grid([999, 0], range(L)))
    assert out.bypass is None
    torch.testing.assert_close(out.base.norm(dim=-1), torch.full((32,), 0.39), atol=1e-5, rtol=0)


def test_mapper_depends_on_time_and_layer():
    mapper = NetiMapper(sd_config()).eval()
    out = mapper(torch.tensor([999.0, 0.0, 999.0]), torch.tensor([3.0, 3.0, 12.0])).base
    assert not torch.allclose(out[0], out[1])
    assert not torch.allclose(out[0], out[2])


# ---- nested dropout and truncation ---------------------------------------------------------------------------

def test_in_eval_truncation_128_equals_no_truncation():
    mapper = NetiMapper(sd_config()).eval()
    t, l = grid([999, 321, 0], range(L))
    full, k128 = mapper(t, l), mapper(t, l, truncation=128)
    assert torch.equal(full.base, k128.base) and torch.equal(full.bypass, k128.bypass)


@pytest.mark.parametrize("k", [1, 8, 32, 100])
def test_with_truncation_k_output_weights_of_units_k_and_beyond_change_nothing(k):
    mapper = NetiMapper(sd_config()).eval()
    t, l = grid([999, 500, 1], range(L))
    before = mapper(t, l, truncation=k)
    with torch.no_grad():
        mapper.output_layer.weight[:, k:] += torch.randn_like(mapper.output_layer.weight[:, k:])
    after = mapper(t, l, truncation=k)
    assert torch.equal(before.base, after.base) and torch.equal(before.bypass, after.bypass)
    assert not torch.equal(mapper(t, l).base, before.base)  # without truncation those weights do matter


def hidden_units_seen_by_output_layer(mapper, t, l):
    seen = []
    handle = mapper.output_layer.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    try:
        mapper(t, l)
    finally:
        handle.remove()
    return seen[0]  # (N, kept_units)


def test_training_with_nested_dropout_prob_1_zeroes_a_suffix_of_units_in_every_row():
    torch.manual_seed(0)
    mapper = NetiMapper(sd_config(nested_dropout_prob=1.0)).train()
    t, l = grid(list(range(0, 1000, 50)), range(L))  # 320 rows
    h = hidden_units_seen_by_output_layer(mapper, t, l)
    nonzero = h != 0
    kept = nonzero.sum(dim=1)
    assert (kept < 128).all()  # k ~ U{0..127}: every row loses at least unit 127
    # the zeroed units are a suffix: row r keeps exactly units 0..kept[r]-1
    assert torch.equal(nonzero, torch.arange(128)[None, :] < kept[:, None])
    assert kept.float().mean().item() == pytest.approx(63.5, abs=12)  # uniform over 0..127


def test_training_with_nested_dropout_prob_0_is_deterministic_and_equals_eval():
    mapper = NetiMapper(sd_config(nested_dropout_prob=0.0))
    t, l = grid([999, 500, 0], range(L))
    mapper.train()
    a, b = mapper(t, l), mapper(t, l)
    mapper.eval()
    c = mapper(t, l)
    assert torch.equal(a.base, b.base) and torch.equal(a.base, c.base) and torch.equal(a.bypass, c.bypass)


def test_training_without_nested_dropout_keeps_every_unit():
    mapper = NetiMapper(sd_config(use_nested_dropout=False, nested_dropout_prob=1.0)).train()
    h = hidden_units_seen_by_output_layer(mapper, *grid([999, 0], range(L)))
    assert (h != 0).all()


def test_training_with_prob_half_drops_whole_layers_together():
    # one coin per layer, as the official code calls the mapper once per layer
    torch.manual_seed(1)
    mapper = NetiMapper(sd_config(nested_dropout_prob=0.5)).train()
    t, l = grid(list(range(0, 1000, 100)), range(L))
    h = hidden_units_seen_by_output_layer(mapper, t, l)
    full_rows = (h != 0).all(dim=1).view(10, L)  # (T, L)
    assert (full_rows.all(dim=0) | (~full_rows).any(dim=0)).all()
    assert 0 < full_rows[0].sum() < L  # with 16 coins at 0.5 some layers drop and some do not


@pytest.mark.parametrize("bad", [0, 129, -1, 2.5, True, "32"])
def test_truncation_outside_1_to_128_is_a_value_error_naming_the_value(bad):
    mapper = NetiMapper(sd_config()).eval()
    with pytest.raises(ValueError, match=f"truncation {bad!r} is out of range.*1 to 128"):
        mapper(torch.tensor([1.0]), torch.tensor([0.0]), truncation=bad)
    with pytest.raises(ValueError, match=repr(bad).replace(".", r"\.")):
        check_truncation(bad)


@pytest.mark.parametrize("good", [None, 1, 64, 128])
def test_truncation_none_or_1_to_128_is_accepted(good):
    check_truncation(good)


def test_truncations_written_as_text_are_1_to_128_or_full():
    assert parse_truncations("4, 16 64,128 full None 129") == [4, 16, 64, 128, None, None, None]
    for bad in ("0", "130", "-4", "8.5", "all"):
        with pytest.raises(ValueError, match=f"truncation '{bad}' is not understood; give values in 1..128"):
            parse_truncations(bad)



# ---- baselines -----------------------------------------------------------------------------------------------

def test_xti_returns_its_layer_vector_for_any_timestep_and_ti_one_vector_everywhere():
    xti = VectorTable(sd_config(method="xti"))
    ti = VectorTable(sd_config(method="ti"))
    with torch.no_grad():
        xti.vectors.copy_(torch.arange(L, dtype=torch.float32)[:, None].expand(L, D))
        ti.vectors.fill_(7.0)
    out = xti(torch.tensor([999.0, 0.0, 500.0]), torch.tensor([2.0, 2.0, 9.0]))
    assert out.bypass is None
    assert out.base[:, 0].tolist() == [2.0, 2.0, 9.0]
    assert (ti(torch.tensor([3.0, 900.0]), torch.tensor([0.0, 15.0])).base == 7.0).all()


def test_config_rejects_unknown_method_and_out_of_range_kept_units():
    with pytest.raises(ValueError, match="method 'dreambooth' is unknown"):
        MapperConfig(method="dreambooth")
    with pytest.raises(ValueError, match="kept_units must be in 1..128, got 0"):
        MapperConfig(kept_units=0)


def test_config_round_trips_through_json():
    cfg = sd_config(kept_units=32, sigma_t=0.05)
    assert MapperConfig.from_json(cfg.to_json()) == cfg
