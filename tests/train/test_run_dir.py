"""A long-lived process sees checkpoints that another process committed to the object store, even though
fsspec caches directory listings (RELIABILITY.md R12)."""

import subprocess
import sys

import torch

from tape_pretrain.distributed.env import DistEnv
from tape_pretrain.train.checkpoint import CheckpointManager
from tape_pretrain.train.run_dir import RunDirectory

COMMIT = """
import sys
from tape_pretrain.train.run_dir import RunDirectory
url, staging, name = sys.argv[1:]
run = RunDirectory(url, staging_root=staging)
(run.local / "checkpoints" / name).mkdir(parents=True)
(run.local / "checkpoints" / name / "COMPLETE").write_text("done\\n")
run.upload([f"checkpoints/{name}/COMPLETE"])
"""


def commit_in_another_process(url, staging, name, env):
    subprocess.run([sys.executable, "-c", COMMIT, url, str(staging), name], env=env, check=True, timeout=60)


def test_reader_sees_a_checkpoint_committed_by_another_process(tmp_path, s3_env, cli_env):
    url = f"s3://{s3_env}/run"
    commit_in_another_process(url, tmp_path / "writer1", "step_00000010", cli_env)
    reader = RunDirectory(url, staging_root=str(tmp_path / "reader"))
    manager = CheckpointManager(reader, DistEnv(0, 1, 0, 1, torch.device("cpu"), "gloo"))
    assert manager.steps() == [10]

    commit_in_another_process(url, tmp_path / "writer2", "step_00000030", cli_env)
    cached = reader.fs.ls(reader.remote_path("checkpoints"), detail=False)
    assert not any(p.endswith("step_00000030") for p in cached), "premise: the reader's cached listing is stale"
    assert manager.steps() == [10, 30]


def test_retention_of_a_remote_run_counts_checkpoints_not_staged_here(tmp_path, s3_env, cli_env):
    """A resume on a fresh machine stages only the checkpoint it loads; keep_last still counts the remote ones."""
    url = f"s3://{s3_env}/run"
    for step in (2, 4, 6, 8):
        commit_in_another_process(url, tmp_path / f"writer{step}", f"step_{step:08d}", cli_env)
    fresh = RunDirectory(url, staging_root=str(tmp_path / "fresh"))
    manager = CheckpointManager(fresh, DistEnv(0, 1, 0, 1, torch.device("cpu"), "gloo"), keep_last=3)
    manager.apply_retention(protect=8)
    assert manager.steps() == [4, 6, 8]
