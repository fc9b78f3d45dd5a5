"""bench model: one training step (forward, backward, AdamW step) of TAPE vs RoPE at the same shape."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tape_pretrain.bench.timing import alternate, format_result
from tape_pretrain.config import ModelConfig, PositionalConfig
from tape_pretrain.distributed.engine import compile_blocks as compile_model_blocks
from tape_pretrain.models import build_model


def make_step(name: str, preset: str, seq_len: int, batch: int, device: torch.device, dtype: torch.dtype,
              compile_blocks: bool = False):
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset=preset, max_seq_len=seq_len,
                                    positional=PositionalConfig(name=name))).to(device)
    if compile_blocks:
        compile_model_blocks(model)  # compiled during the warm-up steps, which are not timed
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    tokens = torch.randint(0, model.config.vocab_size, (batch, seq_len + 1), device=device)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def step():
        with autocast:
            logits = model(inputs)
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def run(preset: str = "paper-155m", seq_len: int = 1024, batch: int = 1, repeats: int = 5, warmup: int = 2,
        encodings: tuple[str, ...] = ("tape", "rope"), compile_blocks: bool = False) -> dict[str, float]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    steps = {name: make_step(name, preset, seq_len, batch, device, dtype, compile_blocks) for name in encodings}
    medians = alternate(steps, warmup=warmup, repeats=repeats)
    for name, seconds in medians.items():
        print(f"{name:>9}: {seconds * 1000:9.1f} ms/step  ({preset}, N={seq_len}, B={batch}, {device.type}, "
              f"{str(dtype).removeprefix('torch.')}{', compiled' if compile_blocks else ''}, median of {repeats})")
    result = {f"{name}_ms": s * 1000 for name, s in medians.items()}
    if "tape" in medians and "rope" in medians:
        result["ratio_tape_over_rope"] = medians["tape"] / medians["rope"]
    print(format_result(result))
    return result
