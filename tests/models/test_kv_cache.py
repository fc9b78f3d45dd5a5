"""Cached decoding (tape_pretrain.models.cache): for every encoding, the logits of a forward over chunks of new tokens
through a cache equal those of the uncached forward over the whole sequence."""

import random

import pytest
import torch

from tape_pretrain.config import PositionalConfig
from tape_pretrain.eval import passkey
from tape_pretrain.models import build_model
from tape_pretrain.models.blocked_bias import CPU_MAX_CAUSAL_BLOCK_ROWS
from tape_pretrain.models.positional import REGISTRY
from tape_pretrain.models.tape import resolve_decoding_form
from tests.models.test_tape_properties import tiny_config

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-9}
LONG = CPU_MAX_CAUSAL_BLOCK_ROWS + 32  # a chunk this long runs ALiBi's and FIRE's bias in several query blocks

# (encoding, positional options): every encoding, and both of TAPE's attention forms and its ablations
VARIANTS = {
    "tape_auto": ("tape", {}),
    "tape_one_call": ("tape", dict(tape_attention="one_call")),
    "tape_two_calls": ("tape", dict(tape_attention="two_calls")),
    "tape_no_attention_update": ("tape", dict(tape_attention_update=False)),
    "tape_no_mlp_update": ("tape", dict(tape_mlp_update=False)),
    "rope": ("rope", {}),
    "nope": ("nope", {}),
    "alibi": ("alibi", {}),
    # L~ = 16: queries past it read the normaliser psi(i) at their absolute position i
    "fire": ("fire", dict(fire_init_threshold=16.0)),
    "xpos": ("xpos", dict(xpos_scale_base=64.0)),  # a decay that matters at these lengths
    "randrope": ("randrope", dict(randrope_eval="expected")),
}


def decoding_model(variant: str, dtype=torch.float64, seed=0, **overrides):
    """A tiny model in eval mode whose positional weights are far from their init: TAPE's update weights start at zero
    (the state would never move), FIRE's MLP biases at zero. Weights of std 0.1 (not 0.02): sharper attention, so
    that positions matter."""
    name, options = VARIANTS[variant]
    torch.manual_seed(seed)
    overrides = dict(init_std=0.1) | overrides
    model = build_model(tiny_config(positional=PositionalConfig(name=name, **options), **overrides))
    with torch.no_grad():
        for layer in model.layers:
            for pname, param in layer.positional.named_parameters():
                param.normal_(0.0 if pname != "c" else 0.5, 0.3)
    return model.to(dtype).eval()


def random_ids(n, batch=2, seed=1):
    return torch.randint(0, 97, (batch, n), generator=torch.Generator().manual_seed(seed))


def cached_logits(model, ids, chunks, position_offset=0, max_length=None):
    """The logits of ids [B, N] fed through one cache in chunks of the given sizes (summing to N)."""
    assert sum(chunks) == ids.shape[1]
    cache = model.new_cache(max_length)
    outs, start = [], 0
    for size in chunks:
        outs.append(model(ids[:, start:start + size], cache=cache, position_offset=position_offset))
        start += size
    assert cache.length == ids.shape[1]
    return torch.cat(outs, dim=1)


