"""Resume on a different number of processes with the same global batch: the same windows in the same
order, losses within 1e-5 of an uninterrupted run (bitwise is not promised across shardings)."""

import pytest

from tape_pretrain.train.checkpoint import verify_checkpoint
from tests.helpers import metrics, run, train_command, write_config

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

ENGINES = {"fsdp2": ("fsdp2", 0), "zero2": ("deepspeed", 2), "zero3": ("deepspeed", 3)}


def config(tmp_path, dataset, name, engine):
    engine_name, stage = ENGINES[engine]
    return write_config(tmp_path / f"{name}.yaml", dataset, tmp_path / name, **{
        "parallel.engine": engine_name, "parallel.zero_stage": stage, "trainer.max_steps": 8})


@pytest.mark.parametrize("engine", ["fsdp2", "zero2", "zero3"])
@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_resume_on_another_world_size(tmp_path, dataset_path, engine, before, after):
    reference_cfg = config(tmp_path, dataset_path, "reference", engine)
    run(train_command(before, reference_cfg))
    reference = metrics(tmp_path / "reference")

    cfg = config(tmp_path, dataset_path, "run", engine)
    run(train_command(before, cfg, "trainer.stop_at_step=4"))
    out = run(train_command(after, cfg))
    assert f"saved by {before} rank(s)" in out.stdout
    if engine != "fsdp2":  # DeepSpeed converts the checkpoint to its universal format first, a line per phase
        phases = [line for line in out.stderr.splitlines() if line.startswith("universal checkpoint: ")]
        assert "Extracting ZeRO fragments (" in phases[0] and phases[-1].startswith("universal checkpoint: converted")
    # the conversion neither altered the checkpoint it read (it must keep verifying) nor left files behind
    verify_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000004")
    assert not list((tmp_path / "run").glob(".universal/*"))
    resumed = metrics(tmp_path / "run")
    assert sorted(resumed) == list(range(1, 9))
    for step in range(5, 9):
        assert resumed[step]["windows_hash"] == reference[step]["windows_hash"]
        assert resumed[step]["lr"] == reference[step]["lr"]
        assert resumed[step]["loss"] == pytest.approx(reference[step]["loss"], rel=1e-5)
