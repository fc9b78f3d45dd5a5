"""model.init_from a Hugging Face Llama (saved by transformers, grouped-query attention): TAPE inserted computes the
Llama exactly (the first training step's loss is transformers' on the same batch), RoPE with linear position
interpolation computes what transformers' linear rope scaling computes, and what cannot be imported is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tape_pretrain.config import ConfigError, load_config
from tape_pretrain.errors import CheckpointError, DataError
from tape_pretrain.models.presets import resolve_model_config_from
from tape_pretrain.train.export import save_export
from tape_pretrain.train.initial_weights import check_pretrained_tokenizer, model_source
from tests.helpers import metrics, write_config
from tests.train.test_trainer_parts import world_of_one  # noqa: F401 (a fixture)

pytestmark = [pytest.mark.slow]

UNSET_SIZES = {f"model.{k}": None for k in ("hidden_size", "num_layers", "num_heads", "ffn_hidden_size")}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, dataset_path) -> Path:
    """A random LlamaForCausalLM with 4 query heads sharing 2 key/value heads, saved by transformers, with the
    dataset's tokenizer beside it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = tmp_path_factory.mktemp("llama")
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # off the initialisation (norms at 1): every weight shapes the logits
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.save_pretrained(directory)
    shutil.copyfile(Path(dataset_path) / "tokenizer.model", directory / "tokenizer.model")
    return directory


def llama_config(tmp_path, dataset_path, llama_dir, **overrides):
    return load_config(write_config(tmp_path / "c.yaml", dataset_path, tmp_path / "run", **{
        "model.init_from": str(llama_dir), **UNSET_SIZES, "parallel.engine": "ddp", "trainer.max_steps": 2,
        **overrides}))


def hf_llama(llama_dir, **config_changes):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(llama_dir, **config_changes).eval()


def test_tape_inserted_into_a_llama_trains_from_exactly_that_llama(tmp_path, dataset_path, llama_dir,
                                                                      world_of_one):  # noqa: F811
    from tape_pretrain.train.trainer import build_trainer

    config = llama_config(tmp_path, dataset_path, llama_dir, **{"model.positional.name": "tape"})
    trainer = build_trainer(config, world_of_one)
    assert trainer.model_config.num_heads == 4 and trainer.model_config.hidden_size == 64
    batches, micro_step = [], trainer.engine.train_micro_step

    def record(inputs, labels, is_boundary, document_ids=None):
        if trainer.step == 0:
            batches.append((inputs.clone(), labels.clone()))
        return micro_step(inputs, labels, is_boundary, document_ids)

    trainer.engine.train_micro_step = record
    trainer.run()
    reference = hf_llama(llama_dir)
    with torch.no_grad():
        losses = [F.cross_entropy(reference(inputs).logits.flatten(0, 1).float(), labels.flatten())
                  for inputs, labels in batches]
    assert len(batches) == trainer.grad_accum
    assert metrics(tmp_path / "run")[1]["loss"] == pytest.approx(torch.stack(losses).mean().item(), abs=1e-5)


@pytest.mark.parametrize("interpolation", [1.0, 2.0])
def test_rope_from_a_llama_computes_transformers_logits(tmp_path, dataset_path, llama_dir, interpolation):
    """The imported model against transformers' own: GQA expanded, and linear position interpolation against
    transformers' linear rope scaling (an independent implementation) at positions past the trained ones."""
    config = llama_config(tmp_path, dataset_path, llama_dir, **{
        "model.positional.name": "rope", "model.positional.interpolation": interpolation})
    model_config = resolve_model_config_from(config, vocab_size=512)
    torch.manual_seed(0)
    ours = model_source(model_config).build(complete=True).eval()
    scaling = {} if interpolation == 1.0 else {"rope_parameters": {"rope_type": "linear", "factor": interpolation,
                                                                   "rope_theta": 10000.0}}
    reference = hf_llama(llama_dir, **scaling)
    save_export(ours.state_dict(), ours.config, tmp_path / "export", None)  # its config.json carries the scaling
    exported = hf_llama(tmp_path / "export")
    ids = torch.randint(4, 512, (2, 300), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = ours(ids)
        assert (logits - reference(ids).logits).abs().max().item() <= 1e-5
        assert (logits - exported(ids).logits).abs().max().item() <= 1e-5


def test_what_cannot_be_imported_is_refused(tmp_path, dataset_path, llama_dir):
    config = llama_config(tmp_path, dataset_path, llama_dir, **{"model.hidden_size": 128})
    with pytest.raises(ConfigError, match="model.hidden_size=128, but the model.init_from checkpoint has 64"):
        resolve_model_config_from(config, vocab_size=512)
    other = tmp_path / "llama3"
    shutil.copytree(llama_dir, other)
    meta = json.loads((other / "config.json").read_text())
    llama3 = {"rope_type": "llama3", "factor": 8.0, "rope_theta": 500000.0}  # transformers 5's key, then 4's
    for key in ("rope_parameters", "rope_scaling"):
        (other / "config.json").write_text(json.dumps({**meta, "rope_parameters": None, key: llama3}))
        with pytest.raises(CheckpointError, match="rotary scaling 'llama3'"):
            resolve_model_config_from(llama_config(tmp_path, dataset_path, other), vocab_size=512)
    (other / "config.json").write_text(json.dumps(meta))
    (other / "model.safetensors").rename(other / "pytorch_model.bin")
    model_config = resolve_model_config_from(llama_config(tmp_path, dataset_path, other), vocab_size=512)
    with pytest.raises(CheckpointError, match="only safetensors are read"):
        model_source(model_config)
    check_pretrained_tokenizer(str(llama_dir), _sha(Path(dataset_path)))  # the dataset's own: accepted
    with pytest.raises(DataError, match="another tokenizer than model.init_from's"):
        check_pretrained_tokenizer(str(llama_dir), "0" * 64)


def _sha(directory: Path) -> str:
    import hashlib

    return hashlib.sha256((directory / "tokenizer.model").read_bytes()).hexdigest()
