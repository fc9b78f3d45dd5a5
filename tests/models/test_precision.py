"""Positions never in low precision (TAPE.md section 7, "Precision"): every encoding under bf16 parameters and
activations, as FSDP2's param_dtype (with cast_forward_inputs) and DeepSpeed's bf16 mode compute."""

import copy

import pytest
import torch
from torch.utils._pytree import tree_map

from tape_pretrain.config import ModelConfig, PositionalConfig
from tape_pretrain.models import build_model
from tape_pretrain.models.positional import REGISTRY

NAMES = sorted(REGISTRY)


def model_for(name: str, max_seq_len: int = 1024, num_heads: int = 4):
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset=None, vocab_size=128, hidden_size=8 * num_heads, num_layers=2,
                                    num_heads=num_heads, ffn_hidden_size=64, max_seq_len=max_seq_len,
                                    # RandPE at its draw-free eval positions (2i), which truth_state can write
                                    positional=PositionalConfig(name=name, randrope_eval="expected"))).eval()
    with torch.no_grad():  # away from the zero init, so that every positional path carries signal
        for layer in model.layers:
            # sharp attention (std 0.02 leaves it nearly uniform, where positions barely move the logits)
            layer.self_attn.q_proj.weight.normal_(0, 0.3)
            layer.self_attn.k_proj.weight.normal_(0, 0.3)
            if name == "tape":
                layer.positional.post_attention_linear.weight.normal_(0, 0.1)
                layer.positional.pe.up_proj.weight.normal_(0, 0.1)
            if name == "fire":
                for p in layer.positional.mlp.parameters():
                    p.normal_(0, 1.0)
    return model


def _to_bf16(value):
    return value.to(torch.bfloat16) if torch.is_tensor(value) and value.is_floating_point() else value


def as_engines_compute_bf16(model):
    """A bf16 copy whose blocks receive their floating-point inputs cast to bf16, the positional state included
    (what FSDP2's MixedPrecisionPolicy(param_dtype=bf16, cast_forward_inputs=True) does to each block)."""
    low = copy.deepcopy(model).to(torch.bfloat16)
    for block in low.layers:
        block.register_forward_pre_hook(lambda m, args, kwargs: (tree_map(_to_bf16, args), tree_map(_to_bf16, kwargs)),
                                        with_kwargs=True)
    return low


def truth_state(name: str, n: int, heads: int, head_dim: int, base: float = 10000.0, xpos_scale: float = 2048.0):
    """Each encoding's initial state written from its definition (TAPE.md sections 2 and 7) in fp64 from integers,
    independently of the model's code; rounded to bf16 once, it is what a bf16 model must hand its first block."""
    positions = torch.arange(n, dtype=torch.float64)[:, None]  # [N, 1]
    theta = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # [F]
    cos, sin = (positions * theta).cos(), (positions * theta).sin()  # [N, F]
    if name == "rope":
        return cos[None, None], sin[None, None]
    if name == "randrope":  # model_for's randrope_eval=expected: positions 2i in eval mode
        return (2 * positions * theta).cos()[None, None], (2 * positions * theta).sin()[None, None]
    if name == "tape":
        return torch.cat((cos, sin), -1).expand(1, heads, n, head_dim)
    if name == "xpos":
        zeta = (torch.arange(0, head_dim, 2, dtype=torch.float64) + 0.4 * head_dim) / (1.4 * head_dim)
        scale = zeta ** (positions / xpos_scale)
        return tuple(t[None, None] for t in (cos * scale, sin * scale, cos / scale, sin / scale))
    if name in ("alibi", "fire"):  # integer positions: each layer builds its bias from them per block of queries
        return torch.arange(n)  # (the bias a bf16 block builds: tests/models/test_linear_memory.py)
    return None


