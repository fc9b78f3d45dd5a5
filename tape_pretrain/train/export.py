"""Consolidated exports: a directory with model.safetensors, config.json and tokenizer.model that loads
without any training engine. RoPE exports use the Hugging Face Llama layout and load in stock transformers."""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tape_pretrain.config import ConfigError, ModelConfig, to_dict
from tape_pretrain.distributed.engine import engine_class
from tape_pretrain.distributed.env import DistEnv
from tape_pretrain.errors import CheckpointError
from tape_pretrain.models import Transformer, build_model
from tape_pretrain.models.convert import to_hf_llama
from tape_pretrain.models.presets import EXPORT_CONFIG, resolve_model_config_from
from tape_pretrain.train.checkpoint import COMPLETE, CheckpointManager, verify_checkpoint
from tape_pretrain.train.run_dir import RunDirectory
from tape_pretrain.utils.progress import Phases, format_duration

WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", EXPORT_CONFIG, "tokenizer.model"


def save_export(state_dict: dict[str, torch.Tensor], model_config: ModelConfig, out: Path,
                tokenizer_bytes: bytes | None) -> None:
    """Write an export directory from a full (unsharded) state dict in our naming."""
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state_dict.items()}
    model_config = dataclasses.replace(model_config, init_from=None)
    meta = {"tape_pretrain": to_dict(model_config)}
    if model_config.positional.name == "rope":
        model = build_model(model_config)
        model.load_state_dict(state)
        hf_state, hf_config = to_hf_llama(model)
        save_file(hf_state, out / WEIGHTS, metadata={"format": "pt"})
        meta.update(hf_config)
    else:
        save_file(state, out / WEIGHTS, metadata={"format": "pt"})
    (out / CONFIG).write_text(json.dumps(meta, indent=1, sort_keys=True))
    if tokenizer_bytes:
        (out / TOKENIZER).write_bytes(tokenizer_bytes)


def load_export_model(directory: str) -> Transformer:
    """Our model, with weights, from an export directory."""
    path = Path(directory)
    if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
        raise CheckpointError(f"{directory}: not an export (needs {CONFIG} and {WEIGHTS})")
    try:
        model = build_model(resolve_model_config_from(path))
    except (TypeError, KeyError, ValueError) as exc:  # sizes that no model has (ConfigError)
        raise CheckpointError(f"{directory}/{CONFIG}: not a valid model config ({exc})") from None
    load_export_weights(model, directory)
    return model.eval()


