"""Learning-rate schedules and the context-length curriculum: pure functions, hashed into checkpoints."""

from __future__ import annotations

import hashlib
import json
import math
import sys

from tape_pretrain.config import CurriculumConfig, ScheduleConfig


def learning_rate(step: int, max_steps: int, peak: float, schedule: ScheduleConfig) -> float:
    """LR for optimizer step ``step`` (0-based): linear warmup, then cosine / linear / WSD / constant."""
    warmup = schedule.warmup_steps
    if step < warmup:
        return peak * (step + 1) / warmup
    floor = peak * schedule.min_lr_ratio
    remaining = max(max_steps - warmup, 1)
    progress = min((step - warmup) / remaining, 1.0)
    if schedule.name == "constant":
        return peak
    if schedule.name == "cosine":
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule.name == "linear":
        return peak - (peak - floor) * progress
    # wsd: warmup, stable at the peak, then a linear decay over the last decay_fraction of all steps
    decay_start = max_steps * (1 - schedule.decay_fraction)
    if step < decay_start:
        return peak
    return peak - (peak - floor) * min((step - decay_start) / max(max_steps - decay_start, 1), 1.0)


class Curriculum:
    """Maps tokens consumed to a sequence length that divides Lmax."""

    def __init__(self, config: CurriculumConfig, max_seq_len: int, total_tokens: int):
        self.max_seq_len = max_seq_len
        self.phases: list[tuple[int, int]] = []  # (until_tokens, seq_len); the last runs to the end
        if config.phases:
            for phase in config.phases:
                if phase.until_tokens is not None:
                    until = phase.until_tokens
                elif phase.until_fraction is not None:
                    until = int(phase.until_fraction * total_tokens)
                else:
                    until = total_tokens
                self.phases.append((until, phase.seq_len))
        elif config.warmup != "none":
            lengths = []
            length = config.start_seq_len
            while length < max_seq_len:
                lengths.append(length)
                length *= 2
            span = config.warmup_fraction * total_tokens
            if config.warmup == "linear":  # equal token budgets per bucket
                bounds = [span * (i + 1) / len(lengths) for i in range(len(lengths))]
            else:  # geometric: each bucket gets twice the tokens of the previous one
                weights = [2**i for i in range(len(lengths))]
                bounds = [span * sum(weights[: i + 1]) / sum(weights) for i in range(len(lengths))]
            self.phases = [(int(b), n) for b, n in zip(bounds, lengths)]
        if not config.phases:
            self.phases.append((sys.maxsize, max_seq_len))

    def seq_len(self, tokens_consumed: int) -> int:
        for until, length in self.phases:
            if tokens_consumed < until:
                return length
        return self.phases[-1][1]

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps([self.max_seq_len, self.phases]).encode()).hexdigest()[:16]
