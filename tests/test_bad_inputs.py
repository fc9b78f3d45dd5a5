"""Bad input gets one clear error: exit 2, one line naming what is wrong and where, no traceback, nothing written.
The cases a careless user hit (issue 13); each runs the real CLI in this process."""

import gzip
import json
from pathlib import Path

import pytest

from tape_pretrain.cli import main

ROOT = Path(__file__).resolve().parents[1]


def one_error(capsys, argv) -> str:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error:") and "Traceback" not in err, err
    return err


def test_binary_file_as_config(tmp_path, capsys):
    (tmp_path / "c.yaml").write_bytes(bytes(range(256)) * 8)
    assert "is not a text file" in one_error(capsys, ["train", tmp_path / "c.yaml"])


@pytest.mark.parametrize("base, message", [("missing.yaml", "does not exist"), ("bad.yaml", "is not valid YAML")])
def test_missing_or_malformed_study_base_config(tmp_path, capsys, base, message):
    (tmp_path / "bad.yaml").write_text("trainer: [1, 2\n")
    study = (ROOT / "configs/studies/pe_micro.yaml").read_text().replace("base_config: ../runs/quickstart.yaml",
                                                                         f"base_config: {base}")
    (tmp_path / "study.yaml").write_text(study)
    err = one_error(capsys, ["study", tmp_path / "study.yaml", "--dry-run"])
    assert "study.base_config" in err and message in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("damage, message", [("config", "config.json: not valid JSON"),
                                             ("weights", "model.safetensors: not a readable safetensors file")])
def test_broken_export(tmp_path, capsys, dataset_path, damage, message):
    export = tmp_path / "export"
    export.mkdir()
    (export / "config.json").write_text("{not json" if damage == "config" else json.dumps(
        {"tape_pretrain": {"preset": None, "vocab_size": 512, "hidden_size": 32, "num_layers": 1, "num_heads": 2,
                           "ffn_hidden_size": 64, "max_seq_len": 64, "positional": {"name": "rope"}}}))
    (export / "model.safetensors").write_bytes(b"\x07" * 64)
    assert message in one_error(capsys, ["eval", export, "--data", dataset_path, "--lengths", "32"])


def test_truncated_jsonl_gz_and_corrupt_parquet(tmp_path, capsys, tokenizer_path):
    (tmp_path / "gz").mkdir()
    data = gzip.compress(b"".join(json.dumps({"text": f"document {i} " * 50}).encode() + b"\n" for i in range(500)))
    (tmp_path / "gz" / "part.jsonl.gz").write_bytes(data[: len(data) // 2])
    err = one_error(capsys, ["prep", "--input", tmp_path / "gz/*.jsonl.gz", "--tokenizer", tokenizer_path,
                             "--out", tmp_path / "out1", "--quiet"])
    assert "part.jsonl.gz: corrupt or truncated gzip file" in err
    (tmp_path / "pq").mkdir()
    (tmp_path / "pq" / "part.parquet").write_bytes(b"PAR1" + b"\0" * 64)
    err = one_error(capsys, ["prep", "--input", tmp_path / "pq/*.parquet", "--tokenizer", tokenizer_path,
                             "--out", tmp_path / "out2", "--quiet"])
    assert "part.parquet: not a readable parquet file" in err
    for out in ("out1", "out2"):  # nothing published: no manifest, so no dataset
        assert not (tmp_path / out / "manifest.json").exists()


def test_missing_init_from(tmp_path, dataset_path, cli_env):
    import subprocess
    import sys

    from tests.helpers import write_config

    cfg = write_config(tmp_path / "c.yaml", dataset_path, tmp_path / "run",
                       **{"model.init_from": str(tmp_path / "nowhere"), "trainer.max_steps": 1})
    out = subprocess.run([sys.executable, "-m", "tape_pretrain.cli", "train", str(cfg)], env=cli_env,
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == (f"error: model.init_from {tmp_path / 'nowhere'}: no such "
                                                   "directory (an export, or a Hugging Face Llama)")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_mistyped_data_path_is_one_preflight_error(tmp_path, dataset_path, cli_env):
    import subprocess
    import sys

    from tests.helpers import write_config

    cfg = write_config(tmp_path / "c.yaml", str(tmp_path / "no_such_dataset"), tmp_path / "run")
    out = subprocess.run([sys.executable, "-m", "tape_pretrain.cli", "train", str(cfg)], env=cli_env,
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1].startswith("error: preflight: rank 0: dataset:")
