"""Every use of DeepSpeed beyond its public training API, in one place, each with the reason it is needed.

DeepSpeed is pinned to 0.19.x (pyproject.toml) because of what is here; tests/train/test_engine_reference.py and
tests/train/test_elastic_resume.py fail if a DeepSpeed upgrade changes any of it.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable

import torch

# DeepSpeed picks its accelerator when imported; without a GPU its auto-detection can pick another backend it finds.
os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
import deepspeed  # noqa: E402
from deepspeed.utils import safe_set_full_fp32_param, safe_set_local_fp32_param  # noqa: E402


def skip_cpu_shm_op() -> None:
    """On CPU, DeepSpeed's communication backend JIT-compiles a shared-memory all-reduce used only by its inference
    path; every rank compiling it at start costs ~30 s on a fresh machine and races between processes. Training
    never calls it. Applied when an engine is built (not at import), before DeepSpeed creates its backend."""
    if not torch.cuda.is_available():
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def set_fp32_master(param, value: torch.Tensor) -> None:
    """Set a trainable parameter's fp32 master copy (every rank calls it with the full value; no collective)."""
    if hasattr(param, "ds_id"):
        # ZeRO-3: DeepSpeed's set_full_hp_param slices rank r's partition as value[r*p:(r+1)*p] without the padding
        # it adds to sizes not divisible by the world size (the last rank read past the end). Pad, then set ours.
        group = getattr(param, "ds_process_group", None)
        world, rank = torch.distributed.get_world_size(group), torch.distributed.get_rank(group)
        local = param.ds_tensor.numel()
        padded = torch.zeros(local * world, dtype=torch.float32, device=value.device)
        padded[:value.numel()] = value.flatten()
        safe_set_local_fp32_param(param, padded.narrow(0, local * rank, local))
    else:
        safe_set_full_fp32_param(param, value)


def full_shape(param) -> torch.Size:
    """A parameter's full shape (a ZeRO-3 partitioned parameter's own shape is empty)."""
    return param.ds_shape if hasattr(param, "ds_shape") else param.shape


def zero3_partitioned_init(ds_config: dict):
    """The context in which a ZeRO-3 model is built already partitioned: no rank ever holds all of it."""
    return deepspeed.zero.Init(config_dict_or_path=ds_config)


@torch.no_grad()
def set_partitioned_param(param, value: Callable[[], torch.Tensor]) -> None:
    """Set a ZeRO-3 partitioned parameter to a full value (gathered, set on rank 0, re-partitioned from rank 0);
    ``value`` is called on rank 0 only."""
    with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
        if torch.distributed.get_rank() == 0:
            param.data.copy_(value().to(param.device, param.dtype).view_as(param.data))


def zero3_consolidated_state_dict(engine) -> dict[str, torch.Tensor]:
    """The full module weights gathered on rank 0 (ZeRO-3, fp32 runs: the module weights are the master weights).
    Private: DeepSpeed exposes it only through save_16bit_model, which writes a file."""
    return engine._zero3_consolidated_16bit_state_dict()


def set_universal_loading(engine, enabled: bool) -> None:
    """Make load_checkpoint read a universal checkpoint (one saved on another data-parallel size and converted).
    Private: the public switch is the config key checkpoint.load_universal, fixed when the engine is built, but only
    resuming decides whether the world size changed."""
    engine._config.load_universal_checkpoint = enabled


def repair_after_universal_load(optimizer: torch.optim.Optimizer, hyperparameters: list[dict]) -> None:
    """Two repairs after ZeRO-3's universal loader (losses drifted 1e-3 from the uninterrupted run within 3 steps
    without them). It stores ONE step tensor in every sub-group's state, and AdamW increments it in place once per
    sub-group per step, so the bias correction of every group after the first ran ahead: give each state its own
    copy. And it gives every param group the hyperparameters of group 0 (the no-decay group would be weight-decayed):
    put back ours (``hyperparameters``: every group's settings without its params, taken before loading)."""
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
    for group, saved in zip(optimizer.param_groups, hyperparameters):
        group.update(saved)


def _bf16_optimizer_files(tag_dir: str) -> dict[int, str]:
    import re

    files = {}
    for name in os.listdir(tag_dir):
        match = re.fullmatch(r"bf16_zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt", name)
        if match:
            files[int(match.group(1))] = os.path.join(tag_dir, name)
    return files


def is_bf16_optimizer_checkpoint(tag_dir: str) -> bool:
    """Written by BF16_Optimizer (bf16 ZeRO-1)? ZeRO-2/3 in bf16 use the same file names but record a ZeRO stage."""
    files = _bf16_optimizer_files(tag_dir)
    if not files:
        return False
    state = torch.load(files[min(files)], map_location="cpu", weights_only=True, mmap=True)  # mmap: reads no tensor
    return "single_partition_of_fp32_groups" in state["optimizer_state_dict"]


def consolidate_bf16_optimizer_checkpoint(tag_dir: str, shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Full fp32 master weights from the checkpoint of DeepSpeed's BF16_Optimizer (bf16 with ZeRO-1), offline.

    DeepSpeed's zero_to_fp32 does not read this format ("is not a zero checkpoint"). Each rank's file holds its
    fp32 partition of every parameter group and, per group, where each parameter's fragment starts in it: a
    parameter is its fragments concatenated in rank order. Frozen parameters are in no group (absent here)."""
    files = _bf16_optimizer_files(tag_dir)
    fragments: dict[str, list[torch.Tensor]] = {}
    for rank in sorted(files):
        state = torch.load(files[rank], map_location="cpu", weights_only=True)["optimizer_state_dict"]
        for partition, mapping in zip(state["single_partition_of_fp32_groups"], state["param_slice_mappings"]):
            for name, fragment in mapping.items():
                fragments.setdefault(name, []).append(partition.narrow(0, fragment.start, fragment.numel))
    return {name: torch.cat(parts).view(shapes[name]).clone() for name, parts in fragments.items()}
