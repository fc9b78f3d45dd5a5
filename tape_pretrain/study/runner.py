"""`tape-pretrain study`: run (or emit) every run of a grid at one budget per size, re-use a finished run only when
its config hash matches, resume interrupted ones, report.

Each run directory gets `study_run.json` when the study launches (or emits) it: the hash of the resolved run
config, that config, and the run's budget. A run directory whose record hash differs from the config the study
would launch now (or that holds a run without a record) is refused with the differing keys; nothing is deleted."""

from __future__ import annotations

import codecs
import dataclasses
import hashlib
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import yaml

from tape_pretrain.config import (
    ConfigError,
    RunConfig,
    dotted_leaves,
    from_dict,
    load_config,
    read_yaml_mapping,
    set_dotted,
    set_leaves,
    to_dict,
    with_later_defaults,
)
from tape_pretrain.errors import DataError
from tape_pretrain.study.report import EVAL_RECORD, RUN_RECORD, write_report
from tape_pretrain.study.spec import StudySpec, load_study
from tape_pretrain.utils.progress import format_duration

RUN_OUTPUTS = ("metrics.jsonl", "checkpoints", "export", "config.json", EVAL_RECORD)
"""What a training (or the study's evaluation) leaves in a run directory: its presence means a run was launched."""

HASH_EXCLUDED = ("run_dir",)
"""Resolved-config keys left out of the hash: where a run lives, not what it computes."""


def dataset_exists(url: str) -> bool:
    from tape_pretrain.data.manifest import MANIFEST
    from tape_pretrain.data.storage import exists, join, open_url

    fs, base = open_url(url)
    return exists(fs, join(base, MANIFEST))


def ensure_dataset(spec: StudySpec, root: Path) -> str:
    """The study's dataset URL, preparing a tokenizer and shards first when it does not exist yet."""
    from tape_pretrain.data.prep import PrepOptions, prepare
    from tape_pretrain.data.tokenizer import train_tokenizer

    url = spec.data_path or str(root / "data" / "dataset")
    if dataset_exists(url):
        return url
    if not spec.data_prep.inputs:
        raise DataError(f"study dataset {url} does not exist and study.data_prep.inputs is empty")
    tokenizer = root / "data" / "tokenizer.model"
    if not tokenizer.exists():
        tokenizer.parent.mkdir(parents=True, exist_ok=True)
        train_tokenizer(spec.data_prep.inputs, spec.data_prep.vocab_size, str(tokenizer))
    prepare(PrepOptions(inputs=spec.data_prep.inputs, tokenizer=str(tokenizer), out=url, workers=2,
                        val_fraction=spec.data_prep.val_fraction, shard_tokens=5_000_000))
    return url


# ---- budgets -----------------------------------------------------------------------------------


@dataclass
class Budget:
    steps: int
    """Optimizer steps of this run."""
    tokens: int
    """Training tokens (steps x trainer.global_batch_tokens)."""
    flops: float
    """Training FLOPs: 3 x forward FLOPs per token (at each step's curriculum length) x tokens."""
    parameters: int
    """All parameters of this encoding's model (TAPE's frozen last-layer weights included)."""
    positional_parameters: int
    """Parameters the positional encoding adds (0 for RoPE, NoPE, ALiBi, xPos, RandPE)."""
    backbone_parameters: int
    """Parameters of the size's backbone, the RoPE model: what the token budget is a multiple of."""
    non_embedding_parameters: int
    """Backbone parameters without token embeddings and LM head: the N of the power-law fit."""


def _meta_model(config: RunConfig, vocab_size: int, encoding: str | None = None):
    """The model the trainer builds for ``config`` (of another encoding when given), shapes only. A model.vocab_size
    that differs from the dataset's is kept: that run's training fails with it, the others run."""
    import torch

    from tape_pretrain.models import build_model
    from tape_pretrain.models.presets import resolve_model_config_from

    model = resolve_model_config_from(config, vocab_size=vocab_size, check_vocab=False, positional=encoding)
    with torch.device("meta"):
        return build_model(model, initialise=False)


