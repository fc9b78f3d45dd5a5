"""The `tape-pretrain` entry point: parses arguments and dispatches; no logic of its own."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from tape_pretrain.utils.logs import setup_logging
from tape_pretrain.utils.redact import RedactingStream, remember_secrets


def _storage_options(items: list[str]) -> dict[str, str]:
    from tape_pretrain.config import ConfigError

    options = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--storage-option {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        options[key] = value
    return options


def cmd_tokenizer_train(args) -> None:
    from tape_pretrain.data.tokenizer import train_tokenizer

    train_tokenizer(args.input, vocab_size=args.vocab_size, out=args.out, text_field=args.text_field,
                    max_sentences=args.max_sentences, model_type=args.model_type)


def cmd_prep(args) -> None:
    from tape_pretrain.data.prep import PrepOptions, prepare

    prepare(PrepOptions(inputs=args.input, tokenizer=args.tokenizer, out=args.out, workers=args.workers,
                        val_fraction=args.val_fraction, shard_tokens=args.shard_tokens,
                        text_field=args.text_field, overwrite=args.overwrite,
                        chunk_docs=args.chunk_docs, dtype=args.dtype, segment_bytes=args.segment_bytes,
                        num_parts=args.num_parts, part=args.part,
                        storage_options=_storage_options(args.storage_option), progress=not args.quiet))


def cmd_data_merge(args) -> None:
    from tape_pretrain.data.prep import merge

    merge(args.url, storage_options=_storage_options(args.storage_option))


def cmd_data_verify(args) -> None:
    from tape_pretrain.data.manifest import verify_dataset

    report = verify_dataset(args.url, storage_options=_storage_options(args.storage_option))
    print(report)


def cmd_data_inspect(args) -> None:
    from tape_pretrain.data.manifest import inspect_dataset

    print(inspect_dataset(args.url, storage_options=_storage_options(args.storage_option), sample=args.sample,
                          doc_shards=args.doc_shards))


def cmd_train(args) -> None:
    from tape_pretrain.config import load_config
    from tape_pretrain.train.trainer import train

    train(load_config(args.config, args.overrides))


def cmd_config_show(args) -> None:
    from tape_pretrain.config import describe_config, format_key_docs, load_config

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not Path(config).exists():  # `config show key=value`: no file
        config, overrides = None, [config, *overrides]
    docs = describe_config(load_config(config, overrides))
    if args.diff:
        docs = [d for d in docs if d.value != d.default]
    print(format_key_docs(docs) if docs else "every key has its default value")


def cmd_plot(args) -> None:
    from tape_pretrain.train.plot import plot_runs

    for path in plot_runs(args.run_dirs, args.out):
        print(path)


def cmd_eval(args) -> None:
    from tape_pretrain.eval.run import evaluate_command

    evaluate_command(args)


def cmd_export(args) -> None:
    from tape_pretrain.train.export import export_checkpoint

    if args.push_to_hub:
        from tape_pretrain.train.export import check_hub_repo_id

        check_hub_repo_id(args.push_to_hub)
    export_checkpoint(args.checkpoint, args.out, overwrite=args.overwrite)
    if args.push_to_hub:
        from tape_pretrain.train.export import push_to_hub

        push_to_hub(args.out, args.push_to_hub, args.private)


def cmd_study(args) -> None:
    from tape_pretrain.study.runner import StudyRunsFailed, run_study

    try:
        run_study(args.study, args.overrides, dry_run=args.dry_run)
    except StudyRunsFailed as exc:  # the other runs ran and RESULTS.md was written: not a usage error
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


def cmd_doctor(args) -> None:
    from tape_pretrain.config import load_config
    from tape_pretrain.distributed.preflight import doctor

    doctor(load_config(args.config, args.overrides) if args.config else None)


def cmd_inspect_model(args) -> None:
    from tape_pretrain.config import ConfigError
    from tape_pretrain.inspect_model import inspect_model

    memory = None
    plan_flags = {"--zero-stage": args.zero_stage, "--world": args.world, "--micro-batch": args.micro_batch,
                  "--precision": args.precision, "--activation-checkpointing": args.activation_checkpointing or None,
                  "--replicate-degree": args.replicate_degree,
                  "--no-reshard-after-forward": None if args.reshard_after_forward else True}
    if args.engine is None:
        given = [flag for flag, value in plan_flags.items() if value is not None]
        if given:
            raise ConfigError(f"{', '.join(given)} plan memory: add --engine deepspeed, fsdp2 or ddp")
    else:
        if args.engine == "fsdp2" and args.zero_stage is not None:
            print(f"warning: --zero-stage {args.zero_stage} is ignored: FSDP2 shards parameters, gradients and "
                  "optimizer state", file=sys.stderr)
            args.zero_stage = None
        memory = dict(engine=args.engine, zero_stage=args.zero_stage,
                      world_size=1 if args.world is None else args.world,
                      micro_batch_size=1 if args.micro_batch is None else args.micro_batch,
                      precision=args.precision or ("fp32" if args.engine == "ddp" else "bf16"),
                      activation_checkpointing=args.activation_checkpointing,
                      replicate_degree=args.replicate_degree or 1, reshard_after_forward=args.reshard_after_forward)
    print(inspect_model(args.model, seq_len=args.seq_len, positional=args.positional, memory=memory))


def cmd_bench(args) -> None:
    what = args.what
    if args.preset is None and what != "decode":
        args.preset = "paper-155m"
    if args.batch is None:
        # On a GPU, batch 1 at the 155M shape is launch-bound (it times kernel launches, not the model)
        import torch

        args.batch = 8 if what == "gpu" or (what == "model" and torch.cuda.is_available()) else 1
    if what == "all":
        from tape_pretrain.bench import suite

        options = ["--preset", args.preset, "--seq-len", str(args.seq_len), "--batch", str(args.batch),
                   "--repeats", str(args.repeats), *(["--compile"] if args.compile else []),
                   "--tape-attention", args.tape_attention]
        suite.run_all(options)
    elif what == "model":
        from tape_pretrain.bench import model

        model.run(preset=args.preset, seq_len=args.seq_len, batch=args.batch, repeats=args.repeats,
                  compile_blocks=args.compile, tape_attention=args.tape_attention)
    elif what == "prep":
        from tape_pretrain.bench import prep

        prep.run()
    elif what == "loader":
        from tape_pretrain.bench import loader

        loader.run()
    elif what == "train":
        from tape_pretrain.bench import train

        train.run()
    elif what == "decode":
        from tape_pretrain.bench import decode

        decode.run(preset=args.preset or "tiny", prompt_len=args.prompt_len,
                   new_tokens=args.new_tokens, repeats=args.repeats)
    elif what == "checkpoint":
        from tape_pretrain.bench import checkpoint

        checkpoint.run(preset=args.preset)
    elif what == "gpu":
        from tape_pretrain.bench import gpu

        result = gpu.run(gpu.GpuCheckOptions(
            preset=args.preset, seq_lens=_int_list(args.seq_lens, "--seq-lens"), batch=args.batch,
            repeats=args.repeats, train_preset=args.train_preset, train_seq_len=args.train_seq_len,
            train_batch=args.train_batch, train_steps=args.train_steps, data=args.data, work_dir=args.work_dir,
            peak_flops=args.peak_flops))
        if result["failed"]:
            raise SystemExit(1)


def _int_list(text: str, option: str) -> tuple[int, ...]:
    from tape_pretrain.config import ConfigError

    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise ConfigError(f"{option} {text!r} is not a comma-separated list of integers") from None


DESCRIPTION = """\
Pretrain decoder-only language models with TAPE (contextualized equivariant
positional encoding) or a baseline encoding (RoPE, NoPE, ALiBi, FIRE, xPos,
RandPE), on one CPU or many GPUs, and evaluate them.

