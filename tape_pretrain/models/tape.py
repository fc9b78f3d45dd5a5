"""TAPE: a positional state that every layer updates from the content (TAPE.md sections 2-4).

The state is Z = c + i s per head and frequency, stored fused as cs = [c | s]: [B, H, N, 2F].
At layer 0, Z_{n,f} = exp(i (n + k) theta_f), so with the update weights at their zero init the
model is exactly a RoPE Llama.

The paper's ablation switches either update off (model.positional.tape_attention_update, tape_mlp_update): the
state then passes that sub-block unchanged and the update's weights do not exist. With both off the state never
moves whatever the weights, so the model is RoPE's (same parameter names, same logits, bitwise), not only at init.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .positional_base import (
    DocumentLayout,
    PositionalEncoding,
    PositionalLayer,
    apply_rotary,
    attention,
    attention_after,
    rotary_frequencies,
    rotary_tables,
)

# The widest value head dim that CUDA's fused kernels take in one call (memory-efficient and cuDNN accept a value
# wider than q/k up to 256; flash needs equal widths). A wider value would run the math kernel, which materialises
# the [N, N] attention matrix: two calls of width D each then stay on the fused kernels.
MAX_FUSED_VALUE_DIM = 256
MAX_FLEX_VALUE_DIM = 128
"""Document mode on CUDA runs FlexAttention, whose kernels are tuned for head dims up to 128: one call over the
2D-wide value only while 2D <= 128 (head_dim 64, the paper's sizes); wider heads take two D-wide calls."""
# auto's limit for one call on the CPU: causal_attention_in_blocks keeps its attention probabilities for backward,
# 5/8 of the [H, N, N] matrix at N = 1024 (31 MB per sequence and layer at H = 12 in fp32), growing as N^2.
MAX_CPU_ONE_CALL_LEN = 2048


def resolve_attention_form(form: str, device_type: str, head_dim: int, seq_len: int, causal: bool = True) -> str:
    """The form TAPELayer.attend uses on ``device_type``: ``form`` itself, or for "auto" the faster one there.

    One call over the 2D-wide value [v|c|s] does one QK^T and softmax for both outputs (29 % fewer attention FLOPs
    than two calls). CUDA: one SDPA call, on the memory-efficient or cuDNN kernel while 2D <= MAX_FUSED_VALUE_DIM.
    CPU: causal_attention_in_blocks, since SDPA's CPU flash kernel needs equal widths (bench model --tape-attention
    both, paper-155m, N = 1024, fp32, 2 threads: a step takes 1.04-1.06x RoPE's with one call, 1.11-1.13x with two).
    Elsewhere two calls, each on a fused kernel."""
    if form != "auto":
        return form
    if device_type == "cuda" and 2 * head_dim <= MAX_FUSED_VALUE_DIM:
        return "one_call"
    if device_type == "cpu" and causal and seq_len <= MAX_CPU_ONE_CALL_LEN:  # bidirectional: SDPA's math kernel
        return "one_call"
    return "two_calls"


def resolve_decoding_form(form: str, device_type: str, head_dim: int) -> str:
    """The form TAPELayer.attend_cached uses for new tokens after cached ones: ``form`` itself, or for "auto" one call
    on CUDA (as resolve_attention_form) and two on the CPU, where SDPA's flash kernel takes each D-wide call and the
    one 2D-wide call runs the math kernel, which scales a copy of every cached key per step (tiny preset, 64 tokens
    after 1024, 1 thread: 1.0 ms per token with two calls, 4.1 ms with one)."""
    if form != "auto":
        return form
    return "one_call" if device_type == "cuda" and 2 * head_dim <= MAX_FUSED_VALUE_DIM else "two_calls"


def causal_attention_in_blocks(q: torch.Tensor, k: torch.Tensor, value: torch.Tensor, block: int = 256,
                               documents: DocumentLayout | None = None):
    """softmax(q k^T / sqrt(D) + causal mask) @ value, for a value wider than q and k, in plain autograd ops.

    q, k: [B, H, N, D]; value: [B, H, N, E] -> [B, H, N, E]. Each block of queries meets only the keys it can see, so
    the masked blocks are never computed: SDPA's math kernel, CPU's only one for E != D, computes all N^2 logits.
    With ``documents``, a query sees only the keys of its own document (block-causal)."""
    b, h, n, _ = q.shape
    scale = q.shape[-1] ** -0.5
    # Scores and softmax in at least fp32, as SDPA's kernels do: bf16 scores would round the logits before the
    # softmax (errors of 5 % against fp64 for sharp attention, where two SDPA calls stay at 0.3 %).
    work = torch.promote_types(q.dtype, torch.float32)
    q, k = q.flatten(0, 1).to(work), k.flatten(0, 1).to(work)  # [BH, N, D]
    value = value.flatten(0, 1)  # [BH, N, E]
    size = min(block, n)
    # ramp[r, j] = -inf where j > n + r: the causal bias of the query block starting at i is ramp[:, n - i : n - i + e].
    ramp = torch.full((size, n + size), float("-inf"), dtype=work, device=q.device).triu(n + 1)
    outs = []
    for i in range(0, n, size):
        e = min(i + size, n)  # this block's queries i..e-1 see keys 0..e-1
        logits = torch.baddbmm(ramp[:e - i, n - i:n - i + e], q[:, i:e], k[:, :e].transpose(1, 2), alpha=scale)
        if documents is not None:
            hidden = ~documents.visible(i, e, e).unsqueeze(1)  # [B, 1, e - i, e]
            logits = logits.view(b, h, e - i, e).masked_fill(hidden, float("-inf")).flatten(0, 1)
        probs = logits.softmax(-1).to(value.dtype)
        outs.append(probs @ value[:, :e])  # [BH, e - i, E]
    return torch.cat(outs, dim=1).view(b, h, n, -1)


class TAPEPositionMLP(nn.Module):
    """The MLP-side update M_n = W_pd diag(silu(W_x m_n)) W_pu, an H x H head mix per token."""

    def __init__(self, hidden_size: int, num_heads: int, position_size: int):
        super().__init__()
        self.x_proj = nn.Linear(hidden_size, position_size, bias=False)  # W_x: [I, d]
        self.up_proj = nn.Linear(num_heads, position_size, bias=False)  # W_pu: [I, H]
        self.down_proj = nn.Linear(position_size, num_heads, bias=False)  # W_pd: [H, I]

    def head_mix(self, mlp_out: torch.Tensor) -> torch.Tensor:
        """The collapsed per-token matrix M: [B, N, H, H]."""
        gate = F.silu(self.x_proj(mlp_out))  # [B, N, I]
        return (self.down_proj.weight * gate.unsqueeze(-2)) @ self.up_proj.weight  # [B,N,H,I] @ [I,H]

    def forward(self, mlp_out: torch.Tensor, cs: torch.Tensor) -> torch.Tensor:
        """M_n applied to cs [B, H, N, 2F] through the collapsed matrix (3x faster on CPU than up -> gate -> down)."""
        mix = self.head_mix(mlp_out).to(cs.dtype)  # [B, N, H, H]
        return (mix @ cs.transpose(1, 2)).transpose(1, 2)  # [B,N,H,H] @ [B,N,H,2F] -> [B,H,N,2F]

    def factored(self, mlp_out: torch.Tensor, cs: torch.Tensor) -> torch.Tensor:
        """The same update as up -> gate -> down (the reference form; used by tests)."""
        gate = F.silu(self.x_proj(mlp_out))  # [B, N, I]
        up = torch.einsum("ih,bhnf->bnif", self.up_proj.weight, cs)
        return torch.einsum("hi,bnif->bhnf", self.down_proj.weight, up * gate.unsqueeze(-1))


class TAPELayer(PositionalLayer):
    """Attention with the state, then the attention-side and MLP-side updates of the state.

    An update switched off (model.positional.tape_attention_update / tape_mlp_update, the paper's ablation) passes
    the state through its sub-block unchanged, and its weights are not created at all: they are neither counted,
    trained, decayed nor checkpointed, and the backbone's weights (a function of seed and name) do not change."""

    def __init__(self, hidden_size: int, num_heads: int, position_size: int, is_last: bool,
                 attention_form: str = "auto", attention_update: bool = True, mlp_update: bool = True):
        super().__init__()
        self.attention_form = attention_form  # model.positional.tape_attention, resolved per call and device
        # gamma_h is the row sum of this H x H matrix, kept as a matrix to match the official optimizer dynamics.
        self.post_attention_linear = nn.Linear(num_heads, num_heads, bias=False) if attention_update else None
        self.pe = TAPEPositionMLP(hidden_size, num_heads, position_size) if mlp_update else None
        self.is_last = is_last  # the last layer's state update is never read: skip it
        if is_last:
            # Kept for the official layout and parameter count, but frozen: a parameter that never gets a
            # gradient would also never get optimizer state, which breaks resharded checkpoint loading.
            self.requires_grad_(False)

    def initial_value(self, name, shape):
        # Zero init of gamma and W_pu: the model starts as exactly the RoPE Llama with the same backbone weights.
        if name in ("post_attention_linear.weight", "pe.up_proj.weight"):
            return torch.zeros(shape)
        return None

    def attend(self, q, k, v, cs, causal, documents=None):
        # Document mode needs nothing more than the mask: A @ [c|s] then mixes states within a document only, and
        # the MLP-side update is per token.
        c, s = cs.chunk(2, dim=-1)
        q, k = apply_rotary(q, c, s), apply_rotary(k, c, s)
        if self.is_last or self.post_attention_linear is None:
            return attention(q, k, v, causal, documents=documents), cs
        form = resolve_attention_form(self.attention_form, q.device.type, q.shape[-1], q.shape[-2], causal)
        if (form == "one_call" and documents is not None and self.attention_form == "auto"
                and q.device.type == "cuda" and 2 * q.shape[-1] > MAX_FLEX_VALUE_DIM):
            form = "two_calls"
        if form == "one_call":
            value = torch.cat((v, cs), dim=-1)  # [B, H, N, 2D]
            if causal and q.device.type == "cpu":
                both = causal_attention_in_blocks(q, k, value, documents=documents)
            else:  # CUDA: SDPA, or in document mode FlexAttention, which takes a wider value too
                both = attention(q, k, value, causal, documents=documents)
            out, moved = both.split(v.shape[-1], dim=-1)
        else:
            out = attention(q, k, v, causal, documents=documents)  # [B, H, N, D]
            moved = attention(q, k, cs, causal, documents=documents)  # A @ [c|s]: [B, H, N, 2F]
        gamma = self.post_attention_linear.weight.sum(dim=-1)  # [H]
        return out, cs + gamma[:, None, None].to(cs.dtype) * moved

    def attend_cached(self, q, k, v, cs, cache):
        # cs [B, H, n, 2F]: the state of the new tokens entering this layer. Cached per token, final once computed:
        # the rotated key and, where attention moves the state, [v | c | s], since a new token's A @ [c|s] reads the
        # layer-input state of every key it sees.
        c, s = cs.chunk(2, dim=-1)
        q, k = apply_rotary(q, c, s), apply_rotary(k, c, s)
        past = cache.past
        if self.is_last or self.post_attention_linear is None:
            keys, values = cache.extend(k, v)
            return attention_after(q, keys, values, past), cs
        d = v.shape[-1]
        keys, value_states = cache.extend(k, torch.cat((v, cs), dim=-1))  # [B,H,L+n,D], [B,H,L+n,D+2F]
        if past == 0:  # a first chunk: as the uncached forward
            form = resolve_attention_form(self.attention_form, q.device.type, d, keys.shape[-2])
        else:
            form = resolve_decoding_form(self.attention_form, q.device.type, d)
        if form == "one_call":
            if past == 0 and q.device.type == "cpu":
                both = causal_attention_in_blocks(q, keys, value_states)
            else:
                both = attention_after(q, keys, value_states, past)
            out, moved = both.split(d, dim=-1)
        else:
            out = attention_after(q, keys, value_states[..., :d], past)  # [B, H, n, D]
            moved = attention_after(q, keys, value_states[..., d:], past)  # A @ [c|s]: [B, H, n, 2F]
        gamma = self.post_attention_linear.weight.sum(dim=-1)  # [H]
        return out, cs + gamma[:, None, None].to(cs.dtype) * moved

    def after_mlp(self, mlp_out, cs):
        if self.is_last or self.pe is None:
            return cs
        return cs + self.pe(mlp_out, cs)


class TAPE(PositionalEncoding):
    name = "tape"

    def __init__(self, config):
        super().__init__(config)
        self.position_size = config.positional.tape_position_size or 4 * config.num_heads
        self.random_offset = config.positional.tape_random_offset
        self.max_seq_len = config.max_seq_len

    def make_layer(self, layer_idx):
        c = self.config
        return TAPELayer(c.hidden_size, c.num_heads, self.position_size, is_last=layer_idx == c.num_layers - 1,
                         attention_form=c.positional.tape_attention,
                         attention_update=c.positional.tape_attention_update, mlp_update=c.positional.tape_mlp_update)

    def initial_state(self, batch_size, seq_len, device, dtype, offset=0, causal=True, documents=None):
        if self.random_offset and self.training:
            # Shift invariance makes this a no-op up to rounding; kept for parity with the official recipe.
            offset = offset + int(torch.randint(0, 2 * self.max_seq_len + 1, ()))
        if documents is None:
            positions = torch.arange(offset, offset + seq_len, device=device)  # [N]
        else:
            positions = (documents.positions + offset).unsqueeze(1)  # [B, 1, N]: each token's place in its document
        theta = rotary_frequencies(self.head_dim, self.config.positional.rope_base, device,
                                   self.config.positional.interpolation)
        cos, sin = rotary_tables(positions, theta, dtype)  # [N, F] or [B, 1, N, F]
        cs = torch.cat((cos, sin), dim=-1)  # [N, 2F] or [B, 1, N, 2F]
        # Materialised, not expand()ed: a stride-0 value tensor is not safe for every SDPA backend (cuDNN's layout
        # checks do not reject it), and layer 1 allocates a state of this size anyway.
        return cs.expand(batch_size, self.num_heads, seq_len, self.head_dim).contiguous()

    def cache_refusal(self):
        if self.random_offset and self.training:
            return ("tape_random_offset draws a new position offset every training forward, which a decoding cache "
                    "cannot keep: call model.eval() to decode with a cache")
        return None

    def extra_forward_flops_per_token(self, seq_len):
        c = self.config
        h, i, d = c.num_heads, self.position_size, c.hidden_size
        updating_layers = c.num_layers - 1
        attention_side = 2 * seq_len * d  # A @ [c|s], as wide as A @ v
        mlp_side = 2 * d * i + 2 * h * h * i + 2 * h * h * self.head_dim  # x_proj, collapse M, apply M
        p = c.positional
        return updating_layers * (attention_side * p.tape_attention_update + mlp_side * p.tape_mlp_update)
