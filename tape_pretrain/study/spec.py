"""The study file: a base run config, a grid, a token budget per size, evaluation lengths, a launcher."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tape_pretrain.config import ConfigError, apply_overrides, from_dict, read_yaml_mapping


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
    """model.positional.name values."""
    sizes: list[SizeSpec] = field(default_factory=list)
    """Model sizes."""
    seeds: list[int] = field(default_factory=lambda: [1234])
    """Seeds."""
    tokens_per_parameter: float = 20.0
    """Token budget per run = this x the model's parameters (rounded to whole steps)."""
    min_steps: int = 10
    """Lower bound on steps for tiny budgets."""
    eval_multipliers: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    """Perplexity is measured at these multiples of the training length."""
    eval_max_tokens: int = 100_000
    """Val tokens per evaluation length."""
    nproc: int = 1
    """Processes per run (torchrun on this machine when > 1)."""
    launcher: Literal["local", "print", "slurm"] = "local"
    """local: run sequentially here; print: print the commands; slurm: write an sbatch array script."""

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
    return spec
