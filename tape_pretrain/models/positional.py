"""The registry of positional encodings: `model.positional.name` -> class."""

from __future__ import annotations

from .alibi import ALiBi
from .fire import FIRE
from .nope import NoPE
from .positional_base import DocumentLayout, PositionalEncoding, PositionalLayer
from .randrope import RandRoPE
from .rope import RoPE
from .tape import TAPE
from .xpos import XPos

REGISTRY: dict[str, type[PositionalEncoding]] = {
    cls.name: cls for cls in (TAPE, RoPE, NoPE, ALiBi, FIRE, XPos, RandRoPE)
}

__all__ = ["REGISTRY", "DocumentLayout", "PositionalEncoding", "PositionalLayer"]
