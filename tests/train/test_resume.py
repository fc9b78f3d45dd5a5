"""Exact resume: SIGTERM (preemption) and kill -9, 2 processes, across a curriculum phase change;
losses after the resume are bitwise equal to an uninterrupted run."""

import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests.helpers import alive, descendants, kill_tree, metrics, run, start_training, train_command, write_config

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

ENGINES = {"zero2": ("deepspeed", 2), "zero3": ("deepspeed", 3), "fsdp2": ("fsdp2", 0), "fsdp2_async": ("fsdp2", 0)}
CURRICULUM = {"phases": [{"seq_len": 32, "until_tokens": 4 * 2048}, {"seq_len": 64}]}


def config_for(tmp_path, dataset, name, engine, interval):
    engine_name, stage = ENGINES[engine]
    return write_config(tmp_path / f"{name}.yaml", dataset, tmp_path / name, **{
        "parallel.engine": engine_name, "parallel.zero_stage": stage, "trainer.max_steps": 10,
        "curriculum": CURRICULUM, "checkpoint.interval": interval,
        "checkpoint.async_save": engine.endswith("_async")})


def wait_for_step(run_dir, step, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        path = run_dir / "metrics.jsonl"
        if path.exists() and any(f'"step": {step},' in line for line in path.read_text().splitlines()):
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.stdout.read()[-3000:]}")
        time.sleep(0.1)
    raise AssertionError(f"step {step} not reached")


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (torchrun's workers), from /proc."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if parent == pid:
            kids.append(int(stat.parent.name))
    assert kids, f"no worker processes under {pid}"
    return kids


def assert_bitwise_after(resumed, reference, first_step):
    steps = [s for s in reference if s > first_step]
    assert steps, "nothing left to compare"
    assert [resumed[s]["loss_hex"] for s in steps] == [reference[s]["loss_hex"] for s in steps]
    assert [resumed[s]["seq_len"] for s in steps] == [reference[s]["seq_len"] for s in steps]
    assert [resumed[s]["windows_hash"] for s in steps] == [reference[s]["windows_hash"] for s in steps]


@pytest.mark.parametrize("engine", ["zero2", "zero3", "fsdp2"])
def test_sigterm_then_same_command_resumes_bitwise(tmp_path, dataset_path, engine):
    reference_cfg = config_for(tmp_path, dataset_path, "reference", engine, interval=0)
    run(train_command(2, reference_cfg))
    reference = metrics(tmp_path / "reference")
    assert {r["seq_len"] for r in reference.values()} == {32, 64}

    cfg = config_for(tmp_path, dataset_path, "run", engine, interval=0)
    cmd = train_command(2, cfg)
    proc = start_training(cmd, step_sleep=0.5)
    wait_for_step(tmp_path / "run", 3, proc)
    if engine == "fsdp2":  # preemption as SLURM does it: TERM to every process, and torchrun relays one more
        for pid in child_pids(proc.pid):
            os.kill(pid, signal.SIGTERM)
        time.sleep(0.5)  # apart, so the workers see two signals rather than one pending
        proc.send_signal(signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGTERM)  # torchrun forwards it; its own exit code is not the signal of success
    proc.wait(timeout=60)
    saved = sorted((tmp_path / "run" / "checkpoints").glob("step_*/COMPLETE"))
    assert len(saved) == 1, "preemption must leave exactly one complete checkpoint"
    stopped_at = int(saved[0].parent.name.split("_")[1])
    assert 3 <= stopped_at < 10
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(r["step"] == stopped_at for r in records)
    assert not [r for r in records if "val_loss" in r], "a stop signal saves at once, without evaluating first"
    out = run(cmd)  # the same command resumes
    assert f"resumed from {tmp_path / 'run' / 'checkpoints' / f'step_{stopped_at:08d}'}" in out.stdout
    assert_bitwise_after(metrics(tmp_path / "run"), reference, stopped_at)
    assert max(metrics(tmp_path / "run")) == 10


@pytest.mark.parametrize("engine", ["zero2", "zero3", "fsdp2", "fsdp2_async"])
def test_kill_9_of_every_process_then_resume_bitwise(tmp_path, dataset_path, engine):
    reference_cfg = config_for(tmp_path, dataset_path, "reference", engine, interval=3)
    run(train_command(2, reference_cfg))
    reference = metrics(tmp_path / "reference")

    cfg = config_for(tmp_path, dataset_path, "run", engine, interval=3)
    cmd = train_command(2, cfg)
    proc = start_training(cmd, step_sleep=0.3)
    wait_for_step(tmp_path / "run", 5, proc)
    workers = descendants(proc.pid)
    assert len(workers) >= 2
    kill_tree(proc.pid)  # the agent and both workers, no chance to save
    proc.wait(timeout=30)
    time.sleep(1)
    assert not [p for p in workers if alive(p)], "a worker survived the kill"
    out = run(cmd)
    assert "resumed from" in out.stdout and "step_00000003" in out.stdout  # the last committed checkpoint
    resumed = metrics(tmp_path / "run")
    assert_bitwise_after(resumed, reference, 3)
    assert max(resumed) == 10
