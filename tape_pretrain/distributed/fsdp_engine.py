"""FSDP2: fully_shard per block then the root; DCP for sharded, reshardable checkpoints."""

from __future__ import annotations

import warnings

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from tape_pretrain.config import ConfigError
from tape_pretrain.distributed.engine import Engine, EngineSetup, ModelSource, adamw, forward_kwargs, lm_loss
from tape_pretrain.distributed.env import DistEnv
from tape_pretrain.utils.safe_load import safe_dcp_load

# Blocks pass the positional state through unchanged (RoPE's tables, TAPE's last layer), and FSDP2's input hooks
# hand it over as a view, so FSDP2 warns that an in-place op on it would skip an all-gather. Nothing modifies a
# block's outputs in place (the model and its tests use out-of-place residuals), so the warning is only noise.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(.*\) returned a view tensor", category=UserWarning)

class FSDP2Engine(Engine):
    def __init__(self, source: ModelSource, setup: EngineSetup):
        self.setup, self.env, self.grad_accum = setup, setup.env, setup.grad_accum
        parallel = setup.parallel
        mesh = fsdp_mesh(setup.env, parallel.replicate_degree)
        policy = MixedPrecisionPolicy(param_dtype=setup.dtype, reduce_dtype=torch.float32)
        if source.lazy:
            with torch.device("meta"):  # shapes only: each rank materialises its own shard below
                model = source.build(False)
        else:
            model = source.build(True).to(setup.env.device)
        self.prepare(model, parallel)
        for block in model.layers:
            fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=parallel.reshard_after_forward)
        fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=parallel.reshard_after_forward)
        if source.lazy:
            materialise_shards(model, source, setup.env.device)
        if setup.env.is_main:  # read back from a parameter: the layout training really uses
            param = next(model.parameters())
            dims = dict(zip(param.device_mesh.mesh_dim_names or ("shard",), param.device_mesh.shape))
            print(f"fsdp2: parameters on mesh {dims}, placements {[str(p) for p in param.placements]}, "
                  f"reshard_after_forward={parallel.reshard_after_forward}", flush=True)
        self.module = model
        self.optimizer = adamw(model, setup.optim)
        self._pending_save = self._staging = self._stager = None
        # A background save runs its own collectives (plan, metadata) while training runs FSDP's: they need a
        # group of their own, or the two interleave on one gloo/NCCL group and deadlock.
        self._checkpoint_group = torch.distributed.new_group(backend="gloo") if setup.async_save else None

    def train_micro_step(self, inputs, labels, is_boundary, document_ids=None):
        self.module.set_requires_gradient_sync(is_boundary)  # reduce-scatter once per optimizer step
        loss = lm_loss(self.module(inputs, **forward_kwargs(document_ids)), labels)
        (loss / self.grad_accum).backward()
        return loss.detach()

    def optimizer_step(self, lr):
        self._wait_for_staging()  # an async save may still be copying the parameters this step will change
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        params = [p for p in self.module.parameters() if p.grad is not None]
        max_norm = self.setup.optim.grad_clip if self.setup.optim.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def eval_logits(self, inputs, document_ids=None):
        return self.module(inputs, **forward_kwargs(document_ids))

    def full_state_dict(self):
        return get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def _state(self):
        model_state, optim_state = get_state_dict(self.module, self.optimizer)
        return {"model": model_state, "optim": optim_state}

    def save(self, directory):
        self.wait_for_save()
        if self.setup.async_save:
            # Staging (the copy of every shard) runs in the background too; forward and backward of the next
            # step overlap with it and only the next optimizer step waits for it (parameters must not change
            # under the copy). The write to disk overlaps with training entirely.
            on_gpu = self.env.device.type == "cuda"
            if on_gpu:
                # DCP's stager copies on its own stream from a worker thread and does not wait for the compute
                # stream: the optimizer step's kernels may still be queued, and it would copy half-updated weights.
                torch.cuda.current_stream(self.env.device).synchronize()
            stager = DefaultStager(StagingOptions(use_pinned_memory=on_gpu, use_shared_memory=False,
                                                  use_async_staging=True, use_non_blocking_copy=on_gpu))
            response = dcp.async_save(self._state(), checkpoint_id=directory, async_stager=stager,
                                      process_group=self._checkpoint_group)
            self._staging, self._pending_save = response.staging_completion, response.upload_completion
            self._stager = stager
        else:
            dcp.save(self._state(), checkpoint_id=directory)

    def _wait_for_staging(self):
        if self._staging is not None:
            self._staging.result()
            self._staging = None

    def save_done(self):
        return self._pending_save is None or self._pending_save.done()

    def wait_for_save(self):
        self._wait_for_staging()
        if self._pending_save is not None:
            self._pending_save.result()
            self._pending_save = None
            self._stager.close()

    def load(self, directory, saved_world_size):
        # DCP reshards on load: any saved world size works
        state = self._state()
        safe_dcp_load(state, directory)
        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


    @classmethod
    def consolidate(cls, engine_dir, model):
        return consolidate_dcp_checkpoint(engine_dir, model)


def consolidate_dcp_checkpoint(engine_dir: str, model) -> dict[str, torch.Tensor]:
    """Full weights from a DCP checkpoint into ``model``'s layout, offline (one process, any saved world size)."""
    state = {"model": model.state_dict()}
    safe_dcp_load(state, engine_dir, no_dist=True)
    return state["model"]


def fsdp_mesh(env: DistEnv, replicate_degree: int) -> DeviceMesh:
    """FSDP over all ranks, or HSDP: replicate_degree groups (one per node, typically) each sharding the model."""
    if replicate_degree == 1:
        return init_device_mesh(env.device.type, (env.world_size,))
    if env.world_size % replicate_degree:
        raise ConfigError(f"parallel.replicate_degree={replicate_degree} does not divide the world size "
                          f"{env.world_size}")
    return init_device_mesh(env.device.type, (replicate_degree, env.world_size // replicate_degree),
                            mesh_dim_names=("replicate", "shard"))


@torch.no_grad()
def materialise_shards(model, source: ModelSource, device: torch.device) -> None:
    """Give a model sharded while on the meta device its initial weights: storage for the local shards only, then
    each parameter's full value made on the CPU one at a time and cut to this rank's shard (no collective)."""
    model.to_empty(device=device)
    for name, param in model.named_parameters():
        full = source.initial_value(model, name, param.shape).to(device=device, dtype=param.dtype)  # DTensor: global
        shard = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
        param.to_local().copy_(shard.to_local())
