"""The size ladder. A preset fills the model fields that a config leaves unset."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tape_pretrain.config import ConfigError, ModelConfig, RunConfig, from_dict, load_config

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


EXPORT_CONFIG = "config.json"
"""An export directory's config file; its ``tape_pretrain`` section holds the ModelConfig fields."""

ModelSource = RunConfig | ModelConfig | Mapping[str, Any] | str | os.PathLike
"""What ``resolve_model_config_from`` accepts."""


def resolve_model_config_from(source: ModelSource, *, vocab_size: int | None = None, check_vocab: bool = True,
                              positional: str | None = None) -> ModelConfig:
    """The ModelConfig, every size field set, of the model that ``source`` describes:

    - a RunConfig: the model its training builds: ``model.max_seq_len`` unset means ``trainer.seq_len``;
    - a ModelConfig, as given;
    - a mapping of ModelConfig fields as recorded (a checkpoint's model identity, an export's config): keys added to
      ModelConfig since take their defaults, unknown keys are a ConfigError;
    - a string or path: an export directory (its config.json; CheckpointError when it is not one), a run config
      file (as a RunConfig), or a preset name.

    ``vocab_size`` (the dataset tokenizer's) fills an unset ``vocab_size``; a different one already set is a
    DataError, or with ``check_vocab=False`` kept (a study plans the budget of a run whose training reports it).
    ``positional`` names another encoding, the other ``model.positional`` fields kept.
    """
    if isinstance(source, RunConfig):
        model = dataclasses.replace(source.model)
        if model.max_seq_len is None:
            model.max_seq_len = source.trainer.seq_len
    elif isinstance(source, ModelConfig):
        model = dataclasses.replace(source)
    elif isinstance(source, Mapping):
        model = from_dict(ModelConfig, dict(source), "model")
    elif isinstance(source, str | os.PathLike):
        return resolve_model_config_from(_model_source_at(source), vocab_size=vocab_size, check_vocab=check_vocab,
                                         positional=positional)
    else:
        raise TypeError(f"not a model source: {type(source).__name__}")
    if vocab_size is not None:
        if model.vocab_size is None:
            model.vocab_size = vocab_size
        elif model.vocab_size != vocab_size and check_vocab:
            from tape_pretrain.errors import DataError

            raise DataError(f"model.vocab_size={model.vocab_size} but the dataset's tokenizer has {vocab_size} ids "
                            "(wrong tokenizer or dataset?)")
    if positional is not None:
        model.positional = dataclasses.replace(model.positional, name=positional)
    return resolve_model_config(model)


def _model_source_at(source: str | os.PathLike) -> RunConfig | ModelConfig | dict:
    """An export directory's recorded model fields, a run config file's RunConfig, or a preset's ModelConfig (an
    export or a file wins over a preset of the same name)."""
    from tape_pretrain.errors import CheckpointError

    path = Path(source)
    config = path / EXPORT_CONFIG
    if config.is_file():
        try:
            meta = json.loads(config.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{config}: not valid JSON ({exc})") from None
        if not isinstance(meta, dict) or not isinstance(meta.get("tape_pretrain"), dict):
            raise CheckpointError(f"{config}: not written by tape-pretrain export")
        try:
            return from_dict(ModelConfig, meta["tape_pretrain"], "model")
        except ConfigError as exc:
            raise CheckpointError(f"{config}: not a valid model config ({exc})") from None
    if path.is_file():
        return load_config(path)
    if str(source) in PRESETS:
        return ModelConfig(preset=str(source))
    if path.is_dir():
        raise CheckpointError(f"{source}: not an export (no {EXPORT_CONFIG})")
    raise ConfigError(f"{str(source)!r} is neither a preset ({', '.join(PRESETS)}), a run config file nor an export "
                      "directory")
