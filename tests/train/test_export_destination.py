"""export never writes into a run or checkpoint directory, and into a non-empty one only with --overwrite
(RELIABILITY.md R20: no command destroys data it did not create). The destination is checked before anything loads."""

import json

import pytest

from tape_pretrain.cli import main


def export(capsys, *args) -> tuple[int, str]:
    code = main(["export", *map(str, args)])
    return code, capsys.readouterr().err.strip()


def test_run_directory_is_refused(tmp_path, capsys):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"seed": 1}))
    code, err = export(capsys, run_dir, "--out", run_dir, "--overwrite")
    assert code == 2 and len(err.splitlines()) == 1 and "is a run directory" in err, err
    assert json.loads((run_dir / "config.json").read_text()) == {"seed": 1}


def test_checkpoint_directory_and_inside_it_are_refused(tmp_path, capsys):
    step = tmp_path / "run/checkpoints/step_00000004"
    (step / "engine").mkdir(parents=True)
    (step / "COMPLETE").write_text("4\n")
    for out in (step, step / "engine"):
        code, err = export(capsys, step, "--out", out, "--overwrite")
        assert code == 2 and f"is inside the checkpoint {step}" in err, err
    assert sorted(p.name for p in step.rglob("*")) == ["COMPLETE", "engine"]


def test_non_empty_directory_needs_overwrite_and_a_file_is_refused(tmp_path, capsys):
    out = tmp_path / "exports"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    code, err = export(capsys, tmp_path / "nowhere", "--out", out)
    assert code == 2 and "is not empty; pass --overwrite" in err, err
    (tmp_path / "file").write_text("x")
    code, err = export(capsys, tmp_path / "nowhere", "--out", tmp_path / "file", "--overwrite")
    assert code == 2 and "is a file" in err, err
    assert (out / "notes.txt").read_text() == "keep me" and (tmp_path / "file").read_text() == "x"


@pytest.mark.parametrize("overwrite", [False, True])
def test_destination_is_checked_before_the_checkpoint(tmp_path, capsys, overwrite):
    """With a fine destination, the (missing) checkpoint is what fails; --overwrite into an empty one is fine."""
    flags = ["--overwrite"] if overwrite else []
    code, err = export(capsys, tmp_path / "nowhere", "--out", tmp_path / "new", *flags)
    assert code == 2 and "nowhere" in err, err


def test_overwrite_keeps_the_old_export_when_the_new_one_fails(tmp_path, capsys):
    out = tmp_path / "exports"
    out.mkdir()
    for name in ("model.safetensors", "config.json", "tokenizer.model"):
        (out / name).write_text(f"old {name}")
    code, err = export(capsys, tmp_path / "run/checkpoints/step_00000099", "--out", out, "--overwrite")
    assert code == 2 and "step_00000099" in err, err
    assert sorted(p.read_text() for p in out.iterdir()) == [
        "old config.json", "old model.safetensors", "old tokenizer.model"]


def test_remote_out_is_refused(tmp_path, capsys):
    code, err = export(capsys, tmp_path / "nowhere", "--out", "s3://bucket/export")
    assert code == 2 and "export writes a local directory" in err, err
    assert not (tmp_path / "s3:").exists()
