"""Consolidated exports: a directory that loads without any training engine, and in the Hugging Face ecosystem.

model.safetensors (fp32), config.json, the tokenizer (tokenizer.model and the files AutoTokenizer reads) and a README
model card. RoPE exports use the Hugging Face Llama layout and load as stock LlamaForCausalLM. Every other encoding
loads with AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True): config.json's auto_map names the
project's own modeling_tape_pretrain.py, shipped byte for byte with the model modules it imports (models/), so the
export computes what the project computes, where tape_pretrain is not installed."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tape_pretrain import models
from tape_pretrain.config import ConfigError, ModelConfig, to_dict
from tape_pretrain.distributed.engine import engine_class
from tape_pretrain.distributed.env import DistEnv
from tape_pretrain.errors import CheckpointError
from tape_pretrain.models import Transformer, build_model
from tape_pretrain.models.convert import to_hf_llama
from tape_pretrain.models.presets import EXPORT_CONFIG, resolve_model_config_from
from tape_pretrain.train.checkpoint import COMPLETE, CheckpointManager, verify_checkpoint
from tape_pretrain.train.hf_tokenizer import write_hf_tokenizer
from tape_pretrain.train.model_card import TrainingFacts, final_val_loss, model_card
from tape_pretrain.train.run_dir import RunDirectory
from tape_pretrain.utils.progress import Phases, format_duration

WEIGHTS, CONFIG, TOKENIZER, CARD = "model.safetensors", EXPORT_CONFIG, "tokenizer.model", "README.md"
MODELS_PACKAGE = Path(models.__file__).parent
MODELING_FILE = "modeling_tape_pretrain.py"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
EXPORT_FILES = (WEIGHTS, CONFIG, TOKENIZER, CARD)
AUTO_MAP = {"AutoConfig": "configuration_tape_pretrain.TapePretrainConfig",
            "AutoModelForCausalLM": "modeling_tape_pretrain.TapePretrainForCausalLM"}
_RELATIVE_IMPORT = re.compile(r"^\s*from\s+\.(\w+)\s+import", re.MULTILINE)  # what transformers follows


def shipped_model_files() -> list[Path]:
    """The project's modules that an export of a non-RoPE model carries: the Hugging Face wrapper and everything it
    imports relatively, found as transformers' dynamic-module loader finds them (``from .name import``)."""
    found, pending = [], [MODELS_PACKAGE / MODELING_FILE]
    while pending:
        path = pending.pop()
        if path in found:
            continue
        found.append(path)
        pending += [MODELS_PACKAGE / f"{name}.py" for name in _RELATIVE_IMPORT.findall(path.read_text())]
    return sorted(found)


def _special_token_ids(tokenizer_bytes: bytes | None) -> dict[str, int | None]:
    if not tokenizer_bytes:
        return {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}  # what prep's tokenizers use
    from tape_pretrain.data.tokenizer import Tokenizer

    ids = Tokenizer.from_bytes(tokenizer_bytes).special_ids()
    return {f"{name}_token_id": (ids[f"{name}_id"] if ids[f"{name}_id"] >= 0 else None) for name in ("bos", "eos",
                                                                                                   "pad")}


