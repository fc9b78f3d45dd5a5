"""Starting a run from a pretrained Hugging Face Llama (``model.init_from=DIR``): its config.json gives the model's
sizes, its safetensors files the weights, read one tensor at a time.

Our parameter names are Llama's without the ``model.`` prefix, so the backbone maps one to one. Grouped-query
attention (num_key_value_heads < num_attention_heads) is expanded: each key/value head's rows are repeated for the
query heads that share it, which computes exactly what grouped attention computes (and lets the copies diverge in
training). Parameters a Llama lacks take the model's own initial values: TAPE's attention-side gamma and MLP-side
up projection start at zero, so TAPE inserted into a Llama computes exactly that Llama (tests compare the first
step's loss with transformers'); any other encoding changes what the pretrained attention sees.

Only safetensors are read (never a pickled ``pytorch_model.bin``), and only the Llama architecture: SiLU MLP, no
biases, head_dim = hidden_size / heads, default or linear rotary scaling.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from tape_pretrain.config import ConfigError, ModelConfig
from tape_pretrain.errors import CheckpointError

CONFIG, SINGLE, INDEX = "config.json", "model.safetensors", "model.safetensors.index.json"
SIZE_FIELDS = {"vocab_size": "vocab_size", "hidden_size": "hidden_size", "num_layers": "num_hidden_layers",
               "num_heads": "num_attention_heads", "ffn_hidden_size": "intermediate_size"}


def check_init_from(directory: str | None) -> None:
    """model.init_from, before anything is built: an existing directory, and if it is a Hugging Face checkpoint
    (no ``tape_pretrain`` section), a Llama."""
    if not directory or "://" in directory:
        return
    path = Path(directory)
    if not path.is_dir():
        raise ConfigError(f"model.init_from {directory}: no such directory (an export, or a Hugging Face Llama)")
    meta = _read_json(path / CONFIG) if (path / CONFIG).is_file() else None
    if isinstance(meta, dict) and "tape_pretrain" not in meta and not is_hf_llama(directory):
        raise CheckpointError(f"model.init_from {directory}: a Hugging Face {meta.get('model_type', '?')!r} "
                              "checkpoint; only Llama-architecture ones (model_type llama) are supported")


def is_hf_llama(directory: str | None) -> bool:
    """A Hugging Face Llama checkpoint (not one of our exports: those record a ``tape_pretrain`` section)."""
    if not directory or "://" in directory:
        return False
    meta = _read_json(Path(directory) / CONFIG) if (Path(directory) / CONFIG).is_file() else None
    return (isinstance(meta, dict) and "tape_pretrain" not in meta
            and (meta.get("model_type") == "llama" or "LlamaForCausalLM" in (meta.get("architectures") or [])))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        raise CheckpointError(f"{path}: not readable JSON ({exc})") from None


@dataclasses.dataclass(frozen=True)
class LlamaShape:
    """What our model takes from a Llama config."""

    sizes: dict[str, int]
    num_kv_heads: int
    norm_eps: float
    rope_base: float
    linear_rope_factor: float
    tied_embeddings: bool


def llama_shape(directory: str) -> LlamaShape:
    path = Path(directory) / CONFIG
    c = _read_json(path)

    def refuse(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: {what}; model.init_from takes Llama-architecture checkpoints only")

    missing = [key for key in SIZE_FIELDS.values() if not isinstance(c.get(key), int)]
    if missing:
        raise refuse(f"no integer {', '.join(missing)}")
    sizes = {ours: c[theirs] for ours, theirs in SIZE_FIELDS.items()}
    heads, hidden = sizes["num_heads"], sizes["hidden_size"]
    if c.get("hidden_act", "silu") != "silu":
        raise refuse(f"hidden_act {c['hidden_act']!r} (ours is SiLU)")
    if c.get("attention_bias") or c.get("mlp_bias"):
        raise refuse("biases in attention or MLP")
    if c.get("head_dim") not in (None, hidden // heads) or hidden % heads:
        raise refuse(f"head_dim {c.get('head_dim')} != hidden_size / num_attention_heads")
    kv_heads = c.get("num_key_value_heads") or heads
    if heads % kv_heads:
        raise refuse(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    # transformers 5 keeps rope_theta and the scaling in rope_parameters; older versions at the top level.
    rope = {**(c.get("rope_scaling") or {}), **(c.get("rope_parameters") or {})}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "linear"):
        raise refuse(f"rotary scaling {rope_type!r} (only default and linear are supported)")
    try:
        return LlamaShape(sizes=sizes, num_kv_heads=int(kv_heads), norm_eps=float(c.get("rms_norm_eps", 1e-6)),
                          rope_base=float(rope.get("rope_theta", c.get("rope_theta", 10000.0))),
                          linear_rope_factor=float(rope.get("factor", 1.0)) if rope_type == "linear" else 1.0,
                          tied_embeddings=bool(c.get("tie_word_embeddings", False)))
    except (TypeError, ValueError) as exc:
        raise refuse(f"a malformed value ({exc})") from None


def with_llama_shape(model: ModelConfig) -> ModelConfig:
    """The run's model section with the sizes, norm epsilon and rotary base (unless the run sets another: theta
    scaling) of its model.init_from Llama; the preset is ignored, and an explicit size that disagrees with the
    checkpoint is a ConfigError."""
    shape = llama_shape(model.init_from)
    values: dict[str, Any] = {"preset": None}
    for field, value in shape.sizes.items():
        given = getattr(model, field)
        if given is not None and given != value:
            raise ConfigError(f"model.{field}={given}, but the model.init_from checkpoint has {value}: leave it unset")
        values[field] = value
    defaults = ModelConfig(preset=None)
    if model.norm_eps not in (defaults.norm_eps, shape.norm_eps):
        raise ConfigError(f"model.norm_eps={model.norm_eps}, but the model.init_from checkpoint has {shape.norm_eps}")
    # A rope_base the run sets is kept (theta scaling: a larger base to extend the context); else the checkpoint's.
    rope_base = model.positional.rope_base
    if rope_base == defaults.positional.rope_base:
        rope_base = shape.rope_base
    positional = dataclasses.replace(model.positional, rope_base=rope_base)
    if shape.linear_rope_factor != 1.0 and model.positional.interpolation == 1.0:
        positional = dataclasses.replace(positional, interpolation=shape.linear_rope_factor)
    return dataclasses.replace(model, norm_eps=shape.norm_eps, positional=positional, **values)


class LlamaWeights:
    """A Llama checkpoint's tensors in our naming, read one at a time, GQA expanded, a tied head copied."""

    def __init__(self, directory: str, expected: dict[str, tuple[int, ...]]):
        self.directory = Path(directory)
        self.shape = llama_shape(directory)
        self.files: dict[str, Any] = {}
        self.location: dict[str, tuple[str, str]] = {}  # our name -> (file, their name)
        for file_name in self._weight_files():
            try:
                handle = safe_open(str(self.directory / file_name), framework="pt", device="cpu")
            except (SafetensorError, OSError, ValueError) as exc:
                raise CheckpointError(f"{self.directory / file_name}: not readable safetensors ({exc})") from None
            self.files[file_name] = handle
            for key in handle.keys():  # noqa: SIM118 (a safe_open handle is not a mapping)
                if not key.endswith("rotary_emb.inv_freq"):  # derived from rope_theta
                    self.location[key.removeprefix("model.")] = (file_name, key)
        if self.shape.tied_embeddings and "lm_head.weight" not in self.location and "embed_tokens.weight" in \
                self.location:
            self.location["lm_head.weight"] = self.location["embed_tokens.weight"]
        backbone = {name for name in expected if ".positional." not in name}
        missing = sorted(backbone - set(self.location))
        unexpected = sorted(set(self.location) - set(expected))
        wrong = sorted(name for name in backbone & set(self.location)
                       if tuple(self.tensor(name, shape_only=True)) != expected[name])
        if missing or unexpected or wrong:
            detail = "; ".join(f"{what}: {', '.join(names[:3])}" for what, names in
                               (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if names)
            raise CheckpointError(f"{directory}: the Llama weights do not fit the model ({detail})")

    def _weight_files(self) -> list[str]:
        if (self.directory / INDEX).is_file():
            index = _read_json(self.directory / INDEX)
            if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
                raise CheckpointError(f"{self.directory / INDEX}: no weight_map")
            return sorted(set(index["weight_map"].values()))
        if (self.directory / SINGLE).is_file():
            return [SINGLE]
        raise CheckpointError(f"{self.directory}: no {SINGLE} or {INDEX} (only safetensors are read: a pickled "
                              "pytorch_model.bin could run code; convert it with transformers' save_pretrained)")

    def has(self, name: str) -> bool:
        return name in self.location

    def tensor(self, name: str, shape_only: bool = False):
        """Our parameter ``name`` in fp32 (GQA key/value projections expanded to every query head); with
        ``shape_only`` its shape after expansion, nothing read."""
        file_name, key = self.location[name]
        expand = self.shape.sizes["num_heads"] // self.shape.num_kv_heads
        is_kv = name.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight")) and expand > 1
        if shape_only:
            shape = tuple(self.files[file_name].get_slice(key).get_shape())
            return (shape[0] * expand, *shape[1:]) if is_kv else shape
        value = self.files[file_name].get_tensor(key).to(torch.float32)
        if is_kv:  # [kv_heads * D, d] -> [heads * D, d], query head h reading kv head h // expand, as GQA does
            head_dim = self.shape.sizes["hidden_size"] // self.shape.sizes["num_heads"]
            value = value.view(self.shape.num_kv_heads, 1, head_dim, -1).expand(-1, expand, -1, -1)
            value = value.reshape(self.shape.num_kv_heads * expand * head_dim, -1)
        return value


def tokenizer_sha256(directory: str) -> str | None:
    """The sha256 of the checkpoint's SentencePiece tokenizer.model, or None where it has none."""
    path = Path(directory) / "tokenizer.model"
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
