"""Addition length generalisation: exact-match accuracy of greedy answers per operand length, with a Wilson 95 %
interval.

For each operand length L, ``problems_per_length`` fresh problems with both operands of exactly L digits
(``tape_pretrain.data.addition.fixed_length_problems``: the evaluation's own random stream, seeded by (seed, L); the
format, every number least significant digit first, is that module's). The model is prompted with the problem up to
and including ``=``, tokenized as prep tokenizes a document (SentencePiece's dummy prefix first), and decodes
greedily through its cache (``passkey.greedy_tokens``), a batch of problems at a time, for as many tokens as the
true sum has digits (the tokenizer splits digits, so a digit is a token), stopping a row at EOS. The answer is the
generated pieces joined as they are (no decode normalisation), and it is correct when it equals the reversed sum
exactly.
"""

from __future__ import annotations

import torch

from tape_pretrain.data.addition import fixed_length_problems
from tape_pretrain.eval.passkey import greedy_tokens, wilson_interval


def exact_match(predictions: list[str], answers: list[str]) -> list[bool]:
    """Whether each predicted answer is exactly its reversed sum: '0964' for '321+7654=' (123 + 4567 = 4690);
    '4690', '096', '09640' and ' 0964' are wrong."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answers")
    return [p == a for p, a in zip(predictions, answers, strict=True)]


def length_result(correct: list[bool]) -> dict:
    """Accuracy, correct count, problem count and Wilson 95 % interval of one length's exact matches."""
    n, k = len(correct), sum(correct)
    return {"accuracy": k / n, "correct": k, "count": n, "ci95": list(wilson_interval(k, n))}


def score_predictions(predictions: dict[int, list[str]], answers: dict[int, list[str]]) -> dict[int, dict]:
    """``length_result`` of each length's predictions against its answers."""
    return {n: length_result(exact_match(predictions[n], answers[n])) for n in answers}


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: list[str], answer_tokens: list[int], device,
                   batch_size: int = 64) -> list[str]:
    """Each prompt's greedy continuation: answer_tokens[i] tokens, fewer at EOS (not included), the pieces joined as
    they are. Prompts of one token count share a batch (no padding: positions stay those of a lone problem)."""
    processor = tokenizer.processor
    eos = processor.eos_id()
    ids = processor.encode(prompts, out_type=int)
    out: list[str] = [""] * len(prompts)
    by_length: dict[int, list[int]] = {}
    for i, prompt_ids in enumerate(ids):
        by_length.setdefault(len(prompt_ids), []).append(i)
    for rows in by_length.values():
        for start in range(0, len(rows), batch_size):
            batch = rows[start:start + batch_size]
            tokens = torch.tensor([ids[i] for i in batch], device=device)  # [B,N]
            steps = max(answer_tokens[i] for i in batch)
            generated, ended = [], torch.zeros(len(batch), dtype=torch.bool, device=device)
            for next_ids in greedy_tokens(model, tokens, steps):
                generated.append(next_ids)
                ended |= next_ids == eos
                if len(generated) < steps and bool(ended.all()):
                    break
            table = torch.stack(generated, dim=1).tolist()  # [B,T]
            for i, row in zip(batch, table, strict=True):
                row = row[:answer_tokens[i]]
                if eos in row:
                    row = row[:row.index(eos)]
                out[i] = "".join(processor.id_to_piece(t) for t in row)
    return out


