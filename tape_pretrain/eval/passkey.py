"""Passkey retrieval: a 5-digit key hidden at a chosen depth of filler text, then asked for; greedy decoding.

Decoding recomputes the full prefix for each new token (no cache): exact for every encoding, TAPE included,
and cheap for the handful of tokens a key needs.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")
QUESTION = " What is the pass key? The pass key is"


@dataclass
class PasskeyPrompt:
    ids: list[int]
    key: str
    depth: float
    key_position: int
    """Token index where the key sentence starts."""


def make_prompt(tokenizer, length: int, depth: float, rng: random.Random) -> PasskeyPrompt:
    """A prompt of about ``length`` tokens with the key sentence at ``depth`` (0 = start, 1 = end) of the filler."""
    key = f"{rng.randrange(10000, 100000)}"
    sentence = tokenizer.processor.encode(f" The pass key is {key}. Remember it. {key} is the pass key.")
    question = tokenizer.processor.encode(QUESTION)
    unit = tokenizer.processor.encode(FILLER)
    budget = max(length - len(sentence) - len(question), 0)
    filler = (unit * (budget // len(unit) + 1))[:budget]
    split = int(round(depth * len(filler)))
    ids = filler[:split] + sentence + filler[split:] + question
    return PasskeyPrompt(ids, key, depth, split)


def score(generated_text: str, key: str) -> bool:
    """Correct exactly when the first run of digits in the answer is the key."""
    match = re.search(r"\d+", generated_text)
    return match is not None and match.group(0) == key


@torch.no_grad()
def greedy(model, ids: list[int], max_new_tokens: int, device) -> list[int]:
    tokens = torch.tensor([ids], device=device)
    out = []
    for _ in range(max_new_tokens):
        next_id = int(model(tokens)[0, -1].argmax())
        out.append(next_id)
        tokens = torch.cat([tokens, torch.tensor([[next_id]], device=device)], dim=1)
    return out


def passkey_accuracy(model, tokenizer, lengths: list[int], depths: list[float], trials: int, seed: int = 0,
                     device="cpu") -> dict[tuple[int, float], float]:
    rng = random.Random(seed)
    results = {}
    for length in lengths:
        for depth in depths:
            correct = 0
            for _ in range(trials):
                prompt = make_prompt(tokenizer, length, depth, rng)
                answer = tokenizer.decode(greedy(model, prompt.ids, 8, device))
                correct += score(answer, prompt.key)
            results[(length, depth)] = correct / trials
    return results
