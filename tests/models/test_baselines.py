"""The baselines of TAPE.md section 7, each against its definition."""

import math

import pytest
import torch

from tape_pretrain.config import PositionalConfig
from tape_pretrain.models import build_model
from tape_pretrain.models.alibi import alibi_bias, alibi_distance_table, alibi_slopes
from tape_pretrain.models.positional import REGISTRY
from tape_pretrain.models.positional_base import rotary_frequencies, rotary_tables
from tests.models.test_tape_properties import tiny_config

TOL = dict(rtol=1e-9, atol=1e-12)


def model_for(name, seed=0, **positional):
    torch.manual_seed(seed)
    return build_model(tiny_config(positional=PositionalConfig(name=name, **positional))).double().eval()


@pytest.fixture
def ids():
    torch.manual_seed(1)
    return torch.randint(0, 97, (2, 16))


def test_registry_has_every_encoding():
    assert set(REGISTRY) == {"tape", "rope", "nope", "alibi", "fire", "xpos", "randrope"}


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_causal_and_trainable(name, ids):
    model = model_for(name).train()
    perturbed = ids.clone()
    perturbed[:, -1] = (perturbed[:, -1] + 1) % 97
    torch.manual_seed(9)
    a = model(ids)
    torch.manual_seed(9)  # RandPE draws positions: same draw for both
    b = model(perturbed)
    torch.testing.assert_close(a[:, :-1], b[:, :-1], rtol=0, atol=1e-12)
    a.sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "positional" not in n)


@pytest.mark.parametrize("name", ["rope", "alibi", "fire", "xpos", "tape"])
def test_relative_encodings_are_shift_invariant(name, ids):
    model = model_for(name)
    torch.testing.assert_close(model(ids, position_offset=37), model(ids), **TOL)


def test_nope_is_permutation_equivariant_without_mask(ids):
    model = model_for("nope")
    perm = torch.randperm(ids.shape[1])
    torch.testing.assert_close(model(ids[:, perm], causal=False), model(ids, causal=False)[:, perm], **TOL)


def test_rope_is_not_permutation_equivariant(ids):
    model = model_for("rope")
    perm = torch.randperm(ids.shape[1])
    assert not torch.allclose(model(ids[:, perm], causal=False), model(ids, causal=False)[:, perm])


def test_alibi_slopes():
    assert alibi_slopes(8).tolist() == [2 ** -(i + 1) for i in range(8)]
    twelve = alibi_slopes(12).tolist()
    assert twelve[:8] == [2 ** -(i + 1) for i in range(8)]
    assert twelve[8:] == pytest.approx([2 ** -(0.5 + i) for i in range(4)])  # every other of 16: 2^-0.5, 2^-1.5..


def test_alibi_bias_is_the_linear_penalty():
    model = model_for("alibi")
    positions = model.positional.initial_state(1, 5, "cpu", torch.float64)  # each layer builds the bias from these
    slopes = alibi_slopes(4)
    bias = alibi_bias(alibi_distance_table(slopes, 5, torch.float64), positions, positions, causal=True)
    assert bias[0, 2, 4, 1].item() == pytest.approx(-slopes[2].item() * 3)
    assert bias[0, 1, 1, 3].item() == -math.inf


@pytest.mark.parametrize("offset, scale", [(0, 1.0), (3, 0.01)])  # L~ = 512 (above every i), and L~ = 5.12
def test_fire_bias_formula(offset, scale):
    """Every (i, j) against the official formula, with psi(max(i, L~)) + eps as the normaliser, also past L~."""
    model = model_for("fire")
    layer = model.layers[0].positional
    with torch.no_grad():
        layer.threshold.fill_(scale)
        for p in layer.mlp.parameters():
            p.normal_(0, 1.0)
    positions = model.positional.initial_state(1, 8, "cpu", torch.float64, offset=offset)
    bias = layer.bias(positions, None, torch.float64)[0]  # [H, N, N]
    c, limit = layer.c.item(), abs(layer.threshold.item() * 512.0)
    for i in range(8):
        for j in range(8):
            pos_i, pos_j = i + offset, j + offset
            x = math.log(abs(c * (pos_i - pos_j)) + 1) / (math.log(abs(c * max(pos_i, limit)) + 1) + 1e-6)
            expected = layer.mlp(torch.tensor([[x]], dtype=torch.float64))[0]
            torch.testing.assert_close(bias[:, i, j], expected, **TOL)


def test_xpos_scales_q_up_and_k_down():
    model = model_for("xpos", xpos_scale_base=512.0)
    cos_q, sin_q, cos_k, sin_k = model.positional.initial_state(1, 8, "cpu", torch.float64)
    d = model.positional.head_dim
    zeta = (torch.arange(0, d, 2, dtype=torch.float64) + 0.4 * d) / (1.4 * d)
    n = 7
    torch.testing.assert_close(torch.hypot(cos_q, sin_q)[0, 0, n], zeta ** (n / 512.0), **TOL)
    torch.testing.assert_close(torch.hypot(cos_k, sin_k)[0, 0, n], zeta ** (-n / 512.0), **TOL)


