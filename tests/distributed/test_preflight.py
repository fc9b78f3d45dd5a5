"""Preflight stops a run before step 0 when the disk cannot hold what the run will write."""

import subprocess

from tests.helpers import base_env, train_command, write_config


def test_a_run_that_cannot_fit_on_disk_stops_before_writing(tmp_path, dataset_path):
    cfg = write_config(tmp_path / "c.yaml", dataset_path, tmp_path / "run",
                       **{"checkpoint.keep_last": 10**9, "trainer.max_steps": 2})
    out = subprocess.run(train_command(0, cfg), env=base_env(), capture_output=True, text=True, timeout=180)
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: preflight:") and "GiB free but the run will write about" in last, last
    assert not (tmp_path / "run" / "metrics.jsonl").exists() and not (tmp_path / "run" / "checkpoints").exists()
