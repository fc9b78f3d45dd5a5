"""FSDP2: fully_shard per block then the root; DCP for sharded, reshardable checkpoints."""

from __future__ import annotations

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from tape_pretrain.config import RunConfig
from tape_pretrain.distributed.engine import Engine, compute_dtype, lm_loss, param_groups
from tape_pretrain.distributed.env import DistEnv


class FSDP2Engine(Engine):
    def __init__(self, model, config: RunConfig, env: DistEnv, grad_accum: int):
        self.config, self.env, self.grad_accum = config, env, grad_accum
        mesh = init_device_mesh(env.device.type, (env.world_size,))
        dtype = compute_dtype(config, env)
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        model.to(env.device)
        for block in model.layers:
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        self.module = model
        self.optimizer = torch.optim.AdamW(
            param_groups(model, config.optim.weight_decay, config.optim.decay_embeddings),
            lr=config.optim.lr, betas=config.optim.betas, eps=config.optim.eps)
        self._pending_save = None

    def train_micro_step(self, inputs, labels, is_boundary):
        self.module.set_requires_gradient_sync(is_boundary)  # reduce-scatter once per optimizer step
        loss = lm_loss(self.module(inputs), labels)
        (loss / self.grad_accum).backward()
        return loss.detach()

    def optimizer_step(self, lr):
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        params = [p for p in self.module.parameters() if p.grad is not None]
        max_norm = self.config.optim.grad_clip if self.config.optim.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def eval_logits(self, inputs):
        return self.module(inputs)

    def full_state_dict(self):
        return get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def _state(self):
        model_state, optim_state = get_state_dict(self.module, self.optimizer)
        return {"model": model_state, "optim": optim_state}

    def save(self, directory):
        self.wait_for_save()
        if self.config.checkpoint.async_save:
            self._pending_save = dcp.async_save(self._state(), checkpoint_id=directory)
        else:
            dcp.save(self._state(), checkpoint_id=directory)

    def wait_for_save(self):
        if self._pending_save is not None:
            self._pending_save.result()
            self._pending_save = None

    def load(self, directory, saved_world_size):
        # DCP reshards on load: any saved world size works
        state = self._state()
        dcp.load(state, checkpoint_id=directory)
        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def consolidate_checkpoint(engine_dir: str, model) -> dict[str, torch.Tensor]:
    """Full weights from a DCP checkpoint into ``model``'s layout, offline (one process, any saved world size)."""
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=engine_dir, no_dist=True)
    return state["model"]