def training_flops(model, config: RunConfig, steps: int) -> float:
    """3 x forward FLOPs per token x tokens over ``steps`` steps, each at its curriculum length."""
    from tape_pretrain.train.schedule import Curriculum

    t = config.trainer
    curriculum = Curriculum(config.curriculum, t.seq_len, steps * t.global_batch_tokens)
    steps_per_length = Counter(curriculum.seq_len(step * t.global_batch_tokens) for step in range(steps))
    return sum(3 * model.forward_flops_per_token(length) * t.global_batch_tokens * count
               for length, count in steps_per_length.items())


def run_budget(spec: StudySpec, config: dict, vocab_size: int) -> Budget:
    """One budget per size, from the size's RoPE model: the same tokens for every encoding (budget: tokens) or the
    same training FLOPs as the RoPE run (budget: flops)."""
    resolved = from_dict(RunConfig, config)
    t = resolved.trainer
    model = _meta_model(resolved, vocab_size)
    rope = _meta_model(resolved, vocab_size, "rope")
    backbone = rope.num_parameters()
    if model.num_parameters() - model.num_positional_parameters() != backbone:
        raise AssertionError(f"{resolved.model.positional.name}: parameters minus positional parameters "
                             f"({model.num_parameters()} - {model.num_positional_parameters()}) differ from the "
                             f"RoPE model's {backbone}: num_positional_parameters misses a positional weight")
    embeddings = rope.embed_tokens.weight.numel() + rope.lm_head.weight.numel()
    rope_steps = max(spec.min_steps, math.ceil(spec.tokens_per_parameter * backbone / t.global_batch_tokens))
    steps = rope_steps
    if spec.budget == "flops" and resolved.model.positional.name != "rope":
        target = training_flops(rope, resolved, rope_steps)
        estimate = max(1, round(target / (training_flops(model, resolved, rope_steps) / rope_steps)))
        # a curriculum's phases move with the step count (until_tokens / until_fraction), so FLOPs per step vary
        # with it: the closest step count near the estimate, not the estimate
        steps = min(range(max(1, estimate - 8), estimate + 9),
                    key=lambda n: (abs(training_flops(model, resolved, n) - target), n))
    return Budget(steps=steps, tokens=steps * t.global_batch_tokens, flops=training_flops(model, resolved, steps),
                  parameters=model.num_parameters(), positional_parameters=model.num_positional_parameters(),
                  backbone_parameters=backbone, non_embedding_parameters=backbone - embeddings)


def plan_run(spec: StudySpec, run: dict, root: Path, data_url: str, vocab_size: int) -> tuple[dict, Budget]:
    """The run's config (with trainer.max_steps set from its budget) and the budget."""
    config = read_yaml_mapping(spec.base_config, "study.base_config") if spec.base_config else {}
    set_leaves(config, spec.base)
    set_leaves(config, {"run_dir": str(root / "runs" / run["name"]), "seed": run["seed"], "data.path": data_url,
                        "model": run["size"].model, "model.positional": spec.positional(run["encoding"]),
                        "logging.wandb.name": f"{spec.name}/{run['name']}"})
    budget = run_budget(spec, config, vocab_size)
    set_dotted(config, "trainer.max_steps", budget.steps)
    return config, budget


def run_config(spec: StudySpec, run: dict, root: Path, data_url: str, vocab_size: int) -> dict:
    return plan_run(spec, run, root, data_url, vocab_size)[0]


# ---- re-use ------------------------------------------------------------------------------------


def _hash(resolved: dict) -> str:
    return hashlib.sha256(json.dumps(resolved, sort_keys=True).encode()).hexdigest()


DATASET_FINGERPRINT = "dataset_fingerprint"
"""The key of the dataset's fingerprint in a run's hashed record (beside the run config's own keys)."""


