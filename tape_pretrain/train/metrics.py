"""Metrics: RUN_DIR/metrics.jsonl on rank 0, a concise console line, optional wandb that never blocks."""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
import sys
from pathlib import Path

from tape_pretrain.config import LoggingConfig
from tape_pretrain.utils.redact import redact

# Dense (no sparsity) bf16 tensor-core peak FLOP/s per GPU from the vendors' data sheets, for MFU; override with
# trainer.peak_flops (e.g. for a power-capped part). Matched against torch.cuda.get_device_name() in this order:
# more specific names first ("H100 PCIe" before "H100"; the SXM part reports e.g. "NVIDIA H100 80GB HBM3").
PEAK_FLOPS = (
    ("GB200", 2500e12), ("B200", 2250e12), ("GH200", 989e12), ("H200", 989e12),
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H800", 989e12),
    ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L40", 181e12), ("A10G", 125e12), ("L4", 121e12),
    ("V100", 125e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12),
)


def peak_flops_for(device_name: str) -> float | None:
    for key, value in PEAK_FLOPS:
        if key in device_name:
            return value
    return None


def gpu_peak_flops() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return peak_flops_for(torch.cuda.get_device_name())


def float_hex(value: float) -> str:
    """The float32 bits of a loss, for bitwise comparisons across runs."""
    return struct.pack(">f", value).hex()


def training_records(run_dir: Path) -> dict[int, dict]:
    """The last training record (one with a loss) of every step in RUN_DIR/metrics.jsonl."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out[record["step"]] = record
    return out


def _parse(line: str) -> dict | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def tensorboard_writer(directory: Path, purge_step: int | None):
    """torch's SummaryWriter, or one ConfigError when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        from tape_pretrain.config import ConfigError

        raise ConfigError("logging.tensorboard needs the tensorboard package: pip install tensorboard (or "
                          "pip install 'tape-pretrain[tensorboard]')") from None
    return SummaryWriter(log_dir=str(directory), purge_step=purge_step)


class MetricsWriter:
    def __init__(self, run_dir: Path, logging: LoggingConfig, config_dict: dict, resume_step: int | None,
                 run_name: str, wandb_id: str | None):
        self.path = run_dir / "metrics.jsonl"
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            # Lines written after the checkpoint we resume from belong to a run that did not survive; so does a
            # half-written last line (a kill -9 mid-write). The rewrite is atomic: a crash keeps the old file.
            kept = [line for line in self.path.read_text(errors="replace").splitlines()
                    if (record := _parse(line)) is not None and record.get("step", 0) <= resume_step]
            partial = self.path.with_name(self.path.name + ".tmp")
            partial.write_text("".join(line + "\n" for line in kept))
            os.replace(partial, self.path)
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self.file = open(self.path, "a")  # noqa: SIM115  (held for the run, closed in close())
        self.tensorboard = None
        if logging.tensorboard:
            # Events of a run that did not survive past the checkpoint are purged, as metrics.jsonl's lines are.
            # a run that starts from scratch purges from step 1: a previous attempt's curves must not mix in
            self.tensorboard = tensorboard_writer(run_dir / "tensorboard", (resume_step or 0) + 1)
        self.wandb = None
        self.wandb_id = wandb_id
        if logging.wandb.mode != "disabled":
            self._start_wandb(logging, config_dict, run_name, run_dir)

    def _start_wandb(self, logging: LoggingConfig, config_dict: dict, run_name: str, run_dir: Path) -> None:
        try:
            import wandb

            self.wandb = wandb.init(project=logging.wandb.project, entity=logging.wandb.entity,
                                    name=logging.wandb.name or run_name, mode=logging.wandb.mode,
                                    id=self.wandb_id, resume="allow", dir=str(run_dir), config=redact(config_dict),
                                    settings=wandb.Settings(init_timeout=60, silent=True))
            self.wandb_id = self.wandb.id
        except Exception as exc:  # wandb must never stop training
            print(f"warning: wandb disabled: {exc}", file=sys.stderr)
            self.wandb = None

    def log(self, record: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.file.write(json.dumps(clean) + "\n")
        self.file.flush()
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                    self.tensorboard.add_scalar(key, value, global_step=record["step"])
        if self.wandb is not None:
            try:
                self.wandb.log({k: v for k, v in record.items() if isinstance(v, int | float)}, step=record["step"])
            except Exception as exc:
                print(f"warning: wandb log failed ({exc}); continuing without it", file=sys.stderr)
                self.wandb = None

    def close(self) -> None:
        self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            with contextlib.suppress(Exception):  # wandb must never fail the run
                self.wandb.finish()
