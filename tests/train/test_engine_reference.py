"""Every engine configuration computes the training a plain single-process PyTorch loop computes.

The reference loop below uses the project's model, parameter groups, schedule and windows (each tested on its own
elsewhere), but no engine: torch.optim.AdamW, clip_grad_norm_, gradient accumulation by hand. Every DeepSpeed ZeRO
stage and FSDP2 on 1 and 2 processes, with accumulation >= 2 and clipping active at every step, must match it per
step on loss and pre-clip grad norm, and at the end on every weight. AdamW and clipping barely react to a uniform
gradient scale, so a summed-instead-of-averaged accumulation moves the loss by less than 1e-3 in 5 steps while the
grad norm doubles: the grad norm is the quantity that catches it.
"""

import copy
import hashlib
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from tape_pretrain.config import load_config
from tape_pretrain.data.cache import cache_split
from tape_pretrain.data.loader import GlobalBatchLoader, TokenWindows
from tape_pretrain.data.manifest import load_manifest
from tape_pretrain.distributed.engine import param_groups
from tape_pretrain.models import build_model
from tape_pretrain.train.schedule import learning_rate
from tape_pretrain.train.trainer import resolve_run_model_config
from tests.helpers import metrics, run, train_command, write_config

STEPS = 5
# 16 windows of 64 tokens per step in micro-batches of 4: accumulation 4 on one process, 2 on two. The pre-clip
# grad norm is 0.6-0.9 over these steps, so a clip at 0.5 is active at every step. Cosine after 2 warmup steps.
SETTINGS = {"trainer.max_steps": STEPS, "trainer.global_batch_tokens": 1024, "trainer.micro_batch_size": 4,
            "optim.grad_clip": 0.5, "schedule.name": "cosine", "schedule.warmup_steps": 2}
# fp32 on CPU. Measured over all ten variants: losses within 6e-8 relative, grad norms within 1.7e-7, weights within
# 5e-6 of their tensor's largest weight (2.9e-5 for ZeRO-3, from two of 4,096 elements whose tiny gradients Adam
# normalises to full-size steps). Missing weight decay alone moves weights by about 4e-4 in 5 steps.
# bf16 (compute in bf16, fp32 master weights, fp32 accumulation and reduction) against the bf16 reference: losses
# within 7.5e-6, grad norms within 1e-4, weights within 4.2e-4 — where the bf16 runs differ from the fp32 reference
# by 1e-4, 1.8e-3 and 0.14, so these tolerances still separate bf16 from fp32 training, let alone a factor of 2.
TOLERANCES = {"fp32": {"loss": 1e-6, "grad_norm": 1e-5, "weights": 1e-4},
              "bf16": {"loss": 3e-5, "grad_norm": 4e-4, "weights": 2e-3}}

VARIANTS = {}  # name: (processes, engine, zero stage, precision)
for processes in (1, 2):
    for engine, stage in (("deepspeed", 0), ("deepspeed", 1), ("deepspeed", 2), ("deepspeed", 3), ("fsdp2", 0)):
        label = f"zero{stage}" if engine == "deepspeed" else engine
        VARIANTS[f"{label}-{processes}"] = (processes, engine, stage, "fp32")
        # DeepSpeed refuses ZeRO-0 in bf16 (no fp32 accumulation or settable master weights there); two-process
        # bf16 runs cover FSDP2 and the paper's ZeRO-2 and ZeRO-3, one process covers every stage.
        if (engine, stage) != ("deepspeed", 0) and (processes == 1 or stage != 1):
            VARIANTS[f"{label}-{processes}-bf16"] = (processes, engine, stage, "bf16")
# One process is fast (3-8 s a run) and runs in the default fast suite; two processes are the slow, distributed half.
PARAMS = [pytest.param(name, marks=[] if VARIANTS[name][0] == 1 else [pytest.mark.slow, pytest.mark.distributed])
          for name in VARIANTS]


