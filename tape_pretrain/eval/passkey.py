"""Passkey retrieval in the LongLoRA / Landmark-attention format: greedy decoding, exact-match scoring, and a
Wilson interval per cell.

A prompt is the task description, whole filler sentences with the key sentence inserted between two of them,
and the question. Each sentence is tokenized on its own (SentencePiece's dummy prefix is the space that joins
them), so a prompt's length is counted exactly: a cell of length L holds prompts of at most L tokens, within one
filler sentence of L. Greedy decoding runs the prompt once and then one token per step through the model's decoding
cache (tape_pretrain.models.cache; last-position logits only), which gives the logits of recomputing the whole prefix
to rounding, for every encoding, TAPE included (in bf16 a near-tie may break the other way). Where the cache would
not (RandPE with randrope_eval=sample draws the positions of the whole prefix anew at each length:
Transformer.cache_refusal), and for models other than Transformer, each step recomputes the prefix.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tape_pretrain.models.transformer import Transformer

DESCRIPTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
               "I will quiz you about the important information there.")
FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
QUESTION = "What is the pass key? The pass key is"


def key_sentence(key: str) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key."


@dataclass
class PasskeyPrompt:
    ids: list[int]
    key: str
    depth: float
    key_position: int
    """Token index where the key sentence starts."""
    num_filler: int
    """Filler sentences in the prompt."""
    key_after: int
    """Filler sentences before the key sentence: round(depth * num_filler)."""


def make_prompt(tokenizer, length: int, depth: float, rng: random.Random) -> PasskeyPrompt:
    """A prompt of at most ``length`` tokens and as many whole filler sentences as fit (so within one filler
    sentence of ``length``), with a random 5-digit key whose sentence follows round(depth x filler sentences) of
    them (Python's round, half to even): depth 0 puts it right after the task description, 1 right before the
    question."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"passkey depth {depth:g} must be in [0, 1]")
    key = str(rng.randrange(10000, 100000))
    encode = tokenizer.processor.encode
    head, sentence, question = encode(DESCRIPTION), encode(key_sentence(key)), encode(QUESTION)
    filler = [encode(text) for text in FILLER]
    used = len(head) + len(sentence) + len(question)
    if used > length:
        raise ValueError(f"passkey length {length} is too short: the task description, key sentence and question "
                         f"alone take {used} tokens")
    chosen: list[list[int]] = []
    while used + len(filler[len(chosen) % len(filler)]) <= length:
        chosen.append(filler[len(chosen) % len(filler)])
        used += len(chosen[-1])
    split = round(depth * len(chosen))
    before = [t for piece in chosen[:split] for t in piece]
    after = [t for piece in chosen[split:] for t in piece]
    ids = head + before + sentence + after + question
    return PasskeyPrompt(ids, key, depth, len(head) + len(before), len(chosen), split)


def score(answer: str, key: str) -> bool:
    """Exact match: the answer, leading whitespace removed, starts with the key's digits and no digit follows them.

    ' 68431.', '68431' and '68431 is the pass key' are correct for 68431; ' 6843', ' 684310', ' 12345' and
    ' it is 68431' are not."""
    text = answer.lstrip()
    return text.startswith(key) and not text[len(key):len(key) + 1].isdigit()


def settled(answer: str, key: str) -> bool:
    """Whether more text could no longer change ``score``: the answer has left the key's digits, or gone past them."""
    text = answer.lstrip()
    return bool(text) and not key.startswith(text)


def greedy_tokens(model, tokens: torch.Tensor, max_new_tokens: int):
    """The next token ids [B] of greedy decoding of tokens [B,N], step by step: Transformer.generate_greedy, with its
    cache unless the encoding refuses one; any other model (a callable returning logits [B,N,V]) recomputes the
    prefix each step."""
    if isinstance(model, Transformer):
        yield from model.generate_greedy(tokens, max_new_tokens, use_cache=model.cache_refusal() is None)
        return
    for _ in range(max_new_tokens):
        next_ids = model(tokens)[:, -1].argmax(dim=-1)
        yield next_ids
        tokens = torch.cat([tokens, next_ids[:, None]], dim=1)


@torch.no_grad()
def greedy_answer(model, tokenizer, prompt: PasskeyPrompt, device) -> str:
    """The model's greedy continuation of the prompt: a few tokens more than the key takes, fewer once the score is
    settled or at EOS."""
    eos = tokenizer.processor.eos_id()
    tokens = torch.tensor([prompt.ids], device=device)
    out: list[int] = []
    for next_ids in greedy_tokens(model, tokens, len(tokenizer.processor.encode(f"{prompt.key}.")) + 2):
        next_id = int(next_ids[0])
        if next_id == eos:
            break
        out.append(next_id)
        if settled(tokenizer.decode(out), prompt.key):
            break
    return tokenizer.decode(out)


def wilson_interval(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (z = 1.96: 95 %). Unlike p +- z sqrt(p(1-p)/n) it stays in
    [0, 1] and is not empty at 0 or n successes: 0/20 gives [0, 0.161], 20/20 [0.839, 1]."""
    if trials <= 0 or not 0 <= successes <= trials:
        raise ValueError(f"wilson_interval needs 0 <= successes <= trials, trials > 0 (got {successes}/{trials})")
    p = successes / trials
    z2n = z * z / trials
    center = (p + z2n / 2) / (1 + z2n)
    half = z / (1 + z2n) * math.sqrt(p * (1 - p) / trials + z2n / (4 * trials))
    # the bounds at 0 and n successes are exactly 0 and 1 (float rounding gives 0.9999999999999999)
    return (0.0 if successes == 0 else max(0.0, center - half),
            1.0 if successes == trials else min(1.0, center + half))


@dataclass
class PasskeyCell:
    """The trials of one (length, depth) cell."""

    length: int
    depth: float
    trials: int
    correct: int
    min_prompt_tokens: int
    max_prompt_tokens: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.trials

    @property
    def interval(self) -> tuple[float, float]:
        """Wilson 95 % score interval of the accuracy."""
        return wilson_interval(self.correct, self.trials)


def evaluate_passkey(answer: Callable[[PasskeyPrompt], str], tokenizer, lengths: list[int], depths: list[float],
                     trials: int = 20, seed: int = 0) -> dict[tuple[int, float], PasskeyCell]:
    """Every (length, depth) cell: ``trials`` prompts, each answered by ``answer(prompt) -> text`` and scored.

    A cell's keys come from a generator seeded by (seed, length, depth), so they do not depend on the other cells
    asked for. Every prompt is built before the first answer: a length too short fails at once."""
    if trials <= 0:
        raise ValueError(f"passkey trials {trials} must be positive")
    prompts = {}
    for n in lengths:
        for d in depths:
            rng = random.Random(f"{seed}/{n}/{float(d)!r}")  # a str seed hashes the same in every process
            prompts[(n, d)] = [make_prompt(tokenizer, n, d, rng) for _ in range(trials)]
    cells = {}
    for (n, d), cell_prompts in prompts.items():
        correct = sum(score(answer(prompt), prompt.key) for prompt in cell_prompts)
        sizes = [len(prompt.ids) for prompt in cell_prompts]
        cells[(n, d)] = PasskeyCell(n, d, trials, correct, min(sizes), max(sizes))
    return cells


def passkey_accuracy(model, tokenizer, lengths: list[int], depths: list[float], trials: int = 20, seed: int = 0,
                     device="auto", dtype="auto") -> dict[tuple[int, float], PasskeyCell]:
    """``evaluate_passkey`` with the model's greedy answers, the model moved to ``device`` in ``dtype`` (see
    ``eval_placement``)."""
    from tape_pretrain.eval.perplexity import eval_placement

    device, dtype = eval_placement(device, dtype)
    model.to(device=device, dtype=dtype)
    return evaluate_passkey(lambda prompt: greedy_answer(model, tokenizer, prompt, device), tokenizer, lengths,
                            depths, trials, seed)
