"""Process-group setup from the launcher's environment: plain python, torchrun, deepspeed, srun torchrun."""

from __future__ import annotations

import ctypes
import ctypes.util
import datetime
import os
import signal
import socket
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from tape_pretrain.config import ConfigError

_REQUIRED_TOGETHER = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str
    control_group: object = None
    """A gloo group for tiny host-side agreements (stop flags) that must not sync the GPU."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_launcher_environment(environ=os.environ) -> None:
    """One clear error naming the variables a launcher forgot (e.g. LOCAL_RANK under a bare srun)."""
    present = [k for k in _REQUIRED_TOGETHER if k in environ]
    if present and len(present) != len(_REQUIRED_TOGETHER):
        missing = [k for k in _REQUIRED_TOGETHER if k not in environ]
        raise ConfigError(
            f"distributed environment is incomplete: {', '.join(present)} set but {', '.join(missing)} unset "
            "(launch with torchrun, the deepspeed launcher or launch/slurm.sbatch, or plain python for one process)")
    if present:
        rank, world, local = (int(environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
        if not 0 <= rank < world:
            raise ConfigError(f"RANK={rank} is outside WORLD_SIZE={world}")
        local_world = int(environ.get("LOCAL_WORLD_SIZE", environ.get("LOCAL_SIZE", world)))
        if not 0 <= local < local_world:
            raise ConfigError(f"LOCAL_RANK={local} is outside LOCAL_WORLD_SIZE={local_world}")


def die_with_launcher() -> None:
    """Under torchrun, ask the kernel to SIGKILL this worker when its agent dies (kill -9 of the agent, a lost
    node): orphaned workers would otherwise keep training, holding devices and writing into the run directory."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the agent died before prctl took effect
        os._exit(1)


def init_distributed(timeout_s: float = 600.0) -> DistEnv:
    """Initialise the default process group (a world of one under plain python) and pick device/backend."""
    check_launcher_environment()
    die_with_launcher()
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", world)))  # LOCAL_SIZE: deepspeed
    if torch.cuda.is_available():
        device, backend = torch.device("cuda", local_rank), "nccl"
        torch.cuda.set_device(device)
    else:
        device, backend = torch.device("cpu"), "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timeout,
                                device_id=device if device.type == "cuda" else None)
    control = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else dist.group.WORLD
    return DistEnv(rank, world, local_rank, local_world, device, backend, control)


def all_agree_any(flag: bool, env: DistEnv) -> bool:
    """True on every rank if any rank's flag is set (host-side, no GPU sync)."""
    if env.world_size == 1:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=env.control_group)
    return bool(t.item())


def all_agree_all(flag: bool, env: DistEnv) -> bool:
    """True on every rank only if every rank's flag is set (host-side, no GPU sync)."""
    return not all_agree_any(not flag, env)


def all_gather_objects(obj, env: DistEnv) -> list:
    """Every rank's object, in rank order (host-side, over the control group)."""
    if env.world_size == 1:
        return [obj]
    out = [None] * env.world_size
    dist.all_gather_object(out, obj, group=env.control_group)
    return out


def barrier(env: DistEnv) -> None:
    if env.world_size > 1:
        dist.barrier(group=env.control_group)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
