"""Launch helpers for multi-process tests: torchrun on loopback with c10d rendezvous, outer timeouts."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import yaml

from tape_pretrain.config import set_dotted
from tape_pretrain.train.metrics import training_records

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    from tape_pretrain.distributed.env import free_port as fp

    return fp()


def base_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1",
               PYTHONUNBUFFERED="1")
    return env


def write_config(path: Path, dataset: str, run_dir: Path, **overrides) -> Path:
    """A tiny, deterministic run config (fp32, one thread, log every step)."""
    config = {
        "run_dir": str(run_dir), "seed": 7,
        "model": {"preset": None, "hidden_size": 64, "num_layers": 2, "num_heads": 4, "ffn_hidden_size": 128,
                  "positional": {"name": "tape"}},
        "data": {"path": dataset, "cache_dir": str(path.parent / "cache"), "prefetch_batches": 2},
        "optim": {"lr": 3e-3},
        "schedule": {"name": "constant", "warmup_steps": 0},
        "trainer": {"max_steps": 6, "seq_len": 64, "global_batch_tokens": 2048, "micro_batch_size": 8,
                    "log_interval": 1, "num_threads": 1, "deterministic": True, "progress_bar": False,
                    "eval_batches": 1},
        "parallel": {"engine": "deepspeed", "zero_stage": 2, "timeout_s": 60},
        "checkpoint": {"interval": 0, "keep_last": 3},
    }
    for key, value in overrides.items():
        set_dotted(config, key, value)
    path.write_text(yaml.safe_dump(config))
    return path


def train_command(nproc: int, config: Path, *overrides: str, port: int | None = None) -> list[str]:
    if nproc == 0:  # plain python, one process
        return [sys.executable, "-m", "tape_pretrain.cli", "train", str(config), *overrides]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--nnodes", "1",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port or free_port()}",
            "-m", "tape_pretrain.cli", "train", str(config), *overrides]


def _save_log(text: str) -> str:
    """Keep the whole stderr of a failed command (its tail alone rarely shows every rank's cause)."""
    import tempfile

    with tempfile.NamedTemporaryFile("w", prefix="tape_pretrain_failed_", suffix=".log", delete=False) as f:
        f.write(text)
    return f"\n(full stderr: {f.name})"


def run(cmd: list[str], timeout: float = 300, check: bool = True, env=None) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, env=env or base_env(), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        # every rank's own error lines first: the root cause is often far above the launcher's tail
        errors = [line for line in result.stderr.splitlines() if re.search(r"(Error|Exception|error:)", line)]
        raise AssertionError(f"command failed ({result.returncode}): {' '.join(cmd)}\nerror lines:\n"
                             + "\n".join(dict.fromkeys(errors[:40])) +
                             f"\nstdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-6000:]}{_save_log(result.stderr)}")
    return result


def descendants(pid: int) -> list[int]:
    """Every process below pid (torchrun starts its workers in sessions of their own, so killpg misses them)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_tree(pid: int, sig: int = signal.SIGKILL) -> None:
    """Send sig to pid and all its descendants (found first, so none is reparented and missed)."""
    for p in [pid, *descendants(pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, sig)


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def fault_env(env: dict[str, str] | None = None, **switches: str) -> dict[str, str]:
    """``env`` (default base_env()) with the test-side fault injection of tests/fault_injection switched on by
    ``switches`` (TAPE_PRETRAIN_TEST_STEP_SLEEP=..., TAPE_PRETRAIN_TEST_HANG=...): every Python process started
    with it, through any launcher, patches the trainer at start-up."""
    env = dict(env or base_env(), **switches)
    env["PYTHONPATH"] = str(ROOT / "tests" / "fault_injection") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def start_training(cmd: list[str], step_sleep: float) -> subprocess.Popen:
    """Start a run whose steps are slowed (test-side hook) so a fault can land mid-run."""
    env = fault_env(TAPE_PRETRAIN_TEST_STEP_SLEEP=str(step_sleep))
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def metrics(run_dir: Path) -> dict[int, dict]:
    """Last record per step of metrics.jsonl (training lines only)."""
    return training_records(run_dir)


@contextlib.contextmanager
def world_of_one_process():
    """This process as rank 0 of a world of one (the trainer built in-process), over gloo on loopback; the
    environment and the signal handlers the trainer installs are restored after."""
    from tape_pretrain.distributed.env import free_port, init_distributed, shutdown

    saved_env = dict(os.environ)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()))
    try:
        yield init_distributed(60)
    finally:
        shutdown()
        os.environ.clear()
        os.environ.update(saved_env)  # later tests' processes must not think they are rank 0 of a world
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
