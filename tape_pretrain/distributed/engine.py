"""The interface the trainer uses, whatever engine runs underneath, and the registry that finds engines by name.

An engine owns everything engine-specific: building (and, for large models, materialising shard by shard) the model,
forward/backward with accumulation, the optimizer step, checkpoint save/load (including world-size changes), and the
offline consolidation of a saved checkpoint into fp32 weights for export. The trainer never branches on the engine.
Adding one: write its module (a subclass of Engine) and add one line to ENGINES.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from tape_pretrain.config import ConfigError, OptimConfig, ParallelConfig, RunConfig
from tape_pretrain.distributed.env import DistEnv

ENGINES = {
    "deepspeed": "tape_pretrain.distributed.deepspeed_engine:DeepSpeedEngine",
    "fsdp2": "tape_pretrain.distributed.fsdp_engine:FSDP2Engine",
    "ddp": "tape_pretrain.distributed.ddp_engine:DDPEngine",
}
"""Engine name (parallel.engine) -> "module:class". Modules are imported only when their engine is used."""


def engine_class(name: str) -> type[Engine]:
    if name not in ENGINES:
        raise ConfigError(f"parallel.engine: unknown engine {name!r} (known: {', '.join(sorted(ENGINES))})")
    module, _, cls = ENGINES[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def forward_kwargs(document_ids: torch.Tensor | None) -> dict:
    """The model's keyword arguments for a micro-batch: none in causal mode (the call is exactly the causal one)."""
    return {} if document_ids is None else {"document_ids": document_ids}


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in fp32; logits [B,N,V], labels [B,N]."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())


def param_groups(model: nn.Module, weight_decay: float, decay_embeddings: bool,
                 shape_of: Callable[[nn.Parameter], torch.Size] = lambda p: p.shape) -> list[dict]:
    """AdamW groups: matrices decay; norms, biases and scalars never; embeddings and head only if asked.
    ``shape_of``: a parameter's full shape, where the engine has partitioned parameters at construction."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_embedding = name.startswith(("embed_tokens.", "lm_head."))
        if len(shape_of(param)) < 2 or (is_embedding and not decay_embeddings):
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw(model: nn.Module, optim: OptimConfig,
          shape_of: Callable[[nn.Parameter], torch.Size] = lambda p: p.shape) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, optim.weight_decay, optim.decay_embeddings, shape_of),
                             lr=optim.lr, betas=optim.betas, eps=optim.eps)


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


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    """bf16 on GPUs by default, fp32 on CPU; an explicit bf16 also runs on CPU (slowly: used to test bf16 there)."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch.bfloat16 if precision == "bf16" else torch.float32


@dataclass(frozen=True)
class EngineSetup:
    """What an engine is built from: its own config section plus the facts it needs, not the whole run config."""

    parallel: ParallelConfig
    optim: OptimConfig
    dtype: torch.dtype
    """Compute dtype (bf16: fp32 master weights, optimizer state, accumulation and reduction)."""
    micro_batch_size: int
    grad_accum: int
    async_save: bool
    env: DistEnv

    @classmethod
    def from_run(cls, config: RunConfig, env: DistEnv, grad_accum: int, bf16_capable: bool = True) -> EngineSetup:
        precision = config.trainer.precision
        if precision == "auto" and not bf16_capable:
            precision = "fp32"
        return cls(config.parallel, config.optim, compute_dtype(precision, env.device),
                   config.trainer.micro_batch_size, grad_accum, config.checkpoint.async_save, env)


@dataclass
class ModelSource:
    """How an engine gets its model.

    ``build(complete)`` constructs it. With complete=True it returns a finished model (initial weights, or the
    weights of model.init_from); with complete=False the engine builds it under a context of its own (the meta
    device for FSDP2, ZeRO-3's partitioning) and then sets each parameter from ``initial_value(model, name, shape)``,
    the full fp32 CPU value of one parameter (of full shape ``shape``): one parameter at a time, keeping only the
    local shard, so no rank ever holds the whole model. ``lazy`` is False for a model that already exists (it can
    only be handed over whole).
    """

    build: Callable[[bool], nn.Module]
    initial_value: Callable[[nn.Module, str, torch.Size], torch.Tensor]
    lazy: bool = True

    @classmethod
    def of(cls, model: nn.Module) -> ModelSource:
        """An already built (eager) model: build() returns it, its current weights are the initial values."""
        return cls(lambda complete: model,
                   lambda m, name, shape: model.get_parameter(name).detach().to("cpu", torch.float32), lazy=False)


class Engine:
    """Forward/backward with accumulation, the optimizer step, and state save/load."""

    module: nn.Module
    bf16_capable: ClassVar[bool] = True
    """False for an engine that trains in fp32 only: trainer.precision=auto then means fp32 on GPUs too."""

    def __init__(self, source: ModelSource, setup: EngineSetup):
        raise NotImplementedError

    @staticmethod
    def prepare(model: nn.Module, parallel: ParallelConfig) -> None:
        """Wrappers that keep parameter names: applied by every engine before it shards the model."""
        if parallel.activation_checkpointing:
            apply_activation_checkpointing(model)
        if parallel.compile:
            compile_blocks(model)

    def train_micro_step(self, inputs: torch.Tensor, labels: torch.Tensor, is_boundary: bool,
                         document_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Forward + backward of one micro-batch (document attention where ``document_ids`` are given); returns the
        detached loss."""
        raise NotImplementedError

    def optimizer_step(self, lr: float) -> torch.Tensor | float:
        """Clip, step, zero grads; returns the pre-clip global grad norm."""
        raise NotImplementedError

    def eval_logits(self, inputs: torch.Tensor, document_ids: torch.Tensor | None = None) -> torch.Tensor:
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
        """Unsharded fp32 weights (the fp32 master copy in bf16 runs) in our naming. Collective; complete on rank 0,
        other ranks may return an empty dict."""
        raise NotImplementedError

    @classmethod
    def consolidate(cls, engine_dir: str, model: nn.Module) -> dict[str, torch.Tensor]:
        """Full fp32 weights from a checkpoint this engine saved (``engine_dir``, at any world size), offline: one
        process, no process group. ``model`` is the model the checkpoint belongs to (its layout and names)."""
        raise NotImplementedError


def build_engine(model: nn.Module | ModelSource, config: RunConfig, env: DistEnv, grad_accum: int) -> Engine:
    """The engine parallel.engine names, for an eagerly built model or a ModelSource (which lets the engine build
    the model itself: on the meta device for FSDP2, partitioned for ZeRO-3)."""
    source = model if isinstance(model, ModelSource) else ModelSource.of(model)
    cls = engine_class(config.parallel.engine)
    return cls(source, EngineSetup.from_run(config, env, grad_accum, cls.bf16_capable))