def save_export(state_dict: dict[str, torch.Tensor], model_config: ModelConfig, out: Path,
                tokenizer_bytes: bytes | None, facts: TrainingFacts | None = None) -> None:
    """Write an export directory from a full (unsharded) state dict in our naming: weights, a Hugging Face
    config.json, the tokenizer (tokenizer.model and the files AutoTokenizer reads), the model card, and for every
    encoding but RoPE (stock Llama) the modeling code.

    Everything is written into a staging directory beside ``out`` first and moved in only when complete, so a
    failure leaves a previous export whole. Files of a previous export that this one does not write are removed;
    only those (export file names and shipped module names): the directory may hold the user's own files."""
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        written = _write_export(state_dict, model_config, staging, tokenizer_bytes, facts)
        ours = {*EXPORT_FILES, *TOKENIZER_FILES, *(p.name for p in shipped_model_files())}
        for name in ours - set(written):  # a previous export's (say, another encoding's modeling code)
            (out / name).unlink(missing_ok=True)
        for name in written:
            os.replace(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_export(state_dict: dict[str, torch.Tensor], model_config: ModelConfig, out: Path,
                  tokenizer_bytes: bytes | None, facts: TrainingFacts | None) -> list[str]:
    """The export's files, written into the (empty) directory ``out``; returns their names."""
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state_dict.items()}
    model_config = dataclasses.replace(model_config, init_from=None)
    meta = {"tape_pretrain": to_dict(model_config), **_special_token_ids(tokenizer_bytes)}
    model = build_model(model_config)
    model.load_state_dict(state)
    if model_config.positional.name == "rope":
        hf_state, hf_config = to_hf_llama(model)
        meta.update(hf_config)
        code: list[Path] = []
    else:
        hf_state = {f"model.{k}": v for k, v in state.items()}
        c = model.config  # the standard names, for tools that read config.json itself (the class derives them too)
        meta.update({"vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "num_hidden_layers": c.num_layers,
                     "num_attention_heads": c.num_heads, "intermediate_size": c.ffn_hidden_size,
                     "max_position_embeddings": c.max_seq_len, "rms_norm_eps": c.norm_eps})
        meta.update({"architectures": ["TapePretrainForCausalLM"], "model_type": "tape_pretrain", "auto_map": AUTO_MAP,
                     "tie_word_embeddings": False, "torch_dtype": "float32"})
        code = shipped_model_files()
    save_file(hf_state, out / WEIGHTS, metadata={"format": "pt"})
    (out / CONFIG).write_text(json.dumps(meta, indent=1, sort_keys=True))
    for path in code:
        shutil.copyfile(path, out / path.name)
    if tokenizer_bytes:
        (out / TOKENIZER).write_bytes(tokenizer_bytes)
        try:
            write_hf_tokenizer(out, tokenizer_bytes)
        except ValueError as exc:  # a SentencePiece model that tokenizer.json cannot reproduce exactly (Unigram)
            for name in TOKENIZER_FILES:
                (out / name).unlink(missing_ok=True)
            print(f"warning: the export has tokenizer.model but no Hugging Face tokenizer files ({exc}): "
                  "AutoTokenizer cannot load it; tape-pretrain and sentencepiece can")
    parameters = sum(p.numel() for p in model.parameters())
    (out / CARD).write_text(model_card(model.config, parameters, facts or TrainingFacts()))
    return sorted(p.name for p in out.iterdir())


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


@dataclasses.dataclass
class Consolidated:
    """A checkpoint as one process holds it: full fp32 weights in our naming, and what an export records."""

    weights: dict[str, torch.Tensor]
    model_config: ModelConfig
    tokenizer: bytes | None
    facts: TrainingFacts


def _export(path: Path, state: dict, out: str, phases: Phases) -> None:
    found = consolidate(path, state, phases)
    save_export(found.weights, found.model_config, Path(out), found.tokenizer, found.facts)
    phases.done(f"wrote {out}")
    print(f"exported {path} (step {state['step']}, {state['engine']}, {state['world_size']} rank(s)) to {out} in "
          f"{format_duration(phases.elapsed())}")


def consolidate(path: Path, state: dict, phases: Phases) -> Consolidated:
    """A verified checkpoint's full weights, whatever its engine and world size, with its tokenizer and facts."""
    model_config = resolve_model_config_from(state["model"])
    # Built as the run built its model (its seed, or its model.init_from): parameters that a checkpoint lacks
    # (DeepSpeed does not save frozen ones) get the values the run started from, which, frozen, it still had.
    run_config = state.get("config", {})
    torch.manual_seed(int(run_config.get("seed", 0)))
    model = build_model(model_config)
    init_from, init_error = run_config.get("model", {}).get("init_from"), None
    if init_from:
        from tape_pretrain.train.initial_weights import model_source

        try:
            # as the trainer does: the source first (it builds a meta model, drawing a number), then the seed
            source = model_source(dataclasses.replace(model_config, init_from=init_from))
            torch.manual_seed(int(run_config.get("seed", 0)))
            model = source.build(complete=True)
        except (CheckpointError, ConfigError, OSError) as exc:
            init_error = f"model.init_from of the run ({init_from}) is unusable: {exc}"
    from tape_pretrain.config import OptimConfig, from_dict
    from tape_pretrain.train.lora import add_lora, merge_lora, uses_lora
    from tape_pretrain.train.trainable import apply_trainable, trainable_names

    optim = from_dict(OptimConfig, run_config.get("optim", {}), "optim")
    lora = uses_lora(optim.trainable)
    if lora:  # the run's structure: its checkpoint holds the adapters and the wrapped base weights
        add_lora(model, optim)
    # frozen as the run froze it (optim.trainable): engines leave such parameters out, or hold them rounded to bf16
    apply_trainable(model, trainable_names(model, optim.trainable, model_config))
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
        if init_error and any(".positional." not in name for name in missing):
            # a frozen backbone's values exist only in model.init_from: random ones would be a silent wrong export
            raise CheckpointError(f"{path}: frozen parameters such as {sorted(missing)[0]} are not in the checkpoint "
                                  f"and {init_error}")
        weights = {**{k: model_state[k] for k in missing}, **weights}
    if lora:
        model.load_state_dict(weights, strict=True)
        merge_lora(model)  # exported as the plain model
        weights = model.state_dict()
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
    return Consolidated(weights, model_config, tokenizer, _checkpoint_facts(path, state))


