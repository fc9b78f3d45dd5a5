"""The paper's TAPE ablation: model.positional.tape_attention_update and tape_mlp_update switch a state update off."""

import copy

import pytest
import torch

from tape_pretrain.config import ModelConfig, PositionalConfig, RunConfig
from tape_pretrain.errors import CheckpointError
from tape_pretrain.models import build_model
from tape_pretrain.train.resume import IMPLEMENTATION_ONLY_POSITIONAL_KEYS, check_resume_compatible, resume_identity
from tests.models.test_tape_properties import TOL, initial_state, tiny_config

VARIANTS = {  # (tape_attention_update, tape_mlp_update)
    "full": (True, True), "no_attention_update": (False, True), "no_mlp_update": (True, False),
    "neither": (False, False)}


def ablated(variant: str, seed=0, dtype=torch.float64, **overrides):
    attention_update, mlp_update = VARIANTS[variant]
    torch.manual_seed(seed)
    positional = PositionalConfig(name="tape", tape_attention_update=attention_update, tape_mlp_update=mlp_update)
    return build_model(tiny_config(positional=positional, **overrides)).to(dtype)


def randomise(model, names=("positional", "q_proj", "k_proj")):
    """Away from the zero init (every update weight, and sharp attention), the same values for the same names."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(part in name for part in names):
                generator = torch.Generator().manual_seed(sum(map(ord, name)))
                p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float64) * 0.3)
    return model


@pytest.fixture
def ids():
    return torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("variant, added", [("full", 457_920), ("no_attention_update", 12 * (48 * 768 + 2 * 48 * 12)),
                                             ("no_mlp_update", 12 * 12 * 12), ("neither", 0)])
def test_a_switched_off_update_has_no_parameters(variant, added):
    attention_update, mlp_update = VARIANTS[variant]
    with torch.device("meta"):
        rope = build_model(ModelConfig(preset="paper-155m", positional=PositionalConfig(name="rope")))
        tape = build_model(ModelConfig(preset="paper-155m", positional=PositionalConfig(
            name="tape", tape_attention_update=attention_update, tape_mlp_update=mlp_update)))
    assert tape.num_parameters() - rope.num_parameters() == tape.num_positional_parameters() == added
    names = {n for n, _ in tape.named_parameters()}
    assert ("layers.3.positional.post_attention_linear.weight" in names) == attention_update
    assert ("layers.3.positional.pe.x_proj.weight" in names) == mlp_update
    assert names - {n for n, _ in rope.named_parameters()} == {n for n in names if ".positional." in n}


def test_each_switch_stops_its_own_update_only():
    torch.manual_seed(3)
    q, k, v = (torch.randn(2, 4, 16, 8, dtype=torch.float64) for _ in range(3))
    mlp_out = torch.randn(2, 16, 32, dtype=torch.float64)
    for variant, (attention_update, mlp_update) in VARIANTS.items():
        model = randomise(ablated(variant))
        layer = model.layers[0].positional
        cs = initial_state(model, torch.zeros(2, 16, dtype=torch.long))
        _, after_attention = layer.attend(q, k, v, cs, causal=True)
        after_mlp = layer.after_mlp(mlp_out, after_attention)
        assert torch.equal(after_attention, cs) != attention_update, variant
        assert torch.equal(after_mlp, after_attention) != mlp_update, variant


@pytest.mark.parametrize("variant, zeroed", [("no_attention_update", "post_attention_linear.weight"),
                                             ("no_mlp_update", "pe.up_proj.weight")])
def test_one_update_off_is_tape_with_that_update_zeroed(ids, variant, zeroed):
    """Off = gamma = 0 (attention side) or W_pu = 0 (MLP side) in the full model, every other weight shared."""
    full = randomise(ablated("full"))
    off = ablated(variant)
    off.load_state_dict({k: v for k, v in full.state_dict().items() if k in off.state_dict()}, strict=True)
    assert not torch.allclose(off(ids), full(ids))  # the switched-off update did move the full model's state
    with torch.no_grad():
        for name, p in full.named_parameters():
            if name.endswith(zeroed):
                p.zero_()
    torch.testing.assert_close(off(ids), full(ids), **TOL)


@pytest.mark.parametrize("seed", [0, 5])
def test_both_off_is_rope_bitwise_for_any_weights(ids, seed):
    """Not only at init (TAPE.md section 5.1): the state never moves, so the model is RoPE's, logits and gradients
    equal bitwise in fp32, and it starts from RoPE's initial weights for the same seed."""
    tape = ablated("neither", seed=seed, dtype=torch.float32)
    torch.manual_seed(seed)
    rope = build_model(tiny_config("rope"))
    assert tape.state_dict().keys() == rope.state_dict().keys()
    assert all(torch.equal(p, rope.state_dict()[k]) for k, p in tape.state_dict().items())
    randomise(rope)
    tape.load_state_dict(rope.state_dict(), strict=True)
    logits = {}
    for name, model in (("tape", tape), ("rope", rope)):
        logits[name] = model(ids)
        torch.nn.functional.cross_entropy(logits[name].flatten(0, 1), ids.roll(-1, 1).flatten()).backward()
    assert torch.equal(logits["tape"], logits["rope"])
    rope_grads = dict(rope.named_parameters())
    for name, p in tape.named_parameters():
        assert torch.equal(p.grad, rope_grads[name].grad), name
    assert tape.positional.extra_forward_flops_per_token(1024) == 0


