"""One run per run directory (RELIABILITY.md R19): a flock locally, a lease with a heartbeat on object stores."""

import json
import os
import subprocess
import time

import pytest

from tape_pretrain.train.run_dir import RunDirectory
from tape_pretrain.train.run_lock import LEASE_OBJECT, LOCK_FILE, RunDirectoryBusy, RunLease, RunLock
from tests.helpers import base_env, kill_tree, metrics, run, start_training, train_command, write_config


def test_second_holder_is_refused_naming_the_first(tmp_path):
    first, second = RunLock(tmp_path), RunLock(tmp_path)
    assert first.acquire() is None
    with pytest.raises(RunDirectoryBusy, match=rf"in use by another run \(host .*, pid {os.getpid()}, started "):
        second.acquire()
    first.release()
    assert second.acquire() is None  # a clean release leaves no holder text behind
    second.release()


def test_a_symlink_at_the_lock_path_is_refused_and_its_target_kept(tmp_path):
    from tape_pretrain.errors import CheckpointError

    (tmp_path / "victim.txt").write_text("important")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / LOCK_FILE).symlink_to(tmp_path / "victim.txt")
    with pytest.raises(CheckpointError, match="a symlink there is refused"):
        RunLock(tmp_path / "run").acquire()
    assert (tmp_path / "victim.txt").read_text() == "important"


def test_text_left_by_a_dead_holder_is_reported_as_taken_over(tmp_path):
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": "node7", "pid": 99999, "started": "2026-01-01T00:00:00"}))
    lock = RunLock(tmp_path)
    assert lock.acquire() == "host node7, pid 99999, started 2026-01-01T00:00:00"
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()


def test_remote_lease_refuses_renews_takes_over_and_releases(s3_env, tmp_path):
    run_dir = RunDirectory(f"s3://{s3_env}/run", staging_root=str(tmp_path))
    first = RunLease(run_dir, ttl_s=0.8, settle_s=0.05)
    assert first.acquire() is None
    expires = json.loads(run_dir.read_remote(LEASE_OBJECT))["expires"]
    with pytest.raises(RunDirectoryBusy, match=rf"in use by another run \(host .*, pid {os.getpid()}, .*expires in"):
        RunLease(run_dir, ttl_s=0.8, settle_s=0.05).acquire()
    time.sleep(0.6)  # about three heartbeats
    assert json.loads(run_dir.read_remote(LEASE_OBJECT))["expires"] > expires
    first.release()
    with pytest.raises(FileNotFoundError):
        run_dir.read_remote(LEASE_OBJECT)
    # A holder that died: its lease is past its expiry, and the next run takes it over, naming it.
    run_dir.write_remote(LEASE_OBJECT, json.dumps({"token": "dead", "expires": time.time() - 1, "host": "node9",
                                                   "pid": 4242, "started": "2026-01-01T00:00:00"}).encode())
    second = RunLease(run_dir, ttl_s=30, settle_s=0.05)
    assert second.acquire() == "host node9, pid 4242, started 2026-01-01T00:00:00"
    second.release()
    # A malformed lease, or one claiming to last for ever, cannot lock a run directory out: taken over.
    for hostile in ({"token": "x", "expires": "soon"}, {"token": "x", "expires": 1e300}, "not json"):
        run_dir.write_remote(LEASE_OBJECT, (hostile if isinstance(hostile, str) else json.dumps(hostile)).encode())
        third = RunLease(run_dir, ttl_s=30, settle_s=0.05)
        assert third.acquire() == "holder unknown"
        third.release()


@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "s3"])
def test_second_train_in_the_same_run_dir_is_refused_while_the_first_finishes(tmp_path, dataset_path, request,
                                                                               where):
    local = where == "local"
    run_dir = tmp_path / "run" if local else f"s3://{request.getfixturevalue('s3_env')}/run"
    staging = {"checkpoint.staging_dir": str(tmp_path / "staging")}
    first_cfg = write_config(tmp_path / "a.yaml", dataset_path, run_dir, **staging, **{
        "trainer.max_steps": 4, "checkpoint.interval": 2})
    second_cfg = write_config(tmp_path / "b.yaml", dataset_path, run_dir, **{
        "checkpoint.staging_dir": str(tmp_path / "staging2"), "trainer.max_steps": 4, "seed": 99,
        "optim.lr": 1e-3, "data.cache_dir": str(tmp_path / "cache2")})
    first = start_training(train_command(0, first_cfg), step_sleep=1.0)
    try:
        deadline = time.time() + 120  # until the first run is training (its metrics file exists, staged if remote)
        while time.time() < deadline and not list((tmp_path / ("run" if local else "staging")).rglob("metrics.jsonl")):
            time.sleep(0.2)
        assert first.poll() is None, first.stdout.read()
        started = time.time()
        out = subprocess.run(train_command(0, second_cfg), env=base_env(), capture_output=True, text=True,
                             timeout=120)
        assert time.time() - started < 60
        assert out.returncode == 2
        last = out.stderr.strip().splitlines()[-1]
        assert last.startswith("error:") and "in use by another run" in last and f"pid {first.pid}" in last, last
        assert "Traceback" not in out.stderr
        assert first.wait(timeout=180) == 0
    finally:
        kill_tree(first.pid)
    if local:
        assert json.loads((run_dir / "config.json").read_text())["seed"] == 7  # the first run's own config
        assert sorted(metrics(run_dir)) == [1, 2, 3, 4]
        assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
    else:
        with pytest.raises(FileNotFoundError):  # released at exit
            RunDirectory(run_dir, staging_root=str(tmp_path / "x")).read_remote(LEASE_OBJECT)
    assert "resumed from" in run(train_command(0, first_cfg, "trainer.max_steps=5")).stdout  # released at exit
