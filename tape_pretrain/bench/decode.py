"""bench decode: greedy decoding of new tokens after a prompt, through the decoding cache (the prompt once, then one
token per step) against recomputing the whole prefix every step; both take the last position's logits only."""

from __future__ import annotations

import torch

from tape_pretrain.bench.timing import alternate, format_result
from tape_pretrain.config import ModelConfig, PositionalConfig
from tape_pretrain.models import build_model


def make_decode(model, prompt: torch.Tensor, new_tokens: int, use_cache: bool, tokens: list[torch.Tensor]):
    """A call that decodes ``new_tokens`` greedily after ``prompt`` and leaves the tokens [B, new_tokens] in
    ``tokens`` (the last call's only)."""
    def decode():
        tokens[:] = [torch.stack(list(model.generate_greedy(prompt, new_tokens, use_cache=use_cache)), dim=1)]

    return decode


def run(preset: str = "tiny", prompt_len: int = 1024, new_tokens: int = 64, batch: int = 1, repeats: int = 3,
        warmup: int = 1, encodings: tuple[str, ...] = ("tape", "rope")) -> dict[str, float | int]:
    """Median seconds of a whole generation per encoding, cached and uncached; ``decode_speedup_<name>`` is the
    uncached time over the cached one, ``decode_same_tokens_<name>`` 1 where both gave the same tokens.

    RandPE decodes with randrope_eval=expected (a cache refuses the sampled positions, models.cache)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    steps, outputs = {}, {}
    for name in encodings:
        torch.manual_seed(0)
        positional = PositionalConfig(name=name, randrope_eval="expected")
        model = build_model(ModelConfig(preset=preset, positional=positional)).to(device=device, dtype=dtype).eval()
        prompt = torch.randint(0, model.config.vocab_size, (batch, prompt_len), device=device)
        for mode in ("cached", "uncached"):
            outputs[name, mode] = []
            steps[f"{name}_{mode}"] = make_decode(model, prompt, new_tokens, mode == "cached", outputs[name, mode])
    with torch.inference_mode():
        medians = alternate(steps, warmup=warmup, repeats=repeats)
    result: dict[str, float | int] = {}
    for name in encodings:
        cached, uncached = medians[f"{name}_cached"], medians[f"{name}_uncached"]
        same = torch.equal(outputs[name, "cached"][0], outputs[name, "uncached"][0])
        print(f"{name:>9}: cached {cached * 1000:8.1f} ms, uncached {uncached * 1000:9.1f} ms, "
              f"{uncached / cached:6.1f}x  ({new_tokens} tokens after {prompt_len}, {preset}, B={batch}, "
              f"{device.type}, {str(dtype).removeprefix('torch.')}, median of {repeats}; same tokens: "
              f"{'yes' if same else 'NO'})")
        result |= {f"decode_cached_ms_{name}": cached * 1000, f"decode_uncached_ms_{name}": uncached * 1000,
                   f"decode_speedup_{name}": uncached / cached, f"decode_same_tokens_{name}": int(same)}
    print(format_result(result))
    return result
