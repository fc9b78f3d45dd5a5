"""The config tree: YAML + overrides, clear errors, and every shipped config loads."""

from pathlib import Path

import pytest

from tape_pretrain.config import ConfigError, load_config
from tape_pretrain.models.presets import resolve_model_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").rglob("*.yaml")), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_config_loads(path):
    if path.parent.name == "studies":
        from tape_pretrain.study.spec import load_study

        load_study(path)
    else:
        config = load_config(path)
        resolve_model_config(config.model)


def test_overrides_take_precedence(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("trainer:\n  max_steps: 5\nmodel:\n  positional:\n    name: rope\n")
    config = load_config(f, ["trainer.max_steps=7", "model.positional.name=alibi", "optim.betas=[0.8, 0.9]"])
    assert config.trainer.max_steps == 7
    assert config.model.positional.name == "alibi"
    assert config.optim.betas == (0.8, 0.9)


@pytest.mark.parametrize("override, message", [
    (["trainer.max_stepz=3"], "unknown config key trainer.max_stepz"),
    (["model.positional.name=rotary"], "model.positional.name: 'rotary' is not one of"),
    (["trainer.micro_batch_size=two"], "trainer.micro_batch_size: expected an integer"),
    (["checkpoint.keep_last=1"], "checkpoint.keep_last must be at least 2"),
    (["trainer.seq_len=100", "trainer.global_batch_tokens=1050"], "not a multiple of trainer.seq_len"),
    (["curriculum.phases=[{seq_len: 48}]"], r"curriculum.phases\[0\].seq_len=48 must divide"),
    (["parallel.zero_stage=4"], "parallel.zero_stage must be 0, 1, 2 or 3"),
    (["parallel.compile=true", "parallel.zero_stage=3"], "parallel.compile does not work with DeepSpeed ZeRO-3"),
    (["nonsense"], "not of the form key=value"),
    (["optim.lr=-1e-3"], "optim.lr must be positive"),
    (["optim.lr=0"], "optim.lr must be positive"),
    (["optim.betas=[0.9, 1.0]"], r"optim.betas must each be in \[0, 1\)"),
    (["optim.eps=0"], "optim.eps must be positive"),
    (["parallel.timeout_s=-5"], "parallel.timeout_s must be positive"),
    (["optim.lr=1e-3x"], "optim.lr: expected a number"),
    (["optim.lr=.inf"], "optim.lr must be a finite number"),
    (["parallel.timeout_s=.nan"], "parallel.timeout_s must be a finite number"),
    (["trainer.eval_batches=-1"], "trainer.eval_batches must be >= 0"),
    (["checkpoint.interval=-5"], "checkpoint.interval must be >= 0"),
    (["checkpoint.lease_ttl_s=1e999"], "checkpoint.lease_ttl_s must be a finite number"),
    (["parallel.engine=megatron"], r"parallel.engine: unknown engine 'megatron' \(known: ddp, deepspeed, fsdp2\)"),
    (["parallel.replicate_degree=2"], "parallel.replicate_degree \\(HSDP\\) needs parallel.engine=fsdp2"),
    (["parallel.replicate_degree=0", "parallel.engine=fsdp2"], "parallel.replicate_degree must be >= 1"),
    (["parallel.engine=ddp", "trainer.precision=bf16"], "parallel.engine=ddp trains in fp32"),
])
def test_bad_values_name_the_dotted_path(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, override)


def test_the_engine_registry_refuses_unknown_names():
    from tape_pretrain.distributed.engine import ENGINES, Engine, engine_class

    with pytest.raises(ConfigError, match="unknown engine 'fsdp'"):
        engine_class("fsdp")
    for name in ENGINES:  # every registered engine implements the whole interface
        cls = engine_class(name)
        assert issubclass(cls, Engine)
        for method in ("__init__", "train_micro_step", "optimizer_step", "eval_logits", "save", "load",
                       "full_state_dict", "consolidate"):
            assert getattr(cls, method) is not getattr(Engine, method), (name, method)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_unknown_preset_is_named():
    config = load_config(None, ["model.preset=giant"])
    with pytest.raises(ConfigError, match="unknown preset 'giant'"):
        resolve_model_config(config.model)


@pytest.mark.parametrize("spelling, value", [("1e-3", 1e-3), ("3E-4", 3e-4), ("2.5e+1", 25.0), (".5", 0.5),
                                             ("1.0e-3", 1e-3)])
def test_float_spellings_of_yaml_1_1_and_1_2_parse(tmp_path, spelling, value):
    assert load_config(None, [f"optim.lr={spelling}"]).optim.lr == value
    f = tmp_path / "c.yaml"
    f.write_text(f"optim:\n  lr: {spelling}\n")
    assert load_config(f).optim.lr == value


def test_set_leaves_merges_sections_and_replaces_leaves_dotted_or_nested():
    from tape_pretrain.config import set_leaves

    data = {"trainer": {"seq_len": 64, "max_steps": 5}, "model": {"positional": {"name": "tape", "rope_base": 5.0}}}
    set_leaves(data, {"trainer.seq_len": 32, "model": {"positional": {"name": "rope"}, "preset": None},
                      "data.storage_options": {}, "optim.betas": [0.8, 0.9]})
    assert data == {"trainer": {"seq_len": 32, "max_steps": 5},
                    "model": {"positional": {"name": "rope", "rope_base": 5.0}, "preset": None},
                    "data": {"storage_options": {}}, "optim": {"betas": [0.8, 0.9]}}
    with pytest.raises(ConfigError, match="seq_len is not a section"):
        set_leaves(data, {"trainer.seq_len.x": 1})


def test_one_model_resolver_for_runs_models_records_exports_files_and_presets(tmp_path):
    """resolve_model_config_from gives the same model from each form a model is described in."""
    import dataclasses

    import torch

    from tape_pretrain.config import ModelConfig, to_dict
    from tape_pretrain.errors import CheckpointError, DataError
    from tape_pretrain.models import build_model
    from tape_pretrain.models.presets import resolve_model_config_from
    from tape_pretrain.train.export import save_export

    path = tmp_path / "run.yaml"
    path.write_text("model:\n  preset: tiny\n  vocab_size: null\n  positional:\n    tape_position_size: 8\n"
                    "trainer:\n  seq_len: 64\n  global_batch_tokens: 256\n")
    run = load_config(path)
    model = resolve_model_config_from(run, vocab_size=512)
    assert (model.vocab_size, model.max_seq_len, model.hidden_size) == (512, 64, 128)  # the dataset's, the window's
    assert model.positional.tape_position_size == 8
    assert resolve_model_config_from(model) == model
    assert resolve_model_config_from(to_dict(model)) == model  # a checkpoint's record
    assert resolve_model_config_from(str(path), vocab_size=512) == model
    torch.manual_seed(0)
    save_export(build_model(model).state_dict(), model, tmp_path / "export", None)
    assert resolve_model_config_from(tmp_path / "export") == model
    assert resolve_model_config_from(str(tmp_path / "export"), positional="rope") == dataclasses.replace(
        model, positional=dataclasses.replace(model.positional, name="rope"))
    assert resolve_model_config_from("tiny") == resolve_model_config(ModelConfig(preset="tiny"))
    with pytest.raises(DataError, match="model.vocab_size=512 but the dataset's tokenizer has 256 ids"):
        resolve_model_config_from(model, vocab_size=256)
    assert resolve_model_config_from(model, vocab_size=256, check_vocab=False).vocab_size == 512
    with pytest.raises(ConfigError, match="unknown config key model.positional.bogus"):
        resolve_model_config_from({"positional": {"bogus": 1}})
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not an export"):
        resolve_model_config_from(tmp_path / "empty")
    with pytest.raises(ConfigError, match="neither a preset"):
        resolve_model_config_from("no-such-model")