def config_hash(config: dict, data_fingerprint: str | None = None) -> tuple[str, dict]:
    """sha256 of the resolved run config (every field, defaults included, run_dir excluded) and of the dataset's
    fingerprint (its manifest: a dataset prepared anew at the same URL is another dataset), and that record."""
    config = dict(config)
    recorded = config.pop(DATASET_FINGERPRINT, None)  # ``config`` may be such a record itself
    resolved = to_dict(from_dict(RunConfig, config))
    for key in HASH_EXCLUDED:
        resolved.pop(key, None)
    resolved[DATASET_FINGERPRINT] = data_fingerprint if data_fingerprint is not None else recorded
    return _hash(resolved), resolved


def config_diff(old: dict, new: dict, limit: int = 6) -> str:
    """'key: old -> new, ...' for the dotted keys whose values differ (a key missing on one side reads <absent>)."""
    a, b = dict(dotted_leaves(old)), dict(dotted_leaves(new))
    keys = sorted(k for k in set(a) | set(b) if a.get(k, "<absent>") != b.get(k, "<absent>"))
    shown = [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}" for k in keys[:limit]]
    return ", ".join(shown) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def reuse_conflict(run_dir: Path, digest: str, resolved: dict) -> str | None:
    """Why the run in ``run_dir`` must not be re-used (or resumed) by a study launching config hash ``digest``;
    None when it may (same hash, or nothing launched there yet)."""
    record_path = run_dir / RUN_RECORD
    if record_path.exists():
        try:
            record = json.loads(record_path.read_text())
        except (OSError, ValueError) as exc:
            return f"{run_dir}: {RUN_RECORD} is unreadable ({exc})"
        recorded = with_later_defaults(record.get("config", {}), to_dict(RunConfig()), skip=HASH_EXCLUDED)
        if record.get("config_hash") == digest or _hash(recorded) == digest:
            return None
        return f"{run_dir} was launched with another config ({config_diff(record.get('config', {}), resolved)})"
    launched = [name for name in RUN_OUTPUTS if (run_dir / name).exists()]
    if launched:
        return (f"{run_dir} holds a run ({', '.join(launched)}) without {RUN_RECORD}: launched by hand or by an "
                "older version of the study, so its config is unknown")
    return None


def _write_json(path: Path, data: dict) -> None:
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(json.dumps(data, indent=1))
    partial.replace(path)  # whole or not at all


def training_finished(run_dir: Path, steps: int) -> bool:
    from tape_pretrain.train.export import WEIGHTS
    from tape_pretrain.train.metrics import training_records

    if not (run_dir / "export" / WEIGHTS).exists() or not (run_dir / "metrics.jsonl").exists():
        return False
    return max(training_records(run_dir), default=0) >= steps


def eval_settings(spec: StudySpec, seq_len: int) -> dict:
    """What a run's evaluation depends on; an eval.json made under other settings (another device or dtype too:
    bf16 on a GPU and fp32 on a CPU differ in the last digits) is redone, never mixed into one table."""
    import torch

    from tape_pretrain.eval.perplexity import eval_device, eval_dtype

    device = eval_device("auto")
    return {"lengths": [m * seq_len for m in spec.eval_multipliers], "max_tokens": spec.eval_max_tokens,
            "device": device.type, "dtype": "bf16" if eval_dtype("auto", device) == torch.bfloat16 else "fp32"}


def eval_current(run_dir: Path, settings: dict) -> bool:
    try:
        return json.loads((run_dir / EVAL_RECORD).read_text()).get("settings") == settings
    except (OSError, ValueError, AttributeError):
        return False


# ---- launching ---------------------------------------------------------------------------------


def train_command(config_path: Path, nproc: int, shutdown_timeout_s: int = 630) -> list[str]:
    """The command that trains (or resumes) one run; torchrun's --standalone picks a free port when it starts.
    torchrun SIGKILLs its workers ``shutdown_timeout_s`` after forwarding a signal (its default, 30 s, is too short
    to save): give them the run's parallel.timeout_s, past which a rank that cannot save ends itself, and a margin."""
    if nproc <= 1:
        return [sys.executable, "-m", "tape_pretrain.cli", "train", str(config_path)]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "--shutdown-timeout", str(shutdown_timeout_s), "-m", "tape_pretrain.cli", "train", str(config_path)]