def _checkpoint_facts(path: Path, state: dict) -> TrainingFacts:
    """Steps, tokens and data from the checkpoint; the val loss and eval table from its run directory when the
    checkpoint sits in one (RUN/checkpoints/step_N) locally."""
    step = int(state["step"])
    batch_tokens = state.get("config", {}).get("trainer", {}).get("global_batch_tokens")
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else None
    eval_md = run_dir / "eval" / path.name / "eval.md" if run_dir is not None else None  # this step's evaluation
    return TrainingFacts(
        steps=step, tokens=step * batch_tokens if isinstance(batch_tokens, int) else None,
        data_fingerprint=state.get("loader", {}).get("fingerprint"),
        final_val_loss=final_val_loss(run_dir / "metrics.jsonl", up_to_step=step) if run_dir is not None else None,
        eval_table=eval_md.read_text() if eval_md is not None and eval_md.is_file() else None)


@contextlib.contextmanager
def export_to_evaluate(source: str) -> Iterator[tuple[Path, Path | None]]:
    """(export directory, default results directory or None for "beside the export") for what ``eval`` is given: a
    run directory with an export, an export, or a checkpoint (a step directory, or a run directory without an
    export: its newest complete one), consolidated through its engine into a temporary export for the duration."""
    path = Path(source)
    if (path / "export" / CONFIG).is_file():
        yield path / "export", None
        return
    if (path / CONFIG).is_file() and (path / WEIGHTS).is_file():
        yield path, None
        return
    if "://" not in source and not (path / COMPLETE).exists() and not (path / "checkpoints").is_dir():
        raise CheckpointError(f"{source}: not a run directory, an export ({CONFIG} and {WEIGHTS}) or a checkpoint "
                              f"(a directory with {COMPLETE})")
    with tempfile.TemporaryDirectory(prefix="tape_pretrain_eval_") as staging:
        checkpoint, state = _find_checkpoint(source, str(Path(staging) / "checkpoint"))
        run_dir = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else None
        if "://" in source:
            run_dir = None  # a remote run's checkpoint was downloaded into the staging directory
        phases = Phases("eval")
        export = Path(staging) / "export"
        _export(checkpoint, state, str(export), phases)
        yield export, (run_dir / "eval" / checkpoint.name) if run_dir is not None else None


HUB_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")


def check_hub_repo_id(repo_id: str) -> None:
    """Before anything is exported: a Hub model repository is USER_OR_ORG/NAME."""
    if not HUB_REPO_ID.fullmatch(repo_id) or ".." in repo_id or repo_id.endswith((".git", ".")):
        raise ConfigError(f"--push-to-hub {repo_id!r}: not a Hub repository id (USER_OR_ORG/NAME: letters, digits, "
                          "'-', '_', '.')")


def push_to_hub(directory: str, repo_id: str, private: bool) -> None:
    """Upload an export to the Hugging Face Hub (created if missing), with the token huggingface_hub finds."""
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise ConfigError("--push-to-hub needs huggingface_hub (pip install huggingface_hub)") from None
    api = HfApi()
    # only what an export writes: a user's notes or credentials in the same directory stay local
    files = sorted({*EXPORT_FILES, *TOKENIZER_FILES, *(p.name for p in shipped_model_files())}
                   & {p.name for p in Path(directory).iterdir()})
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(folder_path=directory, repo_id=repo_id, repo_type="model", allow_patterns=files,
                          commit_message="Upload a tape_pretrain export")
    except Exception as exc:  # the hub's HTTP, auth and validation errors have no common base we could name
        from tape_pretrain.errors import StorageError

        raise StorageError(f"--push-to-hub {repo_id}: {type(exc).__name__}: {exc}") from None
    print(f"pushed {directory} to https://huggingface.co/{repo_id}")
