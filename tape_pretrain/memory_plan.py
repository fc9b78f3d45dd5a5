"""Per-rank memory of one training step, estimated from the model's shapes: `tape-pretrain inspect model --engine`.

Legend: P parameters, Pt trainable parameters (TAPE's last-layer update weights are frozen), W world size,
s bytes of a compute-dtype element (4 fp32, 2 bf16), B micro-batch, N tokens, d hidden size, H heads, V vocab.

The peak is taken at the two moments that matter for a step in steady state (the optimizer state exists,
``zero_grad(set_to_none=True)`` dropped last step's gradients):

    peak = parameters + master weights + optimizer states + buckets
           + max(activations + transient_backward,   # the start of backward
                 gradients + transient_step)         # after backward

What each engine holds (ZeRO-1 shards the optimizer state, ZeRO-2 also the gradients, ZeRO-3 also the parameters,
FSDP2 all three; a sharded term is divided by W):

- FSDP2: fp32 sharded parameters (they are the master weights), cast to the compute dtype by the all-gather
  (MixedPrecisionPolicy(param_dtype, reduce_dtype=fp32)); fp32 sharded gradients. During forward and backward the
  root group (embeddings, final norm, head) stays unsharded, as does the block being run (with W > 1 also the
  prefetched one and an all-gather output), and a block's unsharded gradients meet their fp32 reduce-scatter input.
- DeepSpeed: module parameters in the compute dtype; for ZeRO >= 1 an fp32 master partition (DeepSpeed copies one
  even in fp32). Gradients: ZeRO-0 fp32 module gradients; ZeRO-1 the full module gradients (bf16: bf16 gradients
  plus the full fp32 accumulation buffer of DeepSpeed's BF16_Optimizer, data_types.grad_accum_dtype fp32); ZeRO-2/3
  an fp32 gradient partition. Buffers from DeepSpeed's defaults: ZeRO-1 fp32 and ZeRO-2/3 reduce through a
  contiguous bucket of reduce_bucket_size (5e8) elements; ZeRO-0 and bf16 ZeRO-1 all-reduce a flattened copy of
  the gradients; ZeRO-3 gathers one block (or the head) at a time plus the prefetched one, and keeps parameters of
  up to stage3_param_persistence_threshold (1e5) elements whole on every rank.
- DDP: fp32 parameters, gradients and optimizer state, all replicated; gradients are views into DDP's reduction
  buckets (gradient_as_bucket_view).
- HSDP (FSDP2 with a replicate degree R): as FSDP2 with W / R in place of W.
- AdamW: two fp32 moments per trainable parameter; its foreach step (the GPU default) allocates one fp32 temporary
  the size of its largest parameter group.

Activations are the tensors autograd saves in the forward pass (checked against saved-tensor hooks in the tests),
with attention through a fused SDPA kernel (q, k, v, output, log-sum-exp; never [B,H,N,N] probabilities) and the
cross-entropy in fp32: its log-softmax output is saved and backward adds two [B*N, V] fp32 gradients. With
activation checkpointing only each block's inputs are kept, and backward recomputes one block at a time.
Not modelled: allocator fragmentation and caching, CUDA context and library workspaces, DeepSpeed's
stage3_max_live_parameters / max_reuse_distance (which may keep more of a small model gathered), FIRE's [B,H,N,N]
bias gradient in backward (and on CPU, where SDPA cannot differentiate a mask in its fused kernel, the math
kernel's saved [B,H,N,N] probabilities), and a user's parallel.deepspeed_config.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from tape_pretrain.config import ConfigError, ModelConfig
from tape_pretrain.models.blocked_bias import block_plan
from tape_pretrain.models.tape import resolve_attention_form

ENGINES = ("deepspeed", "fsdp2", "ddp")
PRECISIONS = ("fp32", "bf16")
DEEPSPEED_BUCKET_ELEMENTS = 500_000_000
"""DeepSpeed's default reduce_bucket_size, and the size of its flattened all-reduce buckets."""
DEEPSPEED_PERSISTENCE_THRESHOLD = 100_000
"""DeepSpeed's default stage3_param_persistence_threshold: parameters up to this size stay whole on every rank."""
ROTARY = ("rope", "randrope", "xpos", "tape")


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per rank of one training step; ``peak`` is the figure to set against a device's memory."""

    parameters: int
    """Module parameters as this rank keeps them between steps."""
    master_weights: int
    """fp32 copies that the optimizer updates, where the engine keeps them apart from the module's parameters."""
    optimizer_states: int
    """AdamW's two fp32 moments."""
    gradients: int
    """Gradient buffers at the end of backward."""
    activations: int
    """Peak of the activation memory: the tensors saved for backward plus the loss's gradients at the start of
    backward (with checkpointing: the blocks' inputs plus the larger of the head and one recomputed block)."""
    buckets: int
    """DeepSpeed's contiguous reduce bucket (zero_optimization.reduce_bucket_size elements, 5e8 by default)."""
    transient_backward: int
    """Buffers alive with the activations: unsharded parameters and their gradients, gradient buffers that
    DeepSpeed keeps between steps."""
    transient_step: int
    """Buffers alive with the full gradients after backward: reduction copies, AdamW's step temporary."""
    peak: int
    """The estimated peak: the persistent states plus the larger of the two moments (module docstring)."""


