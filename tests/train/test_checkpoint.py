"""Checkpoint files: offline export of every engine's checkpoint equals the live consolidation; a damaged
newest checkpoint falls back to the previous one; hostile and foreign files are refused before loading."""

import json
import os
import shutil
import stat
import subprocess
import sys

import pytest
import torch

from tape_pretrain.errors import CheckpointError
from tape_pretrain.train.checkpoint import verify_checkpoint
from tape_pretrain.train.export import load_export_model
from tests.helpers import base_env, metrics, run, train_command, write_config

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


@pytest.mark.parametrize("engine, stage", [("fsdp2", 0), ("deepspeed", 2), ("deepspeed", 3)])
def test_offline_export_equals_the_live_export(tmp_path, dataset_path, engine, stage):
    cfg = write_config(tmp_path / "c.yaml", dataset_path, tmp_path / "run", **{
        "parallel.engine": engine, "parallel.zero_stage": stage, "trainer.max_steps": 3})
    run(train_command(2, cfg))
    run([sys.executable, "-m", "tape_pretrain.cli", "export", str(tmp_path / "run"), "--out", str(tmp_path / "x")])
    live = load_export_model(str(tmp_path / "run" / "export"))
    offline = load_export_model(str(tmp_path / "x"))
    for (name, a), b in zip(live.state_dict().items(), offline.state_dict().values()):
        assert torch.equal(a, b), name  # the TAPE export reloads bit-identically
    trained = live.layers[0].positional.pe.up_proj.weight
    assert trained.abs().sum() > 0  # really trained weights, not the zero init
    ids = torch.randint(0, 512, (1, 20))
    assert torch.equal(live(ids), offline(ids))
    if engine == "fsdp2":  # a second export into the same --out: refused, then replaced with --overwrite
        again = [sys.executable, "-m", "tape_pretrain.cli", "export", str(tmp_path / "run"), "--out",
                 str(tmp_path / "x")]
        refused = run(again, check=False)
        assert refused.returncode == 2 and "is not empty; pass --overwrite" in refused.stderr
        run([*again, "--overwrite"])
        assert torch.equal(load_export_model(str(tmp_path / "x"))(ids), live(ids))
    assert (tmp_path / "x" / "tokenizer.model").read_bytes() == (tmp_path / "run/export/tokenizer.model").read_bytes()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, dataset_path):
    root = tmp_path_factory.mktemp("ckref")
    cfg = write_config(root / "c.yaml", dataset_path, root / "run", **{"trainer.max_steps": 8,
                                                                       "checkpoint.interval": 2})
    run(train_command(0, cfg))
    return metrics(root / "run")


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "files_json"])
def test_damaged_newest_checkpoint_falls_back(tmp_path, dataset_path, reference, damage):
    cfg = write_config(tmp_path / "c.yaml", dataset_path, tmp_path / "run", **{"trainer.max_steps": 8,
                                                                               "checkpoint.interval": 2})
    run(train_command(0, cfg, "trainer.stop_at_step=6"))
    newest = tmp_path / "run" / "checkpoints" / "step_00000006"
    victim = max((p for p in (newest / "engine").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    if damage == "truncate":
        victim.write_bytes(victim.read_bytes()[:-1])
    elif damage == "flip":
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0x40
        victim.write_bytes(bytes(data))
    elif damage == "delete":
        victim.unlink()
    else:
        (newest / "files.json").write_text("")
    exported = run([sys.executable, "-m", "tape_pretrain.cli", "export", str(tmp_path / "run"), "--out",
                    str(tmp_path / "x")])
    assert "WARNING skipping checkpoint step_00000006" in exported.stdout and "(step 4," in exported.stdout
    out = run(train_command(0, cfg))
    assert "WARNING skipping checkpoint step_00000006" in out.stdout
    assert "resumed from" in out.stdout and "step_00000004" in out.stdout
    resumed = metrics(tmp_path / "run")
    assert [resumed[s]["loss_hex"] for s in range(5, 9)] == [reference[s]["loss_hex"] for s in range(5, 9)]


def test_what_is_not_a_checkpoint_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        verify_checkpoint(tmp_path / "missing")
    with pytest.raises(CheckpointError, match=r"not a checkpoint \(give RUN_DIR or"):
        verify_checkpoint(tmp_path)
    (tmp_path / "engine").mkdir()
    with pytest.raises(CheckpointError, match="no COMPLETE marker"):
        verify_checkpoint(tmp_path)


def test_pickle_payload_never_runs(tmp_path, dataset_path):
    """A checkpoint whose engine file was replaced by a pickle payload is refused by its checksum."""
    cfg = write_config(tmp_path / "c.yaml", dataset_path, tmp_path / "run", **{"trainer.max_steps": 2,
                                                                               "checkpoint.interval": 1})
    run(train_command(0, cfg))
    canary = tmp_path / "canary"

    class Payload:
        def __reduce__(self):
            return (open, (str(canary), "w"))

    for step in (1, 2):
        target = next((tmp_path / "run/checkpoints" / f"step_{step:08d}" / "engine").rglob("*model_states.pt"))
        torch.save({"module": Payload()}, target)
    out = run(train_command(0, cfg, "trainer.max_steps=3"), check=False)
    assert "WARNING skipping checkpoint step_00000002" in out.stdout
    assert "WARNING skipping checkpoint step_00000001" in out.stdout
    assert "model_states.pt: size" in out.stdout  # refused on its recorded size, before unpickling
    assert "resumed from" not in out.stdout
    assert not canary.exists()


def test_umask_002_checkpoints_resume(tmp_path, dataset_path):
    """R20: under umask 002 the engines create group-writable files; the save removes the write bits
    (they would make the next resume refuse every checkpoint)."""
    cfg = write_config(tmp_path / "c.yaml", dataset_path, tmp_path / "run", **{"trainer.max_steps": 2,
                                                                              "checkpoint.interval": 1})
    previous = os.umask(0o002)
    try:
        run(train_command(0, cfg, "trainer.stop_at_step=1"))
    finally:
        os.umask(previous)
    for path in (tmp_path / "run/checkpoints").rglob("*"):
        assert not path.stat().st_mode & (stat.S_IWGRP | stat.S_IWOTH), path
    out = run(train_command(0, cfg))
    assert "resumed from" in out.stdout


@pytest.mark.parametrize("damage", ["group_writable_file", "foreign_owner"])
def test_untrusted_checkpoint_stops_the_run(tmp_path, dataset_path, damage):
    """R17 (defence in depth) and R20: an untrusted newest checkpoint is not skipped for an older one (nor, if it is
    the only one, replaced by a fresh start from step 0 whose retention would delete the rest): the run stops, and
    nothing is touched."""
    cfg = write_config(tmp_path / "c.yaml", dataset_path, tmp_path / "run", **{"trainer.max_steps": 4,
                                                                              "checkpoint.interval": 1})
    run(train_command(0, cfg, "trainer.stop_at_step=2"))
    target = next((tmp_path / "run/checkpoints/step_00000002/engine").rglob("*.pt"))
    if damage == "group_writable_file":
        target.chmod(0o664)
    else:
        os.chown(target, 4242, -1)  # the tests run as root in CI; elsewhere this needs root too
    before = sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir())
    metrics_before = (tmp_path / "run/metrics.jsonl").read_text()
    out = run(train_command(0, cfg), check=False)
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and target.name in last, last
    assert ("writable by other users" if damage == "group_writable_file" else "owned by another user") in last
    assert sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir()) == before
    assert (tmp_path / "run/metrics.jsonl").read_text() == metrics_before


