"""Single-device model code: the decoder, positional encodings, presets and converters.

The modules the model itself needs (model_config, transformer, cache, positional and the encodings) import only
torch, the standard library and each other, relatively: Hugging Face exports ship them unchanged
(train.export). ``Transformer`` and ``build_model`` load lazily so that ``tape_pretrain.config``, which takes the
model's dataclasses from model_config, does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tape_pretrain.models.transformer import Transformer, build_model

__all__ = ["Transformer", "build_model"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from tape_pretrain.models import transformer

        return getattr(transformer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
