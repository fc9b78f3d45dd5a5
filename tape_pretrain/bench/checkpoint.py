"""bench checkpoint: save/load throughput of each engine next to a plain write/read of the same bytes on the same
disk, and for FSDP2 how long the training loop is blocked by an async save versus a sync one."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from tape_pretrain.bench.timing import format_result
from tape_pretrain.config import load_config
from tape_pretrain.distributed.engine import build_engine
from tape_pretrain.distributed.env import init_distributed, shutdown
from tape_pretrain.models import build_model


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _sync_tree(path: Path) -> None:
    for p in path.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def _drop_page_cache() -> bool:
    """Cold reads for both sides of the comparison (needs root); False where the kernel refuses."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def _raw_write_read(directory: Path, num_bytes: int) -> tuple[float, float]:
    data = os.urandom(min(num_bytes, 256 << 20))
    path = directory / "raw.bin"
    start = time.perf_counter()
    with open(path, "wb") as f:
        written = 0
        while written < num_bytes:
            f.write(data[: num_bytes - written])
            written += min(len(data), num_bytes - written)
        f.flush()
        os.fsync(f.fileno())
    write_s = time.perf_counter() - start
    _drop_page_cache()
    start = time.perf_counter()
    with open(path, "rb") as f:
        while f.read(64 << 20):
            pass
    read_s = time.perf_counter() - start
    path.unlink()
    return write_s, read_s


def _engine(name: str, preset: str, env, async_save: bool = False):
    config = load_config(None, [f"parallel.engine={name}", "parallel.zero_stage=2", f"model.preset={preset}",
                                f"checkpoint.async_save={str(async_save).lower()}", "trainer.seq_len=128",
                                "trainer.global_batch_tokens=256", "trainer.micro_batch_size=2"])
    torch.manual_seed(0)
    engine = build_engine(build_model(config.model), config, env, grad_accum=1)
    tokens = torch.randint(0, 1000, (2, 129), device=env.device)
    engine.train_micro_step(tokens[:, :-1], tokens[:, 1:], is_boundary=True)
    engine.optimizer_step(1e-4)  # so that the optimizer state exists and is saved
    return engine


def run(preset: str = "paper-155m") -> dict:
    env = init_distributed(600)
    results: dict[str, float] = {}
    try:
        with tempfile.TemporaryDirectory(dir=os.environ.get("TAPE_PRETRAIN_BENCH_DIR")) as tmp:
            root = Path(tmp)
            ratios_save, ratios_load = [], []
            for name in ("deepspeed", "fsdp2"):
                engine = _engine(name, preset, env)
                target = root / name
                start = time.perf_counter()
                engine.save(str(target))
                engine.wait_for_save()
                _sync_tree(target)
                save_s = time.perf_counter() - start
                size = _tree_bytes(target)
                cold = _drop_page_cache()
                start = time.perf_counter()
                engine.load(str(target), env.world_size)
                load_s = time.perf_counter() - start
                raw_write_s, raw_read_s = _raw_write_read(root, size)
                gb = size / 1e9
                cache = "cold" if cold else "warm"
                print(f"{name:>9}: {gb:.2f} GB  save {gb / save_s:.2f} GB/s (raw write {gb / raw_write_s:.2f})  "
                      f"load {gb / load_s:.2f} GB/s (raw read {gb / raw_read_s:.2f}; {cache} page cache)")
                ratios_save.append(raw_write_s / save_s)
                ratios_load.append(raw_read_s / load_s)
                results[f"{name}_save_gbps"] = gb / save_s
                results[f"{name}_load_gbps"] = gb / load_s
                shutil.rmtree(target)
                del engine
            blocking = {}
            for async_save in (False, True):
                engine = _engine("fsdp2", preset, env, async_save=async_save)
                target = root / f"async_{async_save}"
                tokens = torch.randint(0, 1000, (2, 129), device=env.device)
                start = time.perf_counter()
                engine.save(str(target))  # the loop waits here ...
                blocked = time.perf_counter() - start
                engine.train_micro_step(tokens[:, :-1], tokens[:, 1:], is_boundary=True)  # ... not during this
                start = time.perf_counter()
                if async_save:
                    engine._wait_for_staging()  # ... and here, before the parameters change
                blocking[async_save] = blocked + time.perf_counter() - start
                engine.optimizer_step(1e-4)
                engine.wait_for_save()
                shutil.rmtree(target)
                del engine
            print(f"FSDP2 loop blocked: sync save {blocking[False]:.2f} s, async save {blocking[True]:.2f} s")
            results.update(save_over_raw=min(ratios_save), load_over_raw=min(ratios_load),
                           async_blocking_over_sync=blocking[True] / blocking[False])
    finally:
        shutdown()
    print(format_result(results))
    return results
