"""Converters between our state dicts and the Hugging Face Llama and official TAPE layouts.

Ours: ``embed_tokens``, ``layers.i.{input_layernorm, self_attn.*, post_attention_layernorm, mlp.*}``,
TAPE's per-layer weights under ``layers.i.positional.*``, ``norm``, ``lm_head``.
Hugging Face Llama: the same names under a ``model.`` prefix (``lm_head`` stays at the top).
Official TAPE (VITA-Group/TAPE, "adape"): the Llama names plus ``layers.i.post_attention_linear`` and
``layers.i.pe.{up,x,down}_proj`` directly in the layer.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from tape_pretrain.config import ConfigError, ModelConfig, PositionalConfig
from tape_pretrain.models.tape import TAPELayer
from tape_pretrain.models.transformer import Transformer

_LAYER = re.compile(r"^layers\.(\d+)\.")
_TAPE_OFFICIAL = re.compile(r"^(layers\.\d+\.)(post_attention_linear\.weight|pe\.(?:up|x|down)_proj\.weight)$")


def _strip_model_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in state_dict.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue  # derived from rope_base
        out[name.removeprefix("model.")] = tensor
    return out


def _infer_config(sd: Mapping[str, torch.Tensor], positional: PositionalConfig, norm_eps: float) -> ModelConfig:
    def shape(name: str) -> tuple[int, ...]:
        if name not in sd:
            raise ConfigError(f"state dict has no {name!r} (is it in the expected layout?)")
        return tuple(sd[name].shape)

    vocab_size, hidden_size = shape("embed_tokens.weight")
    layer_ids = {int(m.group(1)) for name in sd if (m := _LAYER.match(name))}
    if not layer_ids:
        raise ConfigError("state dict has no layers.N.* entries")
    num_layers = max(layer_ids) + 1
    ffn_hidden_size = shape("layers.0.mlp.gate_proj.weight")[0]
    if positional.name == "tape":
        num_heads = shape("layers.0.positional.post_attention_linear.weight")[0]
        positional.tape_position_size = shape("layers.0.positional.pe.up_proj.weight")[0]
    else:
        num_heads = None
    return ModelConfig(preset=None, vocab_size=vocab_size, hidden_size=hidden_size, num_layers=num_layers,
                       num_heads=num_heads, ffn_hidden_size=ffn_hidden_size, max_seq_len=4096,
                       norm_eps=norm_eps, positional=positional)


def _load_into(model: Transformer, sd: Mapping[str, torch.Tensor]) -> Transformer:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise ConfigError(f"state dict does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for name, tensor in sd.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ConfigError(f"{name}: shape {tuple(tensor.shape)} != expected {tuple(expected[name].shape)}")
    model.load_state_dict(sd, strict=True)
    return model


def from_official_tape(state_dict: Mapping[str, torch.Tensor], *, rope_base: float = 10000.0,
                       norm_eps: float = 1e-5) -> Transformer:
    """Build our TAPE model from a state dict in the official layout; every shape is inferred from it. The model has
    both state updates (the layout holds both), also for a file that to_official_tape wrote from an ablated model."""
    sd = {}
    for name, tensor in _strip_model_prefix(state_dict).items():
        m = _TAPE_OFFICIAL.match(name)
        sd[f"{m.group(1)}positional.{m.group(2)}" if m else name] = tensor
    positional = PositionalConfig(name="tape", rope_base=rope_base)
    config = _infer_config(sd, positional, norm_eps)
    model = Transformer(config)
    dtype = sd["embed_tokens.weight"].dtype
    return _load_into(model.to(dtype), sd).eval()


def to_official_tape(model: Transformer) -> dict[str, torch.Tensor]:
    """Our TAPE state dict in the official layout (the inverse of from_official_tape).

    The official layout has both state updates in every layer. A model with an update switched off
    (model.positional.tape_attention_update / tape_mlp_update) is written as the full TAPE model that computes the
    same function, with the missing update's weights all zero: post_attention_linear = 0 makes gamma = 0, and
    W_pu = 0 alone makes M_n = 0 (W_x and W_pd, which could then be anything, are zero too: no weight is made up).
    from_official_tape reads such a file back as full TAPE (the layout does not record the switches), with the same
    logits. Trained on from there, the attention update starts at gamma = 0 as TAPE's own init does, but the
    all-zero MLP update gets no gradient and stays off."""
    if model.config.positional.name != "tape":
        raise ConfigError(f"only a tape model converts to the official TAPE layout, not {model.config.positional.name}")
    state_dict = model.state_dict()
    out = {}
    for name, tensor in {**state_dict, **_switched_off_update_weights(model, state_dict)}.items():
        name = name.replace(".positional.", ".")
        out[name if name == "lm_head.weight" else f"model.{name}"] = tensor
    return out


def _switched_off_update_weights(model: Transformer, state_dict: Mapping[str, torch.Tensor]) -> dict:
    """Zeros, under our names, for the TAPE update weights that a model with an update switched off lacks."""
    c = model.config
    with torch.device("meta"):  # the weights of a layer with both updates
        full = TAPELayer(c.hidden_size, c.num_heads, model.positional.position_size, is_last=False).state_dict()
    like = state_dict["embed_tokens.weight"]
    zeros = {}
    for i in range(c.num_layers):
        for name, weight in full.items():
            if f"layers.{i}.positional.{name}" not in state_dict:
                zeros[f"layers.{i}.positional.{name}"] = like.new_zeros(weight.shape)
    return zeros


def from_hf_llama(state_dict: Mapping[str, torch.Tensor], *, num_heads: int, rope_base: float = 10000.0,
                  norm_eps: float = 1e-5, positional: str = "rope") -> Transformer:
    """Our model (RoPE by default) from a Hugging Face LlamaForCausalLM state dict (num_key_value_heads == H)."""
    sd = _strip_model_prefix(state_dict)
    config = _infer_config(sd, PositionalConfig(name=positional, rope_base=rope_base), norm_eps)
    config.num_heads = num_heads
    model = Transformer(config)
    expected_positional = {k: v for k, v in model.state_dict().items() if ".positional." in k}
    sd.update({k: v for k, v in expected_positional.items() if k not in sd})  # e.g. TAPE at its init
    return _load_into(model.to(sd["embed_tokens.weight"].dtype), sd).eval()


def to_hf_llama(model: Transformer) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, config.json dict) that load in stock ``transformers.LlamaForCausalLM``.

    Only encodings that are exactly a Llama (RoPE) convert; the others have extra weights or biases.
    """
    c = model.config
    if c.positional.name != "rope":
        raise ConfigError(f"only a rope model converts to Hugging Face Llama, not {c.positional.name}")
    sd = {("lm_head.weight" if k == "lm_head.weight" else f"model.{k}"): v.contiguous()
          for k, v in model.state_dict().items()}
    hf_config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "intermediate_size": c.ffn_hidden_size,
        "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_heads, "rms_norm_eps": c.norm_eps, "rope_theta": c.positional.rope_base,
        "max_position_embeddings": c.max_seq_len, "tie_word_embeddings": False, "attention_bias": False,
        "mlp_bias": False, "hidden_act": "silu", "torch_dtype": "float32",
    }
    if c.positional.interpolation != 1.0:  # linear position interpolation is Llama's "linear" rope scaling
        hf_config["rope_scaling"] = {"rope_type": "linear", "factor": c.positional.interpolation}
    return sd, hf_config
