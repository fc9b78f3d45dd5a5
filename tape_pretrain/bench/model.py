"""bench model: one training step (forward, backward, AdamW step) of TAPE vs RoPE at the same shape.

With ``tape_attention="both"`` TAPE runs in both attention forms (one call over [v|c|s], two calls), side by side."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from tape_pretrain.bench.timing import alternate, format_result
from tape_pretrain.config import ModelConfig, PositionalConfig
from tape_pretrain.distributed.engine import compile_blocks as compile_model_blocks
from tape_pretrain.models import build_model
from tape_pretrain.models.presets import resolve_model_config
from tape_pretrain.models.tape import resolve_attention_form

TAPE_ATTENTION_FORMS = ("two_calls", "one_call")


def make_step(name: str, preset: str, seq_len: int, batch: int, device: torch.device, dtype: torch.dtype,
              compile_blocks: bool = False, tape_attention: str = "auto"):
    torch.manual_seed(0)
    positional = PositionalConfig(name=name, tape_attention=tape_attention)
    master = build_model(ModelConfig(preset=preset, max_seq_len=seq_len, positional=positional)).to(device)
    # As the engines compute in bf16: the forward and backward run on a bf16 copy of every parameter (FSDP2's
    # param_dtype; DeepSpeed's bf16 module), the fp32 master weights take the optimizer step and are copied back.
    model = copy.deepcopy(master).to(dtype) if dtype != torch.float32 else master
    if compile_blocks:
        compile_model_blocks(model)  # compiled during the warm-up steps, which are not timed
    optimizer = torch.optim.AdamW(master.parameters(), lr=1e-4, foreach=True)
    tokens = torch.randint(0, model.config.vocab_size, (batch, seq_len + 1), device=device)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    pairs = list(zip(model.parameters(), master.parameters())) if model is not master else []

    def step():
        logits = model(inputs)
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        loss.backward()
        if pairs:
            for low, high in pairs:
                if low.grad is not None:
                    high.grad = low.grad.float()
                    low.grad = None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if pairs:
            with torch.no_grad():
                torch._foreach_copy_([low for low, _ in pairs], [high for _, high in pairs])

    return step


def run(preset: str = "paper-155m", seq_len: int = 1024, batch: int = 1, repeats: int = 5, warmup: int = 2,
        encodings: tuple[str, ...] = ("tape", "rope"), compile_blocks: bool = False,
        tape_attention: str = "auto") -> dict[str, float]:
    """Median step times; ``tape_attention`` is a model.positional.tape_attention value or "both".

    With "both", TAPE is timed once per form (``tape_one_call``, ``tape_two_calls``) and ``tape`` stands for the
    form that "auto" picks on this device."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = resolve_model_config(ModelConfig(preset=preset))
    auto = resolve_attention_form("auto", device.type, config.hidden_size // config.num_heads, seq_len)
    variants = {name: (name, "auto") for name in encodings}
    if "tape" in encodings and tape_attention == "both":
        del variants["tape"]
        variants = {f"tape_{form}": ("tape", form) for form in TAPE_ATTENTION_FORMS} | variants
    elif "tape" in encodings:
        variants["tape"] = ("tape", tape_attention)
    steps = {label: make_step(name, preset, seq_len, batch, device, dtype, compile_blocks, form)
             for label, (name, form) in variants.items()}
    medians = alternate(steps, warmup=warmup, repeats=repeats)
    for name, seconds in medians.items():
        print(f"{name:>14}: {seconds * 1000:9.1f} ms/step  ({preset}, N={seq_len}, B={batch}, {device.type}, "
              f"{str(dtype).removeprefix('torch.')}{', compiled' if compile_blocks else ''}, median of {repeats})")
    if "tape" in encodings:
        print(f"{'tape attention':>14}: {tape_attention} (auto picks {auto} on {device.type})")
        if tape_attention == "both":
            medians["tape"] = medians[f"tape_{auto}"]
    result = {f"{name}_ms": s * 1000 for name, s in medians.items()}
    if "rope" in medians:
        for name in medians:
            if name.startswith("tape"):
                result[f"ratio_{name}_over_rope"] = medians[name] / medians["rope"]
    print(format_result(result))
    return result
