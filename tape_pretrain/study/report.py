"""RESULTS.md and plots of a study: one table, loss vs tokens, perplexity vs length, loss vs parameters."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from tape_pretrain.study.spec import StudySpec


def _collect(spec: StudySpec, root: Path) -> list[dict]:
    from tape_pretrain.train.export import load_export_model

    rows = []
    for run in spec.runs():
        run_dir = root / "runs" / run["name"]
        if not (run_dir / "eval.json").exists():
            continue
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in records if "loss" in r]
        val = [r for r in records if "val_loss" in r]
        model = load_export_model(str(run_dir / "export"))
        timing = json.loads((run_dir / "timing.json").read_text()) if (run_dir / "timing.json").exists() else {}
        rows.append({
            "name": run["name"], "encoding": run["encoding"], "size": run["size"].name, "seed": run["seed"],
            "parameters": model.num_parameters(), "tokens": train[-1]["tokens"], "train_loss": train[-1]["loss"],
            "val_loss": val[-1]["val_loss"] if val else float("nan"),
            "curve": [(r["tokens"], r["loss"]) for r in train],
            "perplexity": {int(k): v["perplexity"] for k, v in json.loads((run_dir / "eval.json").read_text()).items()},
            "train_seconds": timing.get("train_seconds", float("nan")),
        })
    return rows


def _save(fig, ax, xlabel: str, ylabel: str, path: Path, legend_size: float | None = None) -> None:
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def power_law_fit(parameters: list[float], losses: list[float]) -> tuple[float, float] | None:
    """(a, b) of loss = a * N^-b, least squares in log-log space; None with fewer than 2 sizes."""
    if len(set(parameters)) < 2:
        return None
    slope, intercept = np.polyfit(np.log(parameters), np.log(losses), 1)
    return math.exp(intercept), -slope


def write_report(spec: StudySpec, root: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _collect(spec, root)
    lengths = sorted({n for r in rows for n in r["perplexity"]})
    lines = [f"# {spec.name}", "", f"{len(rows)} of {len(spec.runs())} runs finished.", "",
             "| run | encoding | size | params | tokens | train loss | val loss | "
             + " | ".join(f"ppl@{n}" for n in lengths) + " | train time |",
             "|---|---|---|---:|---:|---:|---:|" + "---:|" * len(lengths) + "---:|"]
    for r in rows:
        ppl = " | ".join(f"{r['perplexity'].get(n, float('nan')):.2f}" for n in lengths)
        lines.append(f"| {r['name']} | {r['encoding']} | {r['size']} | {r['parameters']:,} | {r['tokens']:,} | "
                     f"{r['train_loss']:.4f} | {r['val_loss']:.4f} | {ppl} | {r['train_seconds']:.0f}s |")
    fits = {}
    for encoding in spec.encodings:
        mine = [r for r in rows if r["encoding"] == encoding]
        fit = power_law_fit([r["parameters"] for r in mine], [r["val_loss"] for r in mine])
        if fit:
            fits[encoding] = fit
    if fits:
        lines += ["", "Power-law fit of final val loss vs parameters, loss = a * N^-b:", ""]
        lines += [f"- {e}: a = {a:.3g}, b = {b:.3f}" for e, (a, b) in fits.items()]
    lines += ["", "Plots: loss_vs_tokens.png, perplexity_vs_length.png, loss_vs_parameters.png"]
    (root / "RESULTS.md").write_text("\n".join(lines) + "\n")

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        tokens, losses = zip(*r["curve"])
        ax.plot(tokens, losses, label=r["name"])
    _save(fig, ax, "tokens", "train loss", root / "loss_vs_tokens.png", legend_size=7)

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.plot(lengths, [r["perplexity"].get(n, float("nan")) for n in lengths], marker="o", label=r["name"],
                linestyle="-" if r["encoding"] == "tape" else "--")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    _save(fig, ax, "evaluation length (tokens)", "perplexity", root / "perplexity_vs_length.png", legend_size=7)

    fig, ax = plt.subplots(figsize=(6, 4))
    for encoding in spec.encodings:
        mine = [r for r in rows if r["encoding"] == encoding]
        if not mine:
            continue
        ax.scatter([r["parameters"] for r in mine], [r["val_loss"] for r in mine], label=encoding)
        if encoding in fits:
            a, b = fits[encoding]
            xs = np.geomspace(min(r["parameters"] for r in mine), max(r["parameters"] for r in mine), 20)
            ax.plot(xs, a * xs ** -b, linestyle=":")
    ax.set_xscale("log")
    _save(fig, ax, "parameters", "final val loss", root / "loss_vs_parameters.png")
    return root / "RESULTS.md"
