"""The training loop. The trainer decides *when* (steps, logging, eval, checkpoints, stopping);
the engine decides *how* (sharding, accumulation, the optimizer step)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from tape_pretrain.config import ConfigError, ModelConfig, RunConfig, to_dict
from tape_pretrain.data.loader import TokenWindows, WindowBatch
from tape_pretrain.distributed.engine import Engine, build_engine
from tape_pretrain.distributed.env import DistEnv, all_agree_any, barrier, init_distributed, shutdown
from tape_pretrain.errors import CheckpointError, StorageError
from tape_pretrain.models import build_model
from tape_pretrain.models.llama_import import check_init_from
from tape_pretrain.models.positional_base import allow_cudnn_attention
from tape_pretrain.train.checkpoint import CheckpointManager
from tape_pretrain.train.initial_weights import check_pretrained_tokenizer, model_source
from tape_pretrain.train.lora import add_lora, merged_state_dict, uses_lora, with_lora
from tape_pretrain.train.metrics import MetricsWriter, float_hex, gpu_peak_flops
from tape_pretrain.train.profiling import StepProfiler, format_duration, peak_memory_gib
from tape_pretrain.train.resume import (
    check_resume_compatible,
    resolve_run_model_config,
    resume_identity,
    run_curriculum,
)
from tape_pretrain.train.run_dir import RunDirectory
from tape_pretrain.train.run_lock import lock_run_directory
from tape_pretrain.train.schedule import Curriculum, learning_rate
from tape_pretrain.train.trainable import apply_trainable, trainable_names, trainable_summary, with_trainable
from tape_pretrain.train.training_data import TrainingData, load_training_data
from tape_pretrain.utils.logs import close_progress_bar, log, progress_bar, setup_logging
from tape_pretrain.utils.redact import redact, redact_text


def configure_kernels(config: RunConfig) -> None:
    allow_cudnn_attention(config.trainer.cudnn_attention)
    if config.trainer.num_threads is not None:
        torch.set_num_threads(config.trainer.num_threads)
    if config.trainer.deterministic:
        # Strict on CUDA: with warn_only, kernels such as the memory-efficient attention backward (TAPE's one-call
        # form, any value wider than q) only warn and stay non-deterministic, so a run that asked to be bitwise
        # reproducible would silently not be. An op with no deterministic implementation then stops the run, naming
        # itself. On the CPU every op the model uses is deterministic already.
        torch.use_deterministic_algorithms(True, warn_only=not torch.cuda.is_available())
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def git_revision() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


DUPLICATE_SIGNAL_WINDOW_S = 2.0
"""A stop signal this soon after the first is the same stop delivered twice, not a request to exit at once: on
preemption SLURM sends TERM to every process of the job while torchrun relays its own TERM to the workers."""


def batch_layout(config: RunConfig, world_size: int) -> tuple[int, int]:
    """(windows per global batch, micro-batches per rank and step), or one ConfigError naming what does not
    divide."""
    t = config.trainer
    global_windows = t.global_batch_tokens // t.seq_len
    if global_windows % world_size:
        raise ConfigError(f"trainer.global_batch_tokens={t.global_batch_tokens} is {global_windows} "
                          f"sequences, not divisible by the world size {world_size}")
    per_rank = global_windows // world_size
    if per_rank % t.micro_batch_size:
        raise ConfigError(f"{per_rank} sequences per rank per step is not a multiple of "
                          f"trainer.micro_batch_size={t.micro_batch_size}")
    return global_windows, per_rank // t.micro_batch_size


@dataclass
class TrainerParts:
    """What a run trains with; each part is built, and can be tested, on its own."""

    run_directory: RunDirectory
    data: TrainingData
    model_config: ModelConfig
    curriculum: Curriculum
    engine: Engine
    checkpoints: CheckpointManager
    grad_accum: int
    flops_model: torch.nn.Module
    """The model on the meta device, for FLOP counts (MFU)."""


def build_parts(config: RunConfig, env: DistEnv) -> TrainerParts:
    run_directory = RunDirectory(config.run_dir, staging_root=config.checkpoint.staging_dir)
    global_windows, grad_accum = batch_layout(config, env.world_size)
    check_init_from(config.model.init_from)  # before the data: a mistyped path is the likelier error
    data = load_training_data(config, env, global_windows)
    if config.model.init_from:
        check_pretrained_tokenizer(config.model.init_from, data.manifest.tokenizer["sha256"])
    model_config = resolve_run_model_config(config, int(data.manifest.tokenizer["vocab_size"]))
    source = model_source(model_config)
    with torch.device("meta"):  # built before seeding: construction draws a number
        flops_model = build_model(model_config, initialise=False)
        if uses_lora(config.optim.trainable):
            add_lora(flops_model, config.optim)
            source = with_lora(source, config.optim)
    trainable = trainable_names(flops_model, config.optim.trainable, model_config)
    apply_trainable(flops_model, trainable)  # what trains, for the log line
    torch.manual_seed(config.seed)  # identical initial weights on every rank and every engine
    engine = build_engine(with_trainable(source, trainable), config, env, grad_accum)
    torch.manual_seed(config.seed + 1 + env.rank)  # per-rank streams (RandPE, TAPE offsets)
    checkpoints = CheckpointManager(run_directory, env, config.checkpoint.keep_last, config.checkpoint.keep_every,
                                    config.checkpoint.allow_group_writable)
    return TrainerParts(run_directory, data, model_config, run_curriculum(config), engine, checkpoints, grad_accum,
                        flops_model)


class Trainer:
    """The loop over parts: resumes from the newest valid checkpoint, then trains, logs, evaluates and saves."""

    def __init__(self, config: RunConfig, env: DistEnv, parts: TrainerParts):
        self.config, self.env = config, env
        self.run_directory = parts.run_directory
        self.run_dir = self.run_directory.local  # a remote run directory is staged here and uploaded at checkpoints
        self.data, self.model_config, self.curriculum = parts.data, parts.model_config, parts.curriculum
        self.manifest, self.fingerprint = self.data.manifest, self.data.fingerprint
        self.loader, self.skipped_shards = self.data.loader, self.data.skipped_shards
        self.document_mode = config.model.attention == "document"
        self.engine, self.checkpoints, self.grad_accum = parts.engine, parts.checkpoints, parts.grad_accum
        self.flops_model = parts.flops_model
        self.step = 0
        wandb_id = self._resume()
        self.log_file = setup_logging(env.rank, self.run_dir, config.logging.all_ranks)  # after an old run moved aside
        if env.is_main:
            log.info(trainable_summary(self.flops_model, config.optim.trainable))
        self.metrics = None
        if env.is_main:
            remote = self.run_directory
            if remote.is_remote and self.step and remote.exists_remote("metrics.jsonl"):
                remote.download("metrics.jsonl")  # the history up to the checkpoint, on any machine
            self.metrics = MetricsWriter(self.run_dir, config.logging, to_dict(config),
                                         self.step if self.step else None, self.run_dir.name, wandb_id)
            (self.run_dir / "config.json").write_text(json.dumps(redact(to_dict(config)), indent=1))
        self.stop_requested = False
        self._watchdogs: list[threading.Timer] = []  # cancelled once the run has saved and returns
        self._install_signal_handlers()

    # -- setup -----------------------------------------------------------------------------------

    def trainer_state(self) -> dict:
        return {
            "step": self.step,
            "tokens": self.step * self.config.trainer.global_batch_tokens,
            "loader": self.loader.state_dict(),
            **self.resume_identity(),  # model, global_batch_tokens, seq_len, curriculum, engine
            "data_fingerprint": self.fingerprint,
            "tokenizer_sha256": self.manifest.tokenizer["sha256"],
            "skipped_shards": self.skipped_shards,
            "world_size": self.env.world_size,
            "wandb_id": self.metrics.wandb_id if self.metrics else None,
            "git_revision": git_revision(),
            "config": redact(to_dict(self.config)),
        }

    def _resume(self) -> str | None:
        c = self.config.checkpoint
        if not c.resume:
            if self.checkpoints.steps():
                if not c.overwrite:
                    raise CheckpointError(f"{self.checkpoints.root} already has checkpoints and checkpoint.resume="
                                          "false; set checkpoint.overwrite=true to start over, or use a new run_dir")
                self._move_previous_run_aside()
            return None
        found = self.checkpoints.latest_valid(c.resume_from)
        if found is None:
            return None
        directory, state = found
        self._check_compatible(state)
        if state.get("skipped_shards", []) != self.skipped_shards and "data" not in c.allow_changes:
            raise CheckpointError(f"the checkpoint skipped shards {state.get('skipped_shards')} but this run skips "
                                  f"{self.skipped_shards}: the data would differ (add 'data' to "
                                  "checkpoint.allow_changes if intended)")
        try:
            self.engine.load(str(directory / "engine"), int(state["world_size"]))
        except CheckpointError:
            raise
        except (RuntimeError, KeyError, ValueError) as exc:  # e.g. a shape change let through allow_changes=[model]
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"{directory}: the engine cannot load this checkpoint into this run's model "
                                  f"({first[:300]}); to change the model's shape, export the checkpoint and start a "
                                  "new run with model.init_from") from None
        self.loader.load_state_dict(state["loader"], allow_fingerprint_change="data" in c.allow_changes)
        self.checkpoints.load_rng(directory)
        self.step = int(state["step"])
        if self.env.is_main:
            log.info(f"resumed from {directory} (step {self.step}, saved by {state['world_size']} rank(s) "
                     f"with {state['engine']})")
        return state.get("wandb_id")

    def _move_previous_run_aside(self) -> None:
        """Start over without destroying anything and without leaving an old step to resume: the previous run's
        checkpoints, metrics, config and export move to RUN_DIR/replaced_<time>/ (delete it when done with it)."""
        if self.env.is_main:
            aside = f"replaced_{time.strftime('%Y%m%d-%H%M%S')}_{os.getpid()}"  # two start-overs in one second
            moved = self.run_directory.move_aside(("checkpoints", "metrics.jsonl", "config.json", "export", "logs",
                                                   "summary.json", "tensorboard", "profile"), aside)
            log.info(f"checkpoint.overwrite: moved the previous run's {', '.join(moved)} to "
                     f"{redact_text(self.config.run_dir)}/{aside}")
        barrier(self.env)

    def resume_identity(self) -> dict:
        return resume_identity(self.config, int(self.manifest.tokenizer["vocab_size"]))

    def _check_compatible(self, state: dict) -> None:
        check_resume_compatible(state, self.resume_identity(), set(self.config.checkpoint.allow_changes))

    def _install_signal_handlers(self) -> None:
        first_signal_at = []

        def handler(signum, frame):
            if self.stop_requested:
                if time.monotonic() - first_signal_at[0] < DUPLICATE_SIGNAL_WINDOW_S:
                    return  # the same stop delivered twice (SLURM's TERM to every process and torchrun's relay)
                os._exit(128 + signum)  # a second signal: exit at once
            self.stop_requested = True
            first_signal_at.append(time.monotonic())
            # A rank stuck in a hung collective or a stalled step never reaches the save: past the collective
            # timeout it is hung by definition, so end it rather than wait for the launcher's SIGKILL.
            watchdog = threading.Timer(self.config.parallel.timeout_s, os._exit, args=(128 + signum,))
            watchdog.daemon = True
            watchdog.start()
            self._watchdogs.append(watchdog)
            if self.env.is_main:
                log.warning(f"received {signal.Signals(signum).name}: finishing the step, saving, exiting")

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, handler)

    # -- the loop --------------------------------------------------------------------------------

    def micro_batches(self, batch: WindowBatch, seq_len: int):
        """Split this rank's windows into micro-batches, each reshaped to rows of seq_len (DESIGN.md section 4):
        (inputs, labels, the inputs' document ids in document mode else None, how many inputs see a token of another
        document in their context (None when the data records no documents))."""
        size = self.config.trainer.micro_batch_size
        documents = batch.document_ids.split(size) if batch.document_ids is not None else [None] * len(
            range(0, len(batch.tokens), size))
        for chunk, ids in zip(batch.tokens.split(size), documents):
            inputs = chunk[:, :-1].reshape(-1, seq_len).to(self.env.device, non_blocking=True)
            labels = chunk[:, 1:].reshape(-1, seq_len).to(self.env.device, non_blocking=True)
            crossing = None
            if ids is not None:
                ids = ids[:, :-1].reshape(-1, seq_len)  # on the CPU, read by the loader's thread: no device sync
                crossing = 0 if self.document_mode else int((ids != ids[:, :1]).sum())
                ids = ids.to(self.env.device, non_blocking=True) if self.document_mode else None
            yield inputs, labels, ids, crossing

    def run(self) -> dict:
        t, env = self.config.trainer, self.env
        progress = progress_bar(env.is_main and t.progress_bar, total=t.max_steps, initial=self.step, desc="train",
                                unit="step", mininterval=2.0, delay=1.0)
        self._run_started, self._first_step = time.perf_counter(), self.step
        profiler = StepProfiler(t.profile_steps, self.run_dir, env) if t.profile_steps else None
        last, preempted = {}, False
        window_start = time.perf_counter()
        window_tokens, paused, window_crossing = 0, 0.0, 0
        while self.step < t.max_steps:
            tokens_before = self.step * t.global_batch_tokens
            seq_len = self.curriculum.seq_len(tokens_before)
            first_window = self.loader.windows_consumed
            batch = self.loader.next_batch()
            if profiler is not None:
                profiler.before_step(self.step + 1)
            losses = []
            for i, (inputs, labels, document_ids, crossing) in enumerate(self.micro_batches(batch, seq_len)):
                losses.append(self.engine.train_micro_step(inputs, labels, is_boundary=i == self.grad_accum - 1,
                                                           document_ids=document_ids))
                if crossing is not None:
                    window_crossing += crossing
            lr = learning_rate(self.step, t.max_steps, self.config.optim.lr, self.config.schedule)
            grad_norm = self.engine.optimizer_step(lr)
            self.step += 1
            if profiler is not None:
                profiler.after_step(self.step)
            window_tokens += t.global_batch_tokens
            if progress is not None:
                progress.update(1)

            preempted = all_agree_any(self.stop_requested, env)
            stop = preempted or self.step == t.stop_at_step
            final = self.step == t.max_steps or stop
            if self.step % t.log_interval == 0 or final:
                self._synchronize()  # the window's kernels may still be queued: count them before the clock stops
                elapsed = time.perf_counter() - window_start - paused
                last = self._log(losses, grad_norm, lr, seq_len, first_window, window_tokens, elapsed,
                                 window_crossing)
                window_start, window_tokens, paused, window_crossing = time.perf_counter(), 0, 0.0, 0
            # a stop signal saves at once: the preemption grace period is not spent on evaluation
            evaluate = ((t.eval_interval and self.step % t.eval_interval == 0) or final) and not preempted
            checkpoint = (self.config.checkpoint.interval and self.step % self.config.checkpoint.interval == 0) or final
            if evaluate or checkpoint:
                # Evaluation and checkpoints are not training: their time leaves the throughput window. The sync
                # makes the training kernels still queued count as training, not as the pause.
                self._synchronize()
                pause_start = time.perf_counter()
            if evaluate:
                val_losses = self.validation_losses()
                if val_losses and env.is_main:  # every rank evaluated every length (all-reducing); rank 0 logs
                    self.metrics.log({"step": self.step, "tokens": self.step * t.global_batch_tokens, **val_losses})
                    last.update(val_losses)
                    log.info(f"eval step {self.step}: " + " ".join(f"{k} {v:.4f}" for k, v in val_losses.items()))
                if not preempted and all_agree_any(self.stop_requested, env):  # a signal during the evaluation
                    preempted = stop = final = checkpoint = True  # save now, not after one more step
            if checkpoint:
                uploads = ["metrics.jsonl", "config.json"] + ([f"logs/{self.log_file.name}"] if self.log_file else [])
                self.checkpoints.save(self.step, self.engine, self.trainer_state(), extra_uploads=uploads,
                                      blocking=final)
            else:
                self.checkpoints.maybe_commit()
            if evaluate or checkpoint:
                paused += time.perf_counter() - pause_start
            if stop:
                break
        close_progress_bar(progress)
        if profiler is not None:
            profiler.close()
        if self.step == t.max_steps and not preempted:  # else the resumed run exports (it finds no step to take)
            self.write_export()
        self.loader.close()
        if self.metrics is not None:
            self.metrics.close()
            self.write_summary(preempted)
        for watchdog in self._watchdogs:
            watchdog.cancel()
        return last

    def _synchronize(self) -> None:
        if self.env.device.type == "cuda":
            torch.cuda.synchronize(self.env.device)

    def _log(self, losses, grad_norm, lr, seq_len, first_window, window_tokens, elapsed, crossing) -> dict:
        t = self.config.trainer
        loss = torch.stack(losses).float().mean().cpu()
        if self.env.world_size > 1:
            dist.all_reduce(loss, group=self.env.control_group)  # gloo SUM; no GPU sync in the step
            loss /= self.env.world_size
        loss_value = float(loss)
        grad_value = float(grad_norm) if grad_norm is not None else float("nan")
        tokens_per_s = window_tokens / max(elapsed, 1e-9)
        windows = self.loader.global_indices(first_window)
        record = {
            "step": self.step, "tokens": self.step * t.global_batch_tokens, "loss": loss_value,
            "loss_hex": float_hex(loss_value), "lr": lr, "seq_len": seq_len, "grad_norm": grad_value,
            "tokens_per_s": tokens_per_s, "step_time_s": elapsed * t.global_batch_tokens / max(window_tokens, 1),
            "windows_hash": hashlib.blake2b(windows.tobytes(), digest_size=8).hexdigest(),
        }
        if self.data.has_documents:  # training tokens whose context reaches into another document
            crossing = torch.tensor([crossing], dtype=torch.float64)
            if self.env.world_size > 1:
                dist.all_reduce(crossing, group=self.env.control_group)
            record["boundary_crossing_fraction"] = float(crossing) / max(window_tokens, 1)
        if self.data.is_mixture:
            window_len = self.loader.windows.window_len
            record |= {f"tokens/{s.name}": n * window_len
                       for s, n in zip(self.data.sources, self.loader.source_counts())}
        peak = self.config.trainer.peak_flops or gpu_peak_flops()
        if peak:
            flops = 3 * self.flops_model.forward_flops_per_token(seq_len) * tokens_per_s
            record["mfu"] = flops / (peak * self.env.world_size)
        record["peak_memory_gib"] = peak_memory_gib(self.env.device)
        if self.env.is_main:
            self.metrics.log(record)
            remaining = (t.max_steps - self.step) * record["step_time_s"]
            mfu = f" mfu {record['mfu']:.1%}" if "mfu" in record else ""
            log.info(f"step {self.step}/{t.max_steps} loss {loss_value:.4f} lr {lr:.2e} seq_len {seq_len} "
                     f"grad_norm {grad_value:.3f} tok/s {tokens_per_s:,.0f}{mfu} "
                     f"mem {record['peak_memory_gib']:.2f}GiB eta {format_duration(remaining)}")
        return record

    def write_summary(self, preempted: bool) -> dict:
        """RUN_DIR/summary.json and its lines in the log (rank 0): how far the run got and its results, read back
        from metrics.jsonl so that both agree, over every segment of a resumed run."""
        records = [json.loads(line) for line in (self.run_dir / "metrics.jsonl").read_text().splitlines()]
        training = [r for r in records if "loss" in r]
        # a diverged evaluation is logged as null (NaN): it is no one's best
        evaluations = [r for r in records if isinstance(r.get("val_loss"), int | float)]
        best = min(evaluations, key=lambda r: r["val_loss"], default=None)
        export = self.run_dir / "export"
        summary = {
            "run_dir": redact_text(self.config.run_dir), "steps": self.step, "max_steps": self.config.trainer.max_steps,
            "tokens": self.step * self.config.trainer.global_batch_tokens,
            "finished": self.step == self.config.trainer.max_steps and not preempted, "stopped_by_signal": preempted,
            "wall_time_s": time.perf_counter() - self._run_started, "steps_this_process": self.step - self._first_step,
            "final_loss": training[-1]["loss"] if training else None,
            "final_val_loss": evaluations[-1]["val_loss"] if evaluations else None,
            "best_val_loss": best["val_loss"] if best else None, "best_val_step": best["step"] if best else None,
            "export": str(export) if (export / "config.json").exists() else None,
        }
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        self.run_directory.upload(["summary.json"] + ([f"logs/{self.log_file.name}"] if self.log_file else []))
        state = "finished" if summary["finished"] else "stopped" + (" by a signal" if preempted else "")
        val = "" if best is None else (f", final val_loss {summary['final_val_loss']:.4f}, best "
                                       f"{summary['best_val_loss']:.4f} at step {summary['best_val_step']}")
        loss = "" if not isinstance(summary["final_loss"], int | float) else f", final loss {summary['final_loss']:.4f}"
        log.info(f"summary: {state} at step {self.step}/{summary['max_steps']} ({summary['tokens']:,} tokens) in "
                 f"{format_duration(summary['wall_time_s'])}{loss}{val}; export "
                 f"{summary['export'] or 'none'}; written to {redact_text(self.config.run_dir)}/summary.json")
        return summary

    def write_export(self) -> None:
        """RUN_DIR/export: consolidated weights, config and tokenizer, loadable without an engine."""
        from tape_pretrain.data.manifest import TOKENIZER
        from tape_pretrain.data.storage import join, open_url, read_bytes
        from tape_pretrain.train.export import save_export
        from tape_pretrain.train.model_card import TrainingFacts, final_val_loss

        state = self.engine.full_state_dict()
        if self.env.is_main:
            if uses_lora(self.config.optim.trainable):  # the adapters merged: the export is the plain model
                state = merged_state_dict(state, self.model_config, self.config.optim)
            fs, root = open_url(self.data.sources[0].url, self.config.data.storage_options)
            facts = TrainingFacts(steps=self.step, tokens=self.step * self.config.trainer.global_batch_tokens,
                                  data_fingerprint=self.fingerprint,
                                  final_val_loss=final_val_loss(self.run_dir / "metrics.jsonl"))
            save_export(state, self.model_config, self.run_dir / "export", read_bytes(fs, join(root, TOKENIZER)),
                        facts)
            self.run_directory.upload([f"export/{p.name}" for p in sorted((self.run_dir / "export").iterdir())])
        barrier(self.env)

    def validation_losses(self) -> dict[str, float]:
        """val_loss (at trainer.seq_len) and val_loss@N for each eval length; for a mixture the weighted mean of the
        sources' losses, and each source's own as val_loss/<name>. Empty when no source has val windows."""
        seq_len, out, per_length = self.config.trainer.seq_len, {}, {}
        for source in self.data.sources:
            for n, windows in source.val.items():
                loss = self.evaluate(windows)
                if loss is None:
                    continue
                per_length.setdefault(n, []).append((source.weight, loss))
                if n == seq_len and self.data.is_mixture:
                    out[f"val_loss/{source.name}"] = loss
        means = {n: sum(w * loss for w, loss in pairs) / sum(w for w, _ in pairs) for n, pairs in per_length.items()}
        if seq_len not in means:
            return {}
        out["val_loss"] = means[seq_len]
        for m in self.config.trainer.eval_length_multipliers:
            if m * seq_len in means:
                out[f"val_loss@{m * seq_len}"] = means[m * seq_len]
        return out

    @torch.no_grad()
    def evaluate(self, windows: TokenWindows) -> float | None:
        """Mean loss over fixed val windows: the first eval_batches micro-batches of trainer.seq_len (val_loss), or
        the same tokens in windows of N = m x seq_len, micro_batch_size / m rows per forward (val_loss@N)."""
        t, env = self.config.trainer, self.env
        multiple = windows.window_len // t.seq_len
        per_rank = t.eval_batches * t.micro_batch_size // multiple
        total = min(per_rank * env.world_size, windows.num_windows)
        per_rank = total // env.world_size
        if per_rank == 0:
            return None
        indices = torch.arange(env.rank * per_rank, (env.rank + 1) * per_rank).numpy()
        if self.document_mode:
            tokens, documents = (torch.from_numpy(a) for a in windows.gather(indices, with_documents=True))
        else:
            tokens, documents = torch.from_numpy(windows.gather(indices)), None
        module = self.engine.module
        module.eval()
        sums = torch.zeros(2, dtype=torch.float64)
        rows = max(1, t.micro_batch_size // multiple)
        for start in range(0, len(tokens), rows):
            chunk = tokens[start:start + rows]
            inputs = chunk[:, :-1].to(env.device, non_blocking=True)
            labels = chunk[:, 1:].to(env.device, non_blocking=True)
            document_ids = None if documents is None else documents[start:start + rows, :-1].to(env.device)
            logits = self.engine.eval_logits(inputs, document_ids=document_ids)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(),
                                                     reduction="sum")
            sums += torch.tensor([float(loss), labels.numel()], dtype=torch.float64)
        module.train()
        if env.world_size > 1:
            dist.all_reduce(sums, group=env.control_group)
        return float(sums[0] / sums[1])


def build_trainer(config: RunConfig, env: DistEnv) -> Trainer:
    return Trainer(config, env, build_parts(config, env))


def train(config: RunConfig) -> dict:
    configure_kernels(config)
    env = init_distributed(config.parallel.timeout_s)
    setup_logging(env.rank, None, config.logging.all_ranks)
    try:
        from tape_pretrain.distributed.preflight import preflight

        report, problems = preflight(config, env)
        if report:
            log.info(report)
        if problems:  # every rank stops here, before step 0, with the first problem named
            raise StorageError(f"preflight: {problems[0]}")
        # Before the trainer writes anything: a second run in the same run_dir would mix its config, metrics and
        # checkpoints with this one's.
        lock = lock_run_directory(RunDirectory(config.run_dir, staging_root=config.checkpoint.staging_dir), env,
                                  config.checkpoint.lease_ttl_s)
        try:
            return build_trainer(config, env).run()
        finally:
            if lock is not None:
                lock.release()
    finally:
        shutdown()
