"""parallel.compile and parallel.activation_checkpointing change how a step is computed, never what it computes."""

import copy

import pytest
import torch
import torch.nn.functional as F

from tape_pretrain.config import ModelConfig, PositionalConfig
from tape_pretrain.distributed.engine import apply_activation_checkpointing, compile_blocks
from tape_pretrain.models import build_model
from tests.helpers import metrics, run, train_command, write_config

CURRICULUM = {"phases": [{"seq_len": 32, "until_tokens": 3 * 2048}, {"seq_len": 64}]}


def loss_and_grads(model, tokens):
    loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_compiled_checkpointed_blocks_match_eager_blocks():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(0)
    eager = build_model(ModelConfig(preset=None, vocab_size=256, hidden_size=64, num_layers=3, num_heads=4,
                                    ffn_hidden_size=128, max_seq_len=64,
                                    positional=PositionalConfig(name="tape")))
    for layer in eager.layers:  # non-zero update weights, so the positional state really changes
        torch.nn.init.normal_(layer.positional.pe.up_proj.weight, std=0.2)
        torch.nn.init.normal_(layer.positional.post_attention_linear.weight, std=0.2)
    compiled = copy.deepcopy(eager)
    apply_activation_checkpointing(compiled)
    compile_blocks(compiled)
    tokens = torch.randint(0, 256, (2, 33))
    eager_loss, eager_grads = loss_and_grads(eager, tokens)
    compiled_loss, compiled_grads = loss_and_grads(compiled, tokens)
    # the first, middle and last TAPE layers are three graphs; none fell back to eager
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 3
    assert compiled_grads.keys() == eager_grads.keys()
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-6, atol=0)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
@pytest.mark.distributed
def test_compiled_engines_train_like_eager(tmp_path, dataset_path):
    variants = {"eager": {}, "zero2_compiled": {"parallel.compile": True},
                "fsdp2_compiled_checkpointed": {"parallel.engine": "fsdp2", "parallel.compile": True,
                                                "parallel.activation_checkpointing": True}}
    records = {}
    for name, overrides in variants.items():
        cfg = write_config(tmp_path / f"{name}.yaml", dataset_path, tmp_path / name,
                           **{"curriculum": CURRICULUM, **overrides})
        run(train_command(2, cfg), timeout=600)
        records[name] = metrics(tmp_path / name)
    reference = records.pop("eager")
    assert {reference[s]["seq_len"] for s in reference} == {32, 64}
    for name, got in records.items():
        assert [got[s]["windows_hash"] for s in reference] == [reference[s]["windows_hash"] for s in reference]
        for step in reference:
            assert got[step]["loss"] == pytest.approx(reference[step]["loss"], rel=1e-5), (name, step)
