"""Hostile inputs: manifest paths that escape, pickles in checkpoints, corrupt shards at training time,
and secrets that must never be written anywhere."""

import hashlib
import io
import json
import os
import pickle
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from tape_pretrain.data.cache import cache_split
from tape_pretrain.data.manifest import load_manifest
from tape_pretrain.errors import DataError
from tests.helpers import base_env, run, train_command, write_config


@pytest.mark.parametrize("bad", ["../x.bin", "/etc/passwd", "s3://other/x.bin", "train/../../x.bin"])
def test_manifest_paths_must_stay_inside(dataset_path, tmp_path, bad):
    copy = tmp_path / "ds"
    shutil.copytree(dataset_path, copy)
    raw = json.loads((copy / "manifest.json").read_text())
    raw["splits"]["train"][0]["path"] = bad
    (copy / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(DataError, match=f"shard path {bad!r} must be relative and stay inside"):
        load_manifest(str(copy))


def test_escaping_symlink_is_refused(dataset_path, tmp_path):
    copy = tmp_path / "ds"
    shutil.copytree(dataset_path, copy)
    manifest, fp = load_manifest(str(copy))
    shard = copy / manifest.splits["train"][0].path
    outside = tmp_path / "outside.bin"
    shutil.move(shard, outside)
    shard.symlink_to(outside)
    with pytest.raises(DataError, match="resolves outside the dataset"):
        cache_split(str(copy), manifest, fp, "train", str(tmp_path / "cache"))


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncate", "flip", "empty", "out_of_vocab"])
def test_corrupt_shard_stops_training_before_step_0(dataset_path, tmp_path, damage):
    copy = tmp_path / "ds"
    shutil.copytree(dataset_path, copy)
    manifest, _ = load_manifest(str(copy))
    rel = manifest.splits["train"][1].path
    shard = copy / rel
    data = bytearray(shard.read_bytes())
    if damage == "truncate":
        data = data[:-2]
    elif damage == "flip":
        data[1000] ^= 0x10
    elif damage == "empty":
        data = bytearray()
    else:  # out of vocab, with the manifest's checksum updated so only the id check can catch it
        import hashlib

        data[0:2] = (60000).to_bytes(2, "little")
        raw = json.loads((copy / "manifest.json").read_text())
        raw["splits"]["train"][1]["sha256"] = hashlib.sha256(bytes(data)).hexdigest()
        (copy / "manifest.json").write_text(json.dumps(raw))
    shard.write_bytes(bytes(data))
    cfg = write_config(tmp_path / "c.yaml", str(copy), tmp_path / "run", **{"data.cache_dir": str(tmp_path / "c")})
    out = subprocess.run(train_command(0, cfg), env=base_env(), capture_output=True, text=True, timeout=180)
    assert out.returncode == 2
    assert rel in out.stderr and out.stderr.strip().startswith("error:")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # stopped before step 0


class Payload:
    """Unpickling this creates the canary file: proof that foreign code ran."""

    def __init__(self, canary: Path):
        self.canary = str(canary)

    def __reduce__(self):
        return (open, (self.canary, "w"))


def plant_payload(path: Path, canary: Path) -> None:
    """Put a payload where the loader unpickles, keeping the container format."""
    if path.name == ".metadata":  # DCP metadata: a bare pickle
        path.write_bytes(pickle.dumps(Payload(canary)))
    elif path.suffix == ".distcp":  # raw tensor bytes plus torch.save'd non-tensor items at recorded offsets
        from torch.distributed.checkpoint.metadata import BytesStorageMetadata

        from tape_pretrain.utils.safe_load import load_dcp_metadata

        with open(path.parent / ".metadata", "rb") as f:
            metadata = load_dcp_metadata(f)
        item = next(info for index, info in metadata.storage_data.items()
                    if isinstance(metadata.state_dict_metadata[index.fqn], BytesStorageMetadata))
        blob = io.BytesIO()
        torch.save(Payload(canary), blob, _use_new_zipfile_serialization=False)  # the legacy format ignores padding
        assert len(blob.getvalue()) <= item.length
        data = bytearray(path.read_bytes())
        data[item.offset:item.offset + item.length] = blob.getvalue().ljust(item.length, b"\0")
        path.write_bytes(bytes(data))
    else:  # torch.save zip archives
        torch.save({"module": Payload(canary), "state": Payload(canary)}, path)


@pytest.fixture(scope="module")
def trained_checkpoints(tmp_path_factory, dataset_path):
    """One 2-step run per engine, each ending with a checkpoint at step 2."""
    root = tmp_path_factory.mktemp("payload")
    runs = {}
    for engine in ("deepspeed", "fsdp2"):
        cfg = write_config(root / f"{engine}.yaml", dataset_path, root / engine, **{
            "parallel.engine": engine, "trainer.max_steps": 2, "checkpoint.interval": 2})
        run(train_command(0, cfg))
        runs[engine] = root / engine
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "s3"])
@pytest.mark.parametrize("engine", ["deepspeed", "fsdp2"])
def test_no_payload_runs_from_any_checkpoint_file(trained_checkpoints, dataset_path, tmp_path, request, engine,
                                                  where):
    """R17: verifying files.json before loading is not enough once files.json is rewritten to match, as anyone who
    can write the run directory (or the bucket prefix, where no permission can be checked) can do: loading itself
    must never unpickle code. Every pickle-bearing file of a checkpoint, both engines, local and S3 run dirs."""
    source = trained_checkpoints[engine]
    step = "checkpoints/step_00000002"
    pickled = sorted(str(p.relative_to(source / step)) for p in (source / step).rglob("*")
                     if p.suffix in (".pt", ".distcp") or p.name == ".metadata")
    assert len(pickled) == 3, pickled  # model + optimizer state (or DCP metadata + data) and the RNG state
    for rel in pickled:
        copy = tmp_path / rel.replace("/", "_")
        shutil.copytree(source, copy)
        target, canary = copy / step / rel, tmp_path / f"canary_{rel.replace('/', '_')}"
        plant_payload(target, canary)
        table = json.loads((copy / step / "files.json").read_text())
        table[rel] = {"size": target.stat().st_size, "sha256": hashlib.sha256(target.read_bytes()).hexdigest()}
        (copy / step / "files.json").write_text(json.dumps(table))
        run_dir = copy
        if where == "s3":
            import s3fs

            bucket = request.getfixturevalue("s3_env")
            s3fs.S3FileSystem().put(str(copy), f"{bucket}/{copy.name}", recursive=True)
            run_dir = f"s3://{bucket}/{copy.name}"
        cfg = write_config(tmp_path / "c.yaml", dataset_path, run_dir, **{
            "parallel.engine": engine, "trainer.max_steps": 3, "checkpoint.interval": 2,
            "checkpoint.staging_dir": str(tmp_path / f"staging_{copy.name}")})
        out = subprocess.run(train_command(0, cfg), env=base_env(), capture_output=True, text=True, timeout=180)
        assert not canary.exists(), f"{rel}: the payload ran"
        assert out.returncode == 2, (rel, out.stderr[-2000:])
        lines = out.stderr.strip().splitlines()
        assert lines[-1].startswith("error:") and "Traceback" not in out.stderr, (rel, out.stderr[-2000:])
        assert "refusing" in lines[-1], lines[-1]
        assert "resumed from" not in out.stdout


