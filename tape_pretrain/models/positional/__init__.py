"""The registry of positional encodings: `model.positional.name` -> class."""

from __future__ import annotations

from tape_pretrain.models.positional.alibi import ALiBi
from tape_pretrain.models.positional.base import DocumentLayout, PositionalEncoding, PositionalLayer
from tape_pretrain.models.positional.fire import FIRE
from tape_pretrain.models.positional.nope import NoPE
from tape_pretrain.models.positional.randrope import RandRoPE
from tape_pretrain.models.positional.rope import RoPE
from tape_pretrain.models.positional.tape import TAPE
from tape_pretrain.models.positional.xpos import XPos

REGISTRY: dict[str, type[PositionalEncoding]] = {
    cls.name: cls for cls in (TAPE, RoPE, NoPE, ALiBi, FIRE, XPos, RandRoPE)
}

__all__ = ["REGISTRY", "DocumentLayout", "PositionalEncoding", "PositionalLayer"]
