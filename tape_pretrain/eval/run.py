"""`tape-pretrain eval`: perplexity at several lengths of an export, and passkey retrieval, as JSON, markdown
tables and plots."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tape_pretrain.config import ConfigError
from tape_pretrain.eval.perplexity import eval_device, eval_dtype, evaluate_lengths
from tape_pretrain.train.export import export_to_evaluate, load_export_model


def evaluate_command(args) -> dict:
    lengths = _check_options(args)  # before anything loads: a typo costs no consolidation
    try:
        with export_to_evaluate(args.checkpoint) as (export, default_out):
            if args.out is None and default_out is not None:  # a checkpoint: never write inside it
                args.out = str(default_out)
            return _evaluate(args, export, lengths)
    except OSError as exc:  # a read-only or full run/cache/out directory
        if exc.filename is None:
            raise
        from tape_pretrain.errors import StorageError

        raise StorageError(f"{exc.filename}: {exc.strerror or exc} (eval writes its cache and results under --out, "
                           "or beside the export: give a writable --out)") from None


def _check_options(args) -> list[int]:
    """The evaluation lengths; a ConfigError for any option out of range."""
    try:
        lengths = [int(x) for x in args.lengths.split(",") if x]
    except ValueError:
        raise ConfigError(f"--lengths {args.lengths!r} must be comma-separated integers") from None
    if not lengths or min(lengths) <= 0:
        raise ConfigError(f"--lengths {args.lengths!r} must be positive integers")
    for option, value in (("--batch-size", args.batch_size), ("--max-tokens", args.max_tokens),
                          ("--stride", args.stride)):
        if value is not None and value <= 0:
            raise ConfigError(f"{option} {value} must be a positive integer"
                              + (" (omit --stride for non-overlapping windows)" if option == "--stride" else ""))
    return lengths


def _evaluate(args, export: Path, lengths: list[int]) -> dict:
    if args.task == "addition":
        from tape_pretrain.eval.addition import addition_command

        return addition_command(args, export, lengths)
    if args.lm_eval is not None:
        return lm_eval_command(args, export)
    if args.data is None:
        raise ConfigError("--data is required for --task perplexity: the prepared dataset whose val split is scored")
    passkey = passkey_plan(args, export, lengths) if args.passkey else None  # its errors before any evaluation
    import os

    device = eval_device(args.device)
    dtype = eval_dtype(args.dtype, device)
    env = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: every rank scores a share of the windows
        from tape_pretrain.distributed.env import init_distributed

        if device.type != ("cuda" if torch.cuda.is_available() else "cpu"):
            raise ConfigError(f"--device {args.device}: under torchrun eval runs where training does (on CUDA "
                              "here): drop --device, or run without torchrun")
        env = init_distributed()
    device, rank, world = (env.device, env.rank, env.world_size) if env is not None else (device, 0, 1)
    model = load_export_model(str(export)).to(device=device, dtype=dtype)
    check_tokenizer(export, args.data, model.config.vocab_size, args.allow_tokenizer_mismatch)
    try:
        results = evaluate_lengths(model, args.data, lengths, str(Path(args.out or export) / f".cache{rank}"),
                                   args.max_tokens, args.batch_size, device, stride=args.stride, rank=rank,
                                   world_size=world, dtype=dtype, attention=args.attention,
                                   within_documents=args.within_documents, progress=rank == 0)
    finally:
        if env is not None:
            from tape_pretrain.distributed.env import shutdown

            shutdown()  # a process group left to interpreter exit can abort the process (SIGABRT in gloo)
    if rank != 0:
        return results
    table = ["| length | loss | perplexity | tokens |", "|---:|---:|---:|---:|"]
    table += [f"| {n} | {r['loss']:.4f} | {r['perplexity']:.2f} | {r['tokens']:,} |" for n, r in results.items()]
    print("\n".join(table))
    out = Path(args.out) if args.out else export.parent
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps({str(k): v for k, v in results.items()}, indent=1))
    (out / "eval.md").write_text("\n".join(table) + "\n")
    if passkey is not None:
        passkey_report(model, *passkey, args, out, device, dtype)
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


def lm_eval_command(args, export: Path) -> dict:
    from tape_pretrain.eval.harness import run_lm_eval

    tasks = [task for task in args.lm_eval.split(",") if task]
    if not tasks:
        raise ConfigError("--lm-eval needs at least one task name")
    if args.lm_eval_limit is not None and args.lm_eval_limit <= 0:
        raise ConfigError(f"--lm-eval-limit {args.lm_eval_limit} must be positive")
    device = eval_device(args.device)
    out = Path(args.out) if args.out else export.parent
    return run_lm_eval(export, tasks, out, include=args.lm_eval_include, device=str(device),
                       dtype=eval_dtype(args.dtype, device), batch_size=args.batch_size,
                       limit=args.lm_eval_limit, num_fewshot=args.lm_eval_fewshot,
                       log_samples=args.lm_eval_log_samples)


def check_tokenizer(export: Path, data: str, model_vocab: int, allow_mismatch: bool) -> None:
    """The dataset must be tokenized with the model's tokenizer (same sha256 as the export's tokenizer.model):
    a different tokenizer of the same vocabulary size gives a perplexity that means nothing, a larger one crashes."""
    import hashlib

    from tape_pretrain.data.manifest import load_manifest
    from tape_pretrain.errors import DataError

    manifest, _ = load_manifest(data)
    vocab, sha = int(manifest.tokenizer["vocab_size"]), manifest.tokenizer["sha256"]
    if vocab > model_vocab:
        raise DataError(f"{data}: its tokenizer has {vocab} ids, the model only {model_vocab}: not the model's data")
    tokenizer = export / "tokenizer.model"
    if not tokenizer.is_file():
        print(f"warning: {export} has no tokenizer.model: cannot check that {data} uses the model's tokenizer")
        return
    if hashlib.sha256(tokenizer.read_bytes()).hexdigest() != sha:
        if not allow_mismatch:
            raise DataError(f"{data} was tokenized with another tokenizer than the model's ({export}/tokenizer.model "
                            "differs from the dataset's): pass --allow-tokenizer-mismatch for an intended "
                            "cross-tokenizer evaluation")
        print(f"warning: {data} was tokenized with another tokenizer than the model's (--allow-tokenizer-mismatch)")


def passkey_plan(args, export: Path, lengths: list[int]):
    """The tokenizer, lengths and depths of the passkey cells, checked before any evaluation runs."""
    import random

    from tape_pretrain.data.tokenizer import Tokenizer
    from tape_pretrain.eval.passkey import make_prompt

    try:
        passkey_lengths = ([int(x) for x in args.passkey_lengths.split(",") if x] if args.passkey_lengths
                           else lengths)
    except ValueError:
        raise ConfigError(f"--passkey-lengths {args.passkey_lengths!r} must be comma-separated integers") from None
    try:
        depths = [float(x) for x in args.passkey_depths.split(",") if x]
    except ValueError:
        raise ConfigError(f"--passkey-depths {args.passkey_depths!r} must be comma-separated numbers") from None
    if not passkey_lengths:
        raise ConfigError(f"--passkey-lengths {args.passkey_lengths!r}: give at least one length")
    if not depths or not all(0 <= d <= 1 for d in depths):
        raise ConfigError(f"--passkey-depths {args.passkey_depths!r}: give at least one depth, each in [0, 1]")
    if args.passkey_trials <= 0:
        raise ConfigError(f"--passkey-trials {args.passkey_trials} must be positive")
    tokenizer = Tokenizer.load(str(export / "tokenizer.model"))
    try:
        make_prompt(tokenizer, min(passkey_lengths), 0.0, random.Random(0))
    except ValueError as exc:
        raise ConfigError(f"--passkey-lengths: {exc}") from None
    return tokenizer, passkey_lengths, depths


def passkey_report(model, tokenizer, passkey_lengths: list[int], depths: list[float], args, out: Path, device,
                   dtype) -> None:
    """Passkey accuracy per (length, depth) with its Wilson 95 % interval: a table, passkey.json and a heatmap."""
    from tape_pretrain.eval.passkey import passkey_accuracy
    from tape_pretrain.eval.perplexity import dtype_name

    try:
        cells = passkey_accuracy(model, tokenizer, passkey_lengths, depths, args.passkey_trials, args.seed, device,
                                 dtype)
    except ValueError as exc:  # a key whose sentence takes more tokens than the one checked in passkey_plan
        raise ConfigError(f"--passkey-lengths: {exc}") from None
    caption = (f"passkey accuracy [Wilson 95% interval], {args.passkey_trials} trials per cell; prompts of at most "
               "`length` tokens")
    header = "| length | " + " | ".join(f"depth {d:g}" for d in depths) + " |"
    rows = [caption, "", header, "|---:|" + "---:|" * len(depths)]
    for n in passkey_lengths:
        texts = [f"{c.accuracy:.2f} [{c.interval[0]:.2f}, {c.interval[1]:.2f}]"
                 for c in (cells[(n, d)] for d in depths)]
        rows.append(f"| {n} | " + " | ".join(texts) + " |")
    print("\n".join(rows))
    (out / "passkey.md").write_text("\n".join(rows) + "\n")
    placement = {"device": str(device), "dtype": dtype_name(dtype)}
    (out / "passkey.json").write_text(json.dumps(
        [{"length": c.length, "depth": c.depth, "trials": c.trials, "correct": c.correct, "accuracy": c.accuracy,
          "ci95": list(c.interval), "min_prompt_tokens": c.min_prompt_tokens,
          "max_prompt_tokens": c.max_prompt_tokens} | placement for c in cells.values()], indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = [[cells[(n, d)].accuracy for n in passkey_lengths] for d in depths]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")
    ax.set_xticks(range(len(passkey_lengths)), [str(n) for n in passkey_lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_xlabel("prompt length")
    ax.set_ylabel("key depth")
    fig.colorbar(image, label="accuracy")
    fig.tight_layout()
    fig.savefig(out / "passkey.png", dpi=120)
    plt.close(fig)
