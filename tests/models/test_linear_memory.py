"""Every encoding's memory grows linearly in N, and ALiBi's and FIRE's attention per block of queries
(models.blocked_bias) equals the full-matrix attention it replaced: outputs and gradients."""

import math

import pytest
import torch
import torch.nn.functional as F

from tape_pretrain.config import ModelConfig, PositionalConfig
from tape_pretrain.models import blocked_bias, build_model
from tape_pretrain.models.alibi import ALiBiLayer, alibi_slopes
from tape_pretrain.models.fire import FIRELayer
from tape_pretrain.models.positional import REGISTRY
from tests.models.memory_probe import peak_bytes, peak_forward_bytes

HEADS, HEAD_DIM, WIDTH = 4, 16, 32


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of at most 13 query rows (12 for N = 70, which they do not divide)."""
    monkeypatch.setattr(blocked_bias, "BLOCK_BYTES", 1)
    monkeypatch.setattr(blocked_bias, "MIN_BLOCK_ROWS", 13)


def reference_attention(name, layer, q, k, v, positions, causal):
    """Today's full-matrix form: the whole [1, H, N, N] bias, the causal mask added, one SDPA call."""
    n = positions.shape[0]
    distance = positions[:, None] - positions[None, :]  # [N, N] integers
    if name == "alibi":  # -m_h |i - j| in float64, cast once
        bias = (-alibi_slopes(q.shape[1])[:, None, None] * distance.abs().to(torch.float64)).to(q.dtype)
    else:  # MLP_h(psi(i - j) / (psi(max(i, L~)) + eps)), psi(x) = log(|c x| + 1), all in fp32
        c, threshold = layer.c.float(), layer.threshold.float()
        w1, b1, w2, b2 = (p.float() for p in (layer.mlp[0].weight, layer.mlp[0].bias, layer.mlp[2].weight,
                                              layer.mlp[2].bias))

        def psi(x):
            return torch.log(torch.abs(c * x) + 1)

        limit = torch.maximum(positions.float(), torch.abs(threshold * layer.threshold_scale))
        normalised = psi(distance.float()) / (psi(limit)[:, None] + 1e-6)  # [N, N]
        hidden = torch.relu(normalised[..., None] * w1[:, 0] + b1)  # [N, N, W]
        bias = (hidden @ w2.T + b2).permute(2, 0, 1).to(q.dtype)  # [H, N, N]
    if causal:
        bias = bias + torch.full((n, n), float("-inf"), dtype=q.dtype).triu(1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias[None])


def make_layer(name, dtype):
    torch.manual_seed(3)
    if name == "alibi":
        return ALiBiLayer()
    layer = FIRELayer(HEADS, WIDTH, init_c=0.1, init_threshold=512.0)
    with torch.no_grad():
        layer.threshold.fill_(0.1)  # L~ = 51.2: queries on both sides of it, so max(i, L~) takes both values
        for p in layer.mlp.parameters():
            p.normal_(0, 1.0)  # a bias that moves the logits by several units
    return layer.to(dtype)