def test_unrecorded_file_is_refused(tmp_path, dataset_path):
    cfg = write_config(tmp_path / "c.yaml", dataset_path, tmp_path / "run", **{"trainer.max_steps": 1})
    run(train_command(0, cfg))
    directory = tmp_path / "run/checkpoints/step_00000001"
    shutil.copy(directory / "trainer_state.json", directory / "engine" / "extra.pt")
    with pytest.raises(CheckpointError, match="unrecorded file"):
        verify_checkpoint(directory)
    table = json.loads((directory / "files.json").read_text())
    assert all(not name.startswith("/") for name in table)


def test_resume_false_refuses_to_overwrite(tmp_path, dataset_path):
    cfg = write_config(tmp_path / "c.yaml", dataset_path, tmp_path / "run", **{"trainer.max_steps": 1})
    run(train_command(0, cfg))
    out = subprocess.run(train_command(0, cfg, "checkpoint.resume=false"), env=base_env(), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "already has checkpoints and checkpoint.resume=false" in out.stderr


@pytest.mark.parametrize("nproc", [0, 2])
def test_remote_run_dir_resumes_like_a_local_one(tmp_path, dataset_path, reference, s3_env, nproc):
    """run_dir on an S3-compatible server: the staging copy is deleted, so the resume must come from S3."""
    import s3fs

    url = f"s3://{s3_env}/runs/r1"
    cfg = write_config(tmp_path / "c.yaml", dataset_path, url, **{
        "trainer.max_steps": 8, "checkpoint.interval": 2,
        "checkpoint.staging_dir": str(tmp_path / "staging")})
    run(train_command(nproc, cfg, "trainer.stop_at_step=4"))
    shutil.rmtree(tmp_path / "staging")
    fs = s3fs.S3FileSystem()
    leftover = f"{s3_env}/runs/r1/checkpoints/step_00000006/engine/leftover.bin"
    fs.pipe(leftover, b"an upload of step 6 interrupted before COMPLETE")
    out = run(train_command(nproc, cfg))
    assert "skipping checkpoint step_00000006: no COMPLETE marker in the store" in out.stdout  # not downloaded
    assert "resumed from" in out.stdout and "step_00000004" in out.stdout
    fs.invalidate_cache()
    assert not fs.exists(leftover)  # the new step 6 replaced the partial one instead of mixing with it
    remote = {p.rsplit("/", 1)[-1] for p in fs.ls(f"{s3_env}/runs/r1/checkpoints")}
    assert {"step_00000006", "step_00000008"} <= remote
    assert fs.exists(f"{s3_env}/runs/r1/checkpoints/step_00000008/COMPLETE")
    assert fs.exists(f"{s3_env}/runs/r1/export/model.safetensors")
    exported = run([sys.executable, "-m", "tape_pretrain.cli", "export", url, "--out", str(tmp_path / "x")])
    assert "(step 8," in exported.stdout and (tmp_path / "x" / "model.safetensors").is_file()
    lines = [json.loads(x) for x in fs.cat_file(f"{s3_env}/runs/r1/metrics.jsonl").decode().splitlines()]
    resumed = {r["step"]: r for r in lines if "loss" in r}
    assert [resumed[s]["windows_hash"] for s in range(1, 9)] == [reference[s]["windows_hash"] for s in range(1, 9)]
    if nproc == 0:
        assert [resumed[s]["loss_hex"] for s in range(1, 9)] == [reference[s]["loss_hex"] for s in range(1, 9)]
    else:  # two ranks reduce gradients in another order than one: equal up to rounding
        for step in range(1, 9):
            assert resumed[step]["loss"] == pytest.approx(reference[step]["loss"], rel=1e-5)


def test_skipped_corrupt_shard_is_logged_checkpointed_and_resumed_identically(tmp_path, dataset_path):
    """RELIABILITY R8 with data.on_corrupt_shard=skip: the skip is logged and recorded in the checkpoint, a
    resume reproduces the uninterrupted run, and a resume that would see different data is refused."""
    data = tmp_path / "ds"
    shutil.copytree(dataset_path, data)
    victim_rel = json.loads((data / "manifest.json").read_text())["splits"]["train"][1]["path"]
    victim = data / victim_rel
    original = victim.read_bytes()
    flipped = bytearray(original)
    flipped[100] ^= 0x01
    victim.write_bytes(bytes(flipped))
    overrides = {"data.on_corrupt_shard": "skip", "trainer.max_steps": 6, "checkpoint.interval": 3}

    reference_cfg = write_config(tmp_path / "ref.yaml", str(data), tmp_path / "ref", **overrides)
    out = run(train_command(0, reference_cfg))
    assert f"warning: skipping shard {data / victim_rel}: sha256" in out.stdout
    reference = metrics(tmp_path / "ref")

    cfg = write_config(tmp_path / "c.yaml", str(data), tmp_path / "run", **overrides)
    run(train_command(0, cfg, "trainer.stop_at_step=3"))
    state = json.loads((tmp_path / "run/checkpoints/step_00000003/trainer_state.json").read_text())
    assert state["skipped_shards"] == [victim_rel]
    run(train_command(0, cfg))
    resumed = metrics(tmp_path / "run")
    for key in ("windows_hash", "loss_hex"):
        assert [resumed[s][key] for s in range(1, 7)] == [reference[s][key] for s in range(1, 7)]

    victim.write_bytes(original)  # repaired: the same checkpoint would now see one more shard
    refused = run(train_command(0, cfg, "trainer.max_steps=8"), check=False)
    assert refused.returncode != 0 and "the checkpoint skipped shards" in refused.stderr
    assert max(metrics(tmp_path / "run")) == 6  # nothing written by the refused attempt


@pytest.fixture(scope="module")
def curriculum_reference(tmp_path_factory, dataset_path):
    root = tmp_path_factory.mktemp("curriculum")
    cfg = write_config(root / "c.yaml", dataset_path, root / "run", **CURRICULUM_RUN)
    run(train_command(0, cfg))
    return metrics(root / "run")


CURRICULUM_RUN = {"trainer.max_steps": 7, "checkpoint.interval": 0,
                  "curriculum": {"phases": [{"seq_len": 16, "until_tokens": 4 * 2048}, {"seq_len": 64}]}}


@pytest.mark.parametrize("stop", [4, 5])
def test_resume_at_a_curriculum_switch_is_bitwise(tmp_path, dataset_path, curriculum_reference, stop):
    """RELIABILITY R15: saved on the last step of a phase (4) and on the first of the next (5)."""
    assert [curriculum_reference[s]["seq_len"] for s in range(1, 8)] == [16] * 4 + [64] * 3
    cfg = write_config(tmp_path / "c.yaml", dataset_path, tmp_path / "run", **CURRICULUM_RUN)
    run(train_command(0, cfg, f"trainer.stop_at_step={stop}"))
    run(train_command(0, cfg))
    resumed = metrics(tmp_path / "run")
    for key in ("seq_len", "tokens", "windows_hash", "loss_hex", "lr"):
        assert [resumed[s][key] for s in range(stop + 1, 8)] == [curriculum_reference[s][key]
                                                                  for s in range(stop + 1, 8)], key


def test_start_over_moves_the_previous_run_aside(tmp_path, dataset_path):
    """R20. checkpoint.resume=false checkpoint.overwrite=true: the old run's checkpoints can neither be resumed nor take
    the new run's place in retention, and nothing of it is deleted."""
    cfg = write_config(tmp_path / "c.yaml", dataset_path, tmp_path / "run", **{"trainer.max_steps": 4,
                                                                              "checkpoint.interval": 2})
    run(train_command(0, cfg))
    old_metrics = (tmp_path / "run/metrics.jsonl").read_text()
    out = run(train_command(0, cfg, "checkpoint.resume=false", "checkpoint.overwrite=true", "trainer.max_steps=3",
                            "seed=11"))
    aside = next((tmp_path / "run").glob("replaced_*"))
    assert "moved the previous run's checkpoints, metrics.jsonl, config.json, export" in out.stdout
    assert sorted(p.name for p in (aside / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
    assert (aside / "metrics.jsonl").read_text() == old_metrics
    assert sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir()) == ["step_00000002", "step_00000003"]
    resumed = run(train_command(0, cfg, "trainer.max_steps=4", "seed=11"))
    assert "resumed from" in resumed.stdout and "step_00000003" in resumed.stdout  # the new run, not old step 4


@pytest.mark.parametrize("engine", ["deepspeed", "fsdp2"])
def test_a_failed_save_is_one_error_and_keeps_the_previous_checkpoint(tmp_path, dataset_path, engine):
    """R20 (disk full). A file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored: writes fail with EFBIG, as on a full
    disk) hits the step-4 save of a resumed run: one error naming the checkpoint, no partial step_4, step_2 intact
    and still resumable."""
    import resource
    import signal

    cfg = write_config(tmp_path / "c.yaml", dataset_path, tmp_path / "run", **{
        "parallel.engine": engine, "trainer.max_steps": 4, "checkpoint.interval": 2})
    run(train_command(0, cfg, "trainer.stop_at_step=2"))

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))

    out = subprocess.run(train_command(0, cfg), env=base_env(), capture_output=True, text=True, timeout=300,
                         preexec_fn=small_files)
    assert out.returncode == 2, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "step_00000004: saving the checkpoint failed" in last, last
    assert "[2] are intact" in last, last
    assert sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir()) == ["step_00000002"]
    verify_checkpoint(tmp_path / "run/checkpoints/step_00000002")
    assert "resumed from" in run(train_command(0, cfg)).stdout
