"""Run as a script, in a process where importing tape_pretrain fails: load every export under ROOT (ROOT/<name>)
with AutoModelForCausalLM / AutoTokenizer, as a user without this package would, and write what they compute to
ROOT/probe.pt for the tests to compare with the project's model.

Per export: the logits of ROOT/<name>/inputs.pt's ids; greedy generate() with and without the cache and the input
lengths each forward received (a cached generate feeds the prompt, then one token per step); the tokenizer's ids
and decoded text of ROOT/sample.txt; the model class."""

import sys

sys.modules["tape_pretrain"] = None  # any import of it, by the shipped code or through a fallback, fails

from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402


def probe(directory: Path) -> dict:
    inputs = torch.load(directory / "inputs.pt")
    model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True).eval()
    seen: list[int] = []
    inner = model.model if hasattr(model.model, "new_cache") else model  # ours, or stock Llama
    hook = inner.register_forward_pre_hook(lambda m, args, kwargs: seen.append(
        (args[0] if args else kwargs["input_ids"]).shape[1]), with_kwargs=True)
    with torch.no_grad():
        seen.clear()
        logits = model(inputs["ids"]).logits
        prompt = inputs["ids"][:1, :inputs["prompt_len"]]
        seen.clear()
        cached = model.generate(prompt, max_new_tokens=inputs["new_tokens"], do_sample=False, use_cache=True,
                                pad_token_id=model.config.eos_token_id, eos_token_id=None)
        cached_lengths = list(seen)
        uncached = model.generate(prompt, max_new_tokens=inputs["new_tokens"], do_sample=False, use_cache=False,
                                  pad_token_id=model.config.eos_token_id, eos_token_id=None)
        labels = inputs["ids"].clone()
        labels[:, :3] = -100  # ignored positions
        loss = model(inputs["ids"], labels=labels).loss
        last_two = model(inputs["ids"], logits_to_keep=2).logits
        try:
            model(inputs["ids"], attention_mask=torch.ones_like(inputs["ids"]).index_fill_(1, torch.tensor([0]), 0))
            padded_refused = False
        except ValueError:
            padded_refused = True
    hook.remove()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    ids = tokenizer((directory.parent / "sample.txt").read_text(encoding="utf-8"))["input_ids"]
    return {"class": type(model).__name__, "logits": logits, "cached": cached, "uncached": uncached,
            "cached_forward_lengths": cached_lengths, "sample_ids": ids, "decoded": tokenizer.decode(ids),
            "eos_token_id": tokenizer.eos_token_id, "loss": loss, "last_two": last_two,
            "padded_refused": padded_refused,
            "config_special_ids": [model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id],
            "tokenizer_special_ids": [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]}


def main() -> None:
    try:
        import tape_pretrain  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("tape_pretrain is importable: the probe would not show that exports load without it")
    root = Path(sys.argv[1])
    results = {d.name: probe(d) for d in sorted(root.iterdir()) if (d / "config.json").is_file()}
    torch.save(results, root / "probe.pt")


if __name__ == "__main__":
    main()
