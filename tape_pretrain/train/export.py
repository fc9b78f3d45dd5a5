"""Consolidated exports: a directory with model.safetensors, config.json and tokenizer.model that loads
without any training engine. RoPE exports use the Hugging Face Llama layout and load in stock transformers."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tape_pretrain.config import ModelConfig, PositionalConfig, from_dict, to_dict
from tape_pretrain.errors import CheckpointError
from tape_pretrain.models import Transformer, build_model
from tape_pretrain.models.convert import to_hf_llama

WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.json", "tokenizer.model"


def save_export(state_dict: dict[str, torch.Tensor], model_config: ModelConfig, out: Path,
                tokenizer_bytes: bytes | None) -> None:
    """Write an export directory from a full (unsharded) state dict in our naming."""
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state_dict.items()}
    meta = {"tape_pretrain": to_dict(dataclasses.replace(model_config, init_from=None))}
    if model_config.positional.name == "rope":
        model = build_model(meta_config(meta))
        model.load_state_dict(state)
        hf_state, hf_config = to_hf_llama(model)
        save_file(hf_state, out / WEIGHTS, metadata={"format": "pt"})
        meta.update(hf_config)
    else:
        save_file(state, out / WEIGHTS, metadata={"format": "pt"})
    (out / CONFIG).write_text(json.dumps(meta, indent=1, sort_keys=True))
    if tokenizer_bytes:
        (out / TOKENIZER).write_bytes(tokenizer_bytes)


def meta_config(meta: dict) -> ModelConfig:
    raw = dict(meta["tape_pretrain"])
    raw["positional"] = PositionalConfig(**raw["positional"])
    return from_dict(ModelConfig, raw)


def load_export_model(directory: str) -> Transformer:
    """Our model, with weights, from an export directory."""
    path = Path(directory)
    if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
        raise CheckpointError(f"{directory}: not an export (needs {CONFIG} and {WEIGHTS})")
    meta = json.loads((path / CONFIG).read_text())
    if "tape_pretrain" not in meta:
        raise CheckpointError(f"{directory}/{CONFIG}: not written by tape-pretrain export")
    model = build_model(meta_config(meta))
    load_export_weights(model, directory)
    return model.eval()


def load_export_weights(model: Transformer, directory: str) -> None:
    state = load_file(str(Path(directory) / WEIGHTS))
    state = {k.removeprefix("model."): v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{directory}: weights do not fit the model config: {exc}") from None


def export_checkpoint(checkpoint: str, out: str) -> None:
    """Export the consolidated weights a training run saved next to its checkpoint."""
    path = Path(checkpoint)
    source = path / "export" if (path / "export" / WEIGHTS).exists() else path
    if not (source / WEIGHTS).exists():
        raise CheckpointError(f"{checkpoint}: has no consolidated weights (runs write them at the end, in "
                              "RUN_DIR/export; sharded mid-run checkpoints are not consolidated offline yet)")
    import shutil

    shutil.copytree(source, out, dirs_exist_ok=True)
    print(f"exported {source} to {out}")