@dataclass(frozen=True)
class _Sizes:
    """Parameter counts of one model (numels)."""

    total: int
    trainable: int
    largest_block: int
    blocks: int  # all blocks together
    root: int  # embeddings, final norm and head: FSDP2's root group
    largest_module: int  # the largest of a block, the embedding and the head (ZeRO-3 gathers)
    largest_group: int  # trainable parameters in the largest AdamW group
    persistent: int  # parameters that ZeRO-3 leaves whole (up to its persistence threshold)


def plan_memory(config: ModelConfig, *, engine: str, zero_stage: int | None, world_size: int, micro_batch_size: int,
                seq_len: int, precision: str = "bf16", activation_checkpointing: bool = False,
                decay_embeddings: bool = False, replicate_degree: int = 1,
                reshard_after_forward: bool = True, trainable: tuple[str, ...] | list[str] = ("all",)) -> MemoryPlan:
    """Estimate the per-rank memory of one training step of ``config`` (see the module docstring).
    FSDP2 only: ``replicate_degree`` R > 1 is HSDP (each replica shards over world_size / R ranks);
    ``reshard_after_forward=False`` keeps every block's gathered parameters from its forward to its backward.
    ``trainable`` (optim.trainable) sets Pt: the gradients, master weights and optimizer state; activations stay those
    of training every weight (an upper bound: a frozen weight's input is not saved for its gradient)."""
    _validate(engine, zero_stage, world_size, micro_batch_size, seq_len, precision)
    if replicate_degree < 1 or world_size % replicate_degree:
        raise ConfigError(f"--replicate-degree {replicate_degree} must be at least 1 and divide --world {world_size}")
    if engine != "fsdp2" and (replicate_degree != 1 or not reshard_after_forward):
        raise ConfigError("--replicate-degree and --no-reshard-after-forward are FSDP2 settings: add --engine fsdp2")
    import torch

    from tape_pretrain.models import build_model
    from tape_pretrain.train.trainable import apply_trainable, trainable_names

    with torch.device("meta"):  # shapes only
        model = build_model(config)
    apply_trainable(model, trainable_names(model, trainable, model.config))
    sizes = _sizes(model, decay_embeddings)
    s = 4 if precision == "fp32" else 2
    activations = activation_bytes(model, micro_batch_size, seq_len, s, activation_checkpointing)
    w = world_size // replicate_degree if engine == "fsdp2" else world_size  # ranks one copy is sharded over
    p, pt = sizes.total, sizes.trainable

    def shard(nbytes: int) -> int:  # the largest rank's share
        return -(-nbytes // w)

    group_temp = 4 * sizes.largest_group  # AdamW's foreach step: one fp32 temporary (sqrt of exp_avg_sq) per group
    buckets = transient_backward = 0
    if engine == "fsdp2":
        parameters, master, optimizer, gradients = shard(4 * p), 0, shard(8 * pt), shard(4 * pt)
        blocks_in_flight = 1 if w == 1 else 3  # the block being run; with W > 1 an all-gather output and a prefetch
        transient_backward = s * sizes.root + (blocks_in_flight * s + s + 4) * sizes.largest_block
        if not reshard_after_forward and w > 1:  # every block stays gathered from its forward to its backward
            transient_backward += s * sizes.blocks
        # after backward the root group reduce-scatters: its unsharded parameters and gradients and the fp32 input,
        # before its sharded gradient (counted in gradients) exists
        transient_step = max((2 * s + 4) * sizes.root - shard(4 * sizes.root), shard(group_temp))
    elif engine == "ddp":  # fp32, everything replicated; gradients are views into DDP's reduction buckets
        parameters, master, optimizer, gradients = 4 * p, 0, 8 * pt, 4 * pt
        transient_step = group_temp
    else:
        stage = zero_stage
        # ZeRO-3 keeps parameters of up to stage3_param_persistence_threshold (1e5) elements whole on every rank
        parameters = shard(s * p) + s * sizes.persistent if stage == 3 else s * p
        master = shard(4 * pt) if stage >= 1 else 0
        optimizer = shard(8 * pt) if stage >= 1 else 8 * pt
        transient_step = shard(group_temp) if stage >= 1 else group_temp
        flat_copy = 4 * min(pt, DEEPSPEED_BUCKET_ELEMENTS)  # the flattened gradients of an all-reduce bucket
        if stage == 0:
            gradients = 4 * pt
            transient_step = max(flat_copy, transient_step)
        elif stage == 1 and s == 2:  # BF16_Optimizer: bf16 module gradients and a full fp32 accumulation buffer
            gradients = 2 * pt + 4 * pt
            transient_backward = 4 * pt  # the accumulation buffer stays allocated between steps
            transient_step = max(flat_copy, transient_step)
        elif stage == 1:
            gradients = 4 * pt  # the module's gradients, reduced at the step
            buckets = 4 * DEEPSPEED_BUCKET_ELEMENTS
        else:
            gradients = shard(4 * pt)
            buckets = s * DEEPSPEED_BUCKET_ELEMENTS
            if stage == 3:  # the flat gradient partition (kept between steps), the module run and the prefetched one
                transient_backward = gradients + 2 * s * sizes.largest_module
    persistent = parameters + master + optimizer + buckets
    peak = persistent + max(activations + transient_backward, gradients + transient_step)
    return MemoryPlan(parameters=parameters, master_weights=master, optimizer_states=optimizer, gradients=gradients,
                      activations=activations, buckets=buckets, transient_backward=transient_backward,
                      transient_step=transient_step, peak=peak)


def _validate(engine, zero_stage, world_size, micro_batch_size, seq_len, precision) -> None:
    if engine not in ENGINES:
        raise ConfigError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    for flag, value in (("--world", world_size), ("--micro-batch", micro_batch_size), ("--seq-len", seq_len)):
        if value < 1:
            raise ConfigError(f"{flag} must be at least 1, got {value}")
    if engine == "ddp" and precision != "fp32":
        raise ConfigError("the ddp engine trains in fp32: plan --precision fp32")
    if engine == "deepspeed":
        if zero_stage is None:
            raise ConfigError("--engine deepspeed needs --zero-stage (0, 1, 2 or 3)")
        if zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"--zero-stage must be 0, 1, 2 or 3, got {zero_stage}")
        if zero_stage == 0 and precision == "bf16":
            raise ConfigError("DeepSpeed ZeRO-0 in bf16 is refused by the trainer (DeepSpeed has no fp32 gradient "
                              "accumulation there): plan --zero-stage 1, --engine fsdp2 or --precision fp32")
    elif zero_stage is not None:
        warnings.warn(f"--zero-stage {zero_stage} is ignored with --engine {engine}: FSDP2 shards parameters, "
                      "gradients and optimizer state", stacklevel=3)


