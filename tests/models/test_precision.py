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


def model_for(name: str, max_seq_len: int = 1024):
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset=None, vocab_size=128, hidden_size=32, num_layers=2, num_heads=4,
                                    ffn_hidden_size=64, max_seq_len=max_seq_len,
                                    positional=PositionalConfig(name=name))).eval()
    with torch.no_grad():  # away from the zero init, so that every positional path carries signal
        for layer in model.layers:
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


@pytest.mark.parametrize("name", NAMES)
def test_no_floating_point_constant_a_cast_could_round(name):
    """model.to(bf16) (DeepSpeed's module.bfloat16(), too) casts every floating buffer; there must be none, and
    the initial state of a bf16 model must be exactly the fp32 model's state cast once."""
    model = model_for(name, max_seq_len=2048)
    assert [n for n, b in model.named_buffers() if b.is_floating_point()] == []
    torch.manual_seed(3)
    reference = model.positional.initial_state(2, 2048, "cpu", torch.bfloat16)
    low = copy.deepcopy(model).to(torch.bfloat16)
    torch.manual_seed(3)  # RandPE draws its positions
    state = low.positional.initial_state(2, 2048, "cpu", torch.bfloat16)
    for a, b in zip(*(torch.utils._pytree.tree_leaves(s) for s in (state, reference)), strict=True):
        assert (a is None and b is None) or (a.dtype == b.dtype and torch.equal(a, b))


# Relative L2 error of bf16 logits against fp32 on the same weights at N = 1024, measured about 5e-3 for every
# encoding after the fix; FIRE with positions in the activation dtype measured 1.8e-2 (tolerance: 2x the good).
BF16_TOLERANCE = dict.fromkeys(NAMES, 1e-2)


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
    positions, _ = tree_map(_to_bf16, low.positional.initial_state(1, n, "cpu", torch.bfloat16))
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