def attend_with_grads(name, layer, q, k, v, positions, causal, blocked):
    """The attention output and the gradients of a random projection of it for q, k, v and the layer's parameters."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    layer.zero_grad(set_to_none=True)
    if blocked:
        out, state = layer.attend(q, k, v, positions, causal)
        assert state is positions
    else:
        out = reference_attention(name, layer, q, k, v, positions, causal)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(4)).to(out.dtype)
    (out * weights).sum().backward()
    grads = {"q": q.grad, "k": k.grad, "v": v.grad}
    grads.update({n: p.grad for n, p in layer.named_parameters()})
    return out.detach(), grads


def inputs(n, dtype, batch=2):
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(batch, HEADS, n, HEAD_DIM, generator=g) for _ in range(3))
    return (2 * q).to(dtype), (2 * k).to(dtype), v.to(dtype)  # sharp attention: positions matter


# bf16: the reference runs the same bf16 kernels over the whole matrix; blocks change the order of their sums.
TOLERANCES = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("name", ["alibi", "fire"])
def test_blocks_equal_the_full_matrix(name, causal, dtype, small_blocks):
    n, offset = 70, 37  # 5 blocks of 12 rows and one of 10; FIRE depends on the offset beyond L~
    layer = make_layer(name, dtype)
    q, k, v = inputs(n, dtype)
    positions = torch.arange(offset, offset + n)
    want, want_grads = attend_with_grads(name, layer, q, k, v, positions, causal, blocked=False)
    got, got_grads = attend_with_grads(name, layer, q, k, v, positions, causal, blocked=True)
    torch.testing.assert_close(got, want, **TOLERANCES[dtype])
    assert got_grads.keys() == want_grads.keys()
    if name == "fire":  # the test sees the gradients of c and lambda (L~ lies inside the positions)
        assert want_grads["c"].abs().item() > 1e-3 and want_grads["threshold"].abs().item() > 1e-3
    for key, grad in want_grads.items():
        assert grad is not None and got_grads[key] is not None, key
        scale = grad.abs().max().item()  # parameter gradients sum over N^2 pairs: relative to their largest entry
        torch.testing.assert_close(got_grads[key], grad, rtol=TOLERANCES[dtype]["rtol"],
                                   atol=TOLERANCES[dtype]["atol"] * max(1.0, scale), msg=key)
    if dtype == torch.bfloat16:  # no less accurate than the full matrix, against fp32 on the same bf16 values
        exact_layer = make_layer(name, torch.float32)
        exact_layer.load_state_dict({key: value.float() for key, value in layer.state_dict().items()})
        exact, exact_grads = attend_with_grads(name, exact_layer, q.float(), k.float(), v.float(), positions, causal,
                                               blocked=False)

        def error(a, b):
            return ((a.double() - b.double()).norm() / b.double().norm()).item()

        assert error(got, exact) <= 1.05 * error(want, exact) + 1e-6
        for key, grad in exact_grads.items():
            if key == "mlp.2.bias":  # a per-head constant: its true gradient is 0 (softmax is shift invariant)
                continue
            # FIRE's parameters sum the blocks' shares in fp32; dq, dk, dv round once per block in bf16 (measured:
            # up to 1.25x the error of one call, bidirectional, where every block meets every key).
            worse = 1.25 if key not in ("q", "k", "v") else 1.5
            assert error(got_grads[key], grad) <= worse * error(want_grads[key], grad) + 1e-6, key


@pytest.mark.parametrize("name", ["alibi", "fire"])
def test_blocked_model_equals_one_block(name, monkeypatch):
    """The whole model in fp32: logits and every parameter's gradient in one block kept for the backward, in one
    recomputed block, and in blocks of 13 rows (12 after evening out: 45 = 3 x 12 + 9)."""
    config = ModelConfig(preset=None, vocab_size=97, hidden_size=32, num_layers=2, num_heads=HEADS,
                         ffn_hidden_size=48, max_seq_len=64, positional=PositionalConfig(name=name))
    torch.manual_seed(0)
    model = build_model(config)
    ids = torch.randint(0, 97, (2, 45))

    def logits_and_grads():
        model.zero_grad(set_to_none=True)
        logits = model(ids, position_offset=600)  # past FIRE's L~ = 512
        logits.float().pow(2).mean().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    one_block, one_block_grads = logits_and_grads()  # kept for the backward: the whole bias is small
    monkeypatch.setattr(blocked_bias, "KEEP_BYTES", 0)
    recomputed, recomputed_grads = logits_and_grads()
    monkeypatch.setattr(blocked_bias, "BLOCK_BYTES", 1)
    monkeypatch.setattr(blocked_bias, "MIN_BLOCK_ROWS", 13)
    blocked, blocked_grads = logits_and_grads()
    if name == "fire":
        assert {"layers.0.positional.c", "layers.0.positional.threshold"} <= one_block_grads.keys()
    for logits, grads in ((recomputed, recomputed_grads), (blocked, blocked_grads)):
        torch.testing.assert_close(logits, one_block, rtol=1e-5, atol=1e-5)
        assert grads.keys() == one_block_grads.keys()
        for key, grad in one_block_grads.items():
            torch.testing.assert_close(grads[key], grad, rtol=1e-5, atol=1e-6 * max(1.0, grad.abs().max()), msg=key)


@pytest.mark.parametrize("name", ["alibi", "fire"])
def test_bf16_block_bias_is_the_exact_bias_rounded_once(name, small_blocks, monkeypatch):
    """What each block hands SDPA in a bf16 layer: ALiBi's fp64 bias (12 heads: slopes 2^-0.5, 2^-1.5, ... that
    bf16 cannot hold) and FIRE's fp32 one (positions near 8192, 32 apart in bf16), each rounded to bf16 once."""
    seen = []

    def recording_attention(q, k, v, causal, bias=None, scale=None):
        seen.append(bias)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)

    monkeypatch.setattr(blocked_bias, "attention", recording_attention)
    heads = 12 if name == "alibi" else HEADS
    n, offset = 300, 8150  # ALiBi: 20 of the 12 x 300 distances' biases round otherwise from a bf16 slope
    positions = torch.arange(offset, offset + n)
    q = torch.randn(1, heads, n, HEAD_DIM, dtype=torch.bfloat16)
    layer = make_layer(name, torch.bfloat16)
    with torch.no_grad():
        layer.attend(q, q, q, positions, causal=True)
    distance = (positions[:, None] - positions[None, :]).double()  # [N, N]
    if name == "alibi":
        closest = 2 ** math.floor(math.log2(heads))
        slopes = [2.0 ** (-8.0 * (h + 1) / closest) for h in range(closest)]
        slopes += [2.0 ** (-8.0 * (h + 1) / (2 * closest)) for h in range(0, 2 * closest, 2)][:heads - closest]
        truth = -torch.tensor(slopes, dtype=torch.float64)[:, None, None] * distance.abs()  # [H, N, N]
    else:
        c, limit = layer.c.double(), (layer.threshold.double() * 512.0).abs()
        normalised = torch.log((c * distance).abs() + 1) / (
            torch.log((c * torch.maximum(positions.double(), limit)).abs() + 1)[:, None] + 1e-6)
        w1, b1, w2, b2 = (p.double() for p in layer.mlp.parameters())
        truth = (torch.relu(normalised[..., None] * w1[:, 0] + b1) @ w2.T + b2).permute(2, 0, 1)
    assert len(seen) == 24  # blocks of at most 13 rows
    start = 0
    for bias in seen:
        rows, keys = bias.shape[-2:]
        assert bias.dtype == torch.bfloat16 and keys == start + rows  # causal: the keys up to the block's last query
        want = truth[:, start:start + rows, :keys].masked_fill(distance[start:start + rows, :keys] < 0, -math.inf)
        if name == "alibi":
            assert torch.equal(bias[0], want.to(torch.bfloat16))
        else:  # fp32 and fp64 MLPs may round to neighbouring bf16 values: within one bf16 step
            torch.testing.assert_close(bias[0].double(), want, rtol=2**-8, atol=1e-6)
        start += rows
    assert start == n


