"""The study file: a base run config, a grid, one budget per size, seeds and a baseline for the statistics,
evaluation lengths, a launcher (and SLURM resources)."""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tape_pretrain.config import (
    POSITIONAL_NAMES,
    ConfigError,
    PositionalConfig,
    apply_overrides,
    from_dict,
    read_yaml_mapping,
)


@dataclass
class SizeSpec:
    name: str = ""
    """Label used in run names and tables."""
    model: dict[str, Any] = field(default_factory=dict)
    """model.* fields for this size (a preset and/or explicit dimensions)."""


@dataclass
class DataPrepSpec:
    inputs: list[str] = field(default_factory=list)
    """Sources to tokenize when the dataset does not exist yet (empty: the dataset must exist)."""
    vocab_size: int = 4096
    """Tokenizer vocabulary when one is trained."""
    val_fraction: float = 0.02
    """Share of documents in the val split."""


SLURM_SIGNALS = ("USR1", "USR2")
"""Early-warning signals for study.slurm.signal. Not TERM: on preemption or scancel SLURM sends SIGTERM to every
process of the job, the trainer included, so the batch script must not forward a TERM it gets (the trainer's second
signal exits without saving); a signal only SLURM's --signal sends tells the script to forward one SIGTERM."""


@dataclass
class SlurmSpec:
    gres: str | None = "auto"
    """--gres per array task (one run on one node), e.g. gpu:8 or gpu:a100:8; auto asks for gpu:<nproc>; None: no
    --gres line (CPU clusters)."""
    cpus_per_task: int = 16
    """--cpus-per-task (data loading and the engine's CPU work)."""
    time: str = "24:00:00"
    """--time per task (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS); a run that reaches it saves and is
    requeued, and the requeued task resumes from its checkpoint."""
    signal: str = "B:USR1@120"
    """--signal B:NAME@SECONDS, NAME one of SLURM_SIGNALS: sent to the batch script this long before the time
    limit; the script forwards one SIGTERM to the trainer (which finishes its step, saves and exits 0) and requeues
    the unfinished run. torchrun (nproc > 1) gives its workers SECONDS - 10 (at least 30) to save."""
    requeue: bool = True
    """--requeue: SLURM may requeue the task after preemption or a node failure (it resumes)."""
    partition: str | None = None
    """--partition, if any."""
    account: str | None = None
    """--account, if any."""
    extra: list[str] = field(default_factory=list)
    """More #SBATCH options, each a single --option[=value]."""


@dataclass
class StudySpec:
    name: str = "study"
    """Study name: its directory is out_dir/name."""
    out_dir: str = "runs/studies"
    """Where the study's runs and results go."""
    base_config: str | None = None
    """Run config that every run starts from (relative to the study file)."""
    base: dict[str, Any] = field(default_factory=dict)
    """Inline overrides of the base config (dotted or nested)."""
    data_path: str | None = None
    """Dataset URL; prepared from data_prep when missing."""
    data_prep: DataPrepSpec = field(default_factory=DataPrepSpec)
    """How to prepare the dataset if it does not exist."""
    encodings: list[str] = field(default_factory=lambda: ["rope", "tape"])
    """What each run's attention uses: model.positional.name values, or labels of ``variants``."""
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Named encoding variants for ``encodings``: label -> model.positional fields, ``name`` (a built-in encoding)
    included, e.g. TAPE's ablation ``tape-no-mlp-update: {name: tape, tape_mlp_update: false}``."""
    sizes: list[SizeSpec] = field(default_factory=list)
    """Model sizes."""
    seeds: list[int] = field(default_factory=lambda: [1234])
    """Seeds: every (encoding, size) runs once per seed; tables give mean and sample sd over seeds."""
    baseline: str | None = "rope"
    """Encoding that the others are compared with, seed by seed (None: no comparison table)."""
    tokens_per_parameter: float = 20.0
    """Token budget of a size = this x the size's backbone parameters: the RoPE model of that size (embeddings
    included; positional weights such as TAPE's or FIRE's are not), rounded up to whole steps."""
    budget: Literal["tokens", "flops"] = "tokens"
    """tokens: every encoding of a size trains on the same tokens; flops: on the training FLOPs of the size's
    RoPE run (3 x forward FLOPs per token, summed over steps), so an encoding with more FLOPs per token takes
    fewer steps."""
    min_steps: int = 10
    """Lower bound on a size's steps for tiny budgets."""
    final_loss_window: int = 5
    """Final training loss = mean of this many last logged training losses."""
    eval_multipliers: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    """Perplexity is measured at these multiples of the training length."""
    eval_max_tokens: int = 100_000
    """Val tokens per evaluation length."""
    nproc: int = 1
    """Processes per run (torchrun on this machine when > 1)."""
    launcher: Literal["local", "print", "slurm"] = "local"
    """local: run sequentially here; print: print the commands; slurm: write an sbatch array script."""
    slurm: SlurmSpec = field(default_factory=SlurmSpec)
    """Resources and preemption handling of the sbatch array (launcher: slurm)."""

    def positional(self, encoding: str) -> dict[str, Any]:
        """model.positional fields of an entry of ``encodings``."""
        return dict(self.variants[encoding]) if encoding in self.variants else {"name": encoding}

    def runs(self) -> list[dict[str, Any]]:
        out = []
        for encoding, size, seed in itertools.product(self.encodings, self.sizes, self.seeds):
            out.append({"name": f"{encoding}-{size.name}-s{seed}", "encoding": encoding, "size": size, "seed": seed})
        return out