def test_flops_count_only_the_updates_that_run():
    c = tiny_config()
    full, no_attention, no_mlp = (ablated(v).positional.extra_forward_flops_per_token(1024)
                                  for v in ("full", "no_attention_update", "no_mlp_update"))
    attention_side = (c.num_layers - 1) * 2 * 1024 * c.hidden_size  # A @ [c|s] in every layer but the last
    assert no_mlp == attention_side and no_attention == full - attention_side > 0


def test_the_switches_are_part_of_a_runs_resume_identity():
    """They change the model: a run may not resume with another value (unlike tape_attention, which only says how)."""
    assert {"tape_attention_update", "tape_mlp_update"}.isdisjoint(IMPLEMENTATION_ONLY_POSITIONAL_KEYS)
    base = RunConfig()
    saved = resume_identity(base, vocab_size=97)
    for key in ("tape_attention_update", "tape_mlp_update"):
        changed = RunConfig()
        setattr(changed.model.positional, key, False)
        current = resume_identity(changed, vocab_size=97)
        assert current["model"]["positional"][key] is False and saved["model"]["positional"][key] is True
        with pytest.raises(CheckpointError, match=f"differs in positional.{key}$|differs in positional.{key} "):
            check_resume_compatible(saved, current, set())
        check_resume_compatible(saved, current, {"model"})


def test_a_checkpoint_written_before_a_model_key_existed_resumes_with_its_default():
    """Keys added since (the ablation switches, RandPE's evaluation) were at their defaults in the older run."""
    current = resume_identity(RunConfig(), vocab_size=97)
    old = copy.deepcopy(current)
    for key in ("tape_attention_update", "tape_mlp_update", "randrope_eval", "randrope_eval_seed"):
        old["model"]["positional"].pop(key, None)
    check_resume_compatible(old, current, set())
    changed = RunConfig()
    changed.model.positional.tape_mlp_update = False  # the old run had the update: refused
    with pytest.raises(CheckpointError, match="positional.tape_mlp_update"):
        check_resume_compatible(old, resume_identity(changed, vocab_size=97), set())


def test_a_key_only_the_checkpoint_has_is_named():
    current = resume_identity(RunConfig(), vocab_size=97)
    newer = copy.deepcopy(current)
    newer["model"]["positional"]["tape_future_switch"] = True
    newer["model"]["future_width"] = 3
    with pytest.raises(CheckpointError, match=r"differs in future_width, positional\.tape_future_switch "):
        check_resume_compatible(newer, current, set())


def test_interpolation_reaches_tapes_initial_state(ids):
    """Linear position interpolation scales TAPE's initial state as it scales RoPE's angles (RoPE's is checked against
    transformers' linear rope scaling in tests/train/test_llama_init.py): both updates off, the two stay equal."""
    logits = {}
    for factor in (1.0, 2.5):
        torch.manual_seed(0)
        positional = PositionalConfig(name="tape", tape_attention_update=False, tape_mlp_update=False,
                                      interpolation=factor)
        tape = build_model(tiny_config(positional=positional))
        torch.manual_seed(0)
        rope = build_model(tiny_config(positional=PositionalConfig(name="rope", interpolation=factor)))
        with torch.no_grad():
            logits[factor] = tape(ids)
            assert torch.equal(logits[factor], rope(ids))
    assert not torch.allclose(logits[1.0], logits[2.5])
