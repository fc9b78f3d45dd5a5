"""Plain data parallelism (torch DDP): every rank holds the whole model and optimizer, gradients are all-reduced.

The simplest baseline engine, in fp32 only; checkpoints are DCP (replicated tensors are written once), so they load
at any world size and export exactly as FSDP2's do.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.nn.parallel import DistributedDataParallel

from tape_pretrain.config import ConfigError
from tape_pretrain.distributed.engine import Engine, EngineSetup, ModelSource, adamw, forward_kwargs, lm_loss
from tape_pretrain.distributed.fsdp_engine import consolidate_dcp_checkpoint
from tape_pretrain.utils.safe_load import safe_dcp_load


class DDPEngine(Engine):
    bf16_capable = False

    def __init__(self, source: ModelSource, setup: EngineSetup):
        if setup.dtype != torch.float32:
            raise ConfigError("parallel.engine=ddp trains in fp32: set trainer.precision=fp32, or use fsdp2 or "
                              "deepspeed for bf16")
        if setup.async_save:
            raise ConfigError("checkpoint.async_save is supported by the fsdp2 engine only")
        self.setup, self.env, self.grad_accum = setup, setup.env, setup.grad_accum
        model = source.build(True).to(setup.env.device)
        self.prepare(model, setup.parallel)
        self.model = model
        device_ids = [setup.env.device.index] if setup.env.device.type == "cuda" else None
        # gradients as views into the reduction buckets: no second copy of every gradient
        self.module = DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True)
        self.optimizer = adamw(model, setup.optim)

    def train_micro_step(self, inputs, labels, is_boundary, document_ids=None):
        # all-reduce once per optimizer step: the micro-batches before the boundary only accumulate
        sync = contextlib.nullcontext() if is_boundary else self.module.no_sync()
        with sync:
            loss = lm_loss(self.module(inputs, **forward_kwargs(document_ids)), labels)
            (loss / self.grad_accum).backward()
        return loss.detach()

    def optimizer_step(self, lr):
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.setup.optim.grad_clip if self.setup.optim.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def eval_logits(self, inputs, document_ids=None):
        return self.model(inputs, **forward_kwargs(document_ids))  # no gradient: no DDP hooks needed

    def full_state_dict(self):
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()} if self.env.is_main else {}

    def _state(self):
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        return {"model": model_state, "optim": optim_state}

    def save(self, directory):
        dcp.save(self._state(), checkpoint_id=directory)

    def load(self, directory, saved_world_size):
        state = self._state()
        safe_dcp_load(state, directory)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])

    @classmethod
    def consolidate(cls, engine_dir, model):
        return consolidate_dcp_checkpoint(engine_dir, model)
