"""`tape-pretrain eval`: perplexity at several lengths of an export, as JSON, a markdown table and a plot."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tape_pretrain.config import ConfigError
from tape_pretrain.eval.perplexity import evaluate_lengths
from tape_pretrain.train.export import load_export_model


def evaluate_command(args) -> dict:
    source = Path(args.checkpoint)
    export = source / "export" if (source / "export" / "config.json").exists() else source
    if args.passkey:
        raise ConfigError("--passkey is not available yet in this version")
    try:
        lengths = [int(x) for x in args.lengths.split(",") if x]
    except ValueError:
        raise ConfigError(f"--lengths {args.lengths!r} must be comma-separated integers") from None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_export_model(str(export)).to(device)
    results = evaluate_lengths(model, args.data, lengths, str(Path(args.out or export) / ".cache"),
                               args.max_tokens, args.batch_size, device)
    table = ["| length | loss | perplexity | tokens |", "|---:|---:|---:|---:|"]
    table += [f"| {n} | {r['loss']:.4f} | {r['perplexity']:.2f} | {r['tokens']:,} |" for n, r in results.items()]
    print("\n".join(table))
    out = Path(args.out) if args.out else export.parent
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps({str(k): v for k, v in results.items()}, indent=1))
    (out / "eval.md").write_text("\n".join(table) + "\n")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot(list(results), [r["perplexity"] for r in results.values()], marker="o")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("evaluation length")
        ax.set_ylabel("perplexity")
        ax.set_title(f"{model.config.positional.name}: perplexity vs length")
        fig.tight_layout()
        fig.savefig(out / "perplexity.png", dpi=120)
        plt.close(fig)
    return results
