"""Launchers: two torchrun "nodes" on loopback, the retry wrapper after a node is killed, the deepspeed
launcher, and the SLURM script's torchrun command line."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import (
    ROOT,
    _save_log,
    base_env,
    descendants,
    fault_env,
    free_port,
    kill_tree,
    metrics,
    run,
    train_command,
    write_config,
)

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def launch_env(**extra):
    return dict(base_env(), PYTHON=sys.executable, **extra)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, dataset_path):
    """Single node, 2 processes, checkpoint every 3 steps: the run every launcher must reproduce."""
    root = tmp_path_factory.mktemp("launch")
    cfg = write_config(root / "ref.yaml", dataset_path, root / "ref", **{"trainer.max_steps": 8,
                                                                         "checkpoint.interval": 3})
    run(train_command(2, cfg))
    return metrics(root / "ref")


def losses(records):
    return [records[s]["loss_hex"] for s in sorted(records)]


def test_two_loopback_nodes_equal_one_node(tmp_path, dataset_path, reference):
    cfg = write_config(tmp_path / "c.yaml", dataset_path, tmp_path / "run", **{"trainer.max_steps": 8,
                                                                               "checkpoint.interval": 3})
    out = run(["bash", str(ROOT / "launch/local_multinode.sh"), str(cfg)], env=launch_env())
    assert "world_size=2 ranks_per_node=1" in out.stdout
    assert losses(metrics(tmp_path / "run")) == losses(reference)


def test_retry_wrapper_recovers_from_a_killed_node(tmp_path, dataset_path, reference):
    cfg = write_config(tmp_path / "c.yaml", dataset_path, tmp_path / "run", **{"trainer.max_steps": 8,
                                                                               "checkpoint.interval": 3})
    env = fault_env(launch_env(RETRY_DELAY_S="1"), TAPE_PRETRAIN_TEST_STEP_SLEEP="0.4")
    cmd = ["bash", str(ROOT / "launch/retry.sh"), "2", "bash", str(ROOT / "launch/local_multinode.sh"), str(cfg)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    path = tmp_path / "run" / "metrics.jsonl"
    committed = tmp_path / "run" / "checkpoints" / "step_00000003" / "COMPLETE"
    # step 3's checkpoint is committed during step 4 (after step 4's metrics line): kill only once it is there
    while not (path.exists() and '"step": 4,' in path.read_text() and committed.exists()):
        assert time.time() < deadline and proc.poll() is None, "step 4 never reached"
        time.sleep(0.1)
    agents = [p for p in descendants(proc.pid)
              if "torch.distributed.run" in Path(f"/proc/{p}/cmdline").read_text().replace("\0", " ")]
    assert len(agents) == 2
    kill_tree(agents[1])  # node 1 dies: its agent and its worker
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, output[-3000:] + _save_log(output)
    assert "retry: attempt 1 failed" in output
    assert "resumed from" in output
    assert losses(metrics(tmp_path / "run")) == losses(reference)


def test_deepspeed_launcher_runs_two_processes(tmp_path, dataset_path, reference):
    cfg = write_config(tmp_path / "c.yaml", dataset_path, tmp_path / "run", **{"trainer.max_steps": 8,
                                                                               "checkpoint.interval": 3})
    out = run(["bash", str(ROOT / "launch/deepspeed.sh"), str(cfg)],
              env=launch_env(NPROC_PER_NODE="2", MASTER_PORT=str(free_port())))
    assert "world_size=2" in out.stdout
    assert losses(metrics(tmp_path / "run")) == losses(reference)


def test_slurm_script_builds_the_torchrun_command(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\n[ \"$1 $2\" = 'show hostnames' ] && printf 'gpu-a17\\ngpu-a18\\n'\n")
    (bin_dir / "srun").write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {tmp_path}/srun_args\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_NODELIST="gpu-a[17-18]",
               SLURM_JOB_NUM_NODES="2", SLURM_JOB_ID="4242", SLURM_GPUS_ON_NODE="8", PYTHON="python3")
    subprocess.run(["bash", str(ROOT / "launch/slurm.sbatch"), "configs/runs/x.yaml", "trainer.max_steps=5"],
                   env=env, check=True, timeout=30)
    args = (tmp_path / "srun_args").read_text().split("\n")
    assert args[:2] == ["--kill-on-bad-exit=1", "python3"]
    joined = " ".join(args)
    assert "--nnodes 2 --nproc-per-node 8" in joined
    assert "--rdzv-backend c10d --rdzv-endpoint gpu-a17:29500 --rdzv-id 4242" in joined
    assert joined.strip().endswith("-m tape_pretrain.cli train configs/runs/x.yaml trainer.max_steps=5")


def test_slurm_script_outside_an_allocation_says_so(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
    out = subprocess.run(["bash", str(ROOT / "launch/slurm.sbatch"), "x.yaml"], env=env, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode != 0 and "SLURM_JOB_NODELIST" in out.stderr


def test_incomplete_launcher_environment_is_named(tmp_path):
    env = {k: v for k, v in base_env().items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    out = subprocess.run([sys.executable, "-m", "tape_pretrain.cli", "doctor"], env=dict(env, RANK="0"),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "WORLD_SIZE, LOCAL_RANK, MASTER_ADDR" in out.stderr and out.stderr.count("\n") == 1


def test_stalled_rank_fails_the_job_and_the_retry_resumes_bitwise(tmp_path, dataset_path, reference):
    cfg = write_config(tmp_path / "c.yaml", dataset_path, tmp_path / "run", **{
        "trainer.max_steps": 8, "checkpoint.interval": 3, "parallel.timeout_s": 10})
    marker = tmp_path / "stalled"
    env = fault_env(launch_env(RETRY_DELAY_S="1"), TAPE_PRETRAIN_TEST_HANG="1:5",
                    TAPE_PRETRAIN_TEST_HANG_MARKER=str(marker))
    first = subprocess.Popen(train_command(2, cfg), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    while not marker.exists():
        assert first.poll() is None, first.stdout.read()[-3000:]
        time.sleep(0.1)
    stalled_at = time.time()
    first.communicate(timeout=120)
    assert first.returncode != 0
    assert time.time() - stalled_at <= 10 + 30, "the job must fail within the collective timeout + 30 s"
    out = run(["bash", str(ROOT / "launch/retry.sh"), "1", *train_command(2, cfg)], env=env)
    assert "resumed from" in out.stdout and "step_00000003" in out.stdout
    assert losses(metrics(tmp_path / "run")) == losses(reference)
