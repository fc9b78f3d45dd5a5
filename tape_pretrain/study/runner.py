"""`tape-pretrain study`: run (or emit) every run of a grid, skip finished ones, resume interrupted ones, report."""

from __future__ import annotations

import json
import math
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from tape_pretrain.config import (
    ModelConfig,
    PositionalConfig,
    RunConfig,
    from_dict,
    load_config,
    read_yaml_mapping,
    set_dotted,
)
from tape_pretrain.study.report import write_report
from tape_pretrain.study.spec import StudySpec, load_study


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _nested(dotted: dict[str, Any]) -> dict:
    out: dict = {}
    for key, value in dotted.items():
        set_dotted(out, key, value)
    return out


def ensure_dataset(spec: StudySpec, root: Path) -> str:
    """The study's dataset URL, preparing a tokenizer and shards first when it does not exist yet."""
    from tape_pretrain.data.manifest import MANIFEST
    from tape_pretrain.data.prep import PrepOptions, prepare
    from tape_pretrain.data.storage import exists, join, open_url
    from tape_pretrain.data.tokenizer import train_tokenizer

    url = spec.data_path or str(root / "data" / "dataset")
    fs, base = open_url(url)
    if exists(fs, join(base, MANIFEST)):
        return url
    if not spec.data_prep.inputs:
        from tape_pretrain.errors import DataError

        raise DataError(f"study dataset {url} does not exist and study.data_prep.inputs is empty")
    tokenizer = root / "data" / "tokenizer.model"
    if not tokenizer.exists():
        tokenizer.parent.mkdir(parents=True, exist_ok=True)
        train_tokenizer(spec.data_prep.inputs, spec.data_prep.vocab_size, str(tokenizer))
    prepare(PrepOptions(inputs=spec.data_prep.inputs, tokenizer=str(tokenizer), out=url, workers=2,
                        val_fraction=spec.data_prep.val_fraction, shard_tokens=5_000_000, progress=False))
    return url


def run_config(spec: StudySpec, run: dict, root: Path, data_url: str, vocab_size: int) -> dict:
    base = read_yaml_mapping(spec.base_config, "study.base_config") if spec.base_config else {}
    base = _merge(base or {}, _nested({k: v for k, v in spec.base.items() if "." in k}))
    base = _merge(base, {k: v for k, v in spec.base.items() if "." not in k})
    config = _merge(base, {
        "run_dir": str(root / "runs" / run["name"]), "seed": run["seed"],
        "data": {"path": data_url},
        "model": _merge(run["size"].model, {"positional": {"name": run["encoding"]}}),
        "logging": {"wandb": {"name": f"{spec.name}/{run['name']}"}},
    })
    resolved = from_dict(RunConfig, config)
    parameters = count_parameters(resolved.model, vocab_size, resolved.trainer.seq_len)
    tokens = spec.tokens_per_parameter * parameters
    config["trainer"] = dict(config.get("trainer", {}))
    config["trainer"]["max_steps"] = max(spec.min_steps, math.ceil(tokens / resolved.trainer.global_batch_tokens))
    return config


def count_parameters(model: ModelConfig, vocab_size: int, seq_len: int) -> int:
    import torch

    from tape_pretrain.models import build_model

    fields = dict(model.__dict__)
    fields["positional"] = PositionalConfig(**model.positional.__dict__)
    fields["vocab_size"] = fields["vocab_size"] or vocab_size
    fields["max_seq_len"] = fields["max_seq_len"] or seq_len
    with torch.device("meta"):
        return build_model(ModelConfig(**fields)).num_parameters()


def train_command(config_path: Path, nproc: int) -> list[str]:
    if nproc <= 1:
        return [sys.executable, "-m", "tape_pretrain.cli", "train", str(config_path)]
    from tape_pretrain.distributed.env import free_port

    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--nnodes", "1",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
            "-m", "tape_pretrain.cli", "train", str(config_path)]


def evaluate_run(run_dir: Path, data_url: str, spec: StudySpec, seq_len: int) -> dict:
    from tape_pretrain.eval.perplexity import evaluate_lengths
    from tape_pretrain.train.export import load_export_model

    model = load_export_model(str(run_dir / "export"))
    lengths = [m * seq_len for m in spec.eval_multipliers]
    results = evaluate_lengths(model, data_url, lengths, str(run_dir / ".eval_cache"), spec.eval_max_tokens, 4)
    return {str(k): v for k, v in results.items()}


def run_study(path: str, overrides: list[str], dry_run: bool = False) -> Path:
    from tape_pretrain.data.manifest import load_manifest

    spec = load_study(path, overrides)
    root = Path(spec.out_dir) / spec.name
    root.mkdir(parents=True, exist_ok=True)
    emit_only = dry_run or spec.launcher in ("print", "slurm")
    data_url = ensure_dataset(spec, root) if not emit_only else (spec.data_path or str(root / "data" / "dataset"))
    try:
        vocab = int(load_manifest(data_url)[0].tokenizer["vocab_size"])
    except Exception:  # emitting commands before the data exists: size the budget with the preset's vocab
        vocab = 32000
    commands = []
    for run in spec.runs():
        run_dir = root / "runs" / run["name"]
        run_dir.mkdir(parents=True, exist_ok=True)
        config = run_config(spec, run, root, data_url, vocab)
        config_path = run_dir / "run.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        command = train_command(config_path, spec.nproc)
        commands.append(command)
        if emit_only:
            continue
        if (run_dir / "eval.json").exists():
            print(f"study: {run['name']} already finished; skipped")
            continue
        print(f"study: training {run['name']} ({config['trainer']['max_steps']} steps)", flush=True)
        start = time.perf_counter()
        subprocess.run(command, check=True)  # re-running resumes an interrupted run from its checkpoint
        timing_file = run_dir / "timing.json"
        previous = json.loads(timing_file.read_text())["train_seconds"] if timing_file.exists() else 0.0
        timing_file.write_text(json.dumps({"train_seconds": previous + time.perf_counter() - start}))
        seq_len = load_config(config_path).trainer.seq_len
        results = evaluate_run(run_dir, data_url, spec, seq_len)
        # eval.json marks the run finished, so it appears whole or not at all
        partial = run_dir / "eval.json.tmp"
        partial.write_text(json.dumps(results, indent=1))
        partial.replace(run_dir / "eval.json")
    if emit_only:
        lines = [shlex.join(c) for c in commands]
        if spec.launcher == "slurm" and not dry_run:
            script = root / "study_array.sbatch"
            cases = "\n".join(f"  {i}) {line} ;;" for i, line in enumerate(lines))
            script.write_text(f"#!/usr/bin/env bash\n#SBATCH --array=0-{len(lines) - 1}\n"
                              f"#SBATCH --job-name={spec.name}\nset -euo pipefail\n"
                              f"case $SLURM_ARRAY_TASK_ID in\n{cases}\nesac\n")
            print(f"study: wrote {script} ({len(lines)} array tasks); evaluate and report with launcher=local")
        else:
            print("\n".join(lines))
        return root
    report = write_report(spec, root)
    print(f"study: results in {report}")
    return root
