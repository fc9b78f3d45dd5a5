"""Both engines train the tiny TAPE model on real text and agree with a single process."""

import pytest

from tests.helpers import metrics, run, train_command, write_config

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, dataset_path):
    """Single process (DeepSpeed ZeRO-2, world 1) and 2-process ZeRO-2, ZeRO-3 and FSDP2 runs of 6 steps."""
    root = tmp_path_factory.mktemp("engines")
    variants = {"single": (0, "deepspeed", 2), "zero2": (2, "deepspeed", 2), "zero3": (2, "deepspeed", 3),
                "fsdp2": (2, "fsdp2", 0)}
    out = {}
    for name, (nproc, engine, stage) in variants.items():
        config = write_config(root / f"{name}.yaml", dataset_path, root / name,
                              **{"parallel.engine": engine, "parallel.zero_stage": stage})
        run(train_command(nproc, config))
        out[name] = metrics(root / name)
    return out


def test_first_step_loss_identical_across_engines(runs):
    first = runs["single"][1]["loss"]
    for name, records in runs.items():
        assert abs(records[1]["loss"] - first) <= 1e-6, name


def test_losses_agree_after_five_steps(runs):
    reference = runs["single"][5]["loss"]
    for name, records in runs.items():
        assert abs(records[5]["loss"] - reference) / reference <= 1e-3, name


def test_same_data_order_on_every_engine_and_world_size(runs):
    reference = [runs["single"][s]["windows_hash"] for s in range(1, 7)]
    for records in runs.values():
        assert [records[s]["windows_hash"] for s in range(1, 7)] == reference


def test_loss_falls(runs):
    for name, records in runs.items():
        assert records[6]["loss"] < records[1]["loss"] - 0.5, name


def test_metrics_fields(runs):
    record = runs["fsdp2"][3]
    for key in ("step", "tokens", "loss", "lr", "seq_len", "grad_norm", "tokens_per_s", "step_time_s"):
        assert key in record
    assert record["tokens"] == 3 * 2048