The usual order of commands:
  tape-pretrain tokenizer train  train a SentencePiece tokenizer (or bring one)
  tape-pretrain prep             tokenize a corpus into checksummed shards
  tape-pretrain train CONFIG     pretrain (under torchrun for several GPUs)
  tape-pretrain eval RUN_DIR     perplexity at several lengths, passkey
  tape-pretrain export RUN_DIR   a consolidated safetensors export
  tape-pretrain plot RUN_DIR     loss, val loss, lr and throughput curves

`tape-pretrain config show` lists every config key with its default and
meaning; `tape-pretrain COMMAND --help` describes a command and its options.
Documentation: README.md of the tape_pretrain repository; example configs in
its configs/ directory.
"""

SRC_HELP = ("a source: path or URL with globs (*.txt, *.jsonl[.gz|.zst], *.parquet), hf:NAME[:CONFIG][@SPLIT], "
            "or builtin:python-stdlib")
URL_HELP = "dataset URL (path, file://, s3://, gs://, memory://)"


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions as written (``_fill`` wraps them); each option's default appended to its help, except a default
    of None, which the help text explains in words, and a flag's (off unless given)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or (action.option_strings and action.nargs == 0):
            return action.help or ""
        return super()._get_help_string(action)


def _fill(text: str) -> str:
    """Each line of ``text`` a paragraph, wrapped for an 80-column terminal."""
    import textwrap

    return "\n\n".join(textwrap.fill(paragraph, 79) for paragraph in text.split("\n"))


def package_version() -> str:
    """The installed distribution's version, else tape_pretrain.__version__."""
    from importlib import metadata

    try:
        return metadata.version("tape-pretrain")
    except metadata.PackageNotFoundError:
        import tape_pretrain

        return getattr(tape_pretrain, "__version__", "unknown")