@pytest.mark.parametrize("name", NAMES)
def test_bf16_initial_state_is_the_fp64_truth_rounded_once(name):
    """Positions, distances, angles and constants in bf16 (or a bf16 theta, zeta or slope: what model.to(bf16) does
    to a floating buffer) round twice or worse; at N = 1024 bf16 cannot even hold the positions."""
    n = 1024
    heads = 12 if name == "alibi" else 4  # ALiBi at 12 heads has slopes that are not powers of two (2^-0.5, ...)
    low = as_engines_compute_bf16(model_for(name, max_seq_len=n, num_heads=heads).eval())
    assert [key for key, b in low.named_buffers() if b.is_floating_point()] == []
    state = tree_map(_to_bf16, low.positional.initial_state(1, n, "cpu", torch.bfloat16))  # as a block receives it
    truth = truth_state(name, n, heads=heads, head_dim=8)
    got, want = torch.utils._pytree.tree_leaves(state), torch.utils._pytree.tree_leaves(truth)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        if b is None:  # NoPE
            assert a is None
            continue
        b = b.to(torch.bfloat16) if b.is_floating_point() else b
        assert a.dtype == b.dtype and torch.equal(a.expand_as(b), b), name


def test_rms_norm_normalises_bf16_in_fp32():
    from tape_pretrain.models.transformer import RMSNorm

    torch.manual_seed(0)
    norm = RMSNorm(64, 1e-5).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.1)
    x = (torch.randn(4, 64) * 30).to(torch.bfloat16)
    x32 = x.float()
    want = norm.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16)
    assert torch.equal(norm(x), want)


# Relative L2 error of bf16 logits against fp32 on the same weights at N = 1024, with attention sharp enough that
# positions move the logits by 0.11 (FIRE) to 0.48 (RoPE). Measured after the fix / before it (theta rounded by
# model.to(bf16), FIRE positions in bf16): alibi 6.4e-3 / 6.4e-3, fire 6.1e-3 / 1.07e-2, nope 6.1e-3 / 6.1e-3,
# randrope and rope 6.9e-3 / 1.14e-2, tape 7.0e-3 / 1.13e-2, xpos 6.7e-3 / 8.8e-3. Tolerance: 1.25x the fixed value
# (the computation is deterministic on a given CPU).
BF16_TOLERANCE = {"alibi": 8.0e-3, "fire": 7.6e-3, "nope": 7.6e-3, "randrope": 8.6e-3, "rope": 8.6e-3,
                  "tape": 8.8e-3, "xpos": 8.4e-3}


@pytest.mark.parametrize("name", NAMES)
def test_bf16_logits_match_fp32(name):
    model = model_for(name)
    ids = torch.randint(0, 128, (1, 1024), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        reference = model(ids).double()
        low = as_engines_compute_bf16(model)(ids)
    assert low.dtype == torch.bfloat16
    error = ((low.double() - reference).norm() / reference.norm()).item()
    assert error <= BF16_TOLERANCE[name], f"{name}: bf16 logits differ from fp32 by {error:.2e} (relative L2)"


def test_fire_distances_stay_exact_at_8192_in_a_bf16_model():
    """In bf16, the integers near 8192 are 32 apart: a bias built from bf16 positions puts a query's nearest keys at
    distance 0. Built from the state an engine hands a bf16 block, the last query's bias must be the fp64 one."""
    n = 8192
    low = as_engines_compute_bf16(model_for("fire", max_seq_len=n))
    positions = tree_map(_to_bf16, low.positional.initial_state(1, n, "cpu", torch.bfloat16))
    assert torch.equal(positions, torch.arange(n))
    layer = low.layers[0].positional
    tail = positions[-8:]  # queries 8184..8191 against keys 8184..8191
    bias = layer.bias(tail, None, torch.float32)[0, :, -1]  # [H, 8]: query 8191
    c, limit = layer.c.double(), (layer.threshold.double() * 512.0).abs()
    distance = (8191 - tail).double()
    normalised = torch.log((c * distance).abs() + 1) / (torch.log((c * max(8191.0, limit)).abs() + 1) + 1e-6)
    first, second = layer.mlp[0], layer.mlp[2]
    expected = torch.relu(normalised[:, None] * first.weight.double().T + first.bias.double()) @ \
        second.weight.double().T + second.bias.double()  # [8, H]
    torch.testing.assert_close(bias.double(), expected.T, rtol=1e-5, atol=1e-5)
    assert len(set(bias[0].tolist())) == 8  # eight distinct distances, not collapsed ones
