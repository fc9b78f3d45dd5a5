"""What a resumed run must share with the checkpoint it resumes from (its resume identity), and the check that
refuses anything else unless checkpoint.allow_changes waives it."""

from __future__ import annotations

import dataclasses

from tape_pretrain.config import ModelConfig, RunConfig, to_dict, with_later_defaults
from tape_pretrain.errors import CheckpointError
from tape_pretrain.models.presets import resolve_model_config_from
from tape_pretrain.train.lora import lora_identity, uses_lora
from tape_pretrain.train.schedule import Curriculum


def resolve_run_model_config(config: RunConfig, vocab_size: int) -> ModelConfig:
    """The model a run trains: its model section, the dataset tokenizer's vocabulary, max_seq_len defaulting to
    trainer.seq_len (DataError when the model's vocab_size disagrees with the tokenizer's)."""
    return resolve_model_config_from(config, vocab_size=vocab_size)


def run_curriculum(config: RunConfig) -> Curriculum:
    """The run's context-length curriculum (its fingerprint is part of the resume identity)."""
    t = config.trainer
    return Curriculum(config.curriculum, t.seq_len, t.max_steps * t.global_batch_tokens)


IMPLEMENTATION_ONLY_POSITIONAL_KEYS = ("tape_attention", "randrope_eval", "randrope_eval_seed")
"""model.positional keys that leave the training computation unchanged (how TAPE's attention is computed; which
positions RandPE evaluates at): a run may resume with another value."""


def _with_defaults_of_later_keys(saved_model: dict) -> dict:
    """A checkpoint's model identity with the keys added to ModelConfig / PositionalConfig since it was written set
    to their defaults (a new key's default keeps the old model), compared as resume_identity makes it."""
    model = with_later_defaults(saved_model, to_dict(ModelConfig(preset=None)))
    for key in IMPLEMENTATION_ONLY_POSITIONAL_KEYS:
        model["positional"].pop(key, None)
    return model


def resume_identity(config: RunConfig, vocab_size: int) -> dict:
    """What `Trainer.trainer_state` records of a run that a resumed run must match: the model, the global batch
    and window length, the curriculum, the engine and optim.trainable (compared by check_resume_compatible)."""
    model = to_dict(dataclasses.replace(resolve_run_model_config(config, vocab_size), init_from=None))
    for key in IMPLEMENTATION_ONLY_POSITIONAL_KEYS:
        model["positional"].pop(key, None)
    return {
        "model": model,
        "global_batch_tokens": config.trainer.global_batch_tokens,
        "seq_len": config.trainer.seq_len,
        "curriculum": run_curriculum(config).fingerprint(),
        "engine": config.parallel.engine,
        "trainable": list(config.optim.trainable),
        **({"lora": lora_identity(config.optim)} if uses_lora(config.optim.trainable) else {}),
    }


def check_resume_compatible(saved: dict, current: dict, allowed: set[str]) -> None:
    """Refuse to resume from a checkpoint whose trainer state `saved` differs from this run's resume identity
    `current` (see resume_identity), except in the checks named in `allowed` (checkpoint.allow_changes).
    The engine and optim.trainable are never waived: its checkpoint format, or its optimizer state, differs."""
    saved_model = _with_defaults_of_later_keys(saved["model"])
    if "model" not in allowed and saved_model != current["model"]:
        diff = sorted(k for k in current["model"] if current["model"][k] != saved_model.get(k) and k != "positional")
        diff += sorted(f"positional.{k}" for k, v in current["model"]["positional"].items()
                       if v != saved_model["positional"].get(k))
        # keys only the checkpoint has (written by a newer version, or renamed since)
        diff += sorted(k for k in saved_model if k not in current["model"])
        diff += sorted(f"positional.{k}" for k in saved_model["positional"] if k not in current["model"]["positional"])
        raise CheckpointError(f"the checkpoint's model differs in {', '.join(diff)} "
                              "(add 'model' to checkpoint.allow_changes if intended)")
    if "batch" not in allowed and (saved["global_batch_tokens"], saved["seq_len"]) != (
            current["global_batch_tokens"], current["seq_len"]):
        raise CheckpointError(
            f"the checkpoint used global_batch_tokens={saved['global_batch_tokens']} seq_len={saved['seq_len']}; "
            "this run differs (add 'batch' to checkpoint.allow_changes if intended)")
    if "curriculum" not in allowed and saved["curriculum"] != current["curriculum"]:
        raise CheckpointError("the checkpoint's curriculum differs from this run's "
                              "(add 'curriculum' to checkpoint.allow_changes if intended)")
    if saved["engine"] != current["engine"]:
        raise CheckpointError(f"the checkpoint was written by {saved['engine']}, this run uses "
                              f"{current['engine']}: export it and start with model.init_from")
    saved_trainable = saved.get("trainable", ["all"])  # written before optim.trainable existed: everything trained
    if sorted(set(saved_trainable)) != sorted(set(current["trainable"])):
        # never waived: the optimizer state holds exactly the parameters that trained
        raise CheckpointError(f"the checkpoint trained optim.trainable=[{', '.join(saved_trainable)}], this run "
                              f"asks for [{', '.join(current['trainable'])}]: its optimizer state would not fit; "
                              "resume with the checkpoint's optim.trainable, or export it and start a new run with "
                              "model.init_from")
    if saved.get("lora") != current.get("lora"):
        raise CheckpointError(f"the checkpoint's LoRA adapters {saved.get('lora')} differ from this run's "
                              f"{current.get('lora')} (optim.lora_*): resume with the checkpoint's settings")