def load_export_weights(model: Transformer, directory: str) -> None:
    path = Path(directory) / WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"{directory}: no {WEIGHTS} (model.init_from must be an export directory)")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    state = {k.removeprefix("model."): v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{directory}: weights do not fit the model config: {exc}") from None


def _find_checkpoint(checkpoint: str, staging_root: str) -> tuple[Path, dict]:
    """A checkpoint directory as given, or a run directory's (local or remote) newest one that verifies, picked
    exactly as training's resume picks it; a remote one is downloaded under staging_root."""
    path = Path(checkpoint)
    is_run_dir = "://" in checkpoint or (not (path / COMPLETE).exists() and (path / "checkpoints").is_dir())
    if not is_run_dir:
        return path, verify_checkpoint(path)
    one_process = DistEnv(0, 1, 0, 1, torch.device("cpu"), "gloo")
    found = CheckpointManager(RunDirectory(checkpoint, staging_root=staging_root), one_process).latest_valid()
    if found is None:
        raise CheckpointError(f"{checkpoint}: no complete checkpoint")
    return found


def export_checkpoint(checkpoint: str, out: str, overwrite: bool = False) -> None:
    """Export a checkpoint directory (or a run directory: its newest complete checkpoint), whatever its engine
    and world size, to a consolidated export. Files are verified against files.json before anything loads."""
    if "://" in out:
        raise CheckpointError(f"--out {out}: export writes a local directory (copy it to object storage after)")
    _check_export_destination(Path(out), overwrite)
    phases = Phases("export")
    with tempfile.TemporaryDirectory(prefix="tape_pretrain_export_") as staging:
        path, state = _find_checkpoint(checkpoint, staging)
        phases.done(f"verified the checkpoint {path}")
        _export(path, state, out, phases)


EXPORT_FILES = (WEIGHTS, CONFIG, TOKENIZER)


def _check_export_destination(out: Path, overwrite: bool) -> None:
    """Never into a run or checkpoint directory (a run's config.json would be replaced; a file added to a checkpoint
    fails its verification on the next resume), and into a non-empty directory only when told."""
    if out.is_file():
        raise CheckpointError(f"--out {out} is a file; give a directory for the export")
    resolved = out.expanduser().resolve()
    for directory in (resolved, *resolved.parents):
        if (directory / COMPLETE).exists() or (directory / "files.json").exists():
            raise CheckpointError(f"--out {out} is inside the checkpoint {directory}: export elsewhere")
    if (resolved / "checkpoints").is_dir() or (resolved / "metrics.jsonl").exists():
        raise CheckpointError(f"--out {out} is a run directory: export elsewhere (every finished run already has "
                              "RUN_DIR/export)")
    if resolved.is_dir() and any(resolved.iterdir()) and not overwrite:
        raise CheckpointError(f"--out {out} is not empty; pass --overwrite to replace an export there")


def _export(path: Path, state: dict, out: str, phases: Phases) -> None:
    model_config = resolve_model_config_from(state["model"])
    # Built as the run built its model (its seed, or its model.init_from): parameters that a checkpoint lacks
    # (DeepSpeed does not save frozen ones) get the values the run started from, which, frozen, it still had.
    run_config = state.get("config", {})
    torch.manual_seed(int(run_config.get("seed", 0)))
    model = build_model(model_config)
    init_from = run_config.get("model", {}).get("init_from")
    if init_from and (Path(init_from) / WEIGHTS).is_file():
        try:
            load_export_weights(model, init_from)
        except CheckpointError as exc:  # only frozen parameters' values are at stake: never read by the model
            print(f"warning: model.init_from of the run is unusable ({exc}); frozen parameters missing from the "
                  "checkpoint take their seeded initial values")
    try:
        engine = engine_class(state["engine"])
    except ConfigError:
        raise CheckpointError(f"{path}: written by an engine this version does not know "
                              f"({state['engine']!r})") from None
    weights = engine.consolidate(str(path / "engine"), model)
    missing = set(model.state_dict()) - set(weights)
    if missing:  # frozen parameters (TAPE last-layer update weights) may be absent; their output is never read
        model_state = model.state_dict()
        frozen = {k for k, p in model.named_parameters() if not p.requires_grad}
        if missing - frozen:
            raise CheckpointError(f"{path}: consolidated weights lack {sorted(missing - frozen)[:3]}")
        weights = {**{k: model_state[k] for k in missing}, **weights}
    phases.done(f"consolidated the {state['engine']} checkpoint of {state['world_size']} rank(s)")
    tokenizer = None
    data = state.get("config", {}).get("data", {})
    data_path = data.get("path") or next((s.get("path") for s in data.get("sources") or []), None)  # a mixture's first
    if data_path:
        try:
            from tape_pretrain.data.manifest import TOKENIZER
            from tape_pretrain.data.storage import join, open_url, read_bytes

            fs, root = open_url(data_path)
            tokenizer = read_bytes(fs, join(root, TOKENIZER))
        except (OSError, ValueError, RuntimeError):
            print(f"warning: tokenizer of {data_path} not reachable; export has no tokenizer.model")
    for name in EXPORT_FILES:  # only now, with the new export in hand: a stale tokenizer.model must not survive
        (Path(out) / name).unlink(missing_ok=True)
    save_export(weights, model_config, Path(out), tokenizer)
    phases.done(f"wrote {out}")
    print(f"exported {path} (step {state['step']}, {state['engine']}, {state['world_size']} rank(s)) to {out} in "
          f"{format_duration(phases.elapsed())}")
