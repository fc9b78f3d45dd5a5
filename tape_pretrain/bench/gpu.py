"""bench gpu: the project's check of one GPU, in one command (launch/gpu_check.sh runs it from a clone).

Sections, each ending in one PASS / FAIL / INFO (figure) line, then a summary and the usual key=value line:
  environment   torch / CUDA / cuDNN / NCCL, the device, the SDPA backend of each attention call
  speed         TAPE vs RoPE forward+backward, model parameters in the compute dtype (bf16 on CUDA), per N
  mfu           model FLOP utilisation of those timings (3 x forward FLOPs per token)
  sdpa          per attention call and N: the backend SDPA picks, and every backend's error against the math kernel
  train_resume  an FSDP2 run through the real CLI, and the same run stopped halfway and resumed: bitwise equal
  async_save    an async FSDP2 save taken while the next step and a queue of GPU work run: equal to the weights
                at save time
Every size is a parameter, so the whole check also runs on a CPU at a tiny size (tests do).
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

import tape_pretrain
from tape_pretrain.bench.timing import alternate, format_result
from tape_pretrain.config import ConfigError, ModelConfig, PositionalConfig, load_config
from tape_pretrain.distributed.device_report import (
    ATTENTION_CALLS,
    attention_inputs,
    backend_errors,
    cuda_problem,
    device_report,
    format_report,
    model_dtype,
    sdpa_choice,
)
from tape_pretrain.models.positional_base import allow_cudnn_attention
from tape_pretrain.train.metrics import training_records

# Launcher variables of this process (a world of one after init_distributed) must not reach the training runs it
# starts: they would try to join this process's group.
_LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "GROUP_RANK",
                       "ROLE_RANK", "MASTER_ADDR", "MASTER_PORT")
QUICKSTART_CONFIG = Path(tape_pretrain.__file__).resolve().parents[1] / "configs" / "runs" / "quickstart.yaml"


@dataclass
class GpuCheckOptions:
    preset: str = "paper-155m"
    """Model of the speed, MFU and SDPA sections."""
    seq_lens: tuple[int, ...] = (1024, 4096)
    batch: int = 8
    repeats: int = 5
    """Timed calls per model and N (median; after 2 warm-up calls)."""
    train_preset: str = "tiny"
    """Model of the training, resume and async-save sections."""
    train_seq_len: int = 256
    train_batch: int = 8
    train_steps: int = 30
    data: str | None = None
    """Dataset URL for the training runs; default: the built-in corpus, prepared on the fly."""
    work_dir: str | None = None
    """Where runs and checkpoints go (kept); default: a temporary directory (removed)."""
    peak_flops: float | None = None
    """Peak FLOP/s for MFU; default: the table in tape_pretrain.train.metrics (GPUs only)."""

    def validate(self) -> None:
        for name in ("batch", "repeats", "train_seq_len", "train_batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"bench gpu: --{name.replace('_', '-')} must be positive")
        if not self.seq_lens or min(self.seq_lens) < 1:
            raise ConfigError("bench gpu: --seq-lens must list positive lengths, e.g. 1024,4096")
        if self.train_steps < 2:
            raise ConfigError("bench gpu: --train-steps must be at least 2 (the resume stops halfway)")


@dataclass
class Outcome:
    section: str
    status: str  # PASS, FAIL or INFO (a figure)
    detail: str


@dataclass
class GpuCheck:
    options: GpuCheckOptions
    device: torch.device
    dtype: torch.dtype
    work: Path
    outcomes: list[Outcome] = field(default_factory=list)
    values: dict[str, float | str] = field(default_factory=dict)
    timings: dict[int, dict[str, float]] = field(default_factory=dict)
    """N -> {encoding: seconds per forward+backward}."""
    flops_per_token: dict[int, dict[str, float]] = field(default_factory=dict)

    def record(self, section: str, status: str, detail: str) -> None:
        self.outcomes.append(Outcome(section, status, detail))
        print(f"{status} {section}: {detail}", flush=True)

    def run_section(self, name: str, fn):
        """fn's result, or None when it raised (recorded as FAIL)."""
        print(f"\n== {name}", flush=True)
        start = time.perf_counter()
        try:
            return fn()
        except Exception as exc:  # a check reports every section: one failing part must not hide the others
            traceback.print_exc(file=sys.stderr)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            self.record(name, "FAIL", f"{type(exc).__name__}: {first[:300]}")
        finally:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            print(f"({name}: {time.perf_counter() - start:.1f} s)", flush=True)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # -- sections ---------------------------------------------------------------------------------------------

    def environment(self) -> bool:
        problem = cuda_problem()
        if problem:
            self.record("environment", "FAIL", problem)
            return False
        heads, head_dim = self._attention_shape(self.options.preset)
        print(format_report(device_report(self.device, self.dtype, heads, head_dim, self.options.seq_lens[0],
                                          self.options.batch)))
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        self.record("environment", "PASS", f"torch {torch.__version__} on {name} ({self.device}), "
                                           f"{str(self.dtype).removeprefix('torch.')}")
        return True

    def speed(self) -> None:
        from tape_pretrain.distributed.engine import lm_loss
        from tape_pretrain.models import build_model
        from tape_pretrain.models.tape import resolve_attention_form

        o = self.options
        models = {}
        # TAPE in both attention forms: auto's choice on this device is checked by measurement, not assumed
        for label, name, form in (("rope", "rope", "auto"), ("tape_one_call", "tape", "one_call"),
                                  ("tape_two_calls", "tape", "two_calls")):
            torch.manual_seed(0)  # the same backbone weights for all
            config = ModelConfig(preset=o.preset, max_seq_len=max(o.seq_lens),
                                 positional=PositionalConfig(name=name, tape_attention=form))
            models[label] = build_model(config).to(device=self.device, dtype=self.dtype)  # as the engines compute
        vocab = models["rope"].config.vocab_size
        for n in o.seq_lens:
            tokens = torch.randint(0, vocab, (o.batch, n + 1), device=self.device,
                                   generator=torch.Generator(self.device).manual_seed(n))
            inputs, labels = tokens[:, :-1], tokens[:, 1:]

            def forward_backward(model, inputs=inputs, labels=labels):
                def step():
                    lm_loss(model(inputs), labels).backward()
                    model.zero_grad(set_to_none=True)
                return step

            timed = alternate({name: forward_backward(m) for name, m in models.items()}, warmup=2,
                              repeats=o.repeats)
            config = models["rope"].config
            auto = resolve_attention_form("auto", self.device.type, config.hidden_size // config.num_heads, n)
            seconds = {"rope": timed["rope"], "tape": timed[f"tape_{auto}"]}  # tape: what auto runs
            self.timings[n] = seconds
            self.flops_per_token[n] = {name: models[name if name == "rope" else f"tape_{auto}"]
                                       .forward_flops_per_token(n) for name in seconds}
            ratio = seconds["tape"] / seconds["rope"]
            self.values[f"tape_over_rope_N{n}"] = ratio
            for form in ("one_call", "two_calls"):
                self.values[f"tape_{form}_over_rope_N{n}"] = timed[f"tape_{form}"] / timed["rope"]
            self.record(f"speed N={n}", "INFO",
                        f"forward+backward {o.preset} B={o.batch}: rope {seconds['rope'] * 1000:.1f} ms, "
                        f"tape one call {timed['tape_one_call'] * 1000:.1f} ms "
                        f"({timed['tape_one_call'] / timed['rope']:.3f}x), two calls "
                        f"{timed['tape_two_calls'] * 1000:.1f} ms ({timed['tape_two_calls'] / timed['rope']:.3f}x); "
                        f"auto runs {auto}: tape/rope {ratio:.3f} (median of {o.repeats})")
        del models

    def mfu(self) -> None:
        from tape_pretrain.train.metrics import gpu_peak_flops

        peak = self.options.peak_flops or gpu_peak_flops()
        if not self.timings:
            self.record("mfu", "FAIL", "no timings (the speed section failed)")
            return
        if not peak:
            self.record("mfu", "INFO", f"n/a: no peak FLOP/s known for {self.device.type} (pass --peak-flops)")
            return
        b = self.options.batch
        for n, seconds in self.timings.items():
            mfu = {name: 3 * self.flops_per_token[n][name] * b * n / s / peak for name, s in seconds.items()}
            self.values.update({f"mfu_{name}_N{n}": v for name, v in mfu.items()})
            self.record(f"mfu N={n}", "INFO", f"rope {mfu['rope']:.1%}, tape {mfu['tape']:.1%} of "
                                              f"{peak / 1e12:.0f} TFLOP/s (3 x forward FLOPs per token, "
                                              f"forward+backward time)")

    def sdpa(self) -> None:
        o = self.options
        heads, head_dim = self._attention_shape(o.preset)
        low_precision = self.dtype != torch.float32
        # bf16 rounding alone is ~4e-3 of the largest value; a broken kernel (layout, strides) is off by O(1)
        tolerance = {"out": 2e-2, "grad": 5e-2} if low_precision else {"out": 1e-4, "grad": 1e-4}
        failures = []
        for n in o.seq_lens:
            calls = attention_inputs(o.batch, heads, n, head_dim, self.device, self.dtype)
            for name, (q, k, v) in calls.items():
                chosen = sdpa_choice(q, k, v)
                errors = backend_errors(q, k, v)
                math = errors.get("MATH", {"out": 0.0, "grad": 0.0})
                parts = []
                for backend, err in errors.items():
                    # a fused kernel may be as inexact as the math kernel in the same dtype, never much worse
                    ok = all(err[x] <= max(tolerance[x], 2 * math[x]) for x in ("out", "grad"))
                    label = f"{backend}({str(self.dtype).removeprefix('torch.')})" if backend == "MATH" else backend
                    parts.append(f"{label} out {err['out']:.1e} grad {err['grad']:.1e}{'' if ok else ' (too large)'}")
                    if not ok:
                        failures.append(f"N={n} {name} {backend}")
                if chosen not in errors:
                    failures.append(f"N={n} {name}: the chosen {chosen} could not be run alone")
                print(f"  N={n} {name:<13} uses {chosen}; error vs fp32 math: {'; '.join(parts)}", flush=True)
                self.values[f"sdpa_{name}_N{n}"] = chosen
            del calls
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        calls_used = ", ".join(f"{name}={self.values[f'sdpa_{name}_N{o.seq_lens[-1]}']}" for name in ATTENTION_CALLS)
        if failures:
            self.record("sdpa", "FAIL", f"error beyond tolerance or backend unusable: {', '.join(failures)}")
        else:
            self.record("sdpa", "PASS", f"every backend within tolerance of the math kernel at N="
                                        f"{','.join(map(str, o.seq_lens))} ({calls_used})")

    def model_grads(self) -> None:
        """Parameter gradients of one forward+backward under the default attention dispatch, in the engines'
        compute dtype, against the same model in fp32 on the math kernel: a wrong fused kernel (or a wrong call of
        one) shows here as it would in training, whatever its unit-level result."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        from tape_pretrain.distributed.engine import lm_loss
        from tape_pretrain.models import build_model

        o = self.options
        n, batch = o.seq_lens[0], max(1, o.batch // 2)
        low_precision = self.dtype != torch.float32
        # bf16 activations give per-tensor relative L2 errors of about 1e-2; a broken kernel gives O(1)
        tolerance = 5e-2 if low_precision else 1e-4
        failures, worst_seen = [], {}
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        # as the trainer dispatches by default (cuDNN's kernel off), and on CUDA with trainer.cudnn_attention on
        dispatches = [False, True] if self.device.type == "cuda" else [False]
        try:
            for name, cudnn in itertools.product(("rope", "tape", "nope", "alibi", "fire", "xpos", "randrope"),
                                                 dispatches):
                allow_cudnn_attention(cudnn)
                label = f"{name}+cudnn" if cudnn else name
                torch.manual_seed(0)
                config = ModelConfig(preset=o.preset, max_seq_len=n, positional=PositionalConfig(name=name))
                model = build_model(config).to(self.device).eval()  # eval: RandPE's positions do not resample
                tokens = torch.randint(0, model.config.vocab_size, (batch, n + 1), device=self.device,
                                       generator=torch.Generator(self.device).manual_seed(n))
                grads = {}
                for run_label, dtype, backends in (("reference", torch.float32, [SDPBackend.MATH]),
                                                   ("default", self.dtype, None)):
                    model.to(dtype).zero_grad(set_to_none=True)
                    if backends is None:
                        lm_loss(model(tokens[:, :-1]), tokens[:, 1:]).backward()
                    else:
                        with sdpa_kernel(backends):
                            lm_loss(model(tokens[:, :-1]), tokens[:, 1:]).backward()
                    # (the fp32 reference runs first: the cast to the compute dtype rounds the weights, as an
                    # engine's compute copy of its fp32 masters is rounded)
                    grads[run_label] = {k: p.grad.float() for k, p in model.named_parameters() if p.grad is not None}
                ref = grads["reference"]
                errors = gradient_errors(grads["default"], ref)
                norm_ratio = (torch.stack([grads["default"][k].norm() for k in ref]).norm()
                              / torch.stack([g.norm() for g in ref.values()]).norm()).item()
                worst = max(errors, key=errors.get)
                worst_seen[label] = errors[worst]
                ok = errors[worst] <= tolerance and abs(norm_ratio - 1) <= tolerance
                print(f"  {label:<14} grad norm ratio {norm_ratio:.4f}, worst relative L2 error {errors[worst]:.1e} "
                      f"({worst}){'' if ok else ' (too large)'}", flush=True)
                if not ok:
                    failures.append(f"{label} ({worst}: {errors[worst]:.1e}, norm ratio {norm_ratio:.3f})")
                del model, grads, ref
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
            allow_cudnn_attention(False)
        self.values.update({f"grad_error_{label.replace('+', '_')}": round(err, 5)
                            for label, err in worst_seen.items()})
        where = f"{o.preset} N={n} B={batch}, {str(self.dtype).removeprefix('torch.')} default dispatch"
        if failures:
            self.record("model_grads", "FAIL", f"{where} vs fp32 math: {'; '.join(failures)}")
        else:
            self.record("model_grads", "PASS", f"{where}: every encoding's parameter gradients within "
                                               f"{tolerance:.0e} (relative L2 per tensor) of fp32 math")

    def train_resume(self) -> None:
        o = self.options
        data = o.data or self._prepare_data()
        config = self._train_config(data)
        full, resumed = self.work / "run_full", self.work / "run_resumed"
        half = o.train_steps // 2
        # the uninterrupted run and the first half run side by side: they share nothing but the dataset
        running = [self._start_training(config, full),
                   self._start_training(config, resumed, f"trainer.stop_at_step={half}")]
        try:
            out = self._finish_training(*running[0])
            self._finish_training(*running[1])
        finally:
            for process, _, _ in running:
                if process.poll() is None:  # its partner failed: stop it before the work directory goes
                    process.kill()
                    process.wait()
        second = self._finish_training(*self._start_training(config, resumed))
        if "resumed from" not in second:
            self.record("train_resume", "FAIL", f"the second run over {resumed} did not resume from step {half}")
            return
        device = "cuda" if "device=cuda" in out else "cpu"
        if self.device.type == "cuda" and device != "cuda":
            self.record("train_resume", "FAIL", "the training run did not use the GPU (see its preflight above)")
            return
        a, b = training_records(full), training_records(resumed)
        if sorted(a) != list(range(1, o.train_steps + 1)) or sorted(b) != sorted(a):
            self.record("train_resume", "FAIL", f"metrics.jsonl lacks steps: {sorted(a)} / {sorted(b)}")
            return
        last = o.train_steps
        detail = (f"{o.train_steps} FSDP2 steps of {o.train_preset} on {device} (N={o.train_seq_len}, "
                  f"B={o.train_batch}), stopped at {half} and resumed: final loss {a[last]['loss']:.4f} "
                  f"(0x{a[last]['loss_hex']}) ")
        if a[last]["loss_hex"] == b[last]["loss_hex"]:
            self.record("train_resume", "PASS", detail + "bitwise equal to the uninterrupted run")
            return
        differ = next(s for s in sorted(a) if a[s]["loss_hex"] != b[s]["loss_hex"])
        gap = {part: max((abs(a[s]["loss"] - b[s]["loss"]) for s in a if (s > half) == (part == "after")),
                         default=0.0) for part in ("before", "after")}
        cause = ("the resume changed the training" if differ > half else
                 "the runs already differ before the resume: training itself is not bitwise reproducible here"
                 + (" (e.g. fused attention backward kernels, non-deterministic under "
                    "torch.use_deterministic_algorithms(True, warn_only=True))" if device == "cuda" else ""))
        self.record("train_resume", "FAIL", f"{detail}vs {b[last]['loss']:.4f} (0x{b[last]['loss_hex']}) resumed; "
                                            f"first difference at step {differ}: {cause}; largest loss difference "
                                            f"{gap['before']:.1e} up to step {half}, {gap['after']:.1e} after it")

    def async_save(self) -> None:
        """An async save must hold the weights as of the save call, though the GPU may still be computing them when
        it starts (the previous step is queued behind other work) and the next step changes them while it copies
        and writes. The expected weights are read in stream order right after the call."""
        from tape_pretrain.distributed.engine import build_engine
        from tape_pretrain.distributed.env import init_distributed, shutdown
        from tape_pretrain.models import build_model
        from tape_pretrain.models.presets import resolve_model_config

        o = self.options
        n, b = o.train_seq_len, o.train_batch
        common = [f"model.preset={o.train_preset}", "model.positional.name=tape", f"model.max_seq_len={n}",
                  "parallel.engine=fsdp2", f"trainer.seq_len={n}", f"trainer.micro_batch_size={b}",
                  f"trainer.global_batch_tokens={n * b}"]
        env = init_distributed(120)
        try:
            config = load_config(None, [*common, "checkpoint.async_save=true"])
            torch.manual_seed(0)
            engine = build_engine(build_model(config.model), config, env, 1)
            vocab = resolve_model_config(config.model).vocab_size
            gen = torch.Generator(env.device).manual_seed(0)
            tokens = torch.randint(0, vocab, (3, b, n + 1), device=env.device, generator=gen)

            def step(engine, i):
                engine.train_micro_step(tokens[i, :, :-1], tokens[i, :, 1:], is_boundary=True)
                engine.optimizer_step(1e-3)

            step(engine, 0)  # the optimizer state exists from here on
            target = self.work / "async_save" / "engine"
            target.parent.mkdir(parents=True, exist_ok=True)
            queued = _busy(env.device)
            step(engine, 1)  # queued behind that work: its update may not have run when the save starts
            engine.save(str(target))
            # the weights the checkpoint must hold: read on the compute stream, after step 1's update
            snapshot = {k: v.detach().to("cpu", copy=True) for k, v in engine.full_state_dict().items()}
            _busy(env.device)
            step(engine, 2)  # the next step, while the save may still be copying and writing
            engine.wait_for_save()
            self.synchronize()
            after = engine.full_state_dict()
            changed = sum(not torch.equal(after[k].cpu(), snapshot[k]) for k in snapshot)
            del engine, after

            torch.manual_seed(1)  # other initial weights: only the load can make them equal to the snapshot
            fresh = build_engine(build_model(config.model), load_config(None, common), env, 1)
            fresh.load(str(target), env.world_size)
            loaded = {k: v.cpu() for k, v in fresh.full_state_dict().items()}
            del fresh
        finally:
            shutdown()
        if set(loaded) != set(snapshot):
            other = sorted(set(loaded) ^ set(snapshot))
            self.record("async_save", "FAIL", f"the checkpoint holds other tensors than the model: {other}")
            return
        differ = [k for k in snapshot if not torch.equal(loaded[k], snapshot[k])]
        if not changed:
            self.record("async_save", "FAIL", "the step after the save changed no weight: the check proves nothing")
        elif differ:
            self.record("async_save", "FAIL", f"{len(differ)} of {len(snapshot)} tensors in the checkpoint differ "
                                              f"from the weights at save time (first: {differ[0]}): the save read "
                                              "weights before the previous step's update or after the next one's")
        else:
            self.record("async_save", "PASS", f"the checkpoint equals the weights at save time bitwise "
                                              f"({len(snapshot)} tensors), with {queued} queued on {env.device} "
                                              f"before the save and after it, and the next step changing {changed}")

    # -- helpers ----------------------------------------------------------------------------------------------

    @staticmethod
    def _attention_shape(preset: str) -> tuple[int, int]:
        from tape_pretrain.models.presets import resolve_model_config

        model = resolve_model_config(ModelConfig(preset=preset))
        return model.num_heads, model.hidden_size // model.num_heads

    def _prepare_data(self) -> str:
        from tape_pretrain.bench.loader import prepared_dataset

        directory = self.work / "data"
        directory.mkdir(parents=True, exist_ok=True)
        return prepared_dataset(str(directory))

    def _train_config(self, data: str) -> Path:
        """configs/runs/quickstart.yaml with this check's sizes, FSDP2, no curriculum, deterministic."""
        o = self.options
        from tape_pretrain.config import read_yaml_mapping

        config = read_yaml_mapping(QUICKSTART_CONFIG)  # a ConfigError naming it when run outside a clone
        config["data"] = {"path": data}
        config["model"] = {"preset": o.train_preset, "positional": {"name": "tape"}}
        config.pop("curriculum", None)
        config["trainer"].update(max_steps=o.train_steps, seq_len=o.train_seq_len, micro_batch_size=o.train_batch,
                                 global_batch_tokens=o.train_seq_len * o.train_batch, log_interval=1,
                                 eval_interval=0, eval_batches=1, deterministic=True, progress_bar=False)
        config["parallel"] = {"engine": "fsdp2"}
        config["checkpoint"] = {"interval": 0, "keep_last": 2}
        path = self.work / "train.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    def _start_training(self, config: Path, run_dir: Path, *overrides: str):
        """`tape-pretrain train` in a process of its own (the trainer owns its process group), output to a log."""
        env = {k: v for k, v in os.environ.items()
               if k not in _LAUNCHER_VARIABLES and not k.startswith("TORCHELASTIC_")}
        root = str(Path(tape_pretrain.__file__).resolve().parents[1])
        env.update(PYTHONPATH=root + os.pathsep + env.get("PYTHONPATH", ""), TAPE_PRETRAIN_NO_MALLOC_TUNING="1",
                   PYTHONUNBUFFERED="1")
        if self.device.type == "cuda":
            env["TAPE_PRETRAIN_EXPECT_GPU"] = "1"
        # a cache of its own per run directory: two runs at once would fill one cache side by side
        cache = run_dir.with_name(f"cache_{run_dir.name}")
        command = [sys.executable, "-m", "tape_pretrain.cli", "train", str(config), f"run_dir={run_dir}",
                   f"data.cache_dir={cache}", *overrides]
        log = run_dir.with_name(f"{run_dir.name}{'_'.join(['', *overrides]).replace('=', '')}.log")
        with open(log, "w") as f:  # a file, not a pipe: two runs at once must not block on a full pipe
            process = subprocess.Popen(command, env=env, stdout=f, stderr=subprocess.STDOUT, text=True)
        return process, command, log

    @staticmethod
    def _finish_training(process: subprocess.Popen, command: list[str], log: Path) -> str:
        """Waits for a run from _start_training; returns its output (raises if it failed)."""
        try:
            process.wait(timeout=900)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        output = log.read_text(errors="replace")
        lines = output.strip().splitlines()
        if process.returncode != 0:
            sys.stderr.write(output[-8000:])
            raise RuntimeError(f"training exited {process.returncode}: {lines[-1] if lines else 'no output'} "
                               f"({' '.join(command[4:])}; log {log})")
        shown = [x for x in lines if x.startswith(("preflight:", "resumed from"))]
        shown += [x for x in lines if x.startswith("step ")][-1:]
        print(f"  train {' '.join(command[4:])}:\n" + "\n".join(f"    {x}" for x in shown), flush=True)
        return output

    # -- the whole check --------------------------------------------------------------------------------------

    def run(self) -> dict:
        print(f"bench gpu: {self.options} on {self.device}, work directory {self.work}", flush=True)
        allow_cudnn_attention(False)  # time and check what the trainer runs by default (trainer.cudnn_attention)
        if self.run_section("environment", self.environment):
            self.run_section("speed", self.speed)
            self.run_section("mfu", self.mfu)
            self.run_section("sdpa", self.sdpa)
            self.run_section("model_grads", self.model_grads)
            self.run_section("train_resume", self.train_resume)
            self.run_section("async_save", self.async_save)
        failed = [x for x in self.outcomes if x.status == "FAIL"]
        print("\n== summary")
        for x in self.outcomes:
            print(f"{x.status} {x.section}: {x.detail}")
        statuses = {}
        for x in self.outcomes:
            if x.status != "INFO":
                statuses[x.section.split()[0]] = x.status
        self.values.update(statuses)
        self.values["failed"] = len(failed)
        print(format_result(self.values), flush=True)
        return self.values


def gradient_errors(grads: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per parameter: ||g - ref|| / max(||ref||, 1e-3 ||all of ref|| / sqrt(tensors)).

    The floor keeps a parameter whose true gradient is zero from reading as infinitely wrong: FIRE's output bias
    adds the same constant to every logit of a row, so its gradient is rounding noise (~1e-10) in any dtype."""
    floor = 1e-3 * torch.stack([g.norm() for g in reference.values()]).norm() / len(reference) ** 0.5
    return {k: ((grads[k] - g).norm() / torch.maximum(g.norm(), floor).clamp_min(1e-30)).item()
            for k, g in reference.items()}


def _busy(device: torch.device) -> str:
    """Enqueue a long chain of dependent matmuls (about a second on a datacenter GPU) without waiting for it."""
    size, count = (8192, 400) if device.type == "cuda" else (256, 20)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    x = torch.randn(size, size, device=device, dtype=dtype)
    w = torch.randn(size, size, device=device, dtype=dtype) / size**0.5
    for _ in range(count):
        x = torch.tanh(x @ w)
    return f"{count} matmuls of {size}x{size}"


def run(options: GpuCheckOptions) -> dict:
    """Run every section; returns the key=value results (values["failed"] counts FAIL lines)."""
    options.validate()
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dtype = model_dtype(device)
    with tempfile.TemporaryDirectory(prefix="tape_gpu_check_") as tmp:
        work = Path(tmp)
        if options.work_dir:  # a fresh directory inside it: a run directory left from before would be resumed
            Path(options.work_dir).mkdir(parents=True, exist_ok=True)
            work = Path(tempfile.mkdtemp(prefix="gpu_check_", dir=options.work_dir))
        return GpuCheck(options, device, dtype, work).run()
