"""The size ladder. A preset fills the model fields that a config leaves unset."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tape_pretrain.config import ConfigError, ModelConfig, RunConfig, from_dict, load_config
from tape_pretrain.models.model_config import PRESETS as PRESETS
from tape_pretrain.models.model_config import resolve_model_config as resolve_model_config

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
        from tape_pretrain.models.llama_import import is_hf_llama, with_llama_shape

        if is_hf_llama(model.init_from):  # its sizes, not a preset's
            model = with_llama_shape(model)
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