def _sizes(model, decay_embeddings: bool) -> _Sizes:
    from tape_pretrain.distributed.engine import param_groups

    def count(module, trainable_only=False):
        return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)

    blocks = [count(block) for block in model.layers]
    groups = param_groups(model, weight_decay=0.0, decay_embeddings=decay_embeddings)
    return _Sizes(total=count(model), trainable=count(model, trainable_only=True), largest_block=max(blocks),
                  blocks=sum(blocks), root=count(model) - sum(blocks),
                  largest_module=max(*blocks, count(model.embed_tokens), count(model.lm_head)),
                  largest_group=max(sum(p.numel() for p in g["params"]) for g in groups),
                  persistent=sum(p.numel() for p in model.parameters() if p.numel() <= DEEPSPEED_PERSISTENCE_THRESHOLD))


def saved_bytes(model, micro_batch_size: int, seq_len: int, dtype_bytes: int) -> int:
    """Bytes autograd saves in one micro-batch's forward and loss, without activation checkpointing."""
    layers = sum(layer_saved_bytes(model, i, micro_batch_size, seq_len, dtype_bytes)
                 for i in range(model.config.num_layers))
    return (_outside_blocks_saved_bytes(model, micro_batch_size, seq_len, dtype_bytes) + layers
            + _head_saved_bytes(model, micro_batch_size, seq_len, dtype_bytes))