@pytest.mark.slow
def test_secrets_never_reach_any_file(dataset_path, tmp_path):
    """Canary credentials in the environment and in a config field: a full run (train, checkpoint, resume,
    export, eval) with wandb offline leaves them in no file and no log."""
    secret, wandb_key = "CANARYsecretAWS9f3k2", "CANARYwandb" + "0" * 29
    env = dict(base_env(), AWS_SECRET_ACCESS_KEY=secret, AWS_ACCESS_KEY_ID="AKIACANARY", WANDB_API_KEY=wandb_key,
               WANDB_DIR=str(tmp_path / "wandb"), WANDB_MODE="offline")
    cfg = write_config(tmp_path / "c.yaml", dataset_path, tmp_path / "run", **{
        "trainer.max_steps": 4, "checkpoint.interval": 2, "logging.wandb.mode": "offline",
        "data.storage_options": {"secret": secret, "key": "AKIACANARY"}})
    logs = []
    logs.append(run(train_command(0, cfg, "trainer.stop_at_step=2"), env=env))
    logs.append(run(train_command(0, cfg), env=env))
    python = train_command(0, cfg)[0]
    logs.append(run([python, "-m", "tape_pretrain.cli", "export", str(tmp_path / "run"), "--out",
                     str(tmp_path / "export")], env=env))
    logs.append(run([python, "-m", "tape_pretrain.cli", "eval", str(tmp_path / "export"), "--data", dataset_path,
                     "--lengths", "32", "--max-tokens", "500", "--out", str(tmp_path / "eval")], env=env))
    for log in logs:
        assert secret not in log.stdout + log.stderr and wandb_key not in log.stdout + log.stderr
    files = [p for root in (tmp_path / "run", tmp_path / "wandb", tmp_path / "export", tmp_path / "eval")
             for p in Path(root).rglob("*") if p.is_file()]
    assert any("wandb" in str(p) for p in files), "wandb offline wrote nothing: the test would prove nothing"
    for path in files:
        data = path.read_bytes()
        assert secret.encode() not in data and wandb_key.encode() not in data, path
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["data"]["storage_options"] == {"secret": "***", "key": "***"}


@pytest.mark.parametrize("files, state, message", [
    ("[]", "{}", "not a table of files"),
    ('{"trainer_state.json": 5}', "{}", "not a table of files"),
    ("[" * 100_000, "{}", "files.json: unreadable"),
    (None, "[1]", "not a trainer state"),
    (None, "{bad", "trainer_state.json: unreadable"),
])
def test_hostile_checkpoint_json_is_one_error(tmp_path, capsys, files, state, message):
    """R17/R7: a checkpoint's JSON written by an attacker (or a disk) never reaches the code as a traceback."""
    from tape_pretrain.cli import main

    step = tmp_path / "run/checkpoints/step_00000002"
    step.mkdir(parents=True)
    (step / "trainer_state.json").write_text(state)
    if files is None:  # a consistent files.json, so that only the trainer state is wrong
        data = (step / "trainer_state.json").read_bytes()
        files = json.dumps({"trainer_state.json": {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}})
    (step / "files.json").write_text(files)
    (step / "COMPLETE").write_text("2\n")
    code = main(["export", str(step), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err


def test_weights_only_loading_coexists_with_the_users_opposite_override(tmp_path, monkeypatch):
    """TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD (set by users to read old checkpoints) would make torch refuse both."""
    from tape_pretrain.errors import CheckpointError
    from tape_pretrain.utils.safe_load import weights_only_loading

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    torch.save({"w": torch.ones(3)}, tmp_path / "ok.pt")
    torch.save(Payload(tmp_path / "canary"), tmp_path / "payload.pt")
    with weights_only_loading():
        assert torch.equal(torch.load(tmp_path / "ok.pt")["w"], torch.ones(3))
    with pytest.raises(CheckpointError, match="refusing"), weights_only_loading():
        torch.load(tmp_path / "payload.pt", weights_only=False)
    assert not (tmp_path / "canary").exists()
    assert os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] == "1"  # the user's setting is back afterwards
