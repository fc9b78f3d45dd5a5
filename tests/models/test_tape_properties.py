"""The properties of TAPE.md section 5, in float64 on CPU (tolerance 1e-9 relative)."""

import math

import pytest
import torch

from tape_pretrain.config import ModelConfig, PositionalConfig
from tape_pretrain.models import build_model
from tape_pretrain.models.positional_base import apply_rotary

TOL = dict(rtol=1e-9, atol=1e-12)


def tiny_config(name="tape", **overrides):
    fields = dict(preset=None, vocab_size=97, hidden_size=32, num_layers=3, num_heads=4, ffn_hidden_size=48,
                  max_seq_len=64, positional=PositionalConfig(name=name))
    fields.update(overrides)
    return ModelConfig(**fields)


def tape_model(random_updates=True, seed=0, **overrides):
    torch.manual_seed(seed)
    model = build_model(tiny_config(**overrides)).double()
    if random_updates:  # leave the zero init so that the state really moves
        with torch.no_grad():
            for layer in model.layers:
                layer.positional.post_attention_linear.weight.normal_(0, 0.3)
                layer.positional.pe.up_proj.weight.normal_(0, 0.3)
                layer.positional.pe.x_proj.weight.normal_(0, 0.3)  # large enough that negative controls fail
                layer.positional.pe.down_proj.weight.normal_(0, 0.3)
    return model


def run_layers(model, ids, state, causal=True):
    """Logits and the state entering each layer after the first."""
    x = model.embed_tokens(ids)
    states = []
    for layer in model.layers:
        x, state = layer(x, state, causal)
        states.append(state)
    return model.lm_head(model.norm(x)), states


def initial_state(model, ids, offset=0, causal=True):
    b, n = ids.shape
    return model.positional.initial_state(b, n, ids.device, torch.float64, offset=offset, causal=causal)


def rotate_state(cs, phi):
    """Multiply Z = c + i s by exp(i phi); phi broadcasts against [..., F]."""
    c, s = cs.chunk(2, dim=-1)
    return torch.cat((c * phi.cos() - s * phi.sin(), s * phi.cos() + c * phi.sin()), dim=-1)


@pytest.fixture
def ids():
    torch.manual_seed(1)
    return torch.randint(0, 97, (2, 16))


def test_rope_at_initialisation(ids):
    tape = tape_model(random_updates=False)
    torch.manual_seed(0)
    rope = build_model(tiny_config("rope")).double()
    rope.load_state_dict({k: v for k, v in tape.state_dict().items() if ".positional." not in k})
    state0 = initial_state(tape, ids)
    logits, states = run_layers(tape, ids, state0)
    for state in states:
        assert torch.equal(state, state0)  # bitwise: the state never moved
    torch.testing.assert_close(logits, rope(ids), **TOL)

    torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.roll(-1, 1).flatten()).backward()
    for layer in tape.layers[:-1]:
        pos = layer.positional
        assert torch.equal(pos.pe.x_proj.weight.grad, torch.zeros_like(pos.pe.x_proj.weight))
        assert torch.equal(pos.pe.down_proj.weight.grad, torch.zeros_like(pos.pe.down_proj.weight))
        assert pos.pe.up_proj.weight.grad.abs().sum() > 0
        assert pos.post_attention_linear.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("offset", [1, 17, 1000, 2048])
def test_global_shift_invariance(ids, offset):
    model = tape_model()
    reference = model(ids)
    shifted = model(ids, position_offset=offset)
    torch.testing.assert_close(shifted, reference, **TOL)


def test_shift_invariance_test_can_fail(ids):
    """Negative control: an absolute-position perturbation (offset added to k only) does change logits."""
    model = tape_model()
    state = initial_state(model, ids)
    bumped = state.clone()
    bumped[:, :, 3] = initial_state(model, ids, offset=5)[:, :, 3]  # one token's position moved
    assert not torch.allclose(run_layers(model, ids, bumped)[0], model(ids), **TOL)


def test_so2_equivariance(ids):
    model = tape_model()
    f = model.positional.head_dim // 2
    torch.manual_seed(3)
    phi = torch.rand(f, dtype=torch.float64) * 2 * math.pi
    state0 = initial_state(model, ids)
    logits, states = run_layers(model, ids, state0)
    logits_rot, states_rot = run_layers(model, ids, rotate_state(state0, phi))
    torch.testing.assert_close(logits_rot, logits, **TOL)
    for plain, rotated in zip(states, states_rot):
        torch.testing.assert_close(rotated, rotate_state(plain, phi), **TOL)