def _head_saved_bytes(model, micro_batch_size, seq_len, dtype_bytes) -> int:
    c, t = model.config, micro_batch_size * seq_len
    # the final RMSNorm (as in a block), and the log-softmax output [B*N,V] in fp32
    return (4 + 2 * dtype_bytes) * t * c.hidden_size + 4 * t + 4 * t * c.vocab_size


def _outside_blocks_saved_bytes(model, micro_batch_size, seq_len, dtype_bytes) -> int:
    # shared tables or bias; input ids and labels (int64)
    return shared_state_bytes(model, micro_batch_size, seq_len, dtype_bytes) + 2 * 8 * micro_batch_size * seq_len


def activation_bytes(model, micro_batch_size: int, seq_len: int, dtype_bytes: int,
                     activation_checkpointing: bool) -> int:
    """Peak activation bytes of one micro-batch: what autograd saves, plus the loss's gradients at the start of
    backward, plus (with checkpointing) one block recomputed in backward."""
    c = model.config
    b, n, s = micro_batch_size, seq_len, dtype_bytes
    t = b * n
    e = t * c.hidden_size
    num_layers = c.num_layers
    head = _head_saved_bytes(model, b, n, s)
    loss_gradients = 2 * 4 * t * c.vocab_size  # nll and log-softmax gradients, fp32 [B*N,V]
    other = _outside_blocks_saved_bytes(model, b, n, s)
    layers = [layer_saved_bytes(model, i, b, n, s) for i in range(num_layers)]
    # gradients of a block's outputs and of its largest intermediates (SwiGLU's [B,N,d_ff]) during its backward
    block_backward = 3 * s * t * c.ffn_hidden_size + 2 * s * e
    if not activation_checkpointing:
        return other + sum(layers) + max(head + loss_gradients, block_backward)
    # TAPE's [B,H,N,D] state enters every block, a new one per block once it moves (else one tensor, in other)
    state_per_block = s * e if _tape_state_moves(c) else 0
    inputs = num_layers * (s * e + state_per_block)
    return other + inputs + max(head + loss_gradients, max(layers) + block_backward)