TRAIN_LOG = "train.log"
"""A local run's trainer output (stdout and stderr, appended on resume), beside its metrics."""


class StudyRunsFailed(RuntimeError):
    """Some runs of a local study failed; the others ran and RESULTS.md was written."""


def _run_logged(command: list[str], log_path: Path) -> int:
    """Run ``command`` with its output shown here and appended to ``log_path``; its exit status. Ctrl-C reaches the
    trainer as well (same process group): it saves and exits, and this waits for that rather than killing it."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    interrupted = False
    with open(log_path, "ab") as log, subprocess.Popen(command, stdout=subprocess.PIPE,
                                                       stderr=subprocess.STDOUT) as proc:
        while True:
            try:
                chunk = proc.stdout.read1(1 << 16)
            except KeyboardInterrupt:
                interrupted = True
                continue
            if not chunk:
                break
            log.write(chunk)
            sys.stdout.write(decoder.decode(chunk))
            sys.stdout.flush()
        status = proc.wait()
    if interrupted:
        raise KeyboardInterrupt
    return status


def evaluate_run(run_dir: Path, data_url: str, spec: StudySpec, seq_len: int) -> dict:
    """Perplexity at each evaluation length (on the device and in the dtype that evaluate_lengths picks)."""
    from tape_pretrain.eval.perplexity import evaluate_lengths
    from tape_pretrain.train.export import load_export_model

    model = load_export_model(str(run_dir / "export"))
    settings = eval_settings(spec, seq_len)
    results = evaluate_lengths(model, data_url, settings["lengths"], str(run_dir / ".eval_cache"),
                               spec.eval_max_tokens, 4, device=settings["device"], dtype=settings["dtype"],
                               progress=True)
    return {str(k): v for k, v in results.items()}


_FREE_PORT = ("import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")


def sbatch_script(spec: StudySpec, root: Path, tasks: list[tuple[Path, Path]]) -> str:
    """An sbatch array with one task per (run_dir, config) in ``tasks``. The port is chosen on the node when the
    task starts; the early-warning signal reaches the trainer as one SIGTERM, and an unfinished run is requeued."""
    s = spec.slurm
    signal_name, lead_s = s.signal.split(":", 1)[1].removeprefix("SIG").split("@")
    root = root.resolve()
    if re.search(r"[\s%\"'\\]", str(root)):  # #SBATCH lines are not shell; % is a SLURM filename pattern
        raise ConfigError(f"study.out_dir: the study directory {str(root)!r} holds a space, quote, backslash or '%', "
                          "which an #SBATCH --output path cannot: choose another out_dir for launcher: slurm")
    directives = [f"--job-name={spec.name}", f"--array=0-{len(tasks) - 1}", "--nodes=1", "--ntasks=1"]
    directives += [f"--gres={f'gpu:{spec.nproc}' if s.gres == 'auto' else s.gres}"] * (s.gres is not None)
    directives += [f"--cpus-per-task={s.cpus_per_task}", f"--time={s.time}", f"--signal={s.signal}",
                   "--requeue" if s.requeue else "--no-requeue", "--open-mode=append",
                   f"--output={root / 'slurm' / '%x_%A_%a.out'}"]
    directives += [f"--partition={s.partition}"] * bool(s.partition) + [f"--account={s.account}"] * bool(s.account)
    directives += s.extra
    cases = "\n".join(f"  {i}) run_dir={shlex.quote(str(run_dir.resolve()))}; "
                      f"config={shlex.quote(str(config.resolve()))} ;;" for i, (run_dir, config) in enumerate(tasks))
    if spec.nproc > 1:  # torchrun SIGKILLs its workers this long after forwarding the TERM: let them save
        launch = (f'"$PYTHON" -m torch.distributed.run --nproc-per-node {spec.nproc} --nnodes 1 --rdzv-backend c10d '
                  f'--rdzv-endpoint "127.0.0.1:$MASTER_PORT" --shutdown-timeout {max(30, int(lead_s) - 10)} '
                  '-m tape_pretrain.cli train "$config" &')
    else:
        launch = '"$PYTHON" -m tape_pretrain.cli train "$config" &'
    from tape_pretrain.train.export import WEIGHTS

    if s.requeue:  # a failing scontrol must not replace the trainer's exit status
        unfinished = ('  echo "time limit near and the run unfinished: requeueing to resume from its checkpoint" >&2\n'
                      '  scontrol requeue "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}" || '
                      'echo "scontrol requeue failed: resubmit this task to resume the run" >&2')
    else:
        unfinished = '  echo "time limit near and the run unfinished (requeue: false): resubmit it to resume" >&2'

    return f"""#!/usr/bin/env bash