def _command(sub, name: str, help: str, description: str | None = None, **kwargs) -> argparse.ArgumentParser:
    """A subcommand whose --help page starts with its one-line help (and ``description`` below it; each of its lines
    a paragraph)."""
    text = help[0].upper() + help[1:] + "." + (f"\n{description}" if description else "")
    return sub.add_parser(name, help=help, description=_fill(text), formatter_class=HelpFormatter, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    from tape_pretrain.config import POSITIONAL_NAMES

    parser = argparse.ArgumentParser(prog="tape-pretrain", description=DESCRIPTION, formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    # the deepspeed launcher passes --local_rank=N before the command; the environment's LOCAL_RANK is what we use
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(title="commands", dest="command", required=True, metavar="COMMAND")

    tok = _command(sub, "tokenizer", "train a SentencePiece tokenizer").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    p = _command(tok, "train", "train SentencePiece (BPE, byte fallback) on the first documents of the sources")
    p.add_argument("--input", nargs="+", required=True, metavar="SRC", help=SRC_HELP)
    p.add_argument("--vocab-size", type=int, required=True, help="vocabulary size (at least 260: 256 bytes + 4 "
                                                                 "special ids)")
    p.add_argument("--out", required=True, help="path of the tokenizer model to write (e.g. tok.model)")
    p.add_argument("--text-field", default="text", help="JSON field or parquet column holding the text")
    p.add_argument("--max-sentences", type=int, default=200_000, help="documents sampled for training")
    p.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"], help="SentencePiece model type")
    p.set_defaults(func=cmd_tokenizer_train)

    p = _command(sub, "prep", "tokenize sources into checksummed shards with a manifest",
                 "Resumable: a re-run keeps the verified shards and continues. Shows a progress bar (stored bytes "
                 "read, with an ETA when the input sizes are known) on a terminal, plain lines otherwise.")
    p.add_argument("--input", nargs="+", required=True, metavar="SRC", help=SRC_HELP)
    p.add_argument("--tokenizer", required=True, help="SentencePiece model (path or URL)")
    p.add_argument("--out", required=True, help=URL_HELP)
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    p.add_argument("--val-fraction", type=float, default=0.005, help="share of documents in the val split")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, help="target tokens per shard")
    p.add_argument("--text-field", default="text", help="JSON field or parquet column holding the text")
    p.add_argument("--chunk-docs", type=int, default=64, help="documents per tokenization task")
    p.add_argument("--dtype", default="auto", choices=["auto", "uint16", "uint32"],
                   help="token id type on disk (auto: the smallest that holds the vocabulary)")
    p.add_argument("--segment-bytes", type=int, default=1 << 30,
                   help="group consecutive input files into segments of at least this many stored bytes (a hf: "
                        "dataset is one segment); a segment is what one part prepares")
    p.add_argument("--num-parts", type=int, default=1,
                   help="split the preparation into this many parts, run separately (e.g. a SLURM array, all with "
                        "the same --out), then `tape-pretrain data merge URL`; the result is byte-identical to one "
                        "run without parts (1: prepare and merge here)")
    p.add_argument("--part", type=int, default=0,
                   help="with --num-parts P: the part this run prepares, 0 to P-1 (the segments whose index is "
                        "--part modulo P)")
    p.add_argument("--overwrite", action="store_true", help="replace a different dataset at --out")
    p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                   help="fsspec storage option for the URLs (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or progress lines")
    p.set_defaults(func=cmd_prep)

    data = _command(sub, "data", "verify, inspect or merge a prepared dataset").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    for name, func, what in (
            ("verify", cmd_data_verify, "check every shard and offsets file against the manifest"),
            ("inspect", cmd_data_inspect, "summarize a dataset: splits, documents and their lengths, recipe"),
            ("merge", cmd_data_merge, "write the manifest of a prep that ran in parts (prep --num-parts P "
                                      "--part i), once every part has finished")):
        p = _command(data, name, what)
        p.add_argument("url", help=URL_HELP)
        p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                       help="fsspec storage option for the URL (repeatable)")
        if name == "inspect":
            p.add_argument("--sample", type=int, default=200, help="tokens to decode from the first shard")
            p.add_argument("--doc-shards", type=int, default=16,
                           help="document length percentiles come from the offsets of at most this many shards "
                                "per split, evenly spaced")
        p.set_defaults(func=func)

    p = _command(sub, "train", "pretrain a model",
                 "The config is a YAML file of the run config tree; key=value overrides (dotted keys, YAML values) "
                 "win over it, and it over the defaults.\nList every key with its default and meaning: "
                 "`tape-pretrain config show [CONFIG] [key=value ...] [--diff]`.\nSeveral GPUs: `torchrun "
                 "--nproc-per-node N -m tape_pretrain.cli train CONFIG` (see README.md, Launching).")
    p.add_argument("config", help="run config YAML (examples in configs/runs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted config overrides, e.g. trainer.max_steps=1000 model.positional.name=rope")
    p.set_defaults(func=cmd_train)

    cfg = _command(sub, "config", "show the run config tree").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    p = _command(cfg, "show", "print every config key with its value, default and meaning",
                 "The config resolved as `tape-pretrain train` resolves it: defaults, then CONFIG, then the "
                 "overrides.")
    p.add_argument("config", nargs="?", default=None, help="run config YAML (none: the defaults)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, as train takes them")
    p.add_argument("--diff", action="store_true", help="only the keys whose value differs from the default")
    p.set_defaults(func=cmd_config_show)

    p = _command(sub, "eval", "perplexity at several lengths and passkey retrieval",
                 "One progress bar per length on a terminal, one line per length otherwise. Under torchrun every "
                 "rank scores a share of the windows.")
    p.add_argument("checkpoint", help="a run directory (its export/, else its newest checkpoint), an export "
                                      "directory, or a checkpoint directory (RUN_DIR/checkpoints/step_N: consolidated "
                                      "on the fly, results in RUN_DIR/eval/step_N)")
    p.add_argument("--data", default=None,
                   help=URL_HELP + "; its val split is scored (default: none; required, except with --task addition "
                        "and --lm-eval)")
    p.add_argument("--task", choices=["perplexity", "addition"], default="perplexity",
                   help="perplexity: of --data's val split at --lengths tokens; addition: exact-match accuracy of "
                        "greedy answers to reversed-digit addition problems (a model trained on "
                        "builtin:addition) with --lengths read as operand lengths in digits")
    p.add_argument("--problems", type=int, default=200,
                   help="with --task addition: problems per operand length (seeded by --seed), reported with a "
                        "Wilson 95%% interval")
    p.add_argument("--lengths", default="128,256,512", help="comma-separated evaluation lengths in tokens")
    p.add_argument("--stride", type=int, default=None,
                   help="sliding-window stride; each token is scored once, with at least length - stride tokens of "
                        "context (default: non-overlapping windows)")
    p.add_argument("--max-tokens", type=int, default=200_000, help="val tokens evaluated per length")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward")
    p.add_argument("--device", default="auto",
                   help="auto (CUDA when available, as training), cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto",
                   help="auto (bf16 on a CUDA device with bf16, else fp32), fp32 or bf16 (also on the CPU, slowly); "
                        "logits are scored in fp32")
    p.add_argument("--attention", choices=["causal", "document"], default=None,
                   help="causal: each token sees its whole window; document: only its own document, positions "
                        "restarting at each document (default: the model's training mode, model.attention)")
    p.add_argument("--within-documents", action="store_true",
                   help="score only windows that lie inside one document (documents longer than the length)")
    p.add_argument("--passkey", action="store_true",
                   help="passkey retrieval in the LongLoRA / Landmark format, greedy, exact match")
    p.add_argument("--passkey-lengths", default=None,
                   help="prompt lengths in tokens (at most, within one filler sentence) (default: --lengths)")
    p.add_argument("--passkey-depths", default="0.1,0.5,0.9", help="key positions, 0 (first) to 1 (last)")
    p.add_argument("--passkey-trials", type=int, default=20,
                   help="random keys per (length, depth) cell; reported with a Wilson 95%% interval")
    p.add_argument("--out", default=None,
                   help="directory for eval.json, eval.md and plots (default: the export's parent, the run "
                        "directory)")
    p.add_argument("--plot", action="store_true", help="also draw perplexity against length (perplexity.png)")
    p.add_argument("--seed", type=int, default=0, help="seed of the passkey draws")
    p.add_argument("--allow-tokenizer-mismatch", action="store_true",
                   help="evaluate on a dataset tokenized with another tokenizer of the same vocabulary size "
                        "(refused by default: the perplexity would be meaningless)")
    p.add_argument("--lm-eval", default=None, metavar="TASKS",
                   help="run lm-evaluation-harness 0.4 on the export instead (comma-separated task names), through "
                        "its hf model with trust_remote_code; --batch-size, --device and --dtype apply; writes "
                        "lm_eval.json and lm_eval.md (default: none, perplexity)")
    p.add_argument("--lm-eval-include", default=None, metavar="DIR",
                   help="a directory (or YAML file) of lm-eval task definitions, for local tasks (default: "
                        "lm-eval's own tasks only)")
    p.add_argument("--lm-eval-limit", type=float, default=None,
                   help="documents per task (a fraction if < 1), for a quick look (default: all)")
    p.add_argument("--lm-eval-fewshot", type=int, default=None, help="few-shot examples (default: the task's)")
    p.add_argument("--lm-eval-log-samples", action="store_true",
                   help="keep every request's arguments and responses in lm_eval.json")
    p.set_defaults(func=cmd_eval)

    p = _command(sub, "export", "consolidated safetensors export of a checkpoint",
                 "Any engine and world size. The export loads in Hugging Face transformers: RoPE as stock Llama, "
                 "every other encoding with trust_remote_code=True (the project's model code ships in it); "
                 "AutoTokenizer loads its tokenizer; README.md is its model card. Prints a line per phase with the "
                 "elapsed time.")
    p.add_argument("checkpoint", help="a checkpoint directory, or a run directory (local or remote: its newest "
                                      "complete checkpoint)")
    p.add_argument("--out", required=True, help="local directory for model.safetensors, config.json and "
                                                "tokenizer.model")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an export in a non-empty --out (run and checkpoint directories are always refused)")
    p.add_argument("--push-to-hub", default=None, metavar="USER/REPO",
                   help="then upload --out to this Hugging Face Hub model repository (created if missing; token from "
                        "`huggingface-cli login` or HF_TOKEN) (default: no upload)")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")
    p.set_defaults(func=cmd_export)

    p = _command(sub, "plot", "draw loss, val loss, lr, seq_len and throughput against tokens for one or several "
                              "runs; one PNG per metric")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (their metrics.jsonl)")
    p.add_argument("--out", default=None,
                   help="directory for the PNGs (default: the first run directory's plots/)")
    p.set_defaults(func=cmd_plot)

    p = _command(sub, "study", "a grid of runs with RESULTS.md and plots",
                 "Trains, evaluates and reports every run of the grid in turn (`study: run 3/18 NAME: ...`), "
                 "re-using finished runs whose config is unchanged and resuming interrupted ones.")
    p.add_argument("study", help="study YAML (examples in configs/studies/)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides of the study file, e.g. launcher=print seeds=[1,2]")
    p.add_argument("--dry-run", action="store_true", help="print the launch commands only")
    p.set_defaults(func=cmd_study)

    p = _command(sub, "doctor", "preflight checks of the environment, data and run directory")
    p.add_argument("config", nargs="?", default=None,
                   help="run config YAML whose data, run directory and model are checked too (default: the "
                        "environment only)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, as train takes them")
    p.set_defaults(func=cmd_doctor)

    p = _command(sub, "bench", "side-by-side benchmarks printed as ratios")
    p.add_argument("what", choices=["model", "prep", "loader", "train", "checkpoint", "decode", "gpu", "all"],
                   help="what to time (all: model, prep, loader, train and checkpoint; decode: cached against "
                        "uncached generation, TAPE and RoPE)")
    p.add_argument("--preset", default=None,
                   help="model size preset (default: paper-155m for model, checkpoint, gpu and all; tiny for decode)")
    p.add_argument("--seq-len", type=int, default=1024, help="sequence length (bench model, all)")
    p.add_argument("--batch", type=int, default=None,
                   help="sequences per forward (default: 1; bench gpu, and bench model on a GPU: 8)")
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions per measurement")
    p.add_argument("--compile", action="store_true", help="bench model: torch.compile each block of both models")
    p.add_argument("--prompt-len", type=int, default=1024, help="bench decode: prompt tokens before generating")
    p.add_argument("--new-tokens", type=int, default=64, help="bench decode: tokens generated after the prompt")
    p.add_argument("--tape-attention", choices=["auto", "two_calls", "one_call", "both"], default="auto",
                   help="bench model: TAPE's attention form (model.positional.tape_attention); both: time each")
    g = p.add_argument_group("bench gpu", _fill("the one-GPU check (launch/gpu_check.sh); --preset, --batch and "
                                                "--repeats size its speed, MFU and SDPA sections"))
    g.add_argument("--seq-lens", default="1024,4096", help="sequence lengths of the speed, MFU and SDPA sections")
    g.add_argument("--train-preset", default="tiny", help="model of the training, resume and async-save sections")
    g.add_argument("--train-seq-len", type=int, default=256, help="sequence length of the training sections")
    g.add_argument("--train-batch", type=int, default=8, help="sequences per step of the training sections")
    g.add_argument("--train-steps", type=int, default=30, help="steps of each training run")
    g.add_argument("--data", default=None, help="dataset URL for the training runs (default: the built-in corpus, "
                                                "prepared on the fly)")
    g.add_argument("--work-dir", default=None, help="keep runs and checkpoints here (default: a temporary directory)")
    g.add_argument("--peak-flops", type=float, default=None,
                   help="peak FLOP/s for MFU (default: looked up for known GPUs)")
    p.set_defaults(func=cmd_bench)

    insp = _command(sub, "inspect", "describe a model").add_subparsers(dest="action", required=True, metavar="ACTION")
    p = _command(insp, "model", "parameters, positional parameters and FLOPs per token of a model, and with --engine "
                                "its memory per rank in training")
    p.add_argument("model", help="preset name, run config YAML (the model its training builds) or export directory")
    p.add_argument("--seq-len", type=int, default=None,
                   help="sequence length of the FLOPs (default: the model's max_seq_len)")
    p.add_argument("--positional", default=None, choices=POSITIONAL_NAMES,
                   help="one encoding instead of the rope/tape pair (default: both)")
    g = p.add_argument_group("memory plan", _fill("with --engine: estimated memory per rank of one training step "
                                                  "(at --seq-len, default the model's max_seq_len)"))
    g.add_argument("--engine", choices=["deepspeed", "fsdp2", "ddp"], default=None,
                   help="training engine to plan for (default: no memory plan)")
    g.add_argument("--zero-stage", type=int, default=None,
                   help="DeepSpeed ZeRO stage 0-3 (default: none, required with --engine deepspeed)")
    g.add_argument("--world", type=int, default=None, help="ranks sharing the model (default: 1)")
    g.add_argument("--micro-batch", type=int, default=None, help="sequences per rank per forward (default: 1)")
    g.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                   help="training precision (default: bf16; with --engine ddp: fp32)")
    g.add_argument("--activation-checkpointing", action="store_true", help="recompute each block in backward")
    g.add_argument("--replicate-degree", type=int, default=None, help="FSDP2: HSDP replicas (default: 1)")
    g.add_argument("--no-reshard-after-forward", dest="reshard_after_forward", action="store_false",
                   help="FSDP2: keep gathered parameters from forward to backward (default: reshard)")
    p.set_defaults(func=cmd_inspect_model)
    return parser


