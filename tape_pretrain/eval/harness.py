"""lm-evaluation-harness on an export, and the project's own loglikelihood of a continuation to check it against.

``run_lm_eval`` runs lm-eval 0.4 through its stock ``hf`` model with ``trust_remote_code=True``: the export loads as
any Hugging Face model (train.export), so lm-eval sees our logits, not a private adapter's. Tasks are lm-eval's
(names, or YAML files under ``include`` for local ones); nothing is downloaded that the tasks do not name.

``continuation_loglikelihoods`` scores (context, continuation) pairs with the project's model and tokenizer, tokenized
as lm-eval tokenizes for causal models: trailing whitespace of the context moves to the continuation, the pair is
encoded whole and the continuation is what follows the first len(context ids) tokens of it, after the context's
own encoding (when the two encodings disagree at the seam, as BPE may, the scored sequence is neither's).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from tape_pretrain.config import ConfigError

LM_EVAL_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}


def split_pair(encode, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) of a pair, as lm-evaluation-harness splits them for a causal model."""
    if not context:
        raise ValueError("the context must be non-empty (lm-eval scores an empty one after its prefix token)")
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = encode(context + continuation)
    context_ids = encode(context)
    return context_ids, whole[len(context_ids):]


@torch.no_grad()
def continuation_loglikelihoods(model, encode, pairs: list[tuple[str, str]],
                                device: torch.device | str = "cpu") -> list[tuple[float, bool]]:
    """Per pair: the summed log-probability of the continuation's tokens given the context, in fp32, and whether
    each of them is the greedy (argmax) token."""
    out = []
    for context, continuation in pairs:
        context_ids, continuation_ids = split_pair(encode, context, continuation)
        ids = torch.tensor([context_ids + continuation_ids], device=device)
        logits = model(ids[:, :-1])[0, len(context_ids) - 1:].float()  # the positions predicting the continuation
        targets = ids[0, len(context_ids):]
        logprobs = F.log_softmax(logits, dim=-1)
        out.append((float(logprobs.gather(1, targets[:, None]).sum()), bool((logits.argmax(-1) == targets).all())))
    return out


def run_lm_eval(export: Path, tasks: list[str], out: Path, *, include: str | None = None, device: str = "cpu",
                dtype: torch.dtype = torch.float32, batch_size: int = 4, limit: float | None = None,
                num_fewshot: int | None = None, log_samples: bool = False) -> dict:
    """lm-eval's results for ``tasks`` on the export; writes OUT/lm_eval.json (results and configs, plus samples
    with ``log_samples``) and OUT/lm_eval.md (lm-eval's table), and prints the table."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
        from lm_eval.utils import make_table
    except ImportError:
        raise ConfigError("--lm-eval needs lm-evaluation-harness: pip install 'lm-eval>=0.4,<0.5'") from None
    if include is not None and not Path(include).exists():
        raise ConfigError(f"--lm-eval-include {include}: no such file or directory")
    manager = TaskManager(include_path=include)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"--lm-eval: unknown task(s) {', '.join(unknown)} (lm-eval's names, or tasks defined in "
                          "YAML files under --lm-eval-include)")
    model_args = {"pretrained": str(export), "trust_remote_code": True, "dtype": LM_EVAL_DTYPES[dtype],
                  "prefix_token_id": _eos_id(export)}  # an empty context starts after EOS, as documents did
    if batch_size > 1 and _has_generative_task(tasks, manager):
        print(f"note: --batch-size {batch_size} -> 1: generation tasks pad prompts on the left, which the export "
              "refuses (positions would count the padding)")
        batch_size = 1
    try:
        results = lm_eval.simple_evaluate(model="hf", model_args=model_args, tasks=tasks, task_manager=manager,
                                          device=device, batch_size=batch_size, limit=limit, num_fewshot=num_fewshot,
                                          log_samples=log_samples)
    except OSError as exc:
        if exc.filename is not None:
            raise  # a file: eval names it
        from tape_pretrain.errors import DataError

        raise DataError(f"--lm-eval {','.join(tasks)}: {type(exc).__name__}: {exc} (lm-eval's tasks fetch their "
                        "data from the Hugging Face Hub unless cached; local tasks: --lm-eval-include)") from None
    if results is None:  # lm-eval returns None on ranks other than 0
        return {}
    table = make_table(results)
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    keep = ("results", "configs", "versions", "n-shot", "higher_is_better", "n-samples", "samples")
    (out / "lm_eval.json").write_text(json.dumps({k: results[k] for k in keep if k in results}, indent=1,
                                                 default=str))
    (out / "lm_eval.md").write_text(table)
    return results


def _eos_id(export: Path) -> int:
    """The end-of-document id the model saw between training documents (config.json's eos_token_id)."""
    eos = json.loads((export / "config.json").read_text()).get("eos_token_id")
    return eos if isinstance(eos, int) else 2


def _has_generative_task(tasks: list[str], manager) -> bool:
    if hasattr(manager, "load"):  # newer lm-eval: a flat dict of the leaf tasks (get_task_dict is deprecated)
        loaded = list(manager.load(tasks)["tasks"].values())
    else:
        from lm_eval.tasks import get_task_dict

        def leaves(node):
            for value in node.values():
                yield from leaves(value) if isinstance(value, dict) else [value]

        loaded = list(leaves(get_task_dict(tasks, manager)))
    return any(getattr(task, "OUTPUT_TYPE", None) == "generate_until" for task in loaded)