def addition_accuracy(model, tokenizer, lengths: list[int], problems_per_length: int, seed: int, device="auto",
                      dtype="auto", batch_size: int = 64) -> dict[int, dict]:
    """Exact-match accuracy of the model's greedy answers per operand length (digits): ``{length: {accuracy,
    correct, count, ci95}}``. The model is moved to ``device`` in ``dtype`` (see ``eval_placement``) and used in its
    current mode (``load_export_model`` returns it in eval mode)."""
    from tape_pretrain.eval.perplexity import eval_placement

    if problems_per_length <= 0:
        raise ValueError(f"addition problems per length {problems_per_length} must be positive")
    device, dtype = eval_placement(device, dtype)
    model.to(device=device, dtype=dtype)
    problems = {n: fixed_length_problems(n, problems_per_length, seed) for n in lengths}  # a bad length fails first
    # One token past the answer: exact match needs the model to stop there (EOS, as every training problem ends),
    # so a spurious extra carry digit ("13931" for 1393) is wrong.
    predictions = {n: greedy_answers(model, tokenizer, p.prompts, [len(a) + 1 for a in p.answers], device,
                                     batch_size) for n, p in problems.items()}
    return score_predictions(predictions, {n: p.answers for n, p in problems.items()})


def addition_table(results: dict[int, dict]) -> list[str]:
    """The markdown table of ``addition_accuracy``'s results: digits | accuracy | 95% interval | problems."""
    rows = ["| digits | accuracy | 95% interval | problems |", "|---:|---:|---:|---:|"]
    rows += [f"| {n} | {r['accuracy']:.3f} | [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] | {r['count']} |"
             for n, r in results.items()]
    return rows


def check_addition_tokenizer(tokenizer, where: str) -> None:
    """Every digit, '+' and '=' must be a piece of its own (the project's tokenizers split digits; one that never saw
    them would spell them in bytes and the answers could not be counted in tokens)."""
    from tape_pretrain.errors import DataError

    processor = tokenizer.processor
    missing = [c for c in "0123456789+=" if processor.piece_to_id(c) == processor.unk_id()]
    if missing:
        raise DataError(f"{where}: the tokenizer has no piece for {' '.join(missing)}: not a tokenizer of an addition "
                        "model (train one with `tape-pretrain tokenizer train --input builtin:addition ...`)")


def addition_command(args, export, lengths: list[int]) -> dict[int, dict]:
    """`tape-pretrain eval --task addition`: ``addition_accuracy`` of the export at operand lengths ``lengths`` with
    ``args.problems`` problems each (seed ``args.seed``); prints the table and writes addition.json and addition.md
    under ``args.out`` (default: the export's parent, the run directory)."""
    import json
    from pathlib import Path

    from tape_pretrain.config import ConfigError
    from tape_pretrain.data.tokenizer import Tokenizer
    from tape_pretrain.errors import DataError
    from tape_pretrain.eval.perplexity import dtype_name, eval_placement
    from tape_pretrain.train.export import load_export_model

    if args.problems <= 0:
        raise ConfigError(f"--problems {args.problems} must be a positive integer")
    tokenizer_path = Path(export) / "tokenizer.model"
    if not tokenizer_path.is_file():
        raise DataError(f"{export} has no tokenizer.model: --task addition prompts the model with its own tokenizer")
    tokenizer = Tokenizer.load(str(tokenizer_path))
    check_addition_tokenizer(tokenizer, str(tokenizer_path))
    device, dtype = eval_placement(args.device, args.dtype)
    model = load_export_model(str(export))
    if tokenizer.vocab_size > model.config.vocab_size:
        raise DataError(f"{tokenizer_path} has {tokenizer.vocab_size} ids, the model only {model.config.vocab_size}")
    results = addition_accuracy(model, tokenizer, lengths, args.problems, args.seed, device, dtype)
    table = addition_table(results)
    caption = (f"addition exact match ({model.config.positional.name}), {args.problems} problems per operand length, "
               f"seed {args.seed}; numbers written least significant digit first")
    print("\n".join([caption, "", *table]))
    out = Path(args.out) if args.out else Path(export).parent
    out.mkdir(parents=True, exist_ok=True)
    placement = {"seed": args.seed, "device": str(device), "dtype": dtype_name(dtype)}
    (out / "addition.json").write_text(json.dumps([{"digits": n} | r | placement for n, r in results.items()],
                                                  indent=1))
    (out / "addition.md").write_text("\n".join([caption, "", *table]) + "\n")
    return results
