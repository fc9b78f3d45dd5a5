"""AdamW parameter groups, read by name: which parameters decay, which never do, which are not optimised at all."""

import pytest

from tape_pretrain.distributed.engine import param_groups
from tape_pretrain.models import build_model
from tests.models.test_tape_properties import tiny_config


def groups_by_name(model, decay_embeddings):
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = param_groups(model, weight_decay=0.1, decay_embeddings=decay_embeddings)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    return {names[id(p)] for p in decay["params"]}, {names[id(p)] for p in no_decay["params"]}


@pytest.mark.parametrize("decay_embeddings", [False, True])
def test_tape_groups(decay_embeddings):
    model = build_model(tiny_config("tape", num_layers=2))
    decay, no_decay = groups_by_name(model, decay_embeddings)
    matrices = {f"layers.{i}.{m}.weight" for i in range(2) for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj")}
    tape = {f"layers.0.positional.{m}.weight" for m in ("post_attention_linear", "pe.x_proj", "pe.up_proj",
                                                         "pe.down_proj")}  # the last layer's are frozen
    norms = {f"layers.{i}.{n}.weight" for i in range(2) for n in ("input_layernorm", "post_attention_layernorm")}
    norms.add("norm.weight")
    embeddings = {"embed_tokens.weight", "lm_head.weight"}
    assert decay == matrices | tape | (embeddings if decay_embeddings else set())
    assert no_decay == norms | (set() if decay_embeddings else embeddings)


def test_fire_scalars_and_biases_never_decay():
    model = build_model(tiny_config("fire", num_layers=1))
    decay, no_decay = groups_by_name(model, decay_embeddings=False)
    fire = "layers.0.positional."
    assert {fire + "c", fire + "threshold", fire + "mlp.0.bias", fire + "mlp.2.bias"} <= no_decay
    assert {fire + "mlp.0.weight", fire + "mlp.2.weight"} <= decay


def test_frozen_parameters_are_in_no_group():
    model = build_model(tiny_config("tape", num_layers=2))
    decay, no_decay = groups_by_name(model, decay_embeddings=False)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {f"layers.1.positional.{m}.weight" for m in ("post_attention_linear", "pe.x_proj",
                                                                  "pe.up_proj", "pe.down_proj")}
    assert not frozen & (decay | no_decay)
