"""LR schedules and the curriculum as pure functions; curriculum reshape keeps every token."""

import math

import numpy as np
import pytest
import torch

from tape_pretrain.config import CurriculumConfig, CurriculumPhase, ScheduleConfig
from tape_pretrain.train.schedule import Curriculum, learning_rate


def closed_form(name: str, step: int) -> float:
    """The schedules of ScheduleConfig written out for peak 1, floor 0.1, 10 warmup steps of 100, WSD decay 0.2."""
    if step < 10:
        return (step + 1) / 10
    progress = (step - 10) / 90
    if name == "constant":
        return 1.0
    if name == "cosine":
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    if name == "linear":
        return 1.0 - 0.9 * progress
    return 1.0 if step < 80 else 1.0 - 0.9 * (step - 80) / 20  # wsd: stable, then the last 20 % decay linearly


@pytest.mark.parametrize("name", ["cosine", "linear", "wsd", "constant"])
def test_schedule_equals_its_closed_form_at_every_step(name):
    s = ScheduleConfig(name=name, warmup_steps=10, min_lr_ratio=0.1, decay_fraction=0.2)
    for step in range(101):
        assert learning_rate(step, 100, 1.0, s) == pytest.approx(closed_form(name, step), rel=1e-12), step


def test_interior_values_by_hand():
    """A sixth of the way through the decay: cosine 0.1 + 0.45 (1 + cos(pi/6)), linear 1 - 0.9/6."""
    values = {name: learning_rate(25, 100, 2.0, ScheduleConfig(name=name, warmup_steps=10, min_lr_ratio=0.1))
              for name in ("cosine", "linear", "wsd")}
    assert values["cosine"] == pytest.approx(2 * 0.9397114317029974, rel=1e-12)
    assert values["linear"] == pytest.approx(2 * 0.85, rel=1e-12)
    assert values["wsd"] == 2.0


def test_phases_by_tokens_and_fraction():
    c = Curriculum(CurriculumConfig(phases=[CurriculumPhase(seq_len=64, until_tokens=1000),
                                            CurriculumPhase(seq_len=128, until_fraction=0.5),
                                            CurriculumPhase(seq_len=256)]), 256, 10_000)
    assert [c.seq_len(t) for t in (0, 999, 1000, 4999, 5000, 10**9)] == [64, 64, 128, 128, 256, 256]


@pytest.mark.parametrize("form", ["linear", "geometric"])
def test_generated_warmup_uses_power_of_two_buckets(form):
    c = Curriculum(CurriculumConfig(warmup=form, start_seq_len=32, warmup_fraction=0.5), 256, 1000)
    lengths = [c.seq_len(t) for t in range(0, 1000, 10)]
    assert lengths == sorted(lengths) and set(lengths) == {32, 64, 128, 256}
    assert c.seq_len(499) < 256 <= c.seq_len(500)


def test_fingerprint_changes_with_the_schedule():
    a = Curriculum(CurriculumConfig(), 256, 1000)
    b = Curriculum(CurriculumConfig(warmup="linear"), 256, 1000)
    assert a.fingerprint() != b.fingerprint()


def test_reshape_keeps_tokens_and_contiguity():
    from tape_pretrain.data.loader import WindowBatch
    from tape_pretrain.train.trainer import Trainer

    tokens = torch.arange(4 * 257).view(4, 257)  # windows of Lmax+1 = 257
    documents = (tokens // 100).int()  # a document starts every 100 tokens of the corpus
    fake = type("T", (), {})()
    fake.config = type("C", (), {"trainer": type("t", (), {"micro_batch_size": 2})()})()
    fake.env = type("E", (), {"device": torch.device("cpu")})()
    for document_mode in (False, True):
        fake.document_mode = document_mode
        micro = list(Trainer.micro_batches(fake, WindowBatch(tokens, documents, np.zeros(4, dtype=int)), 64))
        assert len(micro) == 2
        for inputs, labels, ids, crossing in micro:
            assert inputs.shape == (8, 64) and labels.shape == (8, 64)
            assert torch.equal(labels[:, :-1], inputs[:, 1:])  # each row is a contiguous run of the corpus
            assert torch.equal(inputs.diff(dim=1), torch.ones(8, 63, dtype=torch.long))
            expected = (inputs // 100).int()
            assert torch.equal(ids, expected) if document_mode else ids is None  # ids stay with their tokens
            # inputs whose row began in an earlier document (none attend across a boundary in document mode)
            assert crossing == (0 if document_mode else int((expected != expected[:, :1]).sum()))
        assert sum(i.numel() for i, *_ in micro) == 4 * 256  # constant tokens per step whatever the curriculum
    assert sum(m[3] for m in micro) == 0 and sum(
        m[3] for m in Trainer.micro_batches(type("T", (), {**vars(fake), "document_mode": False})(),
                                             WindowBatch(tokens, documents, np.zeros(4, dtype=int)), 64)) > 0