def load_study(path: str | Path, overrides: list[str] | None = None) -> StudySpec:
    path = Path(path)
    raw = apply_overrides(read_yaml_mapping(path, "study file"), overrides or [])
    spec = from_dict(StudySpec, raw, "study")
    if spec.base_config and not Path(spec.base_config).is_absolute():
        spec.base_config = str((path.parent / spec.base_config).resolve())
    if spec.base_config:
        read_yaml_mapping(spec.base_config, f"{path}: study.base_config")  # fails here, before any run starts
    if not spec.sizes:
        raise ConfigError(f"{path}: study.sizes is empty")
    names = [s.name for s in spec.sizes]
    if len(set(names)) != len(names) or not all(names):
        raise ConfigError(f"{path}: every study.sizes entry needs a distinct name")
    validate_study(spec, str(path))
    return spec


_SLURM_TIME = re.compile(r"\d+(:\d{1,2}){0,2}|\d+-\d{1,2}(:\d{1,2}){0,2}")
_SLURM_WORD = re.compile(r"[\w.,:+-]+")
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
"""A name that becomes a directory and a SLURM job name: no path separators, '..', spaces or shell characters."""


def validate_study(spec: StudySpec, where: str) -> None:
    """Cross-field checks of a study; one ConfigError naming the study key."""
    for key, name in [("study.name", spec.name)] + [(f"study.sizes[{i}].name", size.name)
                                                   for i, size in enumerate(spec.sizes)]:
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ConfigError(f"{where}: {key}={name!r}: a name becomes a directory (and a job name): use letters, "
                              "digits and '_.-', starting with a letter, digit or '_'")
    for label, fields in spec.variants.items():
        if label in POSITIONAL_NAMES or not _SLURM_WORD.fullmatch(label) or not isinstance(fields, dict):
            raise ConfigError(f"{where}: study.variants.{label}: a variant needs its own label (letters, digits, "
                              f"'.-_', not a built-in encoding name) and a mapping of model.positional fields")
        if fields.get("name") not in POSITIONAL_NAMES:
            raise ConfigError(f"{where}: study.variants.{label}.name must be one of {', '.join(POSITIONAL_NAMES)}, "
                              f"got {fields.get('name')!r}")
        from_dict(PositionalConfig, fields, f"study.variants.{label}")  # unknown fields and bad values fail here
    unknown = [e for e in spec.encodings if e not in POSITIONAL_NAMES and e not in spec.variants]
    if unknown:
        raise ConfigError(f"{where}: study.encodings: unknown encoding {unknown[0]!r} "
                          f"(known: {', '.join(POSITIONAL_NAMES)}; or define it under study.variants)")
    if not spec.encodings or len(set(spec.encodings)) != len(spec.encodings):
        raise ConfigError(f"{where}: study.encodings must be a non-empty list without repeats")
    if not spec.seeds or len(set(spec.seeds)) != len(spec.seeds):
        raise ConfigError(f"{where}: study.seeds must be a non-empty list of distinct seeds")
    if spec.baseline is not None and spec.baseline not in spec.encodings:
        raise ConfigError(f"{where}: study.baseline={spec.baseline!r} is not one of study.encodings "
                          f"({', '.join(spec.encodings)}); add it there or set study.baseline: null")
    if spec.tokens_per_parameter < 0 or spec.min_steps < 1:
        raise ConfigError(f"{where}: study.tokens_per_parameter must be >= 0 and study.min_steps >= 1")
    if spec.final_loss_window < 1:
        raise ConfigError(f"{where}: study.final_loss_window must be >= 1, got {spec.final_loss_window}")
    if spec.nproc < 1 or spec.eval_max_tokens < 1 or not spec.eval_multipliers or min(spec.eval_multipliers) < 1:
        raise ConfigError(f"{where}: study.nproc, study.eval_max_tokens and study.eval_multipliers must be positive")
    s = spec.slurm
    if not _SLURM_TIME.fullmatch(s.time):
        raise ConfigError(f"{where}: study.slurm.time={s.time!r} is not a SLURM time (e.g. 24:00:00 or 2-00:00:00)")
    signal = re.fullmatch(r"B:(?:SIG)?([A-Z0-9]+)@(\d+)", s.signal)
    if not signal or signal.group(1) not in SLURM_SIGNALS or not 1 <= int(signal.group(2)) <= 65535:
        raise ConfigError(f"{where}: study.slurm.signal={s.signal!r}: expected B:NAME@SECONDS with NAME one of "
                          f"{', '.join(SLURM_SIGNALS)} and 1 <= SECONDS <= 65535 (B: sends it to the batch script, "
                          "which forwards one SIGTERM to the trainer; not TERM: SLURM sends that to the trainer "
                          "itself on preemption)")
    if s.cpus_per_task < 1:
        raise ConfigError(f"{where}: study.slurm.cpus_per_task must be >= 1, got {s.cpus_per_task}")
    for key in ("gres", "partition", "account"):
        value = getattr(s, key)
        if value is not None and not _SLURM_WORD.fullmatch(value):
            raise ConfigError(f"{where}: study.slurm.{key}={value!r} is not a single SLURM word")
    for option in s.extra:
        if not re.fullmatch(r"--[a-z][\w-]*(=[^\s'\"\\]+)?", option):
            raise ConfigError(f"{where}: study.slurm.extra: {option!r} is not a single --option[=value]")
