"""The Hugging Face configuration of a tape_pretrain model (every encoding but RoPE, whose exports are stock Llama).

Shipped unchanged into every such export beside modeling_tape_pretrain.py, the model's own modules and config.json,
whose ``auto_map`` names this class: ``AutoConfig.from_pretrained(DIR, trust_remote_code=True)`` loads it where
tape_pretrain is not installed. It imports only transformers, the standard library and, relatively, model_config.

The model is defined by one section, ``tape_pretrain``: the ModelConfig fields as the run resolved them. The standard
attributes (vocab_size, hidden_size, num_hidden_layers, ...) are derived from it for the tools that read them
(lm-evaluation-harness reads max_position_embeddings; generate reads the special token ids).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from transformers import PretrainedConfig

from .model_config import ModelConfig, model_config_from_dict, resolve_model_config


class TapePretrainConfig(PretrainedConfig):
    model_type = "tape_pretrain"

    def __init__(self, tape_pretrain: dict[str, Any] | None = None, bos_token_id: int | None = 1,
                 eos_token_id: int | None = 2, pad_token_id: int | None = 3, **kwargs):
        model = resolve_model_config(model_config_from_dict(tape_pretrain or {}))
        self.tape_pretrain = dataclasses.asdict(model)
        self.vocab_size = model.vocab_size
        self.hidden_size = model.hidden_size
        self.num_hidden_layers = model.num_layers
        self.num_attention_heads = model.num_heads
        self.intermediate_size = model.ffn_hidden_size
        self.max_position_embeddings = model.max_seq_len  # the training length; the encodings may extrapolate
        self.rms_norm_eps = model.norm_eps
        # The output projection is a weight of its own: tying it to the embedding would replace trained weights.
        kwargs["tie_word_embeddings"] = False
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)

    def model_config(self) -> ModelConfig:
        return model_config_from_dict(self.tape_pretrain)