def chunkings(n):
    """Ways to feed n tokens: by threes, a prompt then single tokens, and one at a time; past a query block of ALiBi
    and FIRE, a short prompt then a chunk longer than a block instead of one at a time (the tests' time)."""
    prompt = n - min(n // 2, 16)
    ways = {"threes": [3] * (n // 3) + [n % 3] * (n % 3 > 0), "prompt_then_ones": [prompt] + [1] * (n - prompt)}
    if n > CPU_MAX_CAUSAL_BLOCK_ROWS + 5:
        ways["short_then_long_chunk"] = [5, n - 8, 1, 1, 1]
    else:
        ways["ones"] = [1] * n
    return ways


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("n", [7, LONG])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cached_logits_equal_uncached_logits(variant, n, dtype):
    model = decoding_model(variant, dtype)
    ids = random_ids(n)
    with torch.no_grad():
        expected = model(ids)
        for way, chunks in chunkings(n).items():
            torch.testing.assert_close(cached_logits(model, ids, chunks), expected, rtol=0, atol=TOLERANCE[dtype],
                                       msg=lambda m, way=way: f"{variant}, N={n}, {way}: {m}")


@pytest.mark.parametrize("variant", ["tape_one_call", "fire", "xpos", "alibi"])
def test_cached_logits_equal_uncached_logits_at_an_offset(variant):
    """position_offset is the position of the cache's first token; FIRE's normaliser reads absolute positions."""
    model = decoding_model(variant)
    ids = random_ids(20)
    with torch.no_grad():
        expected = model(ids, position_offset=600)
        got = cached_logits(model, ids, [9, 1, 3, 7], position_offset=600)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-9)


def test_the_positional_weights_matter():
    """The equalities are not vacuous: TAPE's state moves and FIRE's bias depends on the query's absolute position,
    enough to change the logits."""
    ids = random_ids(40)
    with torch.no_grad():
        tape = decoding_model("tape_one_call")
        rope = decoding_model("rope")
        rope.load_state_dict(tape.state_dict(), strict=False)
        assert (tape(ids) - rope(ids)).abs().max() > 0.1
        fire = decoding_model("fire")
        assert (fire(ids, position_offset=600) - fire(ids)).abs().max() > 0.05


def test_tape_caches_keys_values_and_layer_input_states():
    """A TAPE layer that moves the state keeps [v|c|s] (3D per token with the key: 1.5x RoPE); the last layer, whose
    update is skipped, and a layer without the attention-side update keep only keys and values."""
    d = tiny_config().hidden_size // tiny_config().num_heads
    with torch.no_grad():
        for variant, widths in (("tape_one_call", [[d, 2 * d]] * 2 + [[d, d]]), ("tape_no_attention_update",
                                                                              [[d, d]] * 3), ("rope", [[d, d]] * 3)):
            model = decoding_model(variant)
            cache = model.new_cache()
            model(random_ids(5), cache=cache)
            assert [[b.shape[-1] for b in layer.buffers] for layer in cache.layers] == widths, variant


def test_tape_cached_states_are_each_layers_input_state():
    """Layer i's cache holds the state that entered layer i in the uncached forward (the keys' state read by A @ cs)."""
    model = decoding_model("tape_two_calls")
    ids = random_ids(12)
    d = model.positional.head_dim
    with torch.no_grad():
        cache = model.new_cache()
        model(ids[:, :5], cache=cache)
        model(ids[:, 5:], cache=cache)
        x = model.embed_tokens(ids)
        state = model.positional.initial_state(2, 12, "cpu", torch.float64)
        for layer, layer_cache in zip(model.layers[:-1], cache.layers):
            torch.testing.assert_close(layer_cache.buffers[1][..., :12, d:], state, rtol=0, atol=1e-12)
            x, state = layer(x, state)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_generation_gives_the_same_tokens_with_and_without_the_cache(variant):
    model = decoding_model(variant, torch.float32)
    prompt = random_ids(30, batch=2)
    cached = torch.stack(list(model.generate_greedy(prompt, 16)), dim=1)
    uncached = torch.stack(list(model.generate_greedy(prompt, 16, use_cache=False)), dim=1)
    assert cached.shape == (2, 16)
    assert torch.equal(cached, uncached)
    assert len(set(cached.flatten().tolist())) > 1  # not a constant continuation


def reference_greedy(model, ids, steps):
    """The decoding passkey did before the cache: the whole prefix and its full logits at every step."""
    tokens, out = ids, []
    for _ in range(steps):
        next_id = int(model(tokens)[0, -1].float().argmax())
        out.append(next_id)
        tokens = torch.cat([tokens, tokens.new_tensor([[next_id]])], dim=1)
    return out


def recorded_lengths(model):
    lengths = []
    model.register_forward_pre_hook(lambda module, args: lengths.append(args[0].shape[1]))
    return lengths


@pytest.mark.parametrize("variant", ["tape_one_call", "randrope"])
def test_passkey_decodes_through_the_cache(variant):
    model = decoding_model(variant, torch.float32)
    ids = random_ids(40, batch=1)
    with torch.no_grad():
        expected = reference_greedy(model, ids, 6)
        lengths = recorded_lengths(model)
        assert [int(t[0]) for t in passkey.greedy_tokens(model, ids, 6)] == expected
    assert lengths == [40] + [1] * 5  # the prompt once, then one token per step


def test_passkey_recomputes_the_prefix_where_the_cache_is_refused():
    """RandPE's default eval mode (sample) draws the prefix's positions anew at each length: passkey decodes as it
    always did."""
    model = decoding_model("randrope", torch.float32)
    model.positional.eval_mode = "sample"
    ids = random_ids(40, batch=1)
    with torch.no_grad():
        expected = reference_greedy(model, ids, 4)
        lengths = recorded_lengths(model)
        assert [int(t[0]) for t in passkey.greedy_tokens(model, ids, 4)] == expected
    assert lengths == [40, 41, 42, 43]


def test_passkey_answers_are_unchanged_with_a_real_tokenizer(tokenizer_path):
    from tape_pretrain.data.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(tokenizer_path)
    model = decoding_model("tape_one_call", torch.float32, vocab_size=512, max_seq_len=256)
    rng = random.Random(0)
    for length, depth in ((200, 0.0), (300, 0.5)):
        prompt = passkey.make_prompt(tokenizer, length, depth, rng)
        steps = len(tokenizer.processor.encode(f"{prompt.key}.")) + 2
        with torch.no_grad():
            answer = passkey.greedy_answer(model, tokenizer, prompt, "cpu")
            expected = reference_greedy(model, torch.tensor([prompt.ids]), steps)
        assert answer and expected[0] != tokenizer.processor.eos_id()
        assert tokenizer.decode(expected).startswith(answer)


def test_logits_for_last_is_the_last_row():
    model = decoding_model("tape_one_call")
    ids = random_ids(9)
    with torch.no_grad():
        full = model(ids)
        torch.testing.assert_close(model(ids, logits_for="last"), full[:, -1:], rtol=0, atol=1e-12)
        cache = model.new_cache()
        model(ids[:, :4], cache=cache)
        torch.testing.assert_close(model(ids[:, 4:], cache=cache, logits_for="last"), full[:, -1:], rtol=0,
                                   atol=1e-9)
        with pytest.raises(ValueError, match="logits_for='first'"):
            model(ids, logits_for="first")


def test_storage_grows_geometrically_in_the_models_dtype():
    model = decoding_model("tape_one_call", torch.float32)
    ids = random_ids(101)
    capacities = []
    with torch.no_grad():
        cache = model.new_cache()
        for i in range(101):
            model(ids[:, i:i + 1], cache=cache)
            capacities.append(cache.layers[0].capacity)
        assert len(set(capacities)) == 8  # 1, 2, 4, ..., 128: doubling, not a copy per step
        assert all(b.dtype == torch.float32 and b.device.type == "cpu" for layer in cache.layers for b in layer.buffers)
        preallocated = model.new_cache(max_length=101)
        model(ids[:, :50], cache=preallocated)
        pointers = [b.data_ptr() for layer in preallocated.layers for b in layer.buffers]
        for i in range(50, 101):
            model(ids[:, i:i + 1], cache=preallocated)
        assert [b.data_ptr() for layer in preallocated.layers for b in layer.buffers] == pointers
        assert preallocated.num_bytes() == cache.num_bytes() * 101 // 128


def test_refusals_are_clear():
    model = decoding_model("tape_one_call")
    ids = random_ids(6)
    with torch.no_grad():
        cache = model.new_cache()
        model(ids, cache=cache)
        with pytest.raises(ValueError, match="document_ids cannot be combined with a cache"):
            model(ids, cache=cache, document_ids=torch.zeros_like(ids))
        with pytest.raises(ValueError, match="causal=True"):
            model(ids, cache=cache, causal=False)
        with pytest.raises(ValueError, match="holds 2 sequences, the input has 1 rows"):
            model(ids[:1], cache=cache)
        with pytest.raises(ValueError, match="position_offset=3, but this cache started at position_offset=0"):
            model(ids, cache=cache, position_offset=3)
        assert cache.length == 6  # refused forwards change nothing


@pytest.mark.parametrize(("variant", "options", "train", "message"), [
    ("randrope", dict(randrope_eval="sample"), False, "randrope_eval=sample draws all N positions anew"),
    ("randrope", {}, True, "RandPE draws new positions every training forward"),
    ("randrope", dict(randrope_max_len=96), False, r"integer or at most 1 \(here 96 / 64\)"),
    ("tape_one_call", dict(tape_random_offset=True), True, "tape_random_offset draws a new position offset"),
])
def test_encodings_whose_positions_a_cache_cannot_keep_are_refused(variant, options, train, message):
    name, base = VARIANTS[variant]
    torch.manual_seed(0)
    model = build_model(tiny_config(positional=PositionalConfig(name=name, **(base | options)))).train(train)
    assert model.cache_refusal() is not None
    with pytest.raises(ValueError, match=message):
        model.new_cache()
    with pytest.raises(ValueError, match=message):
        next(model.generate_greedy(random_ids(4), 2))


def test_randrope_expected_positions_at_other_ratios_are_cached():
    """randrope_max_len / max_seq_len of 3 (positions 3i) and 1/2 (positions i) keep a prefix's positions."""
    for max_len in (192, 32):
        torch.manual_seed(0)
        model = build_model(tiny_config(positional=PositionalConfig(
            name="randrope", randrope_eval="expected", randrope_max_len=max_len))).double().eval()
        ids = random_ids(20)
        with torch.no_grad():
            torch.testing.assert_close(cached_logits(model, ids, [7, 1, 12]), model(ids), rtol=0, atol=1e-9)


def test_tape_decodes_in_two_calls_on_the_cpu_unless_told_otherwise():
    """auto: after cached tokens, SDPA's CPU flash kernel in two D-wide calls beats one 2D-wide math-kernel call."""
    assert resolve_decoding_form("auto", "cpu", 64) == "two_calls"
    assert resolve_decoding_form("auto", "cuda", 64) == "one_call"
    assert resolve_decoding_form("auto", "cuda", 256) == "two_calls"
    assert resolve_decoding_form("one_call", "cpu", 64) == "one_call"


def test_every_encoding_is_covered():
    assert {name for name, _ in VARIANTS.values()} == set(REGISTRY)


def test_decode_bench_reports_each_encoding(capsys):
    from tape_pretrain.bench.decode import run

    result = run(prompt_len=24, new_tokens=4, repeats=1, warmup=0, encodings=("tape", "rope", "randrope"))
    for name in ("tape", "rope", "randrope"):
        assert result[f"decode_speedup_{name}"] > 0 and result[f"decode_same_tokens_{name}"] == 1
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("decode_cached_ms_tape=")
