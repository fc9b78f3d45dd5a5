"""The baselines of TAPE.md section 7, each against its definition."""

import math

import pytest
import torch

from tape_pretrain.config import PositionalConfig
from tape_pretrain.models import build_model
from tape_pretrain.models.positional import REGISTRY
from tape_pretrain.models.positional.alibi import alibi_slopes
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
    bias = model.positional.initial_state(1, 5, "cpu", torch.float64)
    slopes = alibi_slopes(4)
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
    positions, _ = model.positional.initial_state(1, 8, "cpu", torch.float64, offset=offset)
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
    model.eval()
    assert torch.equal(model.positional.positions(3, 16, "cpu", 0)[0], torch.arange(16))


def test_randrope_eval_equals_rope(ids):
    rope, rand = model_for("rope"), model_for("randrope")
    rand.load_state_dict(rope.state_dict())
    torch.testing.assert_close(rand(ids), rope(ids), **TOL)
