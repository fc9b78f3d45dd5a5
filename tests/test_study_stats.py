"""Study statistics and RESULTS.md: t quantiles of every parity of df, diverged seeds named and never pooled,
failed runs listed, and which logged loss each table reports."""

import json
import math

import pytest

from tape_pretrain.study.report import collect, render_results
from tape_pretrain.study.spec import SizeSpec, StudySpec
from tape_pretrain.study.stats import paired_difference, t_quantile


@pytest.mark.parametrize("df, expected", [(3, 3.18245), (5, 2.57058), (7, 2.36462), (6, 2.44691)])
def test_t_quantile_for_odd_and_even_degrees_of_freedom(df, expected):
    """Reference values of t(0.975, df) from the standard t tables (odd df run the other branch of t_cdf)."""
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=5e-5)
    assert t_quantile(0.025, df) == pytest.approx(-expected, abs=5e-5)


def test_paired_difference_names_non_finite_seeds_and_counts_only_the_rest():
    paired = paired_difference({1: 1.0, 2: math.nan, 3: 2.0, 4: 1.0}, {1: 0.0, 2: 1.0, 3: 0.0, 4: math.inf})
    assert (paired.n, paired.mean, paired.non_finite) == (2, 1.5, (2, 4))
    assert paired.high == pytest.approx(1.5 + 12.7062 * 0.5, abs=1e-3)  # t(0.975, 1) x sd / sqrt(2), sd = sqrt(0.5)
    everything_diverged = paired_difference({1: math.nan}, {1: 1.0})
    assert (everything_diverged.n, everything_diverged.non_finite) == (0, (1,))


def row(encoding, seed, train, val, ppl, size="a", n=10_000):
    return {"name": f"{encoding}-{size}-s{seed}", "encoding": encoding, "size": size, "seed": seed, "steps": 10,
            "tokens": 5120, "flops": 1e9, "parameters": 2 * n, "positional_parameters": 0, "backbone_parameters": 2 * n,
            "non_embedding_parameters": n, "train_loss": train, "val_loss": val, "perplexity": {32: ppl}, "curve": [],
            "train_seconds": 12.0}


def test_a_diverged_seed_is_named_in_every_table_and_each_cell_gives_its_own_n():
    spec = StudySpec(encodings=["rope", "tape"], sizes=[SizeSpec("a")], seeds=[1, 2, 3], baseline="rope")
    rows = [row("rope", 1, 3.5, 3.0, 100.0), row("rope", 2, 3.7, 3.2, 110.0), row("rope", 3, 3.9, 3.4, 130.0),
            row("tape", 1, 3.4, 2.9, 90.0), row("tape", 2, 3.5, math.nan, math.inf), row("tape", 3, 3.8, 3.2, 125.0)]
    text = render_results(spec, rows)
    # tape train loss 3.4, 3.5, 3.8 (all three); val loss 2.9, 3.2 and perplexity 90, 125 (seed 2 diverged)
    assert ("| tape | a | 3 | 3.5667 ± 0.2082 | 3.0500 ± 0.2121 (n=2; diverged: seed 2) "
            "| 107.50 ± 24.75 (n=2; diverged: seed 2) |") in text
    # differences: train -0.1, -0.2, -0.1 (n = 3); val -0.1, -0.2 and perplexity -10, -5 (n = 2): half width
    # t(0.975, 1) x sd / sqrt(2) = 12.7062 x 0.05 = 0.6353 and 12.7062 x 2.5 = 31.77
    assert ("| tape | a | 3 | -0.1333 [-0.2768, 0.0101] | -0.1500 [-0.7853, 0.4853] (n=2; diverged: seed 2) "
            "| -7.50 [-39.27, 24.27] (n=2; diverged: seed 2) |") in text
    statistics = [line for line in text.split("## Mean ± sd over seeds")[1].splitlines() if line.startswith("|")]
    assert not any("nan" in line or "inf" in line for line in statistics), statistics  # (the runs table shows them)
    # loss vs parameters: the mean final val loss (rope 3.2, tape 3.05), not the train loss (3.7, 3.5667)
    assert "| a | 10,000 | 3.2000 | 3.0500 (n=2; diverged: seed 2) |" in text


def write_run(root, name, record, metrics=None, perplexity=None):
    run_dir = root / "runs" / name
    run_dir.mkdir(parents=True)
    (run_dir / "study_run.json").write_text(json.dumps(record))
    if metrics is not None:
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    if perplexity is not None:
        (run_dir / "eval.json").write_text(json.dumps({"results": {"32": {"perplexity": perplexity}}}))


def test_collect_reports_the_last_val_loss_and_lists_failed_runs(tmp_path):
    spec = StudySpec(encodings=["rope"], sizes=[SizeSpec("a")], seeds=[1, 2], final_loss_window=1)
    budget = {"steps": 2, "tokens": 1024, "flops": 1e9, "parameters": 20_000, "positional_parameters": 0,
              "backbone_parameters": 20_000, "non_embedding_parameters": 10_000}
    metrics = [{"step": 1, "tokens": 512, "loss": 5.0, "tokens_per_s": 100.0},
               {"step": 1, "tokens": 512, "val_loss": 4.5},
               {"step": 2, "tokens": 1024, "loss": 4.0, "tokens_per_s": 100.0},
               {"step": 2, "tokens": 1024, "val_loss": 3.9}]
    write_run(tmp_path, "rope-a-s1", {"budget": budget}, metrics, perplexity=50.0)
    write_run(tmp_path, "rope-a-s2", {"budget": budget, "failed": True})
    rows = collect(spec, tmp_path)
    assert [(r["name"], r.get("failed", False)) for r in rows] == [("rope-a-s1", False), ("rope-a-s2", True)]
    assert (rows[0]["val_loss"], rows[0]["train_loss"]) == (3.9, 4.0)  # the last logged val loss, not the first
    text = render_results(spec, rows)
    assert "1 of 2 runs finished" in text and "1 failed, left out of every table and statistic: rope-a-s2." in text
    assert "| rope | a | 1 | 4.0000 (n=1) | 3.9000 (n=1) | 50.00 (n=1) |" in text
    assert "| a | 10,000 | 3.9000 (n=1) |" in text
