"""LoRA adapters through peft (optim.trainable containing ``lora``): added to every construction of the model, given
deterministic initial values, and merged into the base weights at export.

peft wraps each target linear layer: its weight becomes ``...q_proj.base_layer.weight`` and the adapters
``...q_proj.lora_A.default.weight`` [r, in] and ``...lora_B.default.weight`` [out, r]; the layer computes
W x + (alpha / r) B A x. B starts at zero, so the adapted model starts as exactly the base model. A's initial value is
the model's own normal initialisation for that name (not peft's draw from the global generator): a function of the
run's seed and the name, the same whether an engine builds the model whole or materialises it on the meta device.
Checkpoints hold the wrapped names; exports hold the merged weights under the plain names, so a LoRA run exports the
same model type as full training (RoPE: a stock Llama).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from tape_pretrain.config import ConfigError, ModelConfig, OptimConfig
from tape_pretrain.distributed.engine import ModelSource

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_BLOCK_OWNER = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
                "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def uses_lora(trainable: Iterable[str]) -> bool:
    return "lora" in trainable


def check_lora_options(optim: OptimConfig) -> None:
    if optim.lora_rank < 1:
        raise ConfigError(f"optim.lora_rank must be a positive integer, got {optim.lora_rank}")
    if not optim.lora_alpha > 0 or math.isinf(optim.lora_alpha):
        raise ConfigError(f"optim.lora_alpha must be positive, got {optim.lora_alpha}")
    unknown = [t for t in optim.lora_targets if t not in LORA_TARGETS]
    if unknown or not optim.lora_targets:
        raise ConfigError(f"optim.lora_targets {optim.lora_targets}: give some of {', '.join(LORA_TARGETS)}")


def lora_identity(optim: OptimConfig) -> dict:
    """What a resumed LoRA run must share with its checkpoint: the adapters' shapes and scale."""
    return {"rank": optim.lora_rank, "alpha": optim.lora_alpha, "targets": sorted(set(optim.lora_targets))}


def _target_pattern(targets: list[str]) -> str:
    # A full-match regex over module names: q_proj etc. of the blocks only, never TAPE's positional pe.up_proj.
    return r"layers\.\d+\.(?:" + "|".join(f"{_BLOCK_OWNER[t]}\\.{t}" for t in sorted(set(targets))) + ")"


def add_lora(model: nn.Module, optim: OptimConfig) -> None:
    """Wrap ``model``'s target layers with LoRA adapters (in place). What the model froze itself stays frozen; peft
    freezes everything else, which is undone here: optim.trainable decides what trains."""
    from peft import LoraConfig, inject_adapter_in_model

    frozen = {name for name, param in model.named_parameters() if not param.requires_grad}
    config = LoraConfig(r=optim.lora_rank, lora_alpha=optim.lora_alpha, lora_dropout=0.0, bias="none",
                        target_modules=_target_pattern(optim.lora_targets))
    inject_adapter_in_model(config, model)
    for name, param in model.named_parameters():
        param.requires_grad_(plain_name(name) not in frozen)


def plain_name(name: str) -> str:
    """A wrapped base weight's name as the model without adapters calls it."""
    return name.replace(".base_layer.", ".")


def with_lora(source: ModelSource, optim: OptimConfig) -> ModelSource:
    """``source`` with LoRA adapters on every build; base weights take the values ``source`` gives their plain
    names (its initialisation, or model.init_from), adapters A the model's initialisation and B zeros."""

    def initial_value(model: nn.Module, name: str, shape: torch.Size) -> torch.Tensor:
        if ".lora_B." in name:
            return torch.zeros(shape)
        return source.initial_value(model, plain_name(name), shape)

    def build(complete: bool) -> nn.Module:
        model = source.build(complete)
        add_lora(model, optim)
        if complete:
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if ".lora_" in name:
                        param.copy_(initial_value(model, name, param.shape))
        return model

    return ModelSource(build, initial_value, source.lazy)


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight (peft's merge) and put the base layer back in its place: the model's
    parameters then have the plain names and it computes what the adapted model computed."""
    from peft.tuners.lora import LoraLayer

    wrapped = [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLayer)]
    for name, module in wrapped:
        module.merge()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, module.get_base_layer())


def merged_state_dict(state: dict[str, torch.Tensor], model_config: ModelConfig,
                      optim: OptimConfig) -> dict[str, torch.Tensor]:
    """A LoRA run's full state dict (wrapped names) as the merged model's, in plain names, in fp32."""
    from tape_pretrain.models import build_model

    model = build_model(model_config, initialise=False)
    add_lora(model, optim)
    model.load_state_dict({k: v.detach().to("cpu", torch.float32) for k, v in state.items()}, strict=True)
    merge_lora(model)
    return model.state_dict()