# glibc malloc settings for CPU runs: keep freed memory mapped instead of returning every large block to the OS,
# so each step does not page-fault and zero-fill its activations again. Measured on 2 cores, paper-155m, N=1024:
# TAPE 4.40-4.73 s -> 4.18-4.35 s per step, RoPE 3.76-3.87 s -> 3.61-3.80 s (ratio 1.17-1.22 -> 1.15-1.16).
CPU_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(4 << 30), "MALLOC_TRIM_THRESHOLD_": str(4 << 30),
                  "MALLOC_TOP_PAD_": str(1 << 30)}


def tune_cpu_allocator(argv: list[str]) -> None:
    """Re-execute this command once with CPU_MALLOC_ENV (glibc reads it only at start-up).

    Skipped on GPU machines, where it is not needed, when any of the variables is already set, and with
    TAPE_PRETRAIN_NO_MALLOC_TUNING=1.
    """
    import os

    if (not sys.platform.startswith("linux") or os.environ.get("TAPE_PRETRAIN_NO_MALLOC_TUNING")
            or any(k in os.environ for k in CPU_MALLOC_ENV) or os.path.exists("/dev/nvidia0")
            or os.environ.get("TAPE_PRETRAIN_REEXECED")):
        return
    env = dict(os.environ, TAPE_PRETRAIN_REEXECED="1", **CPU_MALLOC_ENV)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "tape_pretrain.cli", *argv], env)


def main(argv: list[str] | None = None) -> int:
    from tape_pretrain.errors import USER_ERRORS

    # Every line this process prints (our messages, library logs, warnings, tracebacks) leaves through here with
    # URL user-info removed: a password in s3://user:PW@bucket/... must never reach a terminal or a log file. The
    # process entry point keeps the wrappers to the end, so that an unexpected traceback is redacted too.
    entry_point = argv is None  # the process entry point (console script or python -m), not a call from Python code
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = RedactingStream(sys.stdout), RedactingStream(sys.stderr)
    if entry_point:
        argv = sys.argv[1:]
        command = next((a for a in argv if not a.startswith("-")), None)
        if command in ("train", "bench", "eval", "study"):
            tune_cpu_allocator(argv)
    remember_secrets(list(argv))  # URLs given on the command line, overrides included
    try:
        args = build_parser().parse_args(argv)
        # warnings of every command as train logs them (train adds its run directory's log file)
        rank = os.environ.get("RANK", "0")
        setup_logging(int(rank) if rank.isdigit() else 0)
        args.func(args)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        if not entry_point:
            sys.stdout, sys.stderr = streams
    return 0


if __name__ == "__main__":
    sys.exit(main())
