"""What a user reads of a run: timestamped, ranked log lines (console and RUN_DIR/logs), no carriage returns when
the output is not a terminal, the end-of-run summary against metrics.jsonl, TensorBoard events, a profiler trace and
`tape-pretrain plot`."""

import json
import re

import pytest

from tests.helpers import metrics, run, train_command, write_config

LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[rank 0\] (INFO|WARNING) ")


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory, dataset_path):
    root = tmp_path_factory.mktemp("logs")
    config = write_config(root / "run.yaml", dataset_path, root / "run", **{
        "parallel.engine": "ddp", "trainer.max_steps": 4, "trainer.log_interval": 1, "trainer.eval_interval": 2,
        "trainer.progress_bar": True, "logging.tensorboard": True, "trainer.profile_steps": [2, 3]})
    result = run(train_command(0, config))  # stdout and stderr are pipes, not terminals
    return root / "run", result


def test_log_lines_carry_time_and_rank_in_the_console_and_the_log_file(logged_run):
    run_dir, result = logged_run
    assert "\r" not in result.stdout and "\r" not in result.stderr  # no progress bar drawn into a pipe
    console = [line for line in result.stdout.splitlines() if line.strip()]
    steps = [line for line in console if " INFO step " in line]
    assert [re.search(r"INFO step (\d+)/4 ", line).group(1) for line in steps] == ["1", "2", "3", "4"]
    assert all(LINE.match(line) for line in steps)
    assert re.search(r" INFO step 4/4 loss \d+\.\d{4} lr \S+ seq_len 64 grad_norm \S+ tok/s [\d,]+ mem [\d.]+GiB "
                     r"eta \d+s$", steps[-1])
    assert [line for line in console if " INFO eval step 2: val_loss " in line]
    log_file = (run_dir / "logs" / "rank0.log").read_text().splitlines()
    assert all(LINE.match(line) for line in log_file if not line.startswith(" "))
    assert [line.split(" ", 2)[2] for line in log_file if " INFO step " in line] == [
        line.split(" ", 2)[2] for line in steps]


def test_summary_agrees_with_metrics(logged_run):
    run_dir, result = logged_run
    summary = json.loads((run_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evaluations = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evaluations] == [2, 4]
    best = min(evaluations, key=lambda r: r["val_loss"])
    assert summary["steps"] == 4 and summary["finished"] and not summary["stopped_by_signal"]
    assert summary["tokens"] == 4 * 2048
    assert summary["final_loss"] == metrics(run_dir)[4]["loss"]
    assert summary["final_val_loss"] == evaluations[-1]["val_loss"]
    assert (summary["best_val_loss"], summary["best_val_step"]) == (best["val_loss"], best["step"])
    assert summary["export"] == str(run_dir / "export")
    assert "INFO summary: finished at step 4/4 (8,192 tokens)" in result.stdout


def test_tensorboard_events_hold_the_logged_losses(logged_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = logged_run
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    logged = {s.step: s.value for s in events.Scalars("loss")}
    assert logged == pytest.approx({step: r["loss"] for step, r in metrics(run_dir).items()}, rel=1e-6)
    assert sorted(s.step for s in events.Scalars("val_loss")) == [2, 4]


def test_profiler_trace_covers_the_requested_steps(logged_run):
    run_dir, _ = logged_run
    trace = json.loads((run_dir / "profile" / "trace_rank0_steps2-3.json").read_text())
    names = {event.get("name", "") for event in trace["traceEvents"]}
    assert any("aten::scaled_dot_product_attention" in n or "aten::mm" in n for n in names)


def test_plot_writes_a_png_per_metric(logged_run, tmp_path):
    from tape_pretrain.train.plot import METRICS, plot_runs

    run_dir, _ = logged_run
    written = plot_runs([str(run_dir), str(run_dir)], str(tmp_path))
    assert sorted(p.name for p in written) == sorted(f"{key}.png" for key in METRICS)
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in written)


def test_summary_of_a_diverged_evaluation_does_not_fail(tmp_path):
    from types import SimpleNamespace

    from tape_pretrain.config import load_config
    from tape_pretrain.train.trainer import Trainer

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "tokens": 64, "loss": 2.5}\n'
                                            '{"step": 1, "tokens": 64, "val_loss": 2.0}\n'
                                            '{"step": 2, "tokens": 128, "loss": null}\n'
                                            '{"step": 2, "tokens": 128, "val_loss": null}\n')
    fake = SimpleNamespace(run_dir=tmp_path, config=load_config(None, [f"run_dir={tmp_path}", "trainer.max_steps=2"]),
                           step=2, _run_started=0.0, _first_step=0, log_file=None,
                           run_directory=SimpleNamespace(upload=lambda paths: None))
    summary = Trainer.write_summary(fake, preempted=False)
    assert (summary["best_val_loss"], summary["best_val_step"], summary["final_val_loss"]) == (2.0, 1, 2.0)
    assert summary["final_loss"] is None


def test_config_show_hides_credentials_and_bad_numbers_are_one_error(capsys):
    from tape_pretrain.cli import main

    assert main(["config", "show", "data.storage_options.secret=hunter2",
                 "data.path=s3://user:pass@bucket/ds"]) == 0
    out = capsys.readouterr().out
    assert "hunter2" not in out and "user:pass" not in out
    assert main(["config", "show", "seed=.inf"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: seed: expected an integer, got inf"]
