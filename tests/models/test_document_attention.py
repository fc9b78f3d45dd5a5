"""Document mode (Transformer.forward(..., document_ids=...)): a row packing several documents gives each document the
logits and gradients it gets alone, for every encoding, and without document_ids nothing of it runs."""

import functools

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask

from tape_pretrain.config import ModelConfig, PositionalConfig
from tape_pretrain.models import blocked_bias, build_model
from tape_pretrain.models import positional_base as base
from tape_pretrain.models.positional import REGISTRY, DocumentLayout
from tape_pretrain.models.positional_base import (
    _GradientInOutputLayout,
    compiled_flex_attention,
    document_attention_kernel,
    document_block_mask,
    rotary_frequencies,
    rotary_tables,
)
from tape_pretrain.models.randrope import sorted_random_positions
from tape_pretrain.models.tape import causal_attention_in_blocks
from tests.models.memory_probe import peak_bytes
from tests.models.test_tape_properties import tiny_config

TOL = dict(rtol=1e-9, atol=1e-12)
N = 30
# Row 0: documents of 7, 15 and 8 tokens. Row 1: 12 tokens of a document continued from the previous window (its
# positions start at 0 at the row start), then 3 and 15; ids are arbitrary, only changes between neighbours count.
DOCUMENT_IDS = torch.tensor([[0] * 7 + [1] * 15 + [2] * 8, [4] * 12 + [2] * 3 + [9] * 15])

ENCODINGS = [
    pytest.param("rope", {}, id="rope"),
    pytest.param("nope", {}, id="nope"),
    pytest.param("xpos", {}, id="xpos"),
    pytest.param("alibi", {}, id="alibi"),
    pytest.param("fire", {}, id="fire"),
    pytest.param("randrope", {"randrope_eval": "expected"}, id="randrope-expected"),
    pytest.param("randrope", {"randrope_eval": "expected", "randrope_max_len": 192}, id="randrope-expected-3x"),
    pytest.param("tape", {"tape_attention": "one_call"}, id="tape-one-call"),
    pytest.param("tape", {"tape_attention": "two_calls"}, id="tape-two-calls"),
]


def document_model(name, dtype=torch.float64, seed=0, **positional):
    """A tiny model in eval mode whose positional weights make every encoding's test able to fail."""
    torch.manual_seed(seed)
    model = build_model(tiny_config(positional=PositionalConfig(name=name, **positional))).to(dtype).eval()
    with torch.no_grad():
        for layer in model.layers:
            if name == "tape":  # TAPE's zero init never moves the state: it would be RoPE
                for p in layer.positional.parameters():
                    p.normal_(0, 0.3)
            if name == "fire":
                layer.positional.threshold.fill_(0.01)  # L~ = 5.12: the normaliser follows the query's position
                for p in layer.positional.mlp.parameters():
                    p.normal_(0, 1.0)  # a bias that moves the logits by several units
    return model


