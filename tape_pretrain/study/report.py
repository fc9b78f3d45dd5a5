"""RESULTS.md and plots of a study: every run (tokens, FLOPs, training time), mean ± sd over seeds, the paired
difference to a baseline encoding with a t-interval, loss vs parameters (a power-law fit from four sizes on)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from tape_pretrain.study.spec import StudySpec
from tape_pretrain.study.stats import MIN_SIZES_FOR_FIT, fit_power_law, mean_sd, paired_difference

RUN_RECORD = "study_run.json"
"""Written into a run directory when the study launches the run: config hash, resolved config, budget."""
EVAL_RECORD = "eval.json"
"""The study's evaluation of a finished run (its settings and perplexity per length); marks the run finished."""


def training_seconds(records: list[dict]) -> float:
    """Training wall time as the run recorded it: the sum over logged windows of tokens / tokens_per_s (the trainer
    leaves start-up, evaluation, checkpoints and export out of these windows)."""
    total, previous = 0.0, 0
    for record in records:
        if record.get("tokens_per_s"):
            total += (record["tokens"] - previous) / record["tokens_per_s"]
        previous = record["tokens"]
    return total


def collect(spec: StudySpec, root: Path) -> list[dict]:
    """One row per finished run: its budget (from study_run.json), losses (metrics.jsonl) and perplexities; and one
    row {name, encoding, size, seed, failed: True} per run whose study_run.json says ``"failed": true``."""
    from tape_pretrain.train.metrics import training_records

    rows = []
    for run in spec.runs():
        run_dir = root / "runs" / run["name"]
        if not (run_dir / RUN_RECORD).exists():
            continue
        record = json.loads((run_dir / RUN_RECORD).read_text())
        if record.get("failed"):
            rows.append({"name": run["name"], "encoding": run["encoding"], "size": run["size"].name,
                         "seed": run["seed"], "failed": True})
            continue
        if not (run_dir / EVAL_RECORD).exists():
            continue
        budget = record["budget"]
        records = [r for _, r in sorted(training_records(run_dir).items())]
        logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        val = [r["val_loss"] for r in logged if r.get("val_loss") is not None]
        last = records[-spec.final_loss_window:]
        evaluation = json.loads((run_dir / EVAL_RECORD).read_text())["results"]
        rows.append({
            "name": run["name"], "encoding": run["encoding"], "size": run["size"].name, "seed": run["seed"],
            **budget,
            "train_loss": sum(r["loss"] for r in last) / len(last) if last else math.nan,
            "val_loss": val[-1] if val else math.nan,
            "curve": [(r["tokens"], r["loss"]) for r in records],
            "perplexity": {int(k): v["perplexity"] for k, v in evaluation.items()},
            "train_seconds": training_seconds(records),
        })
    return rows


def _columns(rows: list[dict]) -> list[tuple[str, object]]:
    """(header, key) of the per-cell metrics: final train loss, val loss, perplexity at each length."""
    lengths = sorted({n for r in rows for n in r["perplexity"]})
    return [("train loss", "train_loss"), ("val loss", "val_loss")] + [(f"ppl@{n}", n) for n in lengths]


def _value(row: dict, key) -> float:
    return row[key] if isinstance(key, str) else row["perplexity"].get(key, math.nan)


def _fmt(value: float, key) -> str:
    return f"{value:.4f}" if isinstance(key, str) else f"{value:.2f}"


def _split_finite(by_seed: dict[int, float]) -> tuple[list[float], list[int]]:
    """The finite values (in seed order) and the seeds whose value is nan or inf (a diverged run)."""
    seeds = sorted(by_seed)
    return [by_seed[s] for s in seeds if math.isfinite(by_seed[s])], [s for s in seeds if not math.isfinite(by_seed[s])]


def _seeds(seeds) -> str:
    return ("seed " if len(seeds) == 1 else "seeds ") + ", ".join(str(s) for s in seeds)


def _notes(n: int, non_finite, single: str = "n=1") -> str:
    """' (n=..; diverged: seeds ..)' when a cell used fewer seeds than its row's n or only one; '' otherwise."""
    notes = [single] if n == 1 else [f"n={n}"] if non_finite else []
    if non_finite:
        notes.append(f"diverged: {_seeds(non_finite)}")
    return f" ({'; '.join(notes)})" if notes else ""


def _mean_cell(by_seed: dict[int, float], key, with_sd: bool = True) -> str:
    """Mean (± sd) over the seeds with a finite value; the others named, never pooled."""
    values, non_finite = _split_finite(by_seed)
    mean, sd = mean_sd(values)
    text = ("-" if not values else f"{_fmt(mean, key)} ± {_fmt(sd, key)}" if len(values) > 1 and with_sd
            else _fmt(mean, key))
    return text + _notes(len(values), non_finite)


