"""A thin Hugging Face ``PreTrainedModel`` around the project's own Transformer, for exports of every encoding but
RoPE (whose exports are stock ``LlamaForCausalLM``).

Shipped unchanged into each export with configuration_tape_pretrain.py and the model's modules (transformer, cache,
model_config, positional, the encodings), which import only torch and each other relatively: the export's logits
are the project's logits, computed by the same code, not by a second implementation of each encoding.

Caching: ``use_cache=True`` (what ``generate`` passes) returns the project's DecodeCache (models.cache) as the
output's cache (``past_key_values`` before transformers 5, ``cache`` since); passed back in, only the tokens after
``cache.length`` are computed. A plain forward (``use_cache`` unset, as lm-evaluation-harness scores) builds no cache
and runs exactly the project's forward. An encoding that cannot cache in eval mode (RandPE's sampled positions)
returns no cache, and ``generate`` then recomputes the prefix for every token, as the project's greedy decoding does.

Unsupported, each refused with a ValueError rather than computed wrongly: padded batches (an ``attention_mask`` with
zeros: positions would start at the padding), ``position_ids``, ``inputs_embeds``.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

# transformers 4 copies into its module cache only this file's relative imports, not theirs: every module the model
# needs is imported here (the "__name__ as _x" ones only for that; transformers 5 follows imports transitively).
from .alibi import __name__ as _alibi  # noqa: F401
from .blocked_bias import __name__ as _blocked_bias  # noqa: F401
from .cache import DecodeCache
from .configuration_tape_pretrain import TapePretrainConfig
from .fire import __name__ as _fire  # noqa: F401
from .model_config import __name__ as _model_config  # noqa: F401
from .nope import __name__ as _nope  # noqa: F401
from .positional import __name__ as _positional  # noqa: F401
from .positional_base import __name__ as _positional_base  # noqa: F401
from .randrope import __name__ as _randrope  # noqa: F401
from .rope import __name__ as _rope  # noqa: F401
from .tape import __name__ as _tape  # noqa: F401
from .transformer import Block, Transformer
from .xpos import __name__ as _xpos  # noqa: F401

# The output field and generate's model_kwargs key of the cache: "cache" since transformers 5, else past_key_values.
CACHE_KEY = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


class TapePretrainForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = TapePretrainConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = [Block.__name__]
    _supports_cache_class = False  # transformers 4: never hand this model a DynamicCache

    def __init__(self, config: TapePretrainConfig):
        super().__init__(config)
        # Under from_pretrained the parameters are built on the meta device and then loaded: no initial values.
        initialise = torch.empty(0).device.type != "meta"
        self.model = Transformer(config.model_config(), initialise=initialise)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the cache is the model's own DecodeCache, made by forward

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Every weight is in model.safetensors, and a model built outside from_pretrained was initialised by the
        Transformer itself: nothing to do (re-initialising here would overwrite loaded weights)."""

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: torch.nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> torch.nn.Linear:
        return self.model.lm_head

    def set_output_embeddings(self, value: torch.nn.Linear) -> None:
        self.model.lm_head = value

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                cache: DecodeCache | None = None, past_key_values: DecodeCache | None = None,
                use_cache: bool | None = None, labels: torch.LongTensor | None = None, logits_to_keep: int = 0,
                position_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                return_dict: bool | None = None, **unused) -> CausalLMOutputWithPast:
        """Logits of input_ids [B,N]: all N positions, or the last ``logits_to_keep``; with ``labels`` also the
        mean next-token cross-entropy (labels -100 ignored), in fp32."""
        if input_ids is None or inputs_embeds is not None:
            raise ValueError("this model takes input_ids (inputs_embeds is not supported)")
        if position_ids is not None:
            raise ValueError("position_ids is not supported: positions are 0.. in each row (after any cache)")
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("padded batches are not supported (positions would count the padding): pass rows of "
                             "equal length, or one row at a time")
        past = cache if cache is not None else past_key_values
        if past is not None and not isinstance(past, DecodeCache):
            raise ValueError(f"cache is a {type(past).__name__}; this model decodes with its own DecodeCache, which "
                             "forward returns when use_cache=True")
        if past is None and use_cache and self.model.cache_refusal() is None:
            past = self.model.new_cache()
        keep = "last" if logits_to_keep == 1 else "all"
        logits = self.model(input_ids, cache=past, logits_for=keep)
        if logits_to_keep > 1:
            logits = logits[:, -logits_to_keep:]
        loss = None
        if labels is not None:
            shifted = labels[:, 1:].to(logits.device)
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), shifted.flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_KEY: past})

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                                      use_cache: bool | None = None, **kwargs) -> dict:
        """Only the tokens the cache does not hold yet (all of them without a cache)."""
        past = kwargs.get("cache", kwargs.get("past_key_values"))
        if isinstance(past, DecodeCache):
            input_ids = input_ids[:, past.length:]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": use_cache, CACHE_KEY: past,
                "logits_to_keep": 1}
