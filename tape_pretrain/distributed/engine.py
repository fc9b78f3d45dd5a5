"""The interface the trainer uses, whatever engine runs underneath (DeepSpeed ZeRO or FSDP2)."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from tape_pretrain.config import RunConfig
from tape_pretrain.distributed.env import DistEnv


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in fp32; logits [B,N,V], labels [B,N]."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())


def param_groups(model: nn.Module, weight_decay: float, decay_embeddings: bool) -> list[dict]:
    """AdamW groups: matrices decay; norms, biases and scalars never; embeddings and head only if asked."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_embedding = name.startswith(("embed_tokens.", "lm_head."))
        if param.ndim < 2 or (is_embedding and not decay_embeddings):
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block in the backward pass; parameter names are unchanged."""
    for block in model.layers:
        block.forward = functools.partial(checkpoint, block.__class__.forward, block, use_reentrant=False)


def compile_blocks(model: nn.Module) -> None:
    """torch.compile each block's forward. The engines' hooks (FSDP2 all-gathers, ZeRO-3 parameter fetches)
    sit on the modules' __call__, outside the compiled forward; parameter names are unchanged."""
    # Each block compiles one graph per (first/middle/last layer) x (sequence length) x (train/eval):
    # a curriculum needs more than dynamo's default of 8 before it would silently fall back to eager.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for block in model.layers:
        block.forward = torch.compile(block.forward)


def compute_dtype(config: RunConfig, env: DistEnv) -> torch.dtype:
    """bf16 on GPUs by default, fp32 on CPU; an explicit bf16 also runs on CPU (slowly: used to test bf16 there)."""
    precision = config.trainer.precision
    if precision == "auto":
        return torch.bfloat16 if env.device.type == "cuda" else torch.float32
    return torch.bfloat16 if precision == "bf16" else torch.float32


class Engine:
    """Forward/backward with accumulation, the optimizer step, and state save/load."""

    module: nn.Module

    def train_micro_step(self, inputs: torch.Tensor, labels: torch.Tensor, is_boundary: bool) -> torch.Tensor:
        """Forward + backward of one micro-batch; returns the detached loss."""
        raise NotImplementedError

    def optimizer_step(self, lr: float) -> torch.Tensor | float:
        """Clip, step, zero grads; returns the pre-clip global grad norm."""
        raise NotImplementedError

    def eval_logits(self, inputs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def save(self, directory: str) -> None:
        """Write the engine state (model + optimizer, sharded as the engine likes) into a local directory."""
        raise NotImplementedError

    def load(self, directory: str, saved_world_size: int) -> None:
        """Restore the state written by save(); saved_world_size may differ from the current one."""
        raise NotImplementedError

    def wait_for_save(self) -> None:
        """Block until a background save, if any, is durable."""

    def save_done(self) -> bool:
        """True when no background save is still writing (non-blocking)."""
        return True

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Unsharded fp32 weights in our naming (collective; meaningful on rank 0)."""
        raise NotImplementedError


def build_engine(model: nn.Module, config: RunConfig, env: DistEnv, grad_accum: int) -> Engine:
    if config.parallel.activation_checkpointing:
        apply_activation_checkpointing(model)
    if config.parallel.compile:
        compile_blocks(model)
    if config.parallel.engine == "deepspeed":
        from tape_pretrain.distributed.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(model, config, env, grad_accum)
    from tape_pretrain.distributed.fsdp_engine import FSDP2Engine

    return FSDP2Engine(model, config, env, grad_accum)