def _difference_cell(diff, key) -> str:
    if diff is None:
        return "-"
    text = ("-" if diff.n == 0 else _fmt(diff.mean, key) if diff.n == 1 else
            f"{_fmt(diff.mean, key)} [{_fmt(diff.low, key)}, {_fmt(diff.high, key)}]")
    return text + _notes(diff.n, diff.non_finite, single="n=1, no interval")


def _table(header: list[str], body: list[list[str]], left: int) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * left + "---:|" * (len(header) - left)] + [
        "| " + " | ".join(cells) + " |" for cells in body]


def _cells(spec: StudySpec, rows: list[dict]) -> list[tuple[str, str, list[dict]]]:
    """(encoding, size, its runs) in the study's order, for the cells with at least one finished run."""
    out = []
    for encoding in spec.encodings:
        for size in spec.sizes:
            mine = [r for r in rows if r["encoding"] == encoding and r["size"] == size.name]
            if mine:
                out.append((encoding, size.name, mine))
    return out


def render_results(spec: StudySpec, rows: list[dict]) -> str:
    """RESULTS.md for ``rows`` (as collect() returns them); a pure function of its inputs."""
    failed = [r for r in rows if r.get("failed")]
    rows = [r for r in rows if not r.get("failed")]
    columns = _columns(rows)
    budget = (f"every encoding of a size trains on the same tokens, {spec.tokens_per_parameter:g} x the size's "
              "backbone parameters (its RoPE model, embeddings included, positional weights not)"
              if spec.budget == "tokens" else
              "every encoding of a size gets the training FLOPs of that size's RoPE run, whose tokens are "
              f"{spec.tokens_per_parameter:g} x the backbone parameters (steps rounded to whole steps)")
    lines = [f"# {spec.name}", "", f"{len(rows)} of {len(spec.runs())} runs finished. Budget ({spec.budget}): "
             f"{budget}. Train FLOPs = 3 x forward FLOPs per token x tokens."
             + (f" {len(failed)} failed, left out of every table and statistic: "
                + ", ".join(r["name"] for r in failed) + "." if failed else ""),
             f"Train loss: mean of the last {spec.final_loss_window} logged training losses. Val loss: the "
             "trainer's evaluation at the last step. Train time: the training wall time the run recorded in its "
             "metrics.jsonl (start-up, evaluation, checkpoints and export excluded).", "", "## Runs", ""]
    header = ["run", "encoding", "size", "seed", "params", "positional params", "steps", "tokens", "train FLOPs"]
    body = [[r["name"], r["encoding"], r["size"], str(r["seed"]), f"{r['parameters']:,}",
             f"{r['positional_parameters']:,}", f"{r['steps']:,}", f"{r['tokens']:,}", f"{r['flops']:.3g}"]
            + [_fmt(_value(r, key), key) for _, key in columns] + [f"{r['train_seconds']:.0f}s"] for r in rows]
    lines += _table(header + [h for h, _ in columns] + ["train time"], body, left=3)

    diverged = ("A seed whose value is nan or inf (a diverged run) is left out of a cell's statistics and named "
                "there, with the n that cell used.")
    lines += ["", "## Mean ± sd over seeds", "",
              f"Sample standard deviation (n - 1); n = the seeds finished. {diverged}", ""]
    body = []
    for encoding, size, mine in _cells(spec, rows):
        cells = [_mean_cell({r["seed"]: _value(r, key) for r in mine}, key) for _, key in columns]
        body.append([encoding, size, str(len(mine))] + cells)
    lines += _table(["encoding", "size", "n"] + [h for h, _ in columns], body, left=2)

    if spec.baseline is not None:
        lines += ["", f"## Difference to {spec.baseline}", "",
                  f"Per seed: encoding - {spec.baseline} on the same seed; the mean over seeds and its 95% "
                  "t-interval (n - 1 degrees of freedom). Negative is better for every column. n = the seeds "
                  f"finished for both; a seed diverged for either is left out and named in its cell, with the n that "
                  "cell used.", ""]
        body = []
        for encoding, size, mine in _cells(spec, rows):
            if encoding == spec.baseline:
                continue
            base = [r for r in rows if r["encoding"] == spec.baseline and r["size"] == size]
            shared = {r["seed"] for r in mine} & {r["seed"] for r in base}
            cells = [_difference_cell(paired_difference({r["seed"]: _value(r, key) for r in mine},
                                                        {r["seed"]: _value(r, key) for r in base}), key)
                     for _, key in columns]
            body.append([encoding, size, str(len(shared))] + cells)
        lines += _table(["encoding", "size", "n"] + [h for h, _ in columns], body, left=2)

    lines += ["", "## Loss vs parameters", "", "N = the size's non-embedding backbone parameters (its RoPE model "
              "without token embeddings and LM head); loss = mean over seeds of the final val loss (the "
              f"trainer's evaluation at the last step). {diverged}", ""]
    sizes = [s.name for s in spec.sizes if any(r["size"] == s.name for r in rows)]
    n_of = {r["size"]: r["non_embedding_parameters"] for r in rows}
    body = []
    for size in sizes:
        cells = []
        for encoding in spec.encodings:
            mine = {r["seed"]: r["val_loss"] for r in rows if r["encoding"] == encoding and r["size"] == size}
            cells.append(_mean_cell(mine, "val_loss", with_sd=False) if mine else "-")
        body.append([size, f"{n_of[size]:,}"] + cells)
    lines += _table(["size", "N"] + list(spec.encodings), body, left=1)
    fits = power_law_fits(spec, rows)
    if len(sizes) < MIN_SIZES_FOR_FIT:
        lines += ["", f"No power-law fit: L = E + A·N^-α has three parameters and needs at least {MIN_SIZES_FOR_FIT} "
                  f"sizes (this study has {len(sizes)} with finished runs)."]
    elif fits:
        lines += ["", "Power-law fit L = E + A·N^-α of the mean val loss (grid over α, least squares for E and A):", ""]
        lines += [f"- {e}: E = {f.e:.4f}, A = {f.a:.4g}, α = {f.alpha:.4f} (rms residual {f.rmse:.2g})"
                  for e, f in fits.items()]
    lines += ["", "Plots: loss_vs_tokens.png, perplexity_vs_length.png, loss_vs_parameters.png"]
    return "\n".join(lines) + "\n"


