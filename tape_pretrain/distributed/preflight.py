"""Preflight: one block, printed by rank 0, of what every rank sees before training starts."""

from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist

from tape_pretrain.config import RunConfig
from tape_pretrain.distributed.env import DistEnv, all_gather_objects
from tape_pretrain.errors import DataError, StorageError


def _free_gib(path: str) -> float:
    probe = Path(os.path.expanduser(path))
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free / 2**30


def _check_run_dir(run_dir: str) -> str:
    if "://" in run_dir and not run_dir.startswith("file://"):
        from tape_pretrain.data.storage import join, open_url, with_retries

        fs, root = open_url(run_dir)
        probe = join(root, f".preflight.{socket.gethostname()}.{os.getpid()}")
        try:
            with_retries(lambda: (fs.pipe_file(probe, b"ok"), fs.rm(probe)), run_dir)
        except StorageError as exc:
            raise StorageError(f"run_dir {run_dir}: not writable ({exc})") from None
        return "writable (remote, staged locally)"
    path = Path(run_dir.removeprefix("file://"))
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".preflight.{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise StorageError(f"run_dir {run_dir}: not writable ({exc})") from None
    return "writable"


def preflight(config: RunConfig | None, env: DistEnv) -> tuple[str, list[str]]:
    """Collective: every rank checks; returns (report for rank 0, '' elsewhere; every rank's problems)."""
    from tape_pretrain.data.manifest import load_manifest

    lines = {"host": socket.gethostname(), "rank": env.rank, "local_rank": env.local_rank,
             "device": str(env.device)}
    problems = []
    if config is not None:
        try:
            manifest, fp = load_manifest(config.data.path, config.data.storage_options) if config.data.path else (
                None, None)
            lines["dataset"] = (f"{config.data.path} ({manifest.num_tokens('train'):,} train tokens, "
                                f"fingerprint {fp[:12]})") if manifest else "data.path not set"
        except (DataError, StorageError, OSError) as exc:
            problems.append(f"dataset: {exc}")
        try:
            lines["run_dir"] = f"{config.run_dir} ({_check_run_dir(config.run_dir)})"
        except StorageError as exc:
            problems.append(str(exc))
        lines["free_gib_cache"] = round(_free_gib(config.data.cache_dir), 1)
        if "://" not in config.run_dir:
            lines["free_gib_run_dir"] = round(_free_gib(config.run_dir), 1)
    tensor = torch.ones(1, device=env.device)
    start = time.perf_counter()
    if env.world_size > 1:
        dist.all_reduce(tensor)
    if env.device.type == "cuda":
        torch.cuda.synchronize()
    lines["all_reduce_ms"] = round((time.perf_counter() - start) * 1000, 2)
    if int(tensor.item()) != env.world_size:
        problems.append(f"all-reduce returned {tensor.item()} instead of {env.world_size}")
    lines["problems"] = problems
    gathered = all_gather_objects(lines, env)
    all_problems = [f"rank {r['rank']}: {p}" for r in gathered for p in r["problems"]]
    if not env.is_main:
        return "", all_problems
    header = (f"preflight: world_size={env.world_size} ranks_per_node={env.local_world_size} "
              f"backend={env.backend} device={env.device.type}")
    body = [header] + [f"  rank {r['rank']} on {r['host']} ({r['device']}): " + ", ".join(
        f"{k}={v}" for k, v in r.items() if k not in ("rank", "host", "device", "problems", "local_rank"))
        for r in gathered]
    body += [f"  PROBLEM {p}" for p in all_problems] or ["  ok"]
    return "\n".join(body), all_problems


def doctor(config: RunConfig | None) -> None:
    from tape_pretrain.distributed.env import init_distributed, shutdown

    env = init_distributed(config.parallel.timeout_s if config else 60.0)
    try:
        report, problems = preflight(config, env)
        if report:
            print(report)
        if problems:
            raise StorageError(f"preflight: {problems[0]}")
    finally:
        shutdown()
