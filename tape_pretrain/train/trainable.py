"""What trains (optim.trainable): presets and fnmatch patterns over the model's parameter names, resolved against the
model and applied to every construction of it (requires_grad_(False) on the rest) before any engine builds its
optimizer. Parameters the model freezes itself (TAPE's last-layer update weights) stay frozen whatever is selected."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable

from torch import nn

from tape_pretrain.config import ConfigError, ModelConfig
from tape_pretrain.distributed.engine import ModelSource


def _all(model_config: ModelConfig) -> list[str]:
    return ["*"]


def _tape(model_config: ModelConfig) -> list[str]:
    # TAPE.md section 8's parameter-efficient set: the MLP-side state update, embeddings and every RMSNorm weight.
    # The attention-side update (post_attention_linear) stays frozen at its zero init, gamma = 0.
    if model_config.positional.name != "tape":
        raise ConfigError(f"optim.trainable: the tape preset needs model.positional.name=tape, not "
                          f"{model_config.positional.name!r}")
    return ["layers.*.positional.pe.*", "embed_tokens.*", "*norm.weight"]


def _lora(model_config: ModelConfig) -> list[str]:
    # The adapters that train.lora adds (to a model built with them: "lora" in optim.trainable adds them).
    return ["layers.*.lora_A.*", "layers.*.lora_B.*"]


PRESETS: dict[str, Callable[[ModelConfig], list[str]]] = {"all": _all, "tape": _tape, "lora": _lora}
"""Preset name -> the patterns it selects for a model config (or a ConfigError). A new preset is one line here."""

GLOB = set("*?[")


def is_pattern(entry: str) -> bool:
    """A pattern names parameters (every parameter name has a dot) or globs; anything else is a preset name."""
    return "." in entry or bool(GLOB & set(entry))


def check_entries(entries: list[str]) -> None:
    """The checks that need no model (config validation): something is listed, and every preset name is known."""
    if not entries:
        raise ConfigError("optim.trainable is empty: nothing would train (the default is [all])")
    for entry in entries:
        if not is_pattern(entry) and entry not in PRESETS:
            raise ConfigError(f"optim.trainable: unknown preset {entry!r} (presets: {', '.join(PRESETS)}; or an "
                              "fnmatch pattern over parameter names, such as 'layers.*.mlp.*')")


def trainable_names(model: nn.Module, entries: Iterable[str], model_config: ModelConfig) -> set[str]:
    """The names of ``model``'s parameters that optim.trainable ``entries`` select and the model does not freeze
    itself. One ConfigError naming the entry for an unknown preset, a pattern that matches no parameter (or only
    parameters the model keeps frozen), or a selection that leaves nothing trainable."""
    entries = list(entries)
    check_entries(entries)
    names = [name for name, _ in model.named_parameters()]
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    selected: set[str] = set()
    for entry in entries:
        if is_pattern(entry):
            matched = set(fnmatch.filter(names, entry))
            if not matched:
                raise ConfigError(f"optim.trainable: {entry!r} matches no parameter of this model (names look like "
                                  f"{', '.join(map(repr, names[:2] + names[-1:]))})")
            if not matched & trainable:
                raise ConfigError(f"optim.trainable: {entry!r} matches only parameters the model keeps frozen")
        else:
            matched = {name for pattern in PRESETS[entry](model_config) for name in fnmatch.filter(names, pattern)}
        selected |= matched & trainable
    if not selected:
        raise ConfigError(f"optim.trainable: [{', '.join(entries)}] leaves nothing trainable")
    return selected


def apply_trainable(model: nn.Module, names: set[str]) -> None:
    """Freeze every parameter of ``model`` not in ``names`` (never unfreezes one)."""
    for name, param in model.named_parameters():
        if name not in names:
            param.requires_grad_(False)


def with_trainable(source: ModelSource, names: set[str]) -> ModelSource:
    """``source`` whose every build (whole, on the meta device, or partitioned) trains only ``names``."""
    def build(complete: bool) -> nn.Module:
        model = source.build(complete)
        apply_trainable(model, names)
        return model

    return ModelSource(build, source.initial_value, source.lazy)


def trainable_summary(model: nn.Module, entries: list[str]) -> str:
    """One log line: how many parameters train and how many are frozen (``model`` may be on the meta device)."""
    train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return (f"optim.trainable [{', '.join(entries)}]: {train:,} parameters train, {frozen:,} frozen "
            f"({train / max(train + frozen, 1):.1%} trainable)")
