"""`tape-pretrain inspect model`: parameters, positional parameters and FLOPs of a preset or config."""

from __future__ import annotations

from pathlib import Path

from tape_pretrain.config import ModelConfig, PositionalConfig, load_config
from tape_pretrain.models import build_model
from tape_pretrain.models.presets import PRESETS


def model_config_from(name_or_config: str, positional: str | None) -> ModelConfig:
    if name_or_config in PRESETS:
        config = ModelConfig(preset=name_or_config)
    elif Path(name_or_config).is_file():
        config = load_config(name_or_config).model
    else:
        from tape_pretrain.config import ConfigError

        raise ConfigError(f"{name_or_config!r} is neither a preset ({', '.join(PRESETS)}) nor a config file")
    if positional:
        config.positional = PositionalConfig(name=positional)
    return config


def inspect_model(name_or_config: str, seq_len: int | None = None, positional: str | None = None) -> str:
    import torch

    base = model_config_from(name_or_config, positional)
    names = [base.positional.name] if positional else ["rope", "tape"]
    lines = []
    with torch.device("meta"):  # shapes only: a 7B model inspects instantly and without memory
        for name in names:
            config = ModelConfig(**{**base.__dict__, "positional": PositionalConfig(
                **{**base.positional.__dict__, "name": name})})
            model = build_model(config)
            n = seq_len or model.config.max_seq_len
            flops = model.forward_flops_per_token(n)
            c = model.config
            lines.append(
                f"{name:>8}: parameters={model.num_parameters():,} "
                f"positional_parameters={model.num_positional_parameters():,} "
                f"forward_flops_per_token@{n}={flops:,.0f} "
                f"(d={c.hidden_size} L={c.num_layers} H={c.num_heads} d_ff={c.ffn_hidden_size} V={c.vocab_size})")
    return "\n".join(lines)