@pytest.fixture
def ids():
    return torch.randint(0, 97, (2, N), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def small_blocks(monkeypatch):
    """ALiBi's and FIRE's attention in blocks of 6 query rows (and recomputed in the backward)."""
    monkeypatch.setattr(blocked_bias, "BLOCK_BYTES", 1)
    monkeypatch.setattr(blocked_bias, "MIN_BLOCK_ROWS", 7)


def documents_of(document_ids):
    """(row, start, stop) of every document, from the ids by hand."""
    spans = []
    for row, row_ids in enumerate(document_ids.tolist()):
        start = 0
        for i in range(1, len(row_ids) + 1):
            if i == len(row_ids) or row_ids[i] != row_ids[i - 1]:
                spans.append((row, start, i))
                start = i
    return spans


def test_layout_finds_document_starts_and_in_document_positions():
    layout = DocumentLayout.from_ids(torch.tensor([[5, 5, 5, 2, 2, 7], [1, 1, 1, 1, 1, 1], [3, 4, 3, 3, 4, 4]]))
    assert layout.starts.tolist() == [[0, 0, 0, 3, 3, 5], [0] * 6, [0, 1, 2, 2, 4, 4]]
    assert layout.positions.tolist() == [[0, 1, 2, 0, 1, 0], list(range(6)), [0, 0, 0, 1, 0, 1]]
    want = torch.tensor([[[layout.starts[b, i] <= j <= i for j in range(6)] for i in range(6)] for b in range(3)])
    assert torch.equal(layout.mask, want.unsqueeze(1))  # [B, 1, N, N]
    assert torch.equal(layout.visible(2, 5, 4), want[:, 2:5, :4])
    assert layout.mask is layout.mask  # built once, shared by every layer


@pytest.mark.parametrize("offset", [0, 3])
@pytest.mark.parametrize("name, positional", ENCODINGS)
def test_packed_rows_give_each_document_its_own_logits(name, positional, offset, ids):
    model = document_model(name, **positional)
    packed = model(ids, position_offset=offset, document_ids=DOCUMENT_IDS)
    for row, start, stop in documents_of(DOCUMENT_IDS):
        alone = model(ids[row:row + 1, start:stop], position_offset=offset)
        torch.testing.assert_close(packed[row, start:stop], alone[0], **TOL, msg=f"document {row}:{start}:{stop}")
    assert not torch.allclose(packed, model(ids, position_offset=offset), **TOL)  # the documents really split


def token_slice(t, row, start, stop):
    """Tokens start..stop-1 of row ``row`` of a state tensor: [B, H or 1, N, F], [B, N] or a row-shared [N]."""
    if t.dim() == 1:
        return t[start:stop]
    return t[row, ..., start:stop, :] if t.dim() == 4 else t[row, start:stop]


@pytest.mark.parametrize("offset", [0, 3])
@pytest.mark.parametrize("name, positional", [p for p in ENCODINGS if p.values[0] not in ("alibi", "nope")])
def test_every_encoding_restarts_its_positions_at_each_document(name, positional, offset):
    """The initial state of each document's tokens is that of the document alone. The logits cannot show this for
    the relative encodings (RoPE, xPos, TAPE: the mask alone makes them equal); ALiBi keeps the row's positions by
    design (its bias depends on i - j only) and NoPE has none."""
    model = document_model(name, **positional)
    layout = DocumentLayout.from_ids(DOCUMENT_IDS)
    packed = model.positional.initial_state(2, N, "cpu", torch.float64, offset=offset, documents=layout)
    packed = packed if isinstance(packed, tuple) else (packed,)
    for row, start, stop in documents_of(DOCUMENT_IDS):
        alone = model.positional.initial_state(1, stop - start, "cpu", torch.float64, offset=offset)
        alone = alone if isinstance(alone, tuple) else (alone,)
        for got, want in zip(packed, alone, strict=True):
            assert got.shape[0] == 2  # per row
            torch.testing.assert_close(token_slice(got, row, start, stop), token_slice(want, 0, 0, stop - start),
                                       rtol=0, atol=0)


@pytest.mark.parametrize("name", ["alibi", "fire"])
def test_bias_blocks_give_each_document_its_own_logits(name, ids, small_blocks):
    model = document_model(name)
    packed = model(ids, document_ids=DOCUMENT_IDS)
    for row, start, stop in documents_of(DOCUMENT_IDS):
        torch.testing.assert_close(packed[row, start:stop], model(ids[row:row + 1, start:stop])[0], **TOL)


def gradients(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


GRADIENT_CASES = [pytest.param(*p.values, False, id=p.id) for p in ENCODINGS] + [
    pytest.param(name, {}, True, id=f"{name}-small-blocks") for name in ("alibi", "fire")]


@pytest.mark.parametrize("name, positional, blocks", GRADIENT_CASES)
def test_packed_gradients_are_the_sum_of_the_documents_gradients(name, positional, blocks, ids, request):
    if blocks:  # blocks of 6 rows, recomputed in the backward
        request.getfixturevalue("small_blocks")
    model = document_model(name, **positional)
    weights = torch.randn(2, N, 97, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    packed = gradients(model, (model(ids, document_ids=DOCUMENT_IDS) * weights).sum())
    summed = {}
    for row, start, stop in documents_of(DOCUMENT_IDS):
        alone = model(ids[row:row + 1, start:stop])
        for key, grad in gradients(model, (alone[0] * weights[row, start:stop]).sum()).items():
            summed[key] = summed.get(key, 0) + grad
    assert packed.keys() == summed.keys()
    positional_keys = [key for key in packed if "positional" in key]
    assert bool(positional_keys) == (name in ("tape", "fire"))
    for key in positional_keys:
        if not key.endswith("mlp.2.bias"):  # FIRE's per-head constant: softmax ignores it, its gradient is 0
            assert packed[key].abs().max() > 1e-6, key  # the comparison is not vacuous
    for key, grad in summed.items():
        torch.testing.assert_close(packed[key], grad, rtol=1e-9, atol=1e-12 * max(1.0, grad.abs().max().item()),
                                   msg=key)


RANDROPE_MODES = [pytest.param("randrope", {"randrope_eval": mode}, mode == "train", id=f"randrope-{mode}")
                  for mode in ("train", "sample", "expected")]
ONE_DOCUMENT = [pytest.param(*p.values, False, id=p.id) for p in ENCODINGS if p.values[0] != "randrope"]


@pytest.mark.parametrize("name, positional, train", ONE_DOCUMENT + RANDROPE_MODES)
def test_one_document_per_row_is_the_causal_path(name, positional, train, ids):
    model = document_model(name, dtype=torch.float32, **positional).train(train)
    torch.manual_seed(7)  # RandPE in training: the same draw in both passes
    packed = model(ids, position_offset=2, document_ids=torch.full_like(ids, 3))
    torch.manual_seed(7)
    causal = model(ids, position_offset=2)
    torch.testing.assert_close(packed, causal, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["train", "sample"])
def test_randrope_documents_take_the_rows_draw_at_their_in_document_positions(mode, ids):
    """Training and ``sample``: the p-th token of a document gets the row's p-th drawn position, and the model is
    RoPE at those positions with the document mask."""
    model = document_model("randrope", randrope_eval="sample").train(mode == "train")
    layout = DocumentLayout.from_ids(DOCUMENT_IDS)
    randrope = model.positional
    torch.manual_seed(3)
    if mode == "train":
        draw = sorted_random_positions(2, N, randrope.max_len)
    else:
        draw = sorted_random_positions(2, N, randrope.eval_range(N),
                                       generator=torch.Generator().manual_seed(randrope.eval_seed))
    torch.manual_seed(3)
    positions = randrope.positions(2, N, "cpu", 0, layout)
    assert torch.equal(positions, draw.gather(1, layout.positions))
    assert torch.equal(positions[1, 12:15], draw[1, :3]) and torch.equal(positions[1, 15:], draw[1, :15])
    rope = document_model("rope")
    rope.load_state_dict(model.state_dict())
    cos, sin = rotary_tables(positions, rotary_frequencies(randrope.head_dim, 10000.0), torch.float64)
    torch.manual_seed(3)
    got = model(ids, document_ids=DOCUMENT_IDS)
    torch.testing.assert_close(got, rope(ids, initial_state=(cos[:, None], sin[:, None]), document_ids=DOCUMENT_IDS),
                               **TOL)


def test_randrope_expected_positions_scale_the_in_document_positions():
    """floor(p R / N) with R = eval_range(N): 3p when max_len is 3x max_seq_len, as for each document alone."""
    model = document_model("randrope", randrope_eval="expected", randrope_max_len=192)
    layout = DocumentLayout.from_ids(DOCUMENT_IDS)
    assert torch.equal(model.positional.positions(2, N, "cpu", 4, layout), 3 * layout.positions + 4)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_without_document_ids_no_document_code_runs(name, ids, monkeypatch):
    """The causal path is today's: no layout, no mask, SDPA with is_causal (or a bias without a batch dimension)."""
    model = document_model(name, dtype=torch.float32)
    want = model(ids)

    def refuse(*args, **kwargs):
        raise AssertionError("document code ran without document_ids")

    for owner, attribute in ((DocumentLayout, "from_ids"), (DocumentLayout, "visible"), (base, "document_block_mask"),
                             (base, "document_attention_kernel")):
        monkeypatch.setattr(owner, attribute, refuse)
    calls = []
    sdpa = F.scaled_dot_product_attention

    def recording_sdpa(q, k, v, attn_mask=None, is_causal=False, scale=None):
        calls.append((attn_mask, is_causal))
        return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording_sdpa)
    assert torch.equal(model(ids), want)
    assert calls
    for attn_mask, is_causal in calls:
        if name in ("alibi", "fire"):
            assert attn_mask.is_floating_point() and attn_mask.shape[0] == 1 and not is_causal
        else:
            assert attn_mask is None and is_causal


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_document_attention_call_goes_through_the_layout_fix(name, monkeypatch):
    """As test_gradient_layout's check, in document mode: each SDPA output passes the CUDA gradient-layout fix."""
    model = document_model(name, dtype=torch.float32, tape_attention="two_calls")
    ids = torch.randint(0, 97, (2, N))
    calls = {"sdpa": 0, "fix": 0}
    sdpa, apply = F.scaled_dot_product_attention, _GradientInOutputLayout.apply

    def counting_sdpa(*args, **kwargs):
        calls["sdpa"] += 1
        return sdpa(*args, **kwargs)

    def counting_apply(out):
        calls["fix"] += 1
        return apply(out)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting_sdpa)
    monkeypatch.setattr(_GradientInOutputLayout, "apply", counting_apply)
    monkeypatch.setattr(base, "needs_gradient_layout", lambda out: out.requires_grad)
    model(ids, document_ids=DOCUMENT_IDS).sum().backward()
    assert calls["sdpa"] >= model.config.num_layers and calls["fix"] == calls["sdpa"], calls


def test_tape_blocked_one_call_masks_documents():
    """causal_attention_in_blocks over several query blocks equals SDPA with the document mask, with gradients."""
    g = torch.Generator().manual_seed(4)
    q, k = (2 * torch.randn(2, 3, N, 8, generator=g, dtype=torch.float64) for _ in range(2))
    value = torch.randn(2, 3, N, 16, generator=g, dtype=torch.float64)
    q, k, value = (t.requires_grad_() for t in (q, k, value))
    layout = DocumentLayout.from_ids(DOCUMENT_IDS)
    blocked = causal_attention_in_blocks(q, k, value, block=8, documents=layout)
    expected = F.scaled_dot_product_attention(q, k, value, attn_mask=layout.mask)
    torch.testing.assert_close(blocked, expected, **TOL)
    grad = torch.randn_like(expected)
    for got, want in zip(torch.autograd.grad(blocked, (q, k, value), grad),
                         torch.autograd.grad(expected, (q, k, value), grad)):
        torch.testing.assert_close(got, want, **TOL)


def test_document_kernel_is_flex_on_cuda_and_sdpa_elsewhere():
    assert document_attention_kernel("cuda") == "flex"
    assert document_attention_kernel("cpu") == "sdpa"
    assert document_attention_kernel("mps") == "sdpa"


LAYOUTS = [DOCUMENT_IDS, torch.tensor([[0] * 3 + [1] * 20 + [2] * 7, [1] * N]),
           torch.tensor([[i // 4 for i in range(32)], [0] * 9 + [1] * 23])]


@pytest.mark.parametrize("layout", range(len(LAYOUTS)))
@pytest.mark.parametrize("block_size", [4, 8, 128])
def test_block_mask_equals_create_block_mask(layout, block_size):
    """The tile-level construction gives FlexAttention's own block mask of the mask_mod, tile for tile."""
    starts = DocumentLayout.from_ids(LAYOUTS[layout]).starts
    b, n = starts.shape
    got = document_block_mask(starts, block_size)
    want = create_block_mask(lambda batch, head, q, kv: (kv <= q) & (kv >= starts[batch, q]), b, None, n, n,
                             device="cpu", BLOCK_SIZE=block_size)
    assert got.seq_lengths == want.seq_lengths == (n, n) and got.BLOCK_SIZE == want.BLOCK_SIZE
    pairs = [("kv_num_blocks", "kv_indices"), ("full_kv_num_blocks", "full_kv_indices"),
             ("q_num_blocks", "q_indices"), ("full_q_num_blocks", "full_q_indices")]
    for counts, indices in pairs:
        assert torch.equal(getattr(got, counts), getattr(want, counts)), counts
        used = torch.arange(getattr(want, indices).shape[-1]) < getattr(want, counts)[..., None]
        assert torch.equal(getattr(got, indices)[used], getattr(want, indices)[used]), indices
    if block_size == 4:
        assert want.full_kv_num_blocks.sum() > 0  # full tiles exist and are matched
    assert torch.equal(got.to_dense(), want.to_dense())


def wide_value_inputs():
    """q, k [2, 4, N, 8] and a value twice as wide (TAPE's [v|c|s])."""
    g = torch.Generator().manual_seed(4)
    q, k = (torch.randn(2, 4, N, 8, generator=g) for _ in range(2))
    return q, k, torch.randn(2, 4, N, 16, generator=g)


@functools.cache
def flex_runs_on_cpu() -> bool:
    """Whether compiled FlexAttention's forward runs here (on the CPU it needs a C++ compiler). The inputs of
    test_flex_takes_a_value_wider_than_q_and_k_on_cpu, so that it reuses this compilation."""
    q, k, value = wide_value_inputs()
    try:
        with torch.no_grad():
            compiled_flex_attention()(q, k, value, block_mask=DocumentLayout.from_ids(DOCUMENT_IDS).block_mask)
    except Exception:  # noqa: BLE001 - whatever stops the compilation, flex does not run here
        return False
    return True


def use_flex(monkeypatch) -> list:
    """Document attention on the flex path from now on (forward only: FlexAttention has no CPU backward); returns
    the list to which each flex call appends its value's shape."""
    if not flex_runs_on_cpu():
        pytest.skip("compiled FlexAttention does not run on this CPU")
    calls = []
    compiled = compiled_flex_attention()

    def counting(q, k, v, **kwargs):
        calls.append(v.shape)
        return compiled(q, k, v, **kwargs)

    monkeypatch.setattr(base, "document_attention_kernel", lambda device_type: "flex")
    monkeypatch.setattr(base, "compiled_flex_attention", lambda: counting)
    return calls


@pytest.mark.parametrize("name, positional", [  # NoPE's q, k, v views would compile once more (strides differ)
    ("rope", {}), ("xpos", {}), ("randrope", {"randrope_eval": "expected"}), ("tape", {"tape_attention": "two_calls"})])
def test_flex_path_equals_the_sdpa_mask_path_on_cpu(name, positional, ids, monkeypatch):
    model = document_model(name, dtype=torch.float32, **positional)
    with torch.no_grad():
        want = model(ids, document_ids=DOCUMENT_IDS)
        calls = use_flex(monkeypatch)
        got = model(ids, document_ids=DOCUMENT_IDS)
    assert len(calls) >= model.config.num_layers
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_flex_takes_a_value_wider_than_q_and_k_on_cpu(monkeypatch):
    """TAPE's one call over [v|c|s] (value 2D wide) on the flex path."""
    q, k, value = wide_value_inputs()
    layout = DocumentLayout.from_ids(DOCUMENT_IDS)
    with torch.no_grad():
        want = base.attention(q, k, value, True, documents=layout)
        calls = use_flex(monkeypatch)
        got = base.attention(q, k, value, True, documents=layout)
    assert calls == [value.shape]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["alibi", "fire"])
def test_a_document_block_stays_within_the_block_budget(name, monkeypatch):
    """The bias of a block now has a batch dimension (FIRE's whole MLP runs per row): the block plan counts it, so
    one layer's extra peak stays near BLOCK_BYTES, not B times it."""
    budget = 2**20
    monkeypatch.setattr(blocked_bias, "BLOCK_BYTES", budget)
    monkeypatch.setattr(blocked_bias, "MIN_BLOCK_ROWS", 1)
    model = document_model(name, dtype=torch.float32)
    b, n = 8, 256
    layer = model.layers[0].positional
    layout = DocumentLayout.from_ids(torch.arange(n).div(40, rounding_mode="floor").expand(b, n))
    positions = model.positional.initial_state(b, n, "cpu", torch.float32, documents=layout)
    q = torch.randn(b, model.config.num_heads, n, 8)
    with torch.no_grad():
        out_bytes = q.numel() * q.element_size()
        peak = peak_bytes(lambda: layer.attend(q, q, q, positions, True, documents=layout), "cpu")
    assert peak <= budget + 2 * out_bytes, f"{name}: peak {peak} B for a block budget of {budget} B"


@pytest.mark.parametrize("name", ["alibi", "fire"])
def test_document_memory_grows_linearly_with_bias_blocks(name, monkeypatch):
    monkeypatch.setattr(blocked_bias, "BLOCK_BYTES", 2**20)
    monkeypatch.setattr(blocked_bias, "MIN_BLOCK_ROWS", 16)
    torch.manual_seed(0)
    config = ModelConfig(preset=None, vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, ffn_hidden_size=128,
                         max_seq_len=1024, positional=PositionalConfig(name=name))
    model = build_model(config).eval()

    def peak(n):
        ids = torch.randint(0, 256, (2, n))
        document_ids = torch.arange(n).div(n // 4, rounding_mode="floor").expand(2, n)  # four documents per row
        with torch.no_grad():
            return peak_bytes(lambda: model(ids, document_ids=document_ids), "cpu")

    short, long = peak(256), peak(1024)
    assert long / short < 6, f"{name}: extra peak {short} B at N=256, {long} B at N=1024 (N^2: x16)"


def test_document_mode_needs_causal_attention_and_one_id_per_token(ids):
    model = document_model("rope")
    with pytest.raises(ValueError, match="causal=True"):
        model(ids, causal=False, document_ids=DOCUMENT_IDS)
    with pytest.raises(ValueError, match="one document id per token"):
        model(ids, document_ids=DOCUMENT_IDS[:, :-1])
    with pytest.raises(ValueError, match="integer tensor"):
        model(ids, document_ids=DOCUMENT_IDS.double())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name, positional", [("rope", {}), ("tape", {"tape_attention": "one_call"})])
def test_flex_documents_on_cuda_equal_the_cpu(name, positional, ids):
    """On CUDA, FlexAttention (one call over TAPE's wider value): logits and gradients as the CPU's SDPA mask."""
    model = document_model(name, dtype=torch.float32, **positional)
    weights = torch.randn(2, N, 97, generator=torch.Generator().manual_seed(2))
    want = gradients(model, (model(ids, document_ids=DOCUMENT_IDS) * weights).sum())
    model.cuda()
    got = gradients(model, (model(ids.cuda(), document_ids=DOCUMENT_IDS.cuda()) * weights.cuda()).sum())
    for key, grad in want.items():
        torch.testing.assert_close(got[key].cpu(), grad, rtol=1e-3, atol=1e-4 * max(1.0, grad.abs().max().item()),
                                   msg=key)