def layer_saved_bytes(model, layer: int, micro_batch_size: int, seq_len: int, dtype_bytes: int) -> int:
    """Bytes autograd saves in block ``layer``'s forward (shared tables and biases excluded)."""
    c = model.config
    b, n, s = micro_batch_size, seq_len, dtype_bytes
    d, h, t = c.hidden_size, c.num_heads, b * n
    e = t * d
    lse = 4 * b * h * n  # SDPA's fp32 log-sum-exp [B,H,N]
    # per RMSNorm: its input in fp32 (in bf16 an fp32 copy), the normalised and the scaled output, rsqrt [B,N,1]
    norms = 2 * ((4 + 2 * s) * e + 4 * t)
    attention = 4 * s * e + lse  # q, k, v and the output, saved by SDPA
    mlp = 4 * s * t * c.ffn_hidden_size  # gate, silu(gate), up, and their product (down_proj's input)
    saved = norms + attention + mlp
    p = c.positional
    name = p.name
    if name in ROTARY:
        saved += s * e  # a rotated q makes SDPA's output [B,H,N,D]-contiguous: merging the heads copies it
    if _tape_state_moves(c):  # a state that never moves is one tensor: shared_state_bytes
        saved += s * e  # the state [c|s], saved by the rotation
        if layer > 0:
            saved += 2 * s * e  # once the state depends on parameters, the rotation saves the projected q and k
    if name == "tape" and layer < c.num_layers - 1:  # the state updates (skipped in the last layer)
        if p.tape_attention_update:
            saved += s * e + lse + s * h  # A @ [c|s] and its log-sum-exp, gamma
            if resolve_attention_form(p.tape_attention, "cuda", d // h, n) == "one_call":
                # one SDPA call saves the concatenated value [v|c|s] (v and [c|s] are not saved on their own) and
                # one log-sum-exp: v's bytes once more, one lse less
                saved += s * e - lse
        if p.tape_mlp_update:
            i = model.positional.position_size
            # the MLP output read by x_proj, the state's copy in the head mix; x_proj, silu, the [B,N,H,I] product
            saved += 2 * s * e + s * t * (2 * i + h * i)
            if layer > 0 or p.tape_attention_update:
                saved += s * t * h * h  # the [B,N,H,H] mix: saved only for a state that depends on parameters
    if name in ("alibi", "fire"):  # attention with the bias built per block of queries (blocked_bias)
        positional = model.layers[layer].positional
        pair_bytes = (positional.bias_bytes_per_pair(h, s) if name == "alibi"
                      else positional.bias_bytes_per_pair(h, s, max(4, s)))
        _, recompute = block_plan(b, h, n, True, pair_bytes, "cuda", grad=True)
        if recompute:  # the blocks keep their q, k, v slices (saved above) and rebuild the rest in the backward
            saved -= lse
        else:
            saved += s * h * n * n  # the layer's [1,H,N,N] bias, saved by SDPA as its mask
            if name == "fire":  # the bias MLP's hidden layer and the fp32 [N,N] psi terms
                saved += 4 * n * n * c.positional.fire_mlp_width + 5 * 4 * n * n
    return saved


def shared_state_bytes(model, micro_batch_size: int, seq_len: int, dtype_bytes: int) -> int:
    """Saved positional tensors shared by every layer: rotary tables, or TAPE's state where no update moves it."""
    c = model.config
    n, s, head_dim = seq_len, dtype_bytes, c.hidden_size // c.num_heads
    name = c.positional.name
    if name == "rope":
        return 2 * n * (head_dim // 2) * s  # cos, sin [1,1,N,F]
    if name == "randrope":
        return 2 * micro_batch_size * n * (head_dim // 2) * s  # per-row positions: [B,1,N,F]
    if name == "xpos":
        return 4 * n * (head_dim // 2) * s
    if name == "tape" and not _tape_state_moves(c):  # both updates off: every layer reads the initial state
        return micro_batch_size * n * c.hidden_size * s  # [B,H,N,2F]
    return 0  # a moving TAPE state is counted per layer; ALiBi's and FIRE's biases too; nope has none


def _tape_state_moves(config: ModelConfig) -> bool:
    """Whether TAPE's state changes from layer to layer: one of its updates is on (model.positional.tape_*_update)."""
    p = config.positional
    return p.name == "tape" and (p.tape_attention_update or p.tape_mlp_update)
