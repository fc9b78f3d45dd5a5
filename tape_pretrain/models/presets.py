"""The size ladder. A preset fills the model fields that a config leaves unset."""

from __future__ import annotations

import dataclasses

from tape_pretrain.config import ConfigError, ModelConfig

PRESETS: dict[str, dict[str, int]] = {
    # ~1.9M parameters with vocab 4096: trains on a 2-core CPU in minutes.
    "tiny": dict(vocab_size=4096, hidden_size=128, num_layers=4, num_heads=4, ffn_hidden_size=352,
                 max_seq_len=256),
    # The paper's "155M" (TAPE.md section 1): 162,417,408 parameters with RoPE.
    "paper-155m": dict(vocab_size=32000, hidden_size=768, num_layers=12, num_heads=12, ffn_hidden_size=3072,
                       max_seq_len=1024),
    "350m": dict(vocab_size=32000, hidden_size=1024, num_layers=24, num_heads=16, ffn_hidden_size=4096,
                 max_seq_len=1024),
    "760m": dict(vocab_size=32000, hidden_size=1536, num_layers=24, num_heads=16, ffn_hidden_size=6144,
                 max_seq_len=1024),
    "1.3b": dict(vocab_size=32000, hidden_size=2048, num_layers=24, num_heads=32, ffn_hidden_size=8192,
                 max_seq_len=2048),
    # Llama-2-7B shape.
    "7b": dict(vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32, ffn_hidden_size=11008,
               max_seq_len=4096),
}


def resolve_model_config(config: ModelConfig) -> ModelConfig:
    """Return a copy with every size field set: explicit fields win over the preset's."""
    base = {}
    if config.preset is not None:
        if config.preset not in PRESETS:
            raise ConfigError(f"model.preset: unknown preset {config.preset!r} (known: {', '.join(PRESETS)})")
        base = PRESETS[config.preset]
    values = {}
    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "ffn_hidden_size", "max_seq_len"):
        value = getattr(config, name)
        if value is None:
            value = base.get(name)
        if value is None:
            raise ConfigError(f"model.{name} is not set and no model.preset provides it")
        if value <= 0:
            raise ConfigError(f"model.{name} must be positive, got {value}")
        values[name] = value
    if values["hidden_size"] % values["num_heads"]:
        raise ConfigError(f"model.hidden_size={values['hidden_size']} is not divisible by "
                          f"model.num_heads={values['num_heads']}")
    if (values["hidden_size"] // values["num_heads"]) % 2:
        raise ConfigError("model head dim (hidden_size / num_heads) must be even for rotary encodings")
    return dataclasses.replace(config, **values)
