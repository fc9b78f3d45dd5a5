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
from tests.helpers import metrics, world_of_one_process, write_config

pytestmark = [pytest.mark.slow]

UNSET_SIZES = {f"model.{k}": None for k in ("hidden_size", "num_layers", "num_heads", "ffn_hidden_size")}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, dataset_path) -> Path:
    """A random LlamaForCausalLM with 4 query heads sharing 2 key/value heads, rope_theta and rms_norm_eps other than
    our defaults, saved by transformers, with the dataset's tokenizer beside it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = tmp_path_factory.mktemp("llama")
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         rms_norm_eps=1e-6, rope_theta=50000.0, tie_word_embeddings=False)  # not our defaults
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
                                                                      world_of_one):
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
    imported = model_source(trainer.model_config).build(complete=True).eval()  # TAPE enters at exactly zero
    for layer in imported.layers:
        assert not layer.positional.post_attention_linear.weight.any()
        assert not layer.positional.pe.up_proj.weight.any()
    ids = torch.randint(4, 512, (2, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (imported(ids) - reference(ids).logits).abs().max().item() <= 1e-5
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
                                                                   "rope_theta": 50000.0}}
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


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory, dataset_path, llama_dir):
    """RoPE from the Llama with rank-4 LoRA on q, k, v, o (and the norms training too), 2 steps, one process, on DDP
    (built whole), FSDP2 (materialised on the meta device from initial_value) and DeepSpeed ZeRO-2 (whose checkpoints
    leave the frozen base weights out): each run's engine model (adapters unmerged), its end-of-run export and an
    export from its last checkpoint."""
    from tape_pretrain.train.export import export_checkpoint
    from tape_pretrain.train.trainer import build_trainer

    out = {}
    for engine in ("ddp", "fsdp2", "deepspeed"):
        root = tmp_path_factory.mktemp(f"lora_{engine}")
        config = llama_config(root, dataset_path, llama_dir, **{
            "model.positional.name": "rope", "optim.trainable": ["lora", "*norm.weight"], "optim.lora_rank": 4,
            "optim.lora_alpha": 8.0, "parallel.engine": engine, "optim.lr": 1e-2})
        with world_of_one_process() as env:
            trainer = build_trainer(config, env)
            trainer.run()
            model = trainer.engine.module
            state = {name.removeprefix("module."): (p.full_tensor() if hasattr(p, "full_tensor") else p).detach()
                     .clone() for name, p in model.named_parameters()}  # DDP's wrapper prefix; FSDP2's DTensors
            ids = torch.randint(4, 512, (2, 48), generator=torch.Generator().manual_seed(5))
            with torch.no_grad():
                logits = model(ids)
        checkpoint = sorted((root / "run" / "checkpoints").glob("step_*"))[-1]
        export_checkpoint(str(checkpoint), str(root / "offline"))
        out[engine] = {"root": root, "state": state, "ids": ids, "logits": logits}
    return out


@pytest.mark.parametrize("engine", ["ddp", "fsdp2", "deepspeed"])
def test_lora_trains_adapters_only_and_exports_the_merged_stock_llama(lora_runs, llama_dir, engine):
    from safetensors.torch import load_file

    run = lora_runs[engine]
    original = load_file(str(llama_dir / "model.safetensors"))
    for name, value in run["state"].items():
        plain = "model." + name.replace(".base_layer.", ".")
        if ".lora_" in name:
            assert name.endswith(("lora_A.default.weight", "lora_B.default.weight"))
        elif name.endswith("norm.weight"):
            assert not torch.equal(value, original[plain]), name  # trained
        else:
            expected = original["lm_head.weight" if name == "lm_head.weight" else plain]
            if name.endswith(("k_proj.base_layer.weight", "v_proj.base_layer.weight")):  # 2 kv heads for 4 queries
                expected = expected.view(2, 16, 64).repeat_interleave(2, dim=0).reshape(64, 64)
            assert torch.equal(value, expected), name
    assert any(".lora_B." in n and v.abs().max() > 0 for n, v in run["state"].items())  # B left zero: trained
    exported = hf_llama(run["root"] / "run" / "export")  # merged: a stock Llama, no adapters
    with torch.no_grad():
        assert (exported(run["ids"]).logits - run["logits"]).abs().max().item() <= 1e-5
    live = load_file(str(run["root"] / "run" / "export" / "model.safetensors"))
    offline = load_file(str(run["root"] / "offline" / "model.safetensors"))
    assert live.keys() == offline.keys() and all(torch.equal(live[k], offline[k]) for k in live)


def test_lora_adapters_start_the_same_on_every_engine(lora_runs):
    """A's initial values come from the seed and the name, not from peft's draws: a model built whole (DDP) and one
    materialised from initial_value on the meta device (FSDP2) train the same (to reduction order)."""
    ddp = lora_runs["ddp"]["state"]
    for engine in ("fsdp2", "deepspeed"):
        other = lora_runs[engine]["state"]
        assert ddp.keys() == other.keys()
        for name in ddp:
            assert (ddp[name] - other[name]).abs().max().item() <= 1e-5, (engine, name)


def test_lora_starts_as_the_base_model(tmp_path, dataset_path, llama_dir):
    """B = 0: the adapted model built whole and the one materialised from initial_value are the Llama itself."""
    from tape_pretrain.train.lora import with_lora

    config = llama_config(tmp_path, dataset_path, llama_dir, **{
        "model.positional.name": "rope", "optim.trainable": ["lora"], "optim.lora_targets": ["q_proj", "up_proj"]})
    model_config = resolve_model_config_from(config, vocab_size=512)
    source = with_lora(model_source(model_config), config.optim)
    torch.manual_seed(0)
    whole = source.build(complete=True).eval()
    assert {n.split(".")[-4] for n, _ in whole.named_parameters() if ".lora_A." in n} == {"q_proj", "up_proj"}
    torch.manual_seed(0)  # as the trainer seeds before any engine builds (the model draws its init seed)
    with torch.device("meta"):
        lazy = source.build(complete=False)
    lazy = lazy.to_empty(device="cpu").eval()
    with torch.no_grad():
        for name, param in lazy.named_parameters():
            param.copy_(source.initial_value(lazy, name, param.shape))
    ids = torch.randint(4, 512, (2, 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        reference = hf_llama(llama_dir)(ids).logits
        assert (whole(ids) - reference).abs().max().item() <= 1e-5
        assert (lazy(ids) - reference).abs().max().item() <= 1e-5
    assert all(torch.equal(p, lazy.get_parameter(n)) for n, p in whole.named_parameters())


def test_lora_settings_and_the_pretrained_tokenizer_are_checked(tmp_path, dataset_path, llama_dir,
                                                                 world_of_one):
    from tape_pretrain.train.resume import check_resume_compatible, resume_identity
    from tape_pretrain.train.trainer import build_trainer

    lora = {"model.positional.name": "rope", "optim.trainable": ["lora"]}
    saved = resume_identity(llama_config(tmp_path, dataset_path, llama_dir, **lora), 512)
    changed = resume_identity(llama_config(tmp_path, dataset_path, llama_dir, **lora, **{"optim.lora_rank": 4}), 512)
    with pytest.raises(CheckpointError, match="LoRA adapters"):
        check_resume_compatible(saved, changed, set())
    other = tmp_path / "other_tokenizer"
    shutil.copytree(llama_dir, other)
    (other / "tokenizer.model").write_bytes((other / "tokenizer.model").read_bytes() + b"\0")
    with pytest.raises(DataError, match="another tokenizer than model.init_from's"):
        build_trainer(llama_config(tmp_path, dataset_path, other), world_of_one)