def test_randrope_positions_are_sorted_distinct_and_resampled():
    model = model_for("randrope", randrope_max_len=128).train()
    a = model.positional.positions(3, 16, "cpu", 0)
    b = model.positional.positions(3, 16, "cpu", 0)
    assert a.shape == (3, 16) and (a.diff(dim=-1) > 0).all() and a.max() < 128
    assert not torch.equal(a, b)


# tiny_config's max_seq_len is 64: training draws from [0, 128), neighbours about 2 apart
@pytest.mark.parametrize("n", [16, 64, 256])  # shorter than, equal to and 4x the training length
def test_randrope_eval_samples_the_training_gaps_over_twice_the_length(n):
    """TAPE.md section 7: the official code samples at evaluation too, over [0, 2 N_eval)."""
    model = model_for("randrope")
    positions = model.positional.positions(256, n, "cpu", 0)  # [B, N]: one draw per row
    assert positions.shape == (256, n) and positions.dtype == torch.int64
    assert positions.min() >= 0 and positions.max() < 2 * n and positions.max() >= 2 * n - 8
    gaps = positions.diff(dim=-1)
    assert (gaps > 0).all()  # sorted and distinct
    # N of the 2N integers, each kept with probability 1/2: mean gap (2N+1)/(N+1) ~ 2, half of the gaps 1
    assert gaps.double().mean().item() == pytest.approx((2 * n + 1) / (n + 1), rel=0.02)
    assert (gaps == 1).double().mean().item() == pytest.approx(0.5, abs=0.03)
    assert len({tuple(row) for row in positions.tolist()}) == 256  # rows draw independently


def test_randrope_eval_range_follows_max_len():
    """randrope_max_len = 3 x max_seq_len: training gaps about 3, so evaluation draws from [0, 3N)."""
    positions = model_for("randrope", randrope_max_len=192).positional.positions(64, 32, "cpu", 0)
    assert positions.max() < 96 and positions.diff(dim=-1).double().mean().item() == pytest.approx(97 / 33, rel=0.03)
    expected = model_for("randrope", randrope_max_len=192, randrope_eval="expected")
    assert torch.equal(expected.positional.positions(1, 32, "cpu", 0)[0], torch.arange(32) * 3)


def test_randrope_eval_is_reproducible_and_leaves_the_global_rng_alone(ids):
    model = model_for("randrope")
    rng = torch.get_rng_state()
    a = model(ids)
    assert torch.equal(torch.get_rng_state(), rng)
    torch.manual_seed(123)  # another global stream, another batch size: the same draw for the same row
    assert torch.equal(model(ids), a) and torch.equal(model(ids[:1]), a[:1])
    other_seed = model_for("randrope", randrope_eval_seed=1)
    assert not torch.allclose(other_seed(ids), a)
    assert torch.equal(model.positional.positions(2, 16, "cpu", 5), model.positional.positions(2, 16, "cpu", 0) + 5)


def test_randrope_expected_eval_positions_are_twice_the_index():
    model = model_for("randrope", randrope_eval="expected")
    for n in (1, 16, 64, 256):
        assert torch.equal(model.positional.positions(3, n, "cpu", 0), 2 * torch.arange(n)[None])
    assert torch.equal(model.positional.positions(3, 8, "cpu", 7), 2 * torch.arange(8)[None] + 7)


@pytest.mark.parametrize("mode", ["sample", "expected"])
def test_randrope_eval_is_rope_at_its_positions(ids, mode):
    rope, rand = model_for("rope"), model_for("randrope", randrope_eval=mode)
    rand.load_state_dict(rope.state_dict())
    positions = rand.positional.positions(ids.shape[0], ids.shape[1], "cpu", 0)
    assert not torch.equal(positions, torch.arange(ids.shape[1]).expand_as(positions))
    theta = rotary_frequencies(rope.positional.head_dim, 10000.0)
    cos, sin = rotary_tables(positions, theta, torch.float64)
    torch.testing.assert_close(rand(ids), rope(ids, initial_state=(cos.unsqueeze(1), sin.unsqueeze(1))), **TOL)
    assert not torch.allclose(rand(ids), rope(ids))  # no longer RoPE at 0..N-1


def test_xpos_interpolates_its_rotation_not_its_decay(ids):
    """With a decay scale so large that zeta^(n/s) is 1 to rounding, xPos is RoPE: interpolation must then give RoPE
    with the same interpolation (whose angles are checked against transformers in tests/train/test_llama_init.py)."""
    logits = {}
    for factor in (1.0, 2.5):
        models = {}
        for name, extra in (("xpos", {"xpos_scale_base": 1e15}), ("rope", {})):
            torch.manual_seed(0)
            models[name] = build_model(tiny_config(positional=PositionalConfig(name=name, interpolation=factor,
                                                                               **extra)))
        with torch.no_grad():
            logits[factor] = models["xpos"](ids)
            assert (logits[factor] - models["rope"](ids)).abs().max().item() <= 1e-5
    assert not torch.allclose(logits[1.0], logits[2.5])
