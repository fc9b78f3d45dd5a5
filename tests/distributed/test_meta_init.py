"""Engines that build the model themselves (FSDP2 on the meta device, ZeRO-3 partitioned) start from exactly the
weights of an eager build: the same seed gives the same model on any engine and world size."""

import json
import sys

import pytest
import torch
from safetensors.torch import save_file

from tape_pretrain.config import ModelConfig, PositionalConfig
from tape_pretrain.models import build_model
from tests.helpers import ROOT, free_port, run


@pytest.mark.slow
@pytest.mark.distributed
def test_meta_and_partitioned_init_equal_eager_init(tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    torch.manual_seed(123)  # a model unlike the seed-11 init: init_from must really be read
    config = ModelConfig(preset=None, vocab_size=101, hidden_size=48, num_heads=3, num_layers=2, ffn_hidden_size=96,
                         max_seq_len=32, positional=PositionalConfig(name="tape"))
    save_file(build_model(config).state_dict(), export / "model.safetensors")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--nnodes", "1", "--rdzv-backend",
           "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
           str(ROOT / "tests" / "distributed" / "meta_init_worker.py"), str(export)]
    out = run(cmd, timeout=300).stdout
    results = json.loads(out.split("RESULT ", 1)[1].splitlines()[0])
    assert len(results) == 5
    for case, result in results.items():
        assert result == {"keys": True, "mismatched": []}, case


def test_initial_weights_depend_on_seed_and_name_only():
    """Order-free init: TAPE and RoPE share every backbone weight for one seed; another seed changes them."""
    def model(name, seed):
        torch.manual_seed(seed)
        return build_model(ModelConfig(preset="tiny", vocab_size=97, positional=PositionalConfig(name=name)))

    tape, rope, other = model("tape", 0).state_dict(), model("rope", 0).state_dict(), model("rope", 1).state_dict()
    assert set(rope) < set(tape)
    for key, value in rope.items():
        assert torch.equal(tape[key], value), key
    assert not torch.equal(other["embed_tokens.weight"], rope["embed_tokens.weight"])
    # every parameter draws its own values: equal shapes, different weights, each with the configured spread
    for a, b in (("layers.0.self_attn.q_proj.weight", "layers.0.self_attn.k_proj.weight"),
                 ("layers.0.mlp.up_proj.weight", "layers.1.mlp.up_proj.weight")):
        assert tape[a].shape == tape[b].shape and not torch.equal(tape[a], tape[b])
    init_std = ModelConfig(preset="tiny").init_std
    assert abs(tape["embed_tokens.weight"].std().item() / init_std - 1) < 0.02
    with torch.device("meta"):
        torch.manual_seed(0)
        meta = build_model(ModelConfig(preset="tiny", vocab_size=97, positional=PositionalConfig(name="tape")))
    for name, param in meta.named_parameters():  # what an engine materialises, one parameter at a time
        assert torch.equal(meta.initial_value(name, param.shape), tape[name]), name