# {spec.name}: one array task per unfinished run, written by `tape-pretrain study`; submit with sbatch.
# When every task is done: tape-pretrain study STUDY.yaml launcher=local (evaluates and reports; training is skipped).
{chr(10).join(f"#SBATCH {d}" for d in directives)}
set -euo pipefail
cd {shlex.quote(os.getcwd())}
PYTHON=${{PYTHON:-{shlex.quote(sys.executable)}}}
case ${{SLURM_ARRAY_TASK_ID:?not an array task}} in
{cases}
  *) echo "no run for array task $SLURM_ARRAY_TASK_ID" >&2; exit 1 ;;
esac
# Chosen here, on the node, when the task starts (a port free on this node now), not where the script was written.
MASTER_PORT=$("$PYTHON" -c "{_FREE_PORT}")
export MASTER_PORT
# The trainer catches SIGTERM: it finishes its step, saves a checkpoint and exits 0; a second signal kills it unsaved.
# SIG{signal_name} (--signal={s.signal}) comes to this shell alone: forward one SIGTERM. A SIGTERM here (preemption,
# scancel) was sent by SLURM to every process of the job, the trainer included: do not send it another.
# The traps are set before the trainer starts, so that no signal finds this shell unprotected.
child="" warned=0 pending=0 signals=0
warn() {{
  signals=$((signals + 1))
  [ "$warned" = 0 ] || return 0
  warned=1
  if [ -n "$child" ]; then kill -TERM "$child" 2>/dev/null || true; else pending=1; fi
}}
trap warn {signal_name}
trap 'signals=$((signals + 1))' TERM
{launch}
child=$!
[ "$pending" = 0 ] || kill -TERM "$child" 2>/dev/null || true  # warned before $child was known
# A trapped signal cuts wait short (status > 128) while the trainer may still be saving: wait until it has exited.
while :; do
  before=$signals status=0
  wait "$child" || status=$?
  [ "$status" -gt 128 ] && [ "$signals" != "$before" ] || break