def test_so2_negative_controls(ids):
    model = tape_model()
    state0 = initial_state(model, ids)
    logits, _ = run_layers(model, ids, state0)
    c, s = state0.chunk(2, dim=-1)
    reflected = torch.cat((c, -s), dim=-1)
    assert not torch.allclose(run_layers(model, ids, reflected)[0], logits, rtol=1e-6)
    torch.manual_seed(4)
    per_head = torch.rand(1, model.config.num_heads, 1, c.shape[-1], dtype=torch.float64) * 2 * math.pi
    assert not torch.allclose(run_layers(model, ids, rotate_state(state0, per_head))[0], logits, rtol=1e-6)


def test_permutation_equivariance_bidirectional(ids):
    model = tape_model()
    perm = torch.randperm(ids.shape[1])
    state0 = initial_state(model, ids, causal=False).contiguous()
    logits, states = run_layers(model, ids, state0, causal=False)
    logits_p, states_p = run_layers(model, ids[:, perm], state0[:, :, perm], causal=False)
    torch.testing.assert_close(logits_p, logits[:, perm], **TOL)
    for plain, permuted in zip(states, states_p):
        torch.testing.assert_close(permuted, plain[:, :, perm], **TOL)


def test_permutation_breaks_with_causal_mask(ids):
    """Control: with the causal mask the same permutation is not equivariant."""
    model = tape_model()
    perm = torch.randperm(ids.shape[1])
    state0 = initial_state(model, ids).contiguous()
    logits = run_layers(model, ids, state0)[0]
    assert not torch.allclose(run_layers(model, ids[:, perm], state0[:, :, perm])[0], logits[:, perm], rtol=1e-6)


def test_causality(ids):
    model = tape_model()
    perturbed = ids.clone()
    perturbed[:, -1] = (perturbed[:, -1] + 1) % 97
    a, b = model(ids), model(perturbed)
    assert torch.equal(a[:, :-1], b[:, :-1])
    assert not torch.equal(a[:, -1], b[:, -1])


def eager_tape_attention(layer, q, k, v, cs):
    """Reference: softmax once, then A@v, A@c, A@s separately."""
    c, s = cs.chunk(2, dim=-1)
    qr, kr = apply_rotary(q, c, s), apply_rotary(k, c, s)
    n = q.shape[-2]
    logits = qr @ kr.transpose(-1, -2) / math.sqrt(q.shape[-1])
    logits = logits.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    a = logits.softmax(-1)
    gamma = layer.post_attention_linear.weight.sum(-1)[:, None, None]
    return a @ v, torch.cat((c + gamma * (a @ c), s + gamma * (a @ s)), dim=-1)


def test_fused_equals_eager():
    model = tape_model()
    layer = model.layers[0].positional
    torch.manual_seed(5)
    b, h, n, d = 2, 4, 16, 8
    tensors = [torch.randn(b, h, n, d, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    q, k, v, cs = tensors
    out_fused, state_fused = layer.attend(q, k, v, cs, causal=True)
    grads_fused = torch.autograd.grad((out_fused**2).sum() + (state_fused**3).sum(), tensors)
    out_eager, state_eager = eager_tape_attention(layer, q, k, v, cs)
    grads_eager = torch.autograd.grad((out_eager**2).sum() + (state_eager**3).sum(), tensors)
    torch.testing.assert_close(out_fused, out_eager, **TOL)
    torch.testing.assert_close(state_fused, state_eager, **TOL)
    for name, gf, ge in zip("qkvs", grads_fused, grads_eager):
        torch.testing.assert_close(gf, ge, **TOL, msg=f"gradient of {name}")
    assert grads_fused[0].abs().sum() > 0


def test_collapsed_mlp_update_equals_factored():
    model = tape_model()
    pe = model.layers[0].positional.pe
    torch.manual_seed(6)
    m = torch.randn(2, 16, 32, dtype=torch.float64)
    cs = torch.randn(2, 4, 16, 8, dtype=torch.float64)
    torch.testing.assert_close(pe(m, cs), pe.factored(m, cs), **TOL)
    assert pe(m, cs).abs().sum() > 0


def test_paper_parameter_count():
    rope = build_model(ModelConfig(preset="paper-155m", positional=PositionalConfig(name="rope")))
    tape = build_model(ModelConfig(preset="paper-155m", positional=PositionalConfig(name="tape")))
    assert rope.num_parameters() == 162_417_408
    assert tape.num_parameters() == 162_875_328
    assert tape.num_parameters() - rope.num_parameters() == tape.num_positional_parameters() == 457_920
    assert tape.positional.position_size == 4 * tape.config.num_heads


def test_last_layer_skips_the_update(ids):
    model = tape_model()
    state0 = initial_state(model, ids)
    _, states = run_layers(model, ids, state0)
    assert torch.equal(states[-1], states[-2])
    assert not torch.equal(states[0], state0)


def test_random_offset_is_a_no_op_up_to_rounding(ids):
    model = tape_model(positional=PositionalConfig(name="tape", tape_random_offset=True))
    model.train()
    torch.testing.assert_close(model(ids), model.eval()(ids), **TOL)
