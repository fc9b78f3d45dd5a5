"""Single-device model code: the decoder, positional encodings, presets and converters."""

from tape_pretrain.models.transformer import Transformer, build_model

__all__ = ["Transformer", "build_model"]
