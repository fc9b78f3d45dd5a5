"""DeepSpeed ZeRO stages 0-3 (DeepSpeed beyond its public training API only through deepspeed_adapter)."""

from __future__ import annotations

import json
import os
import shutil

import torch

from tape_pretrain.config import ConfigError
from tape_pretrain.distributed import deepspeed_adapter as adapter
from tape_pretrain.distributed.engine import Engine, EngineSetup, ModelSource, adamw, forward_kwargs, lm_loss
from tape_pretrain.distributed.env import all_agree_all, barrier
from tape_pretrain.errors import CheckpointError
from tape_pretrain.utils.safe_load import deepspeed_safe_globals, weights_only_loading

deepspeed = adapter.deepspeed
safe_get_full_fp32_param = adapter.deepspeed.utils.safe_get_full_fp32_param


def deepspeed_config(setup: EngineSetup) -> dict:
    """Our config as DeepSpeed's, with a user JSON (parallel.deepspeed_config) merged over it."""
    bf16 = setup.dtype == torch.bfloat16
    parallel = setup.parallel
    stage = parallel.zero_stage
    zero = {"stage": stage}
    overlap = parallel.overlap_comm
    if overlap is None and setup.env.device.type == "cuda":
        overlap = True  # reductions overlap the backward pass (DeepSpeed's own default turns it on for ZeRO-3 only)
    if overlap is not None:
        zero["overlap_comm"] = overlap
    ds = {
        "train_micro_batch_size_per_gpu": setup.micro_batch_size,
        "gradient_accumulation_steps": setup.grad_accum,
        "gradient_clipping": setup.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if bf16:
        # DeepSpeed's bf16 defaults accumulate and all-reduce gradients in bf16 (8 significant bits: 16 summed
        # micro-batches lose the small ones). Do both in fp32, as FSDP2's reduce_dtype does. ZeRO-0 has no fp32
        # accumulation path in DeepSpeed (it raises NotImplementedError).
        if stage == 0:
            raise ConfigError("DeepSpeed ZeRO-0 in bf16 accumulates gradients in bf16 and keeps no fp32 master weights "
                              "that can be set from the fp32 initialisation: use parallel.zero_stage=1 (the same "
                              "memory on one GPU), the fsdp2 engine, or trainer.precision=fp32")
        ds["communication_data_type"] = "fp32"
        ds["data_types"] = {"grad_accum_dtype": "fp32"}
    if parallel.deepspeed_config:
        path = parallel.deepspeed_config
        try:
            with open(path) as f:
                user = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"parallel.deepspeed_config: cannot read {path}: {exc}") from None
        for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
            if key in user and user[key] != ds.get(key, user[key]):
                raise ConfigError(f"parallel.deepspeed_config sets {key}={user[key]}: batch sizes come from "
                                  "trainer.global_batch_tokens and trainer.micro_batch_size")
        # Precision is the trainer's: it decides the fp32 accumulation and reduction above, and the export.
        for key in ("bf16", "fp16", "data_types", "communication_data_type"):
            if key in user and user[key] != ds.get(key):
                raise ConfigError(f"parallel.deepspeed_config sets {key}: precision comes from trainer.precision "
                                  "(bf16 runs accumulate and reduce gradients in fp32; fp16 is not supported)")
        _merge(ds, user)
    return ds


def _merge(base: dict, update: dict) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


