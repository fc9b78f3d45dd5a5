"""Retention keeps the newest complete checkpoints, never the one being written, even when a deletion fails."""

import shutil

import torch

from tape_pretrain.distributed.env import DistEnv
from tape_pretrain.train.checkpoint import COMPLETE, CheckpointManager
from tape_pretrain.train.run_dir import RunDirectory


def make(root, step, complete=True):
    directory = root / "checkpoints" / f"step_{step:08d}"
    (directory / "engine").mkdir(parents=True)
    (directory / "engine" / "weights.bin").write_bytes(b"x" * 10)
    if complete:
        (directory / COMPLETE).write_text(f"{step}\n")
    return directory


def test_retention_with_a_failing_delete(tmp_path, monkeypatch, capsys, caplog):
    env = DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"),
                  backend="gloo")
    manager = CheckpointManager(RunDirectory(str(tmp_path)), env, keep_last=2, keep_every=4)
    for step in (1, 2, 3, 5, 6, 7):
        make(tmp_path, step)
    writing = make(tmp_path, 9, complete=False)  # a newer save still in progress
    real_rmtree = shutil.rmtree

    def failing_rmtree(path, *args, **kwargs):
        if str(path).endswith("step_00000003"):
            raise PermissionError("injected: cannot delete")
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", failing_rmtree)
    manager.apply_retention(protect=7)
    left = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert left == ["step_00000003", "step_00000006", "step_00000007", "step_00000009"]
    captured = capsys.readouterr()  # the project's console handler once a command set up logging, else pytest's
    assert "could not delete old checkpoint" in captured.out + captured.err + caplog.text
    assert not (tmp_path / "checkpoints/step_00000003" / COMPLETE).exists()  # no longer a resume candidate
    assert writing.exists() and (tmp_path / "checkpoints/step_00000007" / COMPLETE).exists()


def test_keep_every_keeps_milestones(tmp_path):
    env = DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"),
                  backend="gloo")
    manager = CheckpointManager(RunDirectory(str(tmp_path)), env, keep_last=2, keep_every=4)
    for step in range(1, 11):
        make(tmp_path, step)
    manager.apply_retention(protect=10)
    assert manager.steps() == [4, 8, 9, 10]
