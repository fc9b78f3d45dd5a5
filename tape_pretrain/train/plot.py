"""`tape-pretrain plot RUN_DIR...`: loss, val loss, lr, sequence length and throughput against tokens, one PNG per
metric, every run a line (read from each run's metrics.jsonl)."""

from __future__ import annotations

import json
from pathlib import Path

from tape_pretrain.config import ConfigError

METRICS = {"loss": "training loss", "val_loss": "validation loss", "lr": "learning rate", "seq_len": "sequence length",
           "tokens_per_s": "throughput (tokens/s)"}


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(f"{run_dir}: no metrics.jsonl (not a run directory, or the run has not logged yet)")
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a half-written last line of a run that is still going, or was killed
        if isinstance(record, dict) and "tokens" in record:
            records.append(record)
    return records


def plot_runs(run_dirs: list[str], out: str | None = None) -> list[Path]:
    """One PNG per metric in ``out`` (default: the first run directory's plots/); returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {Path(d): read_metrics(Path(d)) for d in run_dirs}
    directory = Path(out) if out else Path(run_dirs[0]) / "plots"
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for key, label in METRICS.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        drawn = False
        for run_dir, records in runs.items():
            points = [(r["tokens"], r[key]) for r in records if isinstance(r.get(key), int | float)]
            if points:
                ax.plot(*zip(*points), label=run_dir.name, marker="o" if len(points) < 20 else None)
                drawn = True
        if drawn:
            ax.set_xlabel("tokens")
            ax.set_ylabel(label)
            if key in ("loss", "val_loss"):
                ax.set_xscale("log")
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
            fig.tight_layout()
            path = directory / f"{key}.png"
            fig.savefig(path, dpi=110)
            written.append(path)
        plt.close(fig)
    if not written:
        raise ConfigError(f"{', '.join(run_dirs)}: no logged metrics to plot yet")
    return written
