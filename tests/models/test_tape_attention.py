"""model.positional.tape_attention: one attention call over [v|c|s] and two calls compute the same model."""

import pytest
import torch

from tape_pretrain.config import ConfigError, PositionalConfig, from_dict
from tape_pretrain.models import tape as tape_module
from tape_pretrain.models.tape import resolve_attention_form
from tests.models.test_tape_properties import initial_state, run_layers, tape_model


def assert_equal_to_rounding(actual, expected, what):
    """Equal within 1e-12 relative, each element or on the tensor's scale (an element near zero gets the
    tensor's rounding, not its own)."""
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12 * expected.abs().max().item(),
                               msg=lambda m: f"{what}: {m}")


def model_with(form, seed=0):
    model = tape_model(seed=seed, positional=PositionalConfig(name="tape", tape_attention=form))
    assert all(layer.positional.attention_form == form for layer in model.layers)
    return model


def random_ids(n):
    return torch.randint(0, 97, (2, n), generator=torch.Generator().manual_seed(1))


def forward_backward(model, ids, causal):
    """Logits, the state each layer hands on, and every parameter's gradient."""
    logits, states = run_layers(model, ids, initial_state(model, ids), causal)
    torch.manual_seed(2)
    proj = torch.randn_like(logits)  # every logit carries gradient
    (torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.roll(-1, 1).flatten()) + (proj * logits).sum()
     ).backward()
    return logits.detach(), [s.detach() for s in states], {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n", [16, 300])  # 300: more than one query block of causal_attention_in_blocks
def test_one_call_equals_two_calls(n, causal):
    ids = random_ids(n)
    two = model_with("two_calls")
    one = model_with("one_call")
    one.load_state_dict(two.state_dict())
    logits_two, states_two, grads_two = forward_backward(two, ids, causal)
    logits_one, states_one, grads_one = forward_backward(one, ids, causal)
    assert (states_two[0] - initial_state(two, ids)).abs().max() > 0.1  # gamma != 0: the state really moves
    assert_equal_to_rounding(logits_one, logits_two, "logits")
    for layer, (s1, s2) in enumerate(zip(states_one, states_two)):
        assert_equal_to_rounding(s1, s2, f"state after layer {layer}")
    for name, grad in grads_two.items():
        if grad is None:  # the last layer's frozen TAPE weights
            assert grads_one[name] is None, name
            continue
        assert grad.abs().sum() > 0, name  # the comparison is not vacuous
        assert_equal_to_rounding(grads_one[name], grad, f"grad of {name}")


class RecordingAttention:
    """Wraps one of tape.py's attention functions to record the width of every value it is given."""

    def __init__(self, wrapped, calls):
        self.wrapped, self.calls = wrapped, calls

    def __call__(self, q, k, value, *args, **kwargs):
        self.calls.append((self.wrapped.__name__, value.shape[-1]))
        return self.wrapped(q, k, value, *args, **kwargs)


@pytest.mark.parametrize("form", ["auto", "two_calls", "one_call"])
def test_attention_calls_on_cpu(form, monkeypatch):
    """auto takes one call on the CPU, as causal_attention_in_blocks (SDPA would run its math kernel); the last
    layer makes one SDPA call in every form."""
    model = model_with(form)
    calls = []
    for name in ("attention", "causal_attention_in_blocks"):
        monkeypatch.setattr(tape_module, name, RecordingAttention(getattr(tape_module, name), calls))
    with torch.no_grad():
        model(random_ids(16))
    d, num_layers = model.positional.head_dim, model.config.num_layers
    updating_layer = [("attention", d), ("attention", d)] if form == "two_calls" else [
        ("causal_attention_in_blocks", 2 * d)]
    assert calls == updating_layer * (num_layers - 1) + [("attention", d)]


def test_the_layer_resolves_auto_from_its_own_tensors(monkeypatch):
    """attend asks with the tensors' device, the head width, the length and the causality of this very call."""
    model = model_with("auto")
    asked = []

    def recording(*args):
        asked.append(args)
        return resolve_attention_form(*args)

    monkeypatch.setattr(tape_module, "resolve_attention_form", recording)
    with torch.no_grad():
        model(random_ids(40))
        model(random_ids(24), causal=False)
    updating = model.config.num_layers - 1
    d = model.positional.head_dim
    assert d != 40 and asked == [("auto", "cpu", d, 40, True)] * updating + [("auto", "cpu", d, 24, False)] * updating


def test_blocked_attention_in_bf16_is_as_accurate_as_sdpa():
    """Scores and softmax in fp32 (as SDPA's kernels): against fp64 on the same bf16 inputs, with sharp attention,
    the blocked form's error stays within twice that of SDPA (bf16 scores: 11x)."""
    torch.manual_seed(4)
    q, k = (3 * torch.randn(2, 2, 300, 32) for _ in range(2))
    value = torch.randn(2, 2, 300, 64)
    q, k, value = (t.to(torch.bfloat16) for t in (q, k, value))
    exact = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), value.double(), is_causal=True)
    blocked = tape_module.causal_attention_in_blocks(q, k, value, block=128).double()
    sdpa = torch.cat([torch.nn.functional.scaled_dot_product_attention(q, k, part, is_causal=True)
                      for part in value.split(32, dim=-1)], dim=-1).double()  # the two-call form
    assert (blocked - exact).abs().max() <= 2 * (sdpa - exact).abs().max()


def test_auto_per_device():
    assert resolve_attention_form("auto", "cpu", 64, 1024, causal=False) == "two_calls"  # SDPA's math kernel
    assert resolve_attention_form("auto", "cpu", 64, 1024) == "one_call"
    assert resolve_attention_form("auto", "cpu", 64, 4096) == "two_calls"  # the kept attention matrix grows as N^2
    assert resolve_attention_form("auto", "cuda", 64, 4096) == "one_call"
    assert resolve_attention_form("auto", "cuda", 128, 4096) == "one_call"
    assert resolve_attention_form("auto", "cuda", 160, 1024) == "two_calls"  # a 320-wide value: no fused kernel
    assert resolve_attention_form("auto", "mps", 64, 1024) == "two_calls"
    for form in ("one_call", "two_calls"):
        assert resolve_attention_form(form, "cpu", 64, 8192) == resolve_attention_form(form, "cuda", 256, 64) == form


@pytest.mark.parametrize("n,block", [(16, 4), (16, 5), (7, 3), (16, 64)])
def test_causal_attention_in_blocks_equals_sdpa(n, block):
    torch.manual_seed(3)
    q, k = (torch.randn(2, 3, n, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    value = torch.randn(2, 3, n, 16, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 3, n, 16, dtype=torch.float64)
    blocked = tape_module.causal_attention_in_blocks(q, k, value, block=block)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, value, is_causal=True)
    assert_equal_to_rounding(blocked, expected, "output")
    for name, got, want in zip(["q", "k", "value"], torch.autograd.grad(blocked, (q, k, value), grad),
                               torch.autograd.grad(expected, (q, k, value), grad)):
        assert_equal_to_rounding(got, want, f"grad of {name}")


def test_unknown_form_is_a_config_error():
    with pytest.raises(ConfigError, match="positional.tape_attention: 'three_calls' is not one of"):
        from_dict(PositionalConfig, {"tape_attention": "three_calls"}, "model.positional")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_one_call_runs_on_a_fused_cuda_kernel():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k = (torch.randn(1, 12, 256, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    value = torch.randn(1, 12, 256, 128, device="cuda", dtype=torch.bfloat16)
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):  # raises if neither accepts
        torch.nn.functional.scaled_dot_product_attention(q, k, value, is_causal=True)
