"""LR schedules and the curriculum as pure functions; curriculum reshape keeps every token."""

import pytest
import torch

from tape_pretrain.config import CurriculumConfig, CurriculumPhase, ScheduleConfig
from tape_pretrain.train.schedule import Curriculum, learning_rate


@pytest.mark.parametrize("name", ["cosine", "linear", "wsd", "constant"])
def test_schedules_warm_up_then_end_at_the_floor(name):
    s = ScheduleConfig(name=name, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [learning_rate(step, 100, 1.0, s) for step in range(101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert max(lrs) == pytest.approx(1.0)
    assert lrs[100] == pytest.approx(1.0 if name == "constant" else 0.1)
    if name == "wsd":
        assert lrs[79] == 1.0 and lrs[90] < 1.0


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
    from tape_pretrain.train.trainer import Trainer

    batch = torch.arange(4 * 257).view(4, 257)  # windows of Lmax+1 = 257
    fake = type("T", (), {})()
    fake.config = type("C", (), {"trainer": type("t", (), {"micro_batch_size": 2})()})()
    fake.env = type("E", (), {"device": torch.device("cpu")})()
    micro = list(Trainer.micro_batches(fake, batch, 64))
    assert len(micro) == 2
    for inputs, labels in micro:
        assert inputs.shape == (8, 64) and labels.shape == (8, 64)
        assert torch.equal(labels[:, :-1], inputs[:, 1:])  # each row is a contiguous run of the corpus
        assert torch.equal(inputs.diff(dim=1), torch.ones(8, 63, dtype=torch.long))
    tokens = sum(i.numel() for i, _ in micro)
    assert tokens == 4 * 256  # constant tokens per step whatever the curriculum length
