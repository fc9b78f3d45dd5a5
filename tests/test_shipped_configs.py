"""Every config shipped in configs/ loads, validates and builds its model (shapes only), so a typo there
fails here rather than at the start of somebody's run."""

from pathlib import Path

import pytest
import yaml

from tape_pretrain.config import load_config
from tape_pretrain.inspect_model import inspect_model
from tape_pretrain.models.presets import resolve_model_config
from tape_pretrain.study.runner import run_config
from tape_pretrain.study.spec import load_study

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted((CONFIGS / "runs").glob("*.yaml")), ids=lambda p: p.name)
def test_run_configs_load_and_resolve(path):
    config = load_config(path)
    model = resolve_model_config(config.model)
    assert model.max_seq_len >= config.trainer.seq_len


@pytest.mark.parametrize("path", sorted((CONFIGS / "models").glob("*.yaml")), ids=lambda p: p.name)
def test_model_configs_build(path):
    report = inspect_model(str(path))
    assert "tape: parameters=" in report and "rope: parameters=" in report


@pytest.mark.parametrize("path", sorted((CONFIGS / "studies").glob("*.yaml")), ids=lambda p: p.name)
def test_study_configs_give_valid_run_configs(path, tmp_path):
    spec = load_study(path)
    for run in spec.runs():
        config = run_config(spec, run, tmp_path, "s3://bucket/data", vocab_size=32000)
        (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
        loaded = load_config(tmp_path / "run.yaml")
        for key, value in spec.positional(run["encoding"]).items():  # an encoding or a variant's fields
            assert getattr(loaded.model.positional, key) == value, (run["name"], key)