def reference_training(config_path, bf16: bool = False) -> dict:
    """Per-step loss and pre-clip grad norm, and the final weights, from a plain loop over the same windows.

    bf16: mixed precision as both engines do it: fp32 master weights and optimizer, forward and backward with a
    bf16 copy of every parameter, gradients accumulated and clipped in fp32.
    """
    config = load_config(config_path)
    t, o = config.trainer, config.optim
    manifest, fingerprint = load_manifest(config.data.path)
    split = cache_split(config.data.path, manifest, fingerprint, "train", config.data.cache_dir)
    windows = TokenWindows(split, manifest.dtype, t.seq_len)
    global_windows = t.global_batch_tokens // t.seq_len
    loader = GlobalBatchLoader(windows, fingerprint, config.seed, global_windows, rank=0, world_size=1, prefetch=0)
    torch.manual_seed(config.seed)
    model = build_model(resolve_run_model_config(config, int(manifest.tokenizer["vocab_size"])))
    compute = copy.deepcopy(model).to(torch.bfloat16) if bf16 else model
    optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay, o.decay_embeddings), lr=o.lr,
                                  betas=o.betas, eps=o.eps)
    micro_batches = global_windows // t.micro_batch_size
    losses, grad_norms, window_hashes = [], [], []
    for step in range(t.max_steps):
        window_hashes.append(hashlib.blake2b(loader.global_indices(loader.windows_consumed).tobytes(),
                                             digest_size=8).hexdigest())
        batch = loader.next_batch()  # [windows, seq_len + 1]
        if bf16:
            with torch.no_grad():
                for low, master in zip(compute.parameters(), model.parameters()):
                    low.copy_(master)
        step_losses = []
        for chunk in batch.split(t.micro_batch_size):
            logits = compute(chunk[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1).float(), chunk[:, 1:].flatten())
            (loss / micro_batches).backward()
            step_losses.append(loss.item())
            if bf16:
                for low, master in zip(compute.parameters(), model.parameters()):
                    if low.grad is not None:
                        master.grad = low.grad.float() if master.grad is None else master.grad + low.grad.float()
                compute.zero_grad(set_to_none=True)
        grad_norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip).item())
        lr = learning_rate(step, t.max_steps, o.lr, config.schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(sum(step_losses) / len(step_losses))
    return {"loss": losses, "grad_norm": grad_norms, "windows_hash": window_hashes, "weights": model.state_dict()}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("engine_reference")


@pytest.fixture(scope="module")
def reference(workdir, dataset_path):
    """The reference loop's results per precision, computed on first use."""
    results = {}

    def get(precision: str) -> dict:
        if precision not in results:
            config = write_config(workdir / f"reference-{precision}.yaml", dataset_path, workdir / "reference",
                                  **SETTINGS)
            results[precision] = reference_training(config, bf16=precision == "bf16")
        return results[precision]

    return get


def engine_run(workdir, dataset_path, name) -> dict:
    processes, engine, stage, precision = VARIANTS[name]
    config = write_config(workdir / f"{name}.yaml", dataset_path, workdir / name, **SETTINGS,
                          **{"parallel.engine": engine, "parallel.zero_stage": stage, "trainer.precision": precision})
    run(train_command(0 if processes == 1 else processes, config))
    weights = load_file(str(workdir / name / "export" / "model.safetensors"))  # the end-of-run export
    return {"metrics": metrics(workdir / name), "weights": weights}


def relative(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


@pytest.mark.parametrize("name", PARAMS)
def test_engine_matches_the_reference_loop(workdir, dataset_path, reference, name):
    precision = VARIANTS[name][3]
    want, tol = reference(precision), TOLERANCES[precision]
    result = engine_run(workdir, dataset_path, name)
    records = result["metrics"]
    assert sorted(records) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        record, want_loss, want_norm = records[step], want["loss"][step - 1], want["grad_norm"][step - 1]
        assert relative(record["loss"], want_loss) <= tol["loss"], (name, step, record["loss"], want_loss)
        assert relative(record["grad_norm"], want_norm) <= tol["grad_norm"], (name, step, record["grad_norm"],
                                                                               want_norm)
        assert want_norm > SETTINGS["optim.grad_clip"]  # the clip really acted at this step
    weights = result["weights"]
    assert set(weights) == set(want["weights"])
    for key, expected in want["weights"].items():
        assert weights[key].dtype == torch.float32  # bf16 runs export their fp32 master weights
        error = (weights[key] - expected).abs().max().item() / max(expected.abs().max().item(), 1e-12)
        assert error <= tol["weights"], (name, key, error)
    # The data side: same windows in the same order on every engine and world size, and the metrics a user reads.
    assert [records[s]["windows_hash"] for s in range(1, STEPS + 1)] == want["windows_hash"]
    record = records[3]
    assert record["tokens"] == 3 * 1024 and record["seq_len"] == 64
    assert math.isclose(record["lr"], learning_rate(2, STEPS, 3e-3, load_config(workdir / f"{name}.yaml").schedule))
    for key in ("tokens_per_s", "step_time_s"):
        assert record[key] > 0


def test_reference_learns(reference):
    losses = reference("fp32")["loss"]
    assert losses[-1] < losses[0] - 0.3


def test_deepspeed_bf16_accumulates_and_reduces_in_fp32(tmp_path, dataset_path):
    from tape_pretrain.config import ConfigError
    from tape_pretrain.distributed.deepspeed_engine import deepspeed_config
    from tape_pretrain.distributed.env import DistEnv

    env = DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"), backend="gloo")
    config = load_config(write_config(tmp_path / "c.yaml", dataset_path, tmp_path / "run", **SETTINGS,
                                      **{"trainer.precision": "bf16", "parallel.zero_stage": 2}))
    ds = deepspeed_config(config, env, grad_accum=4)
    assert ds["bf16"]["enabled"] and ds["data_types"]["grad_accum_dtype"] == "fp32"
    assert ds["communication_data_type"] == "fp32"
    config.parallel.zero_stage = 0
    with pytest.raises(ConfigError, match="ZeRO-0 in bf16"):
        deepspeed_config(config, env, grad_accum=4)
