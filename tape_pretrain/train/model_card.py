"""The README.md model card of an export: what the model is, how it was trained and how it loads, for the Hub."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from tape_pretrain.config import ModelConfig

ENCODING_NAMES = {"tape": "TAPE (contextualized equivariant positional encoding)", "rope": "RoPE", "nope": "NoPE",
                  "alibi": "ALiBi", "fire": "FIRE", "xpos": "xPos", "randrope": "RandPE (randomized RoPE)"}


@dataclass
class TrainingFacts:
    """What the card reports about training; None where unknown."""

    steps: int | None = None
    tokens: int | None = None
    data_fingerprint: str | None = None
    final_val_loss: float | None = None
    eval_table: str | None = None
    """A markdown table (the run directory's eval.md), if the run was evaluated."""


def final_val_loss(metrics_path: Path, up_to_step: int | None = None) -> float | None:
    """The last finite val_loss in a metrics.jsonl (at or before up_to_step), or None."""
    if not metrics_path.is_file():
        return None
    value = None
    for line in metrics_path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
        loss = record.get("val_loss")
        if (isinstance(loss, int | float) and math.isfinite(loss)
                and (up_to_step is None or record.get("step", 0) <= up_to_step)):
            value = float(loss)
    return value


def _known(value, fmt: str = "{}") -> str:
    return "unknown" if value is None else fmt.format(value)


def model_card(config: ModelConfig, parameters: int, facts: TrainingFacts) -> str:
    """The card's markdown. RoPE exports load as stock Llama; every other encoding through the export's own code."""
    encoding = config.positional.name
    remote = encoding != "rope"
    load = ("from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f"model = AutoModelForCausalLM.from_pretrained(PATH{', trust_remote_code=True' if remote else ''})\n"
            # trust_remote_code for the tokenizer only spares transformers' question about the model's code
            f"tokenizer = AutoTokenizer.from_pretrained(PATH{', trust_remote_code=True' if remote else ''})\n"
            "ids = tokenizer(\"def main():\", return_tensors=\"pt\").input_ids\n"
            "print(tokenizer.decode(model.generate(ids, max_new_tokens=32, do_sample=False)[0]))")
    code_note = ("The modeling code in this directory is tape_pretrain's own model code, shipped unchanged "
                 "(`trust_remote_code=True` runs it); it needs torch and transformers only. Generation uses a "
                 "key/value cache (for TAPE also the positional state of past tokens). Batches must be unpadded."
                 if remote else "This is a stock Hugging Face Llama checkpoint: no custom code.")
    lines = [
        "---", "library_name: transformers", "pipeline_tag: text-generation", "tags:", "- tape_pretrain",
        f"- {encoding}", "---", "",
        f"# A {encoding} language model trained with tape_pretrain", "",
        "| | |", "|---|---|",
        f"| positional encoding | {ENCODING_NAMES.get(encoding, encoding)} |",
        f"| parameters | {parameters:,} |",
        f"| layers x width x heads | {config.num_layers} x {config.hidden_size} x {config.num_heads} |",
        f"| vocabulary | {config.vocab_size:,} |",
        f"| training length | {config.max_seq_len:,} tokens, attention: {config.attention} |",
        f"| steps | {_known(facts.steps, '{:,}')} |",
        f"| tokens trained | {_known(facts.tokens, '{:,}')} |",
        f"| data fingerprint | {_known(facts.data_fingerprint)} |",
        f"| final val loss | {_known(facts.final_val_loss, '{:.4f}')} |",
        "", "## Use", "", "```python", load, "```", "", code_note, "",
    ]
    if facts.eval_table:
        lines += ["## Evaluation", "", facts.eval_table.strip(), ""]
    lines += ["## Files", "",
              "`model.safetensors` (fp32 weights), `config.json` (its `tape_pretrain` section is the model config "
              "as trained), `tokenizer.model` (SentencePiece) with `tokenizer_config.json`"
              + (", and the modeling code (`*.py`)." if remote else "."), ""]
    return "\n".join(lines)