done
if [ "$warned" = 1 ] && [ ! -f "$run_dir/export/{WEIGHTS}" ]; then
{unfinished}
fi
exit "$status"
"""


def run_study(path: str, overrides: list[str], dry_run: bool = False) -> Path:
    from tape_pretrain.data.manifest import load_manifest

    spec = load_study(path, overrides)
    root = Path(spec.out_dir) / spec.name
    root.mkdir(parents=True, exist_ok=True)
    emit_only = dry_run or spec.launcher in ("print", "slurm")
    # every launcher but a dry run prepares the data first: the budgets need its vocabulary, and the re-use hash
    # its fingerprint
    data_url = ensure_dataset(spec, root) if not dry_run else (spec.data_path or str(root / "data" / "dataset"))
    fingerprint = None
    if dry_run and not dataset_exists(data_url):
        if not spec.data_prep.inputs:
            raise DataError(f"study dataset {data_url} does not exist and study.data_prep.inputs is empty")
        vocab = spec.data_prep.vocab_size  # what the study's own prep will train
    else:
        manifest, fingerprint = load_manifest(data_url)
        vocab = int(manifest.tokenizer["vocab_size"])
    plans, conflicts = [], []
    for run in spec.runs():
        run_dir = root / "runs" / run["name"]
        config, budget = plan_run(spec, run, root, data_url, vocab)
        digest, resolved = config_hash(config, fingerprint)
        conflict = reuse_conflict(run_dir, digest, resolved)
        if conflict:
            conflicts.append(f"  {run['name']}: {conflict}")
        plans.append((run, run_dir, config, budget, digest, resolved))
    if conflicts:
        raise ConfigError(
            f"study {spec.name}: {len(conflicts)} run(s) were launched with a config that differs from the one this "
            "study would launch now, and are neither re-used nor resumed:\n" + "\n".join(conflicts) +
            "\nNothing was deleted or launched. Move those run directories aside (or delete them yourself), "
            "or give the study another name or out_dir.")
    commands, tasks, failed = [], [], []
    for number, (run, run_dir, config, budget, digest, resolved) in enumerate(plans, 1):
        where = f"study: run {number}/{len(plans)} {run['name']}"
        run_dir.mkdir(parents=True, exist_ok=True)
        config_path = run_dir / "run.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        if not dry_run:  # launched (or printed to be launched) with this config: the hash that re-use checks
            _write_json(run_dir / RUN_RECORD, {
                "config_hash": digest, "encoding": run["encoding"], "size": run["size"].name, "seed": run["seed"],
                "budget": dataclasses.asdict(budget), "config": resolved})
        command = train_command(config_path, spec.nproc, math.ceil(resolved["parallel"]["timeout_s"]) + 30)
        commands.append(command)
        trained = training_finished(run_dir, budget.steps)
        if not trained:
            tasks.append((run_dir, config_path))
        if emit_only:
            continue
        seq_len = load_config(config_path).trainer.seq_len
        settings = eval_settings(spec, seq_len)
        if trained and eval_current(run_dir, settings):
            print(f"{where}: already finished; skipped", flush=True)
            continue
        started = time.monotonic()
        if not trained:
            print(f"{where}: training ({budget.steps} steps, {budget.tokens:,} tokens, {budget.flops:.3g} FLOPs)",
                  flush=True)
            status = _run_logged(command, run_dir / TRAIN_LOG)  # resumes an interrupted run
            if status != 0:
                log = run_dir / TRAIN_LOG
                print(f"{where}: failed (exit status {status}; log: {log}); continuing", flush=True)
                record = json.loads((run_dir / RUN_RECORD).read_text())
                _write_json(run_dir / RUN_RECORD, {**record, "failed": {"exit_status": status, "log": str(log)}})
                failed.append(f"{run['name']} (exit status {status}; log: {log})")
                continue
        print(f"{where}: evaluating at {', '.join(map(str, settings['lengths']))} tokens", flush=True)
        results = evaluate_run(run_dir, data_url, spec, seq_len)
        _write_json(run_dir / EVAL_RECORD, {"settings": settings, "results": results})  # marks the run finished
        print(f"{where}: done in {format_duration(time.monotonic() - started)}", flush=True)
    if emit_only:
        if spec.launcher == "slurm" and not dry_run:
            if not tasks:
                print("study: every run is trained; evaluate and report with launcher=local")
                return root
            (root / "slurm").mkdir(exist_ok=True)
            script = root / "study_array.sbatch"
            script.write_text(sbatch_script(spec, root, tasks))
            print(f"study: wrote {script} ({len(tasks)} array tasks); evaluate and report with launcher=local")
        else:
            print("\n".join(shlex.join(c) for c in commands))
        return root
    report = write_report(spec, root)
    if failed:  # the runs that failed in this invocation (a run that failed before is launched again)
        with report.open("a") as out:
            out.write("\n## Failed runs\n\n" + "".join(f"- {line}\n" for line in failed))
    print(f"study: results in {report}")
    if failed:
        raise StudyRunsFailed(f"{len(failed)} runs failed: " + "; ".join(failed))
    return root
