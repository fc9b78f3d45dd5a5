"""Studies: a 2-run grid completes, is skipped on re-run, and writes RESULTS.md and real plots."""

import subprocess
import sys

import matplotlib.image as mpimg
import pytest
import yaml

from tape_pretrain.study.runner import run_study
from tape_pretrain.study.spec import load_study
from tests.helpers import ROOT, base_env

pytestmark = [pytest.mark.slow]


def study_file(tmp_path, dataset_path):
    spec = {
        "name": "mini", "out_dir": str(tmp_path / "out"), "data_path": dataset_path,
        "base": {"model.preset": None, "trainer.seq_len": 32, "trainer.global_batch_tokens": 512,
                 "trainer.micro_batch_size": 8, "trainer.log_interval": 1, "trainer.num_threads": 1,
                 "trainer.progress_bar": False, "data.cache_dir": str(tmp_path / "cache"),
                 "parallel.engine": "fsdp2"},
        "encodings": ["rope", "tape"],
        "sizes": [{"name": "a", "model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "ffn_hidden_size": 64}},
                  {"name": "b", "model": {"hidden_size": 48, "num_layers": 2, "num_heads": 2, "ffn_hidden_size": 96}}],
        "tokens_per_parameter": 0.0, "min_steps": 4, "eval_multipliers": [1, 2], "eval_max_tokens": 2000,
        "nproc": 1,
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_study_runs_skips_and_reports(tmp_path, dataset_path, capfd):
    path = study_file(tmp_path, dataset_path)
    root = run_study(str(path), [])
    results = (root / "RESULTS.md").read_text()
    for name in ("rope-a-s1234", "tape-a-s1234", "rope-b-s1234", "tape-b-s1234"):
        assert f"| {name} |" in results
    assert "ppl@32" in results and "ppl@64" in results
    assert "Power-law fit" in results
    for plot in ("loss_vs_tokens.png", "perplexity_vs_length.png", "loss_vs_parameters.png"):
        image = mpimg.imread(root / plot)
        assert image.shape[0] > 200 and image.shape[1] > 300
        assert image[..., :3].std() > 0.01  # not a blank canvas
    capfd.readouterr()
    run_study(str(path), [])
    out = capfd.readouterr().out
    assert out.count("already finished; skipped") == 4


def test_dry_run_prints_one_command_per_run(tmp_path, dataset_path):
    path = study_file(tmp_path, dataset_path)
    out = subprocess.run([sys.executable, "-m", "tape_pretrain.cli", "study", str(path), "--dry-run"],
                         env=base_env(), capture_output=True, text=True, timeout=120, check=True).stdout
    assert out.count("tape_pretrain.cli train") == 4


@pytest.mark.parametrize("study", sorted((ROOT / "configs" / "studies").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_studies_load(study):
    spec = load_study(study)
    assert spec.runs()
