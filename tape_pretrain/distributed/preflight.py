"""Preflight: one block, printed by rank 0, of what every rank sees before training starts."""

from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from tape_pretrain.config import RunConfig
from tape_pretrain.distributed.device_report import cuda_problem, format_report, run_device_report
from tape_pretrain.distributed.env import DistEnv, all_gather_objects
from tape_pretrain.errors import DataError, StorageError

if TYPE_CHECKING:
    from tape_pretrain.data.manifest import Manifest


def _free_gib(path: str) -> float:
    probe = Path(os.path.expanduser(path))
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free / 2**30


def bytes_the_run_writes(config: RunConfig, vocab_size: int) -> int:
    """What a run writes to its (local or staging) run directory at most: keep_last + 1 checkpoints (one is being
    written while keep_last are kept) of fp32 weights and two AdamW moments (plus fp32 masters in bf16), and the
    fp32 export. An estimate to catch a full disk before step 0, not an exact figure."""
    from tape_pretrain.models import build_model
    from tape_pretrain.train.resume import resolve_run_model_config

    with torch.device("meta"):
        params = build_model(resolve_run_model_config(config, vocab_size)).num_parameters()
    per_param = 4 + 8 + (4 if config.trainer.precision == "bf16" else 0)
    return params * per_param * (config.checkpoint.keep_last + 1) + params * 4


def bytes_the_data_fetches(config: RunConfig, datasets: list[tuple[str, Manifest, str]]) -> int:
    """What the run may still put into data.cache_dir on each node, for ``datasets`` [(url, manifest, fingerprint)]:
    with data.access=copy the train and val shards and offsets files not cached yet (a dataset on a local or shared
    disk is read in place: nothing); with data.access=stream the stream cache's limit (data.stream_cache_gib) plus
    the val files not cached yet."""
    from tape_pretrain.data.storage import is_local, open_url

    c = config.data
    stream = c.access == "stream"
    total = int(c.stream_cache_gib * 2**30) if stream else 0
    for url, manifest, fingerprint in datasets:
        if is_local(open_url(url, c.storage_options)[0]):
            continue
        root = Path(os.path.expanduser(c.cache_dir)) / fingerprint[:16]
        for split in ("val",) if stream else ("train", "val"):
            for shard in manifest.splits.get(split, []):
                for rel, size in ((shard.path, shard.num_bytes), (shard.docs_path, shard.docs_num_bytes)):
                    if rel and not (root / rel).exists():
                        total += size
    return total


def _same_filesystem(a: str, b: str) -> bool:
    def existing(path: str) -> Path:
        probe = Path(os.path.expanduser(path))
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        return probe
    return existing(a).stat().st_dev == existing(b).stat().st_dev


def _bytes_under(root: Path, names: tuple[str, ...]) -> int:
    return sum(p.stat().st_size for name in names if (root / name).is_dir()
               for p in (root / name).rglob("*") if p.is_file())


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
    gpu_problem = cuda_problem()  # a GPU torch cannot use would otherwise train on the CPU without a word
    if gpu_problem:
        problems.append(gpu_problem)
    manifest, manifests = None, []
    if config is not None:
        try:
            datasets = [(s.path, s.weight) for s in config.data.sources] or (
                [(config.data.path, 1.0)] if config.data.path else [])
            described = []
            for path, weight in datasets:
                found, fp = load_manifest(path, config.data.storage_options)
                manifests.append((path, found, fp))
                manifest = manifest or found
                share = f", weight {weight:g}" if len(datasets) > 1 else ""
                described.append(f"{path} ({found.num_tokens('train'):,} train tokens, fingerprint {fp[:12]}{share})")
            lines["dataset"] = "; ".join(described) or "data.path not set"
        except (DataError, StorageError, OSError) as exc:
            problems.append(f"dataset: {exc}")
        try:
            lines["run_dir"] = f"{config.run_dir} ({_check_run_dir(config.run_dir)})"
        except StorageError as exc:
            problems.append(str(exc))
        free_cache = _free_gib(config.data.cache_dir)
        lines["free_gib_cache"] = round(free_cache, 1)
        data_needed = 0.0
        if manifests and env.local_rank == 0:  # one rank per node: the node's cache
            c = config.data
            data_needed = bytes_the_data_fetches(config, manifests) / 2**30
            lines["data_fetches_gib"] = round(data_needed, 3)
            if data_needed > free_cache:
                what = (f"data.access=stream may fill about {data_needed:.3f} GiB of it (data.stream_cache_gib="
                        f"{c.stream_cache_gib:g} and the val shards not cached yet): lower data.stream_cache_gib, "
                        "free space, or point data.cache_dir at a larger disk") if c.access == "stream" else (
                        f"data.access=copy will fetch about {data_needed:.3f} GiB more into it (the train and val "
                        "shards not cached yet): free space, point data.cache_dir at a larger disk, or set "
                        "data.access=stream (its disk use is bounded by data.stream_cache_gib)")
                problems.append(f"{c.cache_dir} has {free_cache:.3f} GiB free but {what}")
        remote = "://" in config.run_dir and not config.run_dir.startswith("file://")
        local_dir = config.checkpoint.staging_dir if remote else config.run_dir.removeprefix("file://")
        free = _free_gib(local_dir)
        lines["free_gib_run_dir"] = round(free, 1)
        if manifest is not None and env.local_rank == 0:
            total = bytes_the_run_writes(config, int(manifest.tokenizer["vocab_size"])) / 2**30
            # a resumed run already holds some of it (retention replaces those checkpoints, the export is rewritten)
            held = _bytes_under(Path(os.path.expanduser(local_dir)), ("checkpoints", "export")) / 2**30
            needed = max(total - held, 0.0)
            lines["run_writes_gib"] = round(needed, 3)
            if needed > free:
                problems.append(f"{local_dir} has {free:.3f} GiB free but the run will write about {needed:.3f} GiB "
                                f"more (checkpoint.keep_last={config.checkpoint.keep_last} + 1 checkpoints and the "
                                "export): free space, lower checkpoint.keep_last, or move run_dir")
            elif data_needed <= free_cache and needed + data_needed > free and _same_filesystem(
                    local_dir, config.data.cache_dir):
                problems.append(f"{local_dir} and {config.data.cache_dir} share a disk with {free:.3f} GiB free, "
                                f"but the run will write about {needed:.3f} GiB and the data needs about "
                                f"{data_needed:.3f} GiB more: free space, or move one of them")
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
            print(format_report(run_device_report(config, env.device)))
        if problems:
            raise StorageError(f"preflight: {problems[0]}")
    finally:
        shutdown()