def power_law_fits(spec: StudySpec, rows: list[dict]) -> dict:
    """Per encoding with finished runs at MIN_SIZES_FOR_FIT or more sizes: the fit of mean val loss vs N."""
    fits = {}
    for encoding in spec.encodings:
        by_size: dict[int, list[float]] = {}
        for r in rows:
            if r["encoding"] == encoding and math.isfinite(r["val_loss"]):
                by_size.setdefault(r["non_embedding_parameters"], []).append(r["val_loss"])
        if len(by_size) >= MIN_SIZES_FOR_FIT:
            n = sorted(by_size)
            fits[encoding] = fit_power_law(n, [mean_sd(by_size[k])[0] for k in n])
    return fits


def _save(fig, ax, xlabel: str, ylabel: str, path: Path, legend_size: float | None = None) -> None:
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(spec: StudySpec, root: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = collect(spec, root)
    (root / "RESULTS.md").write_text(render_results(spec, rows))
    rows = [r for r in rows if not r.get("failed")]
    lengths = sorted({n for r in rows for n in r["perplexity"]})

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        tokens, losses = zip(*r["curve"])
        ax.plot(tokens, losses, label=r["name"])
    _save(fig, ax, "tokens", "train loss", root / "loss_vs_tokens.png", legend_size=7)

    fig, ax = plt.subplots(figsize=(6, 4))
    for encoding, size, mine in _cells(spec, rows):
        stats = [mean_sd([r["perplexity"].get(n, math.nan) for r in mine]) for n in lengths]
        ax.errorbar(lengths, [m for m, _ in stats], yerr=[0 if math.isnan(s) else s for _, s in stats], marker="o",
                    capsize=3, label=f"{encoding}-{size} (n={len(mine)})",
                    linestyle="-" if encoding == "tape" else "--")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    _save(fig, ax, "evaluation length (tokens)", "perplexity (mean ± sd over seeds)", root / "perplexity_vs_length.png",
          legend_size=7)

    fig, ax = plt.subplots(figsize=(6, 4))
    fits = power_law_fits(spec, rows)
    for encoding in spec.encodings:
        mine = [r for r in rows if r["encoding"] == encoding]
        if not mine:
            continue
        ax.scatter([r["non_embedding_parameters"] for r in mine], [r["val_loss"] for r in mine], label=encoding)
        if encoding in fits:
            xs = np.geomspace(min(r["non_embedding_parameters"] for r in mine),
                              max(r["non_embedding_parameters"] for r in mine), 20)
            ax.plot(xs, fits[encoding](xs), linestyle=":")
    ax.set_xscale("log")
    _save(fig, ax, "non-embedding parameters N", "final val loss", root / "loss_vs_parameters.png")
    return root / "RESULTS.md"
