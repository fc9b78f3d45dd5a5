"""`tape-pretrain inspect model`: parameters, positional parameters and FLOPs of a preset or config, and with
--engine the per-rank memory plan of a training step (tape_pretrain.memory_plan)."""

from __future__ import annotations

from tape_pretrain.memory_plan import MemoryPlan, plan_memory
from tape_pretrain.models import build_model
from tape_pretrain.models.presets import resolve_model_config_from


def inspect_model(name_or_config: str, seq_len: int | None = None, positional: str | None = None,
                  memory: dict | None = None) -> str:
    """The report on a preset, a run config file (the model its training builds) or an export directory: for the
    ``positional`` encoding, else for RoPE and TAPE. ``memory`` (plan_memory's keyword arguments but the model and
    the sequence length) adds the memory plan of each encoding shown."""
    import torch

    names = [positional] if positional else ["rope", "tape"]
    lines, plans = [], {}
    trainable = run_trainable(name_or_config)
    with torch.device("meta"):  # shapes only: a 7B model inspects instantly and without memory
        for name in names:
            config = resolve_model_config_from(name_or_config, positional=name)
            model = build_model(config)
            n = seq_len or model.config.max_seq_len
            flops = model.forward_flops_per_token(n)
            c = model.config
            lines.append(
                f"{name:>8}: parameters={model.num_parameters():,} "
                f"positional_parameters={model.num_positional_parameters():,} "
                f"forward_flops_per_token@{n}={flops:,.0f} "
                f"(d={c.hidden_size} L={c.num_layers} H={c.num_heads} d_ff={c.ffn_hidden_size} V={c.vocab_size})")
            if memory is not None:
                plans[name] = _plan(config, n, memory, trainable, lines)
    if plans:
        lines += ["", memory_table(plans, n, **memory)]
    return "\n".join(lines)


def run_trainable(name_or_config: str) -> list[str]:
    """A run config file's optim.trainable (what the memory plan counts gradients and optimizer state for), without
    LoRA's adapters (a few MiB at any rank worth using: the plan counts the rest as frozen); else [all]."""
    from pathlib import Path

    from tape_pretrain.config import load_config

    path = Path(name_or_config)
    if not path.is_file():
        return ["all"]
    entries = [entry for entry in load_config(path).optim.trainable if entry != "lora"]
    return entries or ["embed_tokens.weight"]  # LoRA alone: next to nothing trains (the embedding stands in)


def _plan(config, seq_len: int, memory: dict, trainable: list[str], lines: list[str]) -> MemoryPlan:
    from tape_pretrain.config import ConfigError

    try:
        return plan_memory(config, seq_len=seq_len, trainable=trainable, **memory)
    except ConfigError as exc:  # the run's selection names another encoding's parameters (the tape preset on rope)
        lines.append(f"{config.positional.name:>8}: planned with every parameter trainable ({exc})")
        return plan_memory(config, seq_len=seq_len, **memory)


MEMORY_ROWS = (
    ("parameters", "parameters"),
    ("master_weights", "fp32 master weights"),
    ("optimizer_states", "optimizer states"),
    ("gradients", "gradients"),
    ("activations", "activations"),
    ("buckets", "DeepSpeed reduce bucket"),
    ("transient_backward", "transient, backward"),
    ("transient_step", "transient, step"),
    ("peak", "peak"),
)


def memory_table(plans: dict[str, MemoryPlan], seq_len: int, *, engine: str, zero_stage: int | None,
                 world_size: int, micro_batch_size: int, precision: str, activation_checkpointing: bool,
                 replicate_degree: int = 1, reshard_after_forward: bool = True) -> str:
    """The plans side by side, one column per encoding, in GiB or MiB."""
    setup = f"{engine} ZeRO-{zero_stage}" if engine == "deepspeed" else engine
    if replicate_degree > 1:
        setup += f" (HSDP: {replicate_degree} replicas)"
    if not reshard_after_forward:
        setup += " (no reshard after forward)"
    checkpointing = "on" if activation_checkpointing else "off"
    lines = [f"memory per rank: {setup}, world {world_size}, {precision}, micro-batch {micro_batch_size} x "
             f"{seq_len} tokens, activation checkpointing {checkpointing}",
             f"{'':24}" + "".join(f"{name:>12}" for name in plans)]
    for field, label in MEMORY_ROWS:
        lines.append(f"{label:24}" + "".join(f"{format_bytes(getattr(plan, field)):>12}" for plan in plans.values()))
    lines.append("peak = parameters + masters + optimizer + bucket + max(activations + transient backward, "
                 "gradients + transient step)")
    return "\n".join(lines)


def format_bytes(n: int) -> str:
    if n == 0:
        return "-"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
