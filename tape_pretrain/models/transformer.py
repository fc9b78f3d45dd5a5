"""A Llama-style decoder whose blocks carry (x, positional state).

Legend: B batch, N tokens, d hidden size, H heads, D = d / H head dim, V vocab, L layers.
Pre-norm RMSNorm, SwiGLU MLP, no biases, untied embeddings. Single-device code: engines in
tape_pretrain.distributed wrap it. Cached decoding (new_cache, forward(..., cache=), generate_greedy): see
tape_pretrain.models.cache.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .cache import DecodeCache, LayerCache
from .model_config import ModelConfig, resolve_model_config
from .positional import REGISTRY, DocumentLayout, PositionalLayer


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in at least fp32 (as Hugging Face Llama does) so bf16 activations keep their scale; an fp64
        # model stays fp64 (its property tests hold to 1e-9).
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.k_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)

    def split_heads(self, t: torch.Tensor) -> torch.Tensor:  # [B,N,d] -> [B,H,N,D]
        b, n, _ = t.shape
        return t.view(b, n, self.num_heads, -1).transpose(1, 2)

    def forward(self, h, state, positional: PositionalLayer, causal: bool, documents: DocumentLayout | None = None,
                cache: LayerCache | None = None):
        q, k, v = (self.split_heads(proj(h)) for proj in (self.q_proj, self.k_proj, self.v_proj))
        if cache is None:
            out, state = positional.attend(q, k, v, state, causal, documents=documents)  # [B,H,N,D]
        else:
            out, state = positional.attend_cached(q, k, v, state, cache)  # [B,H,n,D]: the new tokens only
        b, _, n, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1)), state


class MLP(nn.Module):
    def __init__(self, hidden_size: int, ffn_hidden_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, ffn_hidden_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, ffn_hidden_size, bias=False)
        self.down_proj = nn.Linear(ffn_hidden_size, hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, positional: PositionalLayer):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.self_attn = Attention(config.hidden_size, config.num_heads)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.mlp = MLP(config.hidden_size, config.ffn_hidden_size)
        self.positional = positional

    def forward(self, x, state, causal: bool = True, documents: DocumentLayout | None = None,
                cache: LayerCache | None = None):
        a, state = self.self_attn(self.input_layernorm(x), state, self.positional, causal, documents, cache)
        x = x + a
        m = self.mlp(self.post_attention_layernorm(x))
        x = x + m
        return x, self.positional.after_mlp(m, state)  # TAPE reads the MLP output, not the residual


class Transformer(nn.Module):
    """Decoder-only LM. ``forward(input_ids [B,N]) -> logits [B,N,V]``; positions start at 0 in each row, or with
    ``document_ids`` [B,N] at each document start (see forward)."""

    def __init__(self, config: ModelConfig, initialise: bool = True):
        super().__init__()
        config = resolve_model_config(config)
        self.config = config
        # One draw from the global generator; every parameter's initial value derives from it and the parameter's
        # name (see initial_value). On the CPU explicitly: under torch.device("meta") it must still be a number.
        self.init_seed = int(torch.randint(0, 2**62, (1,), device="cpu"))
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.positional = REGISTRY[config.positional.name](config)
        self.layers = nn.ModuleList(
            Block(config, self.positional.make_layer(i)) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if initialise:  # engines that build on the meta device or partitioned set the weights themselves
            self.reset_parameters()

    def initial_value(self, name: str, shape: torch.Size) -> torch.Tensor:
        """The full fp32 initial value of parameter ``name`` (of full shape ``shape``: an engine that partitions
        parameters at construction knows it, the parameter itself may not), on the CPU.

        A function of (init_seed, name) alone, not of the order in which parameters are created or initialised:
        a model built on the meta device and materialised shard by shard (FSDP2, ZeRO-3) gets exactly the weights
        of an eagerly built one, on any device and world size, and models that differ only in their positional
        encoding (TAPE and RoPE) share every backbone weight for the same seed."""
        owner_name, _, leaf = name.rpartition(".")
        owner = self.get_submodule(owner_name) if owner_name else self
        for i, block in enumerate(self.layers):
            prefix = f"layers.{i}.positional."
            if name.startswith(prefix):
                value = block.positional.initial_value(name.removeprefix(prefix), shape)
                if value is not None:
                    return value.to(torch.float32)
        if isinstance(owner, RMSNorm):
            return torch.ones(shape)
        if leaf == "bias":
            return torch.zeros(shape)
        generator = torch.Generator().manual_seed(_parameter_seed(self.init_seed, name))
        return torch.empty(shape, device="cpu").normal_(0.0, self.config.init_std, generator=generator)

    @torch.no_grad()
    def reset_parameters(self):
        """Set every parameter to its initial_value (parameters on the meta device have no values to set)."""
        for name, param in self.named_parameters():
            if not param.is_meta:
                param.copy_(self.initial_value(name, param.shape))

    def forward(self, input_ids: torch.Tensor, causal: bool = True, position_offset: int = 0,
                initial_state=None, document_ids: torch.Tensor | None = None, cache: DecodeCache | None = None,
                logits_for: Literal["all", "last"] = "all") -> torch.Tensor:
        """Logits [B,N,V] of input_ids [B,N]; with ``logits_for="last"`` only the last token's, [B,1,V].

        ``document_ids`` [B,N] (integers on the input's device) switches on document mode for rows that pack several
        documents: tokens of one document are contiguous and share an id, and a document starts wherever the id
        differs from the previous token's (and at the row start). Attention is then block-causal (a token sees only
        its own document, up to itself) and every encoding's positions restart at position_offset at each document
        start, so each document gets the logits it would get alone. Only with causal=True.

        ``cache`` (from new_cache): cached decoding. input_ids are the tokens that follow the cache.length cached
        ones (positions position_offset + cache.length ..., position_offset the same in every call); they attend to
        every cached token and causally to each other, are appended to the cache, and the logits are theirs only.
        Causal, one sequence per row (no document_ids), no initial_state."""
        if logits_for not in ("all", "last"):
            raise ValueError(f"logits_for={logits_for!r}: use 'all' or 'last'")
        if cache is not None:
            x = self._decode(input_ids, cache, causal, position_offset, initial_state, document_ids)
            return self.lm_head(self.norm(x[:, -1:] if logits_for == "last" else x))
        x = self.embed_tokens(input_ids)  # [B,N,d]
        b, n = input_ids.shape
        documents = None
        if document_ids is not None:
            if not causal:
                raise ValueError("document_ids needs causal=True (document mode is block-causal)")
            if document_ids.shape != input_ids.shape or document_ids.device != input_ids.device:
                raise ValueError(f"document_ids is {list(document_ids.shape)} on {document_ids.device}, input_ids "
                                 f"{list(input_ids.shape)} on {input_ids.device}: give one document id per token, on "
                                 f"the device of input_ids")
            documents = DocumentLayout.from_ids(document_ids)  # once per forward: every layer shares its masks
        state = initial_state
        if state is None:
            state = self.positional.initial_state(b, n, input_ids.device, x.dtype, offset=position_offset,
                                                  causal=causal, documents=documents)
        for layer in self.layers:
            x, state = layer(x, state, causal, documents)
        if logits_for == "last":
            x = x[:, -1:]  # the norm and lm_head are per token: skip the vocabulary projection of the others
        return self.lm_head(self.norm(x))  # [B,N,V]

    def cache_refusal(self) -> str | None:
        """Why cached decoding would not reproduce this model's uncached forward in its current mode (RandPE's
        sampled or training positions, TAPE's training-time random offset), or None when it does."""
        return self.positional.cache_refusal()

    def new_cache(self, max_length: int | None = None) -> DecodeCache:
        """An empty decoding cache for forward(..., cache=); ``max_length`` tokens preallocated (else it grows by
        doubling). Raises ValueError when the encoding cannot decode with a cache in this mode (cache_refusal)."""
        refusal = self.cache_refusal()
        if refusal is not None:
            raise ValueError(refusal)
        return DecodeCache(len(self.layers), max_length or 0)

    def _decode(self, input_ids, cache: DecodeCache, causal, position_offset, initial_state, document_ids):
        """The final hidden states [B,n,d] of the new tokens input_ids [B,n], through every layer's cache."""
        if document_ids is not None:
            raise ValueError("document_ids cannot be combined with a cache: cached decoding continues one sequence "
                             "per row (decode each document in a row of its own)")
        if not causal or initial_state is not None:
            raise ValueError("a cache needs causal=True and no initial_state (the cache builds the new tokens' state)")
        refusal = self.cache_refusal()  # the mode may have changed since new_cache
        if refusal is not None:
            raise ValueError(refusal)
        b, n = input_ids.shape
        past = cache.start_forward(b, position_offset)
        x = self.embed_tokens(input_ids)  # [B,n,d]
        state = self.positional.decode_state(b, past, n, input_ids.device, x.dtype, offset=position_offset)
        for layer, layer_cache in zip(self.layers, cache.layers, strict=True):
            x, state = layer(x, state, causal, cache=layer_cache)
        cache.advance(n)
        return x

    @torch.no_grad()
    def generate_greedy(self, input_ids: torch.Tensor, max_new_tokens: int,
                        use_cache: bool = True) -> Iterator[torch.Tensor]:
        """Greedy continuation of input_ids [B,N]: yields the next token ids [B] (on the input's device, no host
        synchronisation) up to max_new_tokens times; stop early by leaving the loop.

        With ``use_cache``, the prompt runs once and every step one token, through a cache (ValueError where
        cache_refusal() says the encoding cannot); without, each step recomputes the whole prefix. Both take the
        last position's logits only."""
        if use_cache:
            cache = self.new_cache(input_ids.shape[1] + max_new_tokens)
            tokens = input_ids
            for _ in range(max_new_tokens):
                next_ids = self(tokens, cache=cache, logits_for="last")[:, -1].argmax(dim=-1)  # [B]
                yield next_ids
                tokens = next_ids[:, None]
        else:
            tokens = input_ids
            for _ in range(max_new_tokens):
                next_ids = self(tokens, logits_for="last")[:, -1].argmax(dim=-1)
                yield next_ids
                tokens = torch.cat((tokens, next_ids[:, None]), dim=1)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def num_positional_parameters(self) -> int:
        """Parameters added by the positional encoding (TAPE's update weights, FIRE's MLPs, ...)."""
        return sum(p.numel() for layer in self.layers for p in layer.positional.parameters()) + sum(
            p.numel() for p in self.positional.parameters())

    def forward_flops_per_token(self, seq_len: int) -> float:
        """Matmul FLOPs of one forward pass per token at length seq_len (PaLM convention: full
        attention, 2 FLOPs per multiply-add), including the positional encoding's extra work."""
        c = self.config
        per_layer = 4 * c.hidden_size**2 + 3 * c.hidden_size * c.ffn_hidden_size
        dense = 2 * (c.num_layers * per_layer + c.vocab_size * c.hidden_size)
        attention = 4 * c.num_layers * c.hidden_size * seq_len
        return dense + attention + self.positional.extra_forward_flops_per_token(seq_len)


def _parameter_seed(init_seed: int, name: str) -> int:
    digest = hashlib.blake2b(name.encode(), digest_size=8).digest()
    return (init_seed ^ int.from_bytes(digest, "little")) % 2**63


def build_model(config: ModelConfig, initialise: bool = True) -> Transformer:
    return Transformer(config, initialise)