class DeepSpeedEngine(Engine):
    def __init__(self, source: ModelSource, setup: EngineSetup):
        self.setup, self.env = setup, setup.env
        adapter.skip_cpu_shm_op()
        ds_config = deepspeed_config(setup)
        self.bf16 = ds_config["bf16"]["enabled"]
        partitioned = source.lazy and setup.parallel.zero_stage == 3
        if partitioned:
            with adapter.zero3_partitioned_init(ds_config):  # each rank keeps only its partition of each parameter
                model = source.build(False)
            for name, param in model.named_parameters():  # one full parameter at a time
                adapter.set_partitioned_param(
                    param, lambda n=name, p=param: source.initial_value(model, n, adapter.full_shape(p)))
            initial = {}
        else:
            model = source.build(True)
            # In bf16, initialize() casts the module (module.bfloat16()) before the optimizer copies its fp32 master
            # weights from it, so training would start from bf16-rounded weights where FSDP2 starts from the exact
            # fp32 ones. Hold the fp32 tensors (references, not copies) and put them back into the master copy.
            initial = {name: p.data for name, p in model.named_parameters()} if self.bf16 else {}
        self.prepare(model, setup.parallel)
        self.optimizer = adamw(model, setup.optim, shape_of=adapter.full_shape)  # partitioned: no shape of its own
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=self.optimizer, config=ds_config,
                                                    dist_init_required=False)
        self.module = self.engine.module
        self._frozen_fp32 = {}  # frozen parameters have no master copy: export writes them from here, unrounded
        if self.bf16:
            for name, param in self.module.named_parameters():
                value = initial[name] if name in initial else source.initial_value(self.module, name,
                                                                                   adapter.full_shape(param))
                if param.requires_grad:
                    adapter.set_fp32_master(param, value.to(param.device))
                elif self.env.is_main:
                    self._frozen_fp32[name] = value

    def train_micro_step(self, inputs, labels, is_boundary, document_ids=None):
        loss = lm_loss(self.engine(inputs, **forward_kwargs(document_ids)), labels)
        self.engine.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps
        if not is_boundary:
            self.engine.step()  # accumulation bookkeeping only; the optimizer steps at the boundary
        return loss.detach()

    def optimizer_step(self, lr):
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        pre_clip_norm = None
        if self.setup.parallel.zero_stage == 0:
            # Without ZeRO, DeepSpeed clips fp32 gradients but does not keep the norm: measure it here.
            grads = [p.grad for p in self.module.parameters() if p.grad is not None]
            pre_clip_norm = torch.nn.utils.get_total_norm(grads) if grads else None
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            norm = pre_clip_norm
        return norm if norm is not None else float("nan")

    def eval_logits(self, inputs, document_ids=None):
        return self.engine(inputs, **forward_kwargs(document_ids))

    def _to_universal(self, directory: str) -> str:
        """Convert a checkpoint saved on another data-parallel size to DeepSpeed's universal format. Each node's
        leader converts into RUN_DIR/.universal/ (never inside the checkpoint, whose files.json must keep
        verifying); every rank then loads it, resharded, and load() removes it."""
        import collections
        import socket
        import subprocess
        import sys

        from tape_pretrain.utils.progress import Phases, format_duration

        step_dir = os.path.dirname(os.path.abspath(directory))  # RUN_DIR/checkpoints/step_N
        run_dir = os.path.dirname(os.path.dirname(step_dir))
        out = os.path.join(run_dir, ".universal", f"{os.path.basename(step_dir)}-{socket.gethostname()}")
        failure = None
        if self.env.local_rank == 0:
            shutil.rmtree(out, ignore_errors=True)  # a leftover of an interrupted conversion
            # In a fresh process: the converter must not issue collectives on this job's process group.
            # Weights-only there too: the converter unpickles every optimizer file of the checkpoint.
            phases, phase = Phases("universal checkpoint"), None
            output: collections.deque[str] = collections.deque(maxlen=20)
            with subprocess.Popen(
                    [sys.executable, "-m", "tape_pretrain.distributed.ds_universal", "--input_folder",
                     os.path.join(directory, "engine"), "--output_folder", os.path.join(out, "engine"),
                     "--num_extract_workers", "1", "--num_merge_workers", "1", "--inject_missing_state"],
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace") as proc:
                for line in proc.stdout:
                    if line.strip():
                        output.append(line.strip())
                    if line.startswith("*** "):  # its phases: "*** 1. Extracting ZeRO fragments", ..., "*** Done!"
                        if phase is not None:
                            phases.done(phase)
                        name = line.removeprefix("*** ").strip().rstrip(". ")
                        phase = None if name.startswith("Done") else name
            if proc.returncode != 0:
                failure = f"{step_dir}: DeepSpeed's universal conversion failed: {(output or ['no output'])[-1]}"
            else:
                print(f"universal checkpoint: converted {step_dir}, saved on another number of ranks, into {out} "
                      f"({format_duration(phases.elapsed())})", file=sys.stderr, flush=True)
        # every rank learns of a failure (a rank left in a barrier would report a gloo error as the cause)
        if not all_agree_all(failure is None, self.env):
            raise CheckpointError(failure or f"{step_dir}: DeepSpeed's universal conversion failed on another node")
        return out

    def full_state_dict(self):
        if self.bf16:
            # The fp32 master weights, not the bf16 module copy. Collective: every rank assembles every parameter.
            state = {}
            for name, param in self.module.named_parameters():
                full = safe_get_full_fp32_param(param) if param.requires_grad else None
                if self.env.is_main:  # only rank 0 writes the export: the others let each tensor go at once
                    state[name] = full.cpu() if full is not None else self._frozen_fp32[name].cpu()
            return state
        if self.setup.parallel.zero_stage == 3:
            return adapter.zero3_consolidated_state_dict(self.engine)  # gathered on rank 0
        return self.engine.module.state_dict()

    def save(self, directory):
        self.engine.save_checkpoint(directory, tag="engine", save_latest=False)

    def load(self, directory, saved_world_size):
        universal = saved_world_size != self.env.world_size
        if universal:
            directory = converted = self._to_universal(directory)
            adapter.set_universal_loading(self.engine, True)
        hyperparameters = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
        with weights_only_loading(deepspeed_safe_globals()):
            path, _ = self.engine.load_checkpoint(directory, tag="engine", load_module_strict=True,
                                                  load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint in {directory}/engine")
        if universal:
            adapter.repair_after_universal_load(self.optimizer, hyperparameters)
            adapter.set_universal_loading(self.engine, False)
            barrier(self.env)
            if self.env.local_rank == 0:
                shutil.rmtree(converted, ignore_errors=True)


    @classmethod
    def consolidate(cls, engine_dir, model):
        """The fp32 master weights of trainable parameters. Frozen ones are left out: they have no master copy, and
        the checkpoint's module copy of them is rounded to bf16 in bf16 runs (the caller has their initial values,
        which, frozen, they kept)."""
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        tag_dir = os.path.join(engine_dir, "engine")
        with weights_only_loading(deepspeed_safe_globals()):
            if adapter.is_bf16_optimizer_checkpoint(tag_dir):  # bf16 with ZeRO-1
                shapes = {name: param.shape for name, param in model.named_parameters()}
                weights = adapter.consolidate_bf16_optimizer_checkpoint(tag_dir, shapes)
            elif any(name.endswith("optim_states.pt") for name in os.listdir(tag_dir)):
                weights = get_fp32_state_dict_from_zero_checkpoint(engine_dir, tag="engine")
            else:  # ZeRO-0: the module state is stored whole (the files were verified against files.json before this)
                weights = torch.load(os.path.join(tag_dir, "mp_rank_00_model_states.pt"), map_location="cpu",
                                     weights_only=True)["module"]
        frozen = {name for name, param in model.named_parameters() if not param.requires_grad}
        return {name: value for name, value in weights.items() if name not in frozen}
