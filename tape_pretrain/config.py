"""One configuration tree: dataclasses loaded from YAML plus dotted ``key=value`` overrides.

Precedence is command line > file > defaults. Unknown keys and ill-typed values raise
:class:`ConfigError` naming the dotted path. Each component receives only its own section.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

# The model's own dataclasses live beside the model code (exports ship them); re-exported as the config tree's.
from tape_pretrain.models.model_config import POSITIONAL_NAMES as POSITIONAL_NAMES
from tape_pretrain.models.model_config import ConfigError as ConfigError
from tape_pretrain.models.model_config import ModelConfig as ModelConfig
from tape_pretrain.models.model_config import PositionalConfig as PositionalConfig


@dataclass
class DataSource:
    path: str
    """Dataset URL written by `tape-pretrain prep`; every source of a mixture must use the same tokenizer."""
    weight: float = 1.0
    """Share of training windows drawn from this source (weights are normalised over the sources)."""
    name: str | None = None
    """Name in metrics (val_loss/<name>); the last component of the path when unset."""


@dataclass
class DataConfig:
    path: str | None = None
    """Dataset URL written by `tape-pretrain prep` (local path, file://, s3://, gs://, memory://)."""
    sources: list[DataSource] = field(default_factory=list)
    """A weighted mixture of datasets, instead of data.path: [{path: URL, weight: w, name: n}, ...]. Windows
    interleave deterministically in proportion to the weights, whatever the world size."""
    cache_dir: str = "~/.cache/tape_pretrain/datasets"
    """Local directory where remote shards are cached after their sha256 is checked."""
    on_corrupt_shard: Literal["error", "skip"] = "error"
    """What to do with a shard that fails its size or checksum check."""
    prefetch_batches: int = 2
    """Global batches prepared ahead in a background thread (0 disables prefetch)."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """Extra fsspec options for the dataset URL (e.g. endpoint_url); credentials come from the environment."""
    allow_tokenizer_mismatch: bool = False
    """Train even when the dataset's tokenizer differs from the one the run started with."""
    access: Literal["copy", "stream"] = "copy"
    """copy: each node's first rank fetches and verifies the whole train split before step 0 and its other ranks
    re-use that copy; stream: each rank reads the train split's shards when its loader first needs them, through
    a bounded local cache (data.stream_cache_gib), each verified on first use. Either way the val splits are
    copied, and the batches are the same."""
    fetch_timeout_s: float = 3600.0
    """Deadline for a node's first rank to fetch and verify a split; the node's other ranks wait for it this long
    (not parallel.timeout_s) and then stop with one error."""
    stream_cache_gib: float = 64.0
    """data.access=stream: local disk the stream cache may fill on each node (in data.cache_dir), shared evenly by
    the node's ranks; every shard must fit in one rank's share."""
    stream_lookahead_batches: int = 4
    """data.access=stream: global batches ahead of the loader whose shards are fetched in the background."""


@dataclass
class OptimConfig:
    lr: float = 3e-4
    """Peak learning rate."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay for matrices (norms and embeddings are exempt unless decay_embeddings)."""
    decay_embeddings: bool = False
    """Apply weight decay to embeddings and the output head too."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables clipping)."""
    trainable: list[str] = field(default_factory=lambda: ["all"])
    """What trains; the rest stays frozen at its initial value. Each entry is a preset (all; tape: TAPE's MLP-side
    state update, embeddings and RMSNorm weights; lora: LoRA adapters, see lora_*, merged at export) or an fnmatch
    pattern over parameter names (layers.*.mlp.*, lm_head.weight); a run resumes only with the same entries."""
    lora_rank: int = 8
    """With optim.trainable containing lora: the rank r of the LoRA adapters (peft) added to lora_targets."""
    lora_alpha: float = 16.0
    """LoRA scaling numerator: an adapter adds (lora_alpha / lora_rank) B A x to its layer's output."""
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """The linear layers of every block that get adapters (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj,
    down_proj)."""


@dataclass
class ScheduleConfig:
    name: Literal["cosine", "linear", "wsd", "constant"] = "cosine"
    """Shape of the learning-rate schedule after warmup."""
    warmup_steps: int = 0
    """Linear warmup steps from 0 to optim.lr."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak (cosine, linear, wsd)."""
    decay_fraction: float = 0.2
    """WSD: the fraction of all steps spent in the final linear decay."""


@dataclass
class CurriculumPhase:
    seq_len: int = 0
    """Sequence length during this phase."""
    until_tokens: int | None = None
    """The phase lasts while fewer than this many tokens have been consumed."""
    until_fraction: float | None = None
    """Alternative to until_tokens: a fraction of the run's total tokens."""


@dataclass
class CurriculumConfig:
    phases: list[CurriculumPhase] = field(default_factory=list)
    """Explicit phases in order; the last phase lasts to the end. Empty means trainer.seq_len throughout."""
    warmup: Literal["none", "linear", "geometric"] = "none"
    """Generated warmup from start_seq_len to trainer.seq_len over power-of-two buckets."""
    start_seq_len: int = 64
    """First length of a generated warmup."""
    warmup_fraction: float = 0.5
    """Fraction of the run's tokens that a generated warmup spans."""


@dataclass
class TrainerConfig:
    max_steps: int = 100
    """Optimizer steps to train for."""
    global_batch_tokens: int = 8192
    """Tokens per optimizer step across all ranks; gradient accumulation is derived from it."""
    micro_batch_size: int = 4
    """Sequences of trainer.seq_len per rank per forward/backward."""
    seq_len: int = 256
    """Lmax: the loader's window length; curriculum lengths must divide it."""
    eval_interval: int = 0
    """Evaluate on the val split every this many steps (0 disables; the last step always evaluates)."""
    eval_batches: int = 4
    """Micro-batches per rank used for each evaluation."""
    eval_length_multipliers: list[int] = field(default_factory=list)
    """Also log val_loss@N at N = m x seq_len for each m: the val tokens of val_loss (eval_batches x micro_batch_size
    windows of seq_len per rank) cut into windows of N (whole windows: all of them when m divides that count), in
    micro-batches of micro_batch_size / m rows (at least 1). Empty: val_loss only."""
    log_interval: int = 10
    """Write a metrics line every this many steps."""
    stop_at_step: int | None = None
    """Pause after this step with a checkpoint (e.g. to fit a job's time limit); re-run to continue."""
    num_threads: int | None = None
    """torch intra-op threads per process (fixed for bitwise reproducibility); None keeps torch's choice."""
    deterministic: bool = False
    """torch.use_deterministic_algorithms(True) for bitwise-reproducible runs."""
    cudnn_attention: bool = False
    """Let SDPA dispatch training attention to cuDNN's kernel on CUDA. Off by default: on an H200 (torch 2.11,
    cuDNN 9.19) its backward gave gradients off by O(1) when d(out) was laid out unlike out, the layout the model
    produced (models.positional_base.gradient_in_output_layout now aligns it); turn it on once
    `tape-pretrain bench gpu`'s model_grads section passes with it on your stack."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: bf16 on CUDA, fp32 on CPU. bf16 also runs on CPU (slowly; the tests use it to check bf16 numerics)."""
    peak_flops: float | None = None
    """Peak FLOP/s per device for MFU; None looks the GPU up in a table."""
    progress_bar: bool = True
    """Show a progress bar on rank 0 when stderr is a terminal (never in a log file)."""
    profile_steps: list[int] = field(default_factory=list)
    """[a, b]: record a torch.profiler trace of steps a..b (and a CUDA memory snapshot on GPU) to RUN_DIR/profile."""


@dataclass
class ParallelConfig:
    engine: str = "deepspeed"
    """Training engine: deepspeed (ZeRO 0-3), fsdp2, or ddp (plain data parallel, fp32: the simplest baseline)."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage 0-3."""
    deepspeed_config: str | None = None
    """Path to a DeepSpeed JSON merged over the generated config."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass."""
    compile: bool = False
    """torch.compile each block (after activation checkpointing, before sharding): fused kernels on GPU.
    The first steps at each new sequence length pay the compile time."""
    timeout_s: float = 600.0
    """Collective timeout: a rank stalled longer than this makes every rank exit non-zero."""
    replicate_degree: int = 1
    """FSDP2: 1 shards over all ranks; R > 1 is HSDP, R replicas (one per node, typically) each sharding the model
    over world/R ranks, so parameter all-gathers stay inside a replica and only gradients cross between them."""
    reshard_after_forward: bool = True
    """FSDP2: free each block's gathered parameters after its forward (gathered again for backward); false keeps
    them, trading memory for one all-gather per block and step."""
    overlap_comm: bool | None = None
    """DeepSpeed: overlap gradient reduction with the backward pass (null: on for GPUs; on CPU DeepSpeed's own default,
    on for ZeRO-3 only)."""


@dataclass
class CheckpointConfig:
    interval: int = 0
    """Save every this many steps (0: only at the end and on preemption)."""
    keep_last: int = 3
    """Complete checkpoints to keep (at least 2, so a corrupt newest one can fall back)."""
    keep_every: int = 0
    """Also keep every checkpoint whose step is a multiple of this (0: none)."""
    async_save: bool = False
    """FSDP2: write the checkpoint in the background while training continues."""
    resume: bool = True
    """Resume from the newest complete checkpoint in run_dir."""
    resume_from: str | None = None
    """Resume from this checkpoint directory instead of the newest one."""
    overwrite: bool = False
    """With resume=false, start over in a run_dir that has checkpoints (the old run moves to replaced_<time>/)."""
    lease_ttl_s: float = 120.0
    """A remote run_dir's lease expires this long after its holder's last heartbeat (then another run may take it)."""
    allow_changes: list[str] = field(default_factory=list)
    """Resume-time checks to waive: any of model, data, batch, curriculum."""
    allow_group_writable: bool = False
    """Load checkpoints from directories that other users can write to (refused by default: they unpickle)."""
    staging_dir: str = "~/.cache/tape_pretrain/runs"
    """Local mirror of a remote run_dir (s3://, gs://): engines write here, then files are uploaded."""


@dataclass
class WandbConfig:
    mode: Literal["online", "offline", "disabled"] = "disabled"
    """wandb mode; it never blocks training."""
    project: str = "tape-pretrain"
    """wandb project."""
    entity: str | None = None
    """wandb entity (team)."""
    name: str | None = None
    """Run name; defaults to the run directory's name."""


@dataclass
class LoggingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Weights & Biases logging."""
    tensorboard: bool = False
    """Also write TensorBoard event files to RUN_DIR/tensorboard (needs the tensorboard package)."""
    all_ranks: bool = False
    """Every rank logs at INFO to the console and to RUN_DIR/logs/rank<R>.log (default: rank 0; others warn)."""


@dataclass
class RunConfig:
    run_dir: str = "runs/default"
    """Where metrics, checkpoints and exports go (a local path or an fsspec URL)."""
    seed: int = 1234
    """Seeds the model initialisation and the data order."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# ---- building dataclasses from plain data -------------------------------------------------------

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Convert ``value`` to type ``tp`` or raise ConfigError naming ``path``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: {value!r} matches none of {tp}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ConfigError(f"{path}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 (PyYAML) reads 1e-3 as a string; YAML 1.2 and users read a number
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported type {_type_name(tp)}")


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping; unknown keys are errors naming their dotted path."""
    if data is None:
        data = {}
    if dataclasses.is_dataclass(data):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(f"unknown config key {where}{unknown[0]} (valid keys: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], f"{path}.{k}" if path else k) for k, v in data.items()}
    required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING and f.name not in kwargs]
    if required:
        where = f"{path}." if path else ""
        raise ConfigError(f"{where}{required[0]} is required (give it a value)")
    return cls(**kwargs)


def with_later_defaults(recorded: dict, defaults: dict, skip: tuple[str, ...] = ()) -> dict:
    """A recorded config (a run's, or its model's: a checkpoint's resume identity, a study's run record) with the
    keys added to the code since it was recorded set to their defaults, at any depth: that run computed what the
    default computes. Keys the code has since dropped stay, and so differ; top-level keys in ``skip`` stay absent."""
    out = dict(recorded)
    for key, value in defaults.items():
        if key in skip:
            continue
        if key not in out:
            out[key] = value
        elif isinstance(value, dict) and isinstance(out[key], dict):
            out[key] = with_later_defaults(out[key], value)
    return out


def to_dict(config: Any) -> dict[str, Any]:
    """Plain-data form of a config (tuples become lists), suitable for YAML/JSON."""
    def convert(v: Any) -> Any:
        if isinstance(v, tuple):
            return [convert(x) for x in v]
        if isinstance(v, list):
            return [convert(x) for x in v]
        if isinstance(v, dict):
            return {k: convert(x) for k, x in v.items()}
        return v
    return convert(dataclasses.asdict(config))


def _parse_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as exc:  # e.g. [*norm.weight]: a leading * is a YAML alias
        raise ConfigError(f"override value {text!r} is not valid YAML ({str(exc).splitlines()[0]}); quote it, "
                          "e.g. 'optim.trainable=[\"*norm.weight\"]'") from None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted ``a.b.c=value`` overrides (values parsed as YAML) to a nested mapping."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        if not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", key):
            raise ConfigError(f"override {item!r}: {key!r} is not a dotted key")
        try:
            set_dotted(data, key, _parse_scalar(raw))
        except ConfigError as exc:
            raise ConfigError(f"override {item!r}: {exc}") from None
    return data


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """``data[a][b][c] = value`` for the key ``a.b.c``, creating the sections that are missing."""
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{part} is not a section")
        node = child
    node[parts[-1]] = value


def read_yaml_mapping(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """A YAML file's top-level mapping ({} for an empty file); one ConfigError for a missing, unreadable, binary,
    invalid or non-mapping file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {path} is not a text file (not UTF-8)") from None
    except OSError as exc:
        raise ConfigError(f"{what} {path} cannot be read: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{what} {path} is not valid YAML: {first}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{what} {path} must hold a mapping at the top level")
    from tape_pretrain.utils.redact import remember_secrets

    remember_secrets(loaded or {})
    return loaded or {}


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Load a RunConfig from YAML (or defaults when ``path`` is None) and apply overrides, then validate."""
    data = read_yaml_mapping(path) if path is not None else {}
    data = apply_overrides(data, overrides or [])
    config = from_dict(RunConfig, data)
    validate(config)
    return config


def _floats(node: Any, prefix: str = "") -> list[tuple[str, float]]:
    """Every float field of a config tree, with its dotted path."""
    out = []
    for f in dataclasses.fields(node):
        value, name = getattr(node, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            out += _floats(value, name + ".")
        elif isinstance(value, float):
            out.append((name, value))
        elif isinstance(value, tuple | list):
            out += [(f"{name}[{i}]", v) for i, v in enumerate(value) if isinstance(v, float)]
    return out


def validate(config: RunConfig) -> None:
    """Cross-field checks that types alone cannot express."""
    t = config.trainer
    positional = config.model.positional
    if not positional.interpolation > 0 or math.isinf(positional.interpolation):
        raise ConfigError(f"model.positional.interpolation must be a positive factor, got {positional.interpolation}")
    if positional.interpolation != 1.0 and positional.name in ("nope", "alibi", "fire"):
        raise ConfigError(f"model.positional.interpolation scales rotary angles; {positional.name} has none")
    for name in ("max_steps", "global_batch_tokens", "micro_batch_size", "seq_len", "log_interval"):
        if getattr(t, name) <= 0:
            raise ConfigError(f"trainer.{name} must be positive, got {getattr(t, name)}")
    if t.num_threads is not None and t.num_threads <= 0:
        raise ConfigError(f"trainer.num_threads must be positive, got {t.num_threads}")
    if t.global_batch_tokens % t.seq_len:
        raise ConfigError(
            f"trainer.global_batch_tokens={t.global_batch_tokens} is not a multiple of "
            f"trainer.seq_len={t.seq_len}")
    from tape_pretrain.distributed.engine import ENGINES

    if config.parallel.engine not in ENGINES:
        raise ConfigError(f"parallel.engine: unknown engine {config.parallel.engine!r} "
                          f"(known: {', '.join(sorted(ENGINES))})")
    if config.parallel.replicate_degree < 1:
        raise ConfigError(f"parallel.replicate_degree must be >= 1, got {config.parallel.replicate_degree}")
    if config.parallel.replicate_degree > 1 and config.parallel.engine != "fsdp2":
        raise ConfigError("parallel.replicate_degree (HSDP) needs parallel.engine=fsdp2")
    p = config.parallel
    ignored = [(p.engine != "fsdp2" and not p.reshard_after_forward, "parallel.reshard_after_forward (FSDP2 only)"),
               (p.engine != "deepspeed" and p.overlap_comm is not None, "parallel.overlap_comm (DeepSpeed only)"),
               (p.engine != "deepspeed" and p.deepspeed_config is not None,
                "parallel.deepspeed_config (DeepSpeed only)"),
               (p.engine == "deepspeed" and config.checkpoint.async_save,
                "checkpoint.async_save (DeepSpeed saves synchronously)")]
    for is_ignored, what in ignored:
        if is_ignored:
            warnings.warn(f"{what} is ignored with parallel.engine={p.engine}", stacklevel=2)
    if config.parallel.engine == "ddp" and config.trainer.precision == "bf16":
        raise ConfigError("parallel.engine=ddp trains in fp32 (the plain baseline): use fsdp2 or deepspeed for bf16")
    if not 0 <= config.parallel.zero_stage <= 3:
        raise ConfigError(f"parallel.zero_stage must be 0, 1, 2 or 3, got {config.parallel.zero_stage}")
    if config.parallel.compile and config.parallel.engine == "deepspeed" and config.parallel.zero_stage == 3:
        # ZeRO-3 fetches each Linear's parameters in hooks inside the block, where dynamo sees empty partitions.
        raise ConfigError("parallel.compile does not work with DeepSpeed ZeRO-3 (its parameter fetches run inside "
                          "the compiled blocks); use parallel.engine=fsdp2, or zero_stage 0-2")
    if config.checkpoint.keep_last < 2:
        raise ConfigError(
            f"checkpoint.keep_last must be at least 2 (got {config.checkpoint.keep_last}): with one, a corrupt "
            "newest checkpoint leaves nothing to fall back to")
    bad = set(config.checkpoint.allow_changes) - {"model", "data", "batch", "curriculum"}
    if bad:
        raise ConfigError(f"checkpoint.allow_changes: unknown check {sorted(bad)[0]!r} "
                          "(valid: model, data, batch, curriculum)")
    for i, phase in enumerate(config.curriculum.phases):
        where = f"curriculum.phases[{i}]"
        if phase.seq_len <= 0 or t.seq_len % phase.seq_len:
            raise ConfigError(f"{where}.seq_len={phase.seq_len} must divide trainer.seq_len={t.seq_len}")
        if phase.until_tokens is not None and phase.until_fraction is not None:
            raise ConfigError(f"{where}: give until_tokens or until_fraction, not both")
    if config.curriculum.warmup != "none":
        start = config.curriculum.start_seq_len
        if start <= 0 or t.seq_len % start:
            raise ConfigError(f"curriculum.start_seq_len={start} must divide trainer.seq_len={t.seq_len}")
        if config.curriculum.phases:
            raise ConfigError("curriculum: give phases or a warmup, not both")
    for name, value in _floats(config):  # inf and nan pass every comparison below or crash later
        if not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number, got {value}")
    for name, value in (("trainer.eval_batches", t.eval_batches), ("trainer.eval_interval", t.eval_interval),
                        ("checkpoint.interval", config.checkpoint.interval),
                        ("checkpoint.keep_every", config.checkpoint.keep_every), ("seed", config.seed)):
        if value < 0:
            raise ConfigError(f"{name} must be >= 0, got {value}")
    if t.profile_steps and (len(t.profile_steps) != 2 or not 1 <= t.profile_steps[0] <= t.profile_steps[1]):
        raise ConfigError(f"trainer.profile_steps must be [first, last] with 1 <= first <= last, got {t.profile_steps}")
    windows = t.eval_batches * t.micro_batch_size  # val windows of seq_len per rank and evaluation
    for m in t.eval_length_multipliers:
        if m <= 0:
            raise ConfigError(f"trainer.eval_length_multipliers must be positive integers, got {m}")
        if windows and m > windows:
            raise ConfigError(f"trainer.eval_length_multipliers: {m} x seq_len is longer than the {windows} windows "
                              f"of seq_len each rank evaluates (trainer.eval_batches x micro_batch_size): raise "
                              f"trainer.eval_batches to at least {-(-m // t.micro_batch_size)}")
    _validate_sources(config.data)
    o = config.optim
    if not o.lr > 0:
        raise ConfigError(f"optim.lr must be positive, got {o.lr}")
    if not all(0 <= b < 1 for b in o.betas):
        raise ConfigError(f"optim.betas must each be in [0, 1), got {list(o.betas)}")
    if not o.eps > 0:
        raise ConfigError(f"optim.eps must be positive, got {o.eps}")
    if o.weight_decay < 0 or o.grad_clip < 0:
        raise ConfigError(f"optim.weight_decay and optim.grad_clip must be >= 0, got {o.weight_decay}, {o.grad_clip}")
    from tape_pretrain.train.trainable import check_entries

    check_entries(o.trainable)  # the rest needs the model: checked when the run builds it
    from tape_pretrain.train.lora import check_lora_options

    check_lora_options(o)  # also without lora in optim.trainable: a typo there should not wait for its first use
    if not 10 <= config.checkpoint.lease_ttl_s <= 86_400:
        raise ConfigError(f"checkpoint.lease_ttl_s must be between 10 s and a day, got {config.checkpoint.lease_ttl_s}")
    if not config.parallel.timeout_s > 0:
        raise ConfigError(f"parallel.timeout_s must be positive, got {config.parallel.timeout_s}")
    s = config.schedule
    if s.warmup_steps < 0:
        raise ConfigError(f"schedule.warmup_steps must be >= 0, got {s.warmup_steps}")
    if not 0 <= s.min_lr_ratio <= 1:
        raise ConfigError(f"schedule.min_lr_ratio must be in [0, 1], got {s.min_lr_ratio}")


SOURCE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def source_name(source: DataSource) -> str:
    """A source's name in metrics: data.sources[i].name, or the last component of its path."""
    return source.name or source.path.rstrip("/").rsplit("/", 1)[-1]


def _validate_sources(data: DataConfig) -> None:
    if not data.sources:
        return
    if data.path is not None:
        raise ConfigError("data.path and data.sources are both set: a mixture lists every dataset in data.sources "
                          "(add data.path there as one more source)")
    names = set()
    for i, source in enumerate(data.sources):
        where = f"data.sources[{i}]"
        if not (source.weight > 0 and math.isfinite(source.weight)):
            raise ConfigError(f"{where}.weight must be a positive finite number, got {source.weight}")
        name = source_name(source)
        if not SOURCE_NAME.fullmatch(name):
            raise ConfigError(f"{where}.name {name!r}: use letters, digits, '_', '.' and '-' (it names a metric)")
        if name in names:
            raise ConfigError(f"{where}: two sources are named {name!r}; give each a distinct name")
        names.add(name)



# ---- merging and describing configs --------------------------------------------------------------

def dotted_leaves(mapping: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """The leaves of a nested mapping (values that are not mappings, and empty mappings) with their dotted keys, in
    order: ``{"a": {"b": 1}, "c.d": 2}`` gives ``[("a.b", 1), ("c.d", 2)]``."""
    out = []
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            out += dotted_leaves(value, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", value))
    return out


def set_leaves(data: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Set every leaf of ``update`` (keys dotted, ``{"trainer.seq_len": 64}``, or nested, ``{"trainer": {"seq_len":
    64}}``) in ``data`` with ``set_dotted``, in order: sections merge, leaves replace. Returns ``data``."""
    for key, value in dotted_leaves(update):
        set_dotted(data, key, value)
    return data


@dataclass(frozen=True)
class KeyDoc:
    """One leaf key of a config tree, as `tape-pretrain config show` prints it."""

    key: str
    """Dotted name, as an override writes it: model.positional.name."""
    value: Any
    """Its value in the config described, as plain data (YAML's lists and mappings)."""
    default: Any
    """Its default value, as plain data."""
    doc: str
    """The field's docstring, on one line ("" for a field without one)."""


def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of dataclass ``cls`` (the string literal right below each field in its source), on
    one line each, by field name; a field without one is absent."""
    import ast
    import inspect
    import textwrap

    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return _plain(dataclasses.asdict(value))
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def describe_config(config: Any = None, defaults: Any = None) -> list[KeyDoc]:
    """Every leaf key of a config tree (a RunConfig, the defaults when None), depth first in field order, with its
    value, its default (from ``defaults``, else the tree's class built without arguments) and its docstring.
    A field holding a dataclass is a section; every other field (lists of sources or phases included) is a leaf."""
    config = RunConfig() if config is None else config
    defaults = type(config)() if defaults is None else defaults
    out: list[KeyDoc] = []

    def walk(node: Any, default: Any, prefix: str) -> None:
        docs = field_docs(type(node))
        for f in dataclasses.fields(node):
            value, default_value = getattr(node, f.name), getattr(default, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, default_value, f"{prefix}{f.name}.")
            else:
                shown = _plain(value)
                if f.name == "storage_options" or "://" in str(shown):  # credentials never leave in clear
                    from tape_pretrain.utils.redact import redact

                    shown = redact({f.name: shown})[f.name]
                out.append(KeyDoc(f"{prefix}{f.name}", shown, _plain(default_value), docs.get(f.name, "")))

    walk(config, defaults, "")
    return out


def yaml_value(value: Any) -> str:
    """``value`` as the right-hand side of a ``key=value`` override (one line of YAML)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30, sort_keys=False).strip()
    return text.removesuffix("...").strip()


def format_key_docs(docs: list[KeyDoc], width: int = 100) -> str:
    """``key = value  (default: d)`` and the key's docstring below it, indented, for each key."""
    import textwrap

    lines = []
    for d in docs:
        lines.append(f"{d.key} = {yaml_value(d.value)}  (default: {yaml_value(d.default)})")
        lines += textwrap.wrap(d.doc, width, initial_indent="    ", subsequent_indent="    ")
    return "\n".join(lines)