def test_block_rows_keep_a_block_within_its_budget():
    pair = 300
    for n in (512, 4096, 65536):
        rows = blocked_bias.query_block_rows(n, n, pair)
        assert rows * n * pair <= max(blocked_bias.BLOCK_BYTES, blocked_bias.MIN_BLOCK_ROWS * n * pair)
        fewest_blocks = -(-n // max(blocked_bias.MIN_BLOCK_ROWS, blocked_bias.BLOCK_BYTES // (n * pair)))
        assert -(-n // rows) == fewest_blocks and rows * fewest_blocks - n < fewest_blocks  # as few, equal blocks
    assert blocked_bias.query_block_rows(8, 8, pair) == 8  # a short sequence is one block
    assert blocked_bias.query_block_rows(1000, 1000, 1, max_rows=128) == 125


def test_cpu_peak_probe_reads_known_allocations():
    def allocations():
        a = torch.empty(1000, 1000)  # 4 MB
        b = torch.empty(500, 1000)  # 2 MB
        del a
        c = torch.empty(2000, 1000)  # 8 MB, with b still live
        del b, c

    assert peak_bytes(allocations, "cpu") == 10_000_000
    x = torch.randn(300, 400)
    assert peak_bytes(lambda: x @ x.T, "cpu") == 300 * 300 * 4


def memory_model(name):
    torch.manual_seed(0)
    config = ModelConfig(preset=None, vocab_size=256, hidden_size=64, num_layers=2, num_heads=HEADS,
                         ffn_hidden_size=128, max_seq_len=1024, positional=PositionalConfig(name=name))
    return build_model(config).eval()


@pytest.fixture
def scaled_blocks(monkeypatch):
    """A block budget scaled down with the model, so that both lengths run in several blocks, as the default
    budget makes the paper's model do from a few thousand tokens on. Memory then grows as N (a block holds at most
    1 MiB, or 16 rows of N keys), and a block that held the whole [N, N] matrix would show as N^2."""
    monkeypatch.setattr(blocked_bias, "BLOCK_BYTES", 2**20)
    monkeypatch.setattr(blocked_bias, "MIN_BLOCK_ROWS", 16)


SHORT, LONG = 256, 1024


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_forward_memory_grows_linearly(name, scaled_blocks):
    model = memory_model(name)
    short, long = (peak_forward_bytes(model, n, 1, "cpu", grad=False) for n in (SHORT, LONG))
    ratio = long / short
    assert ratio < 6, f"{name}: extra peak {short} B at N={SHORT}, {long} B at N={LONG} (x{ratio:.1f}; N^2: x16)"


@pytest.mark.parametrize("name", ["alibi", "fire"])
def test_training_memory_grows_linearly(name, scaled_blocks):
    """Forward and backward: the blocks' saved tensors would add up to N^2 without the recomputation."""
    model = memory_model(name).train()
    short, long = (peak_forward_bytes(model, n, 1, "cpu", grad=True) for n in (SHORT, LONG))
    ratio = long / short
    assert ratio < 6, f"{name}: extra peak {short} B at N={SHORT}, {long} B at N={LONG} (x{ratio:.1f}; N^2: x16)"
