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
import json
import math
from pathlib import Path

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
from tape_pretrain.train.export import export_checkpoint
from tape_pretrain.train.resume import resolve_run_model_config
from tape_pretrain.train.schedule import learning_rate
from tests.helpers import metrics, run, train_command, write_config

STEPS = 5
# 16 windows of 64 tokens per step in micro-batches of 4: accumulation 4 on one process, 2 on two. The pre-clip
# grad norm is 0.49-0.76 over these steps, so a clip at 0.4 is active at every step. Cosine after 2 warmup steps.
# Three heads of width 16: TAPE's 3x3 gamma matrix has 9 elements, which 2 ranks cannot split evenly (ZeRO-3 pads).
SETTINGS = {"trainer.max_steps": STEPS, "trainer.global_batch_tokens": 1024, "trainer.micro_batch_size": 4,
            "optim.grad_clip": 0.4, "schedule.name": "cosine", "schedule.warmup_steps": 2,
            "model.hidden_size": 48, "model.num_heads": 3, "model.ffn_hidden_size": 96}
# Relative errors; weights as ||w - w_ref|| / ||w_ref|| per tensor. Measured over every variant (fp32): losses
# 1.0e-7, grad norms 1.7e-7, weights 1.4e-6; missing weight decay alone moves weights by about 1.5e-3 in 5 steps.
# bf16 (bf16 compute, fp32 master weights, accumulation, reduction and clipping) against the bf16 reference loop:
# losses 7.8e-8, grad norms 4.6e-7, weights 2.5e-7 (3.8e-6, 6.1e-5, 9.3e-4 before per-name init and TAPE's one-call
# CPU attention), where the same runs differed from fp32 training by 1e-4 (loss) and 1.8e-3 (grad norm); DeepSpeed
# starting from bf16-rounded weights (no fp32 master reset) moved losses 3.3e-5.
TOLERANCES = {"fp32": {"loss": 1e-6, "grad_norm": 1e-6, "weights": 1e-5},
              "bf16": {"loss": 1.5e-5, "grad_norm": 2e-4, "weights": 2e-3}}

VARIANTS = {}  # name: (processes, engine, zero stage, precision, encoding)
for processes in (1, 2):
    for engine, stage in (("deepspeed", 0), ("deepspeed", 1), ("deepspeed", 2), ("deepspeed", 3), ("fsdp2", 0)):
        label = f"zero{stage}" if engine == "deepspeed" else engine
        VARIANTS[f"{label}-{processes}"] = (processes, engine, stage, "fp32", "tape")
        if (engine, stage) != ("deepspeed", 0):  # DeepSpeed has no fp32 accumulation at ZeRO-0: refused in bf16
            VARIANTS[f"{label}-{processes}-bf16"] = (processes, engine, stage, "bf16", "tape")
# FIRE's one-element parameters (0-dim ones failed at start-up on FSDP2 and on DeepSpeed with 2 ranks).
VARIANTS["fsdp2-1-fire"] = (1, "fsdp2", 0, "fp32", "fire")
VARIANTS["zero2-2-fire"] = (2, "deepspeed", 2, "fp32", "fire")
VARIANTS["ddp-1"] = (1, "ddp", 0, "fp32", "tape")
# Document attention: the engine hands each micro-batch's document ids to the model as the reference loop does.
VARIANTS["zero2-1-document"] = (1, "deepspeed", 2, "fp32", "tape")
VARIANTS["ddp-2"] = (2, "ddp", 0, "fp32", "tape")
# HSDP: 2 replicas of 2 shards. Micro-batches of 2 keep accumulation at 2 on 4 ranks. Not reshard_after_forward,
# so the other FSDP2 setting is exercised too.
VARIANTS["hsdp-4"] = (4, "fsdp2", 0, "fp32", "tape")
# Enough val windows (400 of 64 tokens) that the evaluation crosses document boundaries.
EXTRA_SETTINGS = {"zero2-1-document": {"model.attention": "document", "trainer.eval_batches": 100},
                  "hsdp-4": {"parallel.replicate_degree": 2, "trainer.micro_batch_size": 2,
                             "parallel.reshard_after_forward": False}}
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
    documents = config.model.attention == "document"
    loader = GlobalBatchLoader(windows, fingerprint, config.seed, global_windows, rank=0, world_size=1, prefetch=0,
                               documents=True)  # ids for document attention, and for the boundary metric
    torch.manual_seed(config.seed)
    model = build_model(resolve_run_model_config(config, int(manifest.tokenizer["vocab_size"])))
    compute = copy.deepcopy(model).to(torch.bfloat16) if bf16 else model
    optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay, o.decay_embeddings), lr=o.lr,
                                  betas=o.betas, eps=o.eps)
    micro_batches = global_windows // t.micro_batch_size
    losses, grad_norms, window_hashes, crossing = [], [], [], []
    for step in range(t.max_steps):
        window_hashes.append(hashlib.blake2b(loader.global_indices(loader.windows_consumed).tobytes(),
                                             digest_size=8).hexdigest())
        batch = loader.next_batch()  # [windows, seq_len + 1]
        # inputs whose context reaches into another document: none under document attention
        inputs_ids = batch.document_ids[:, :-1]
        crossing.append(0.0 if documents else float((inputs_ids != inputs_ids[:, :1]).sum()) / inputs_ids.numel())
        ids = batch.document_ids.split(t.micro_batch_size) if documents else [None] * micro_batches
        if bf16:
            with torch.no_grad():
                for low, master in zip(compute.parameters(), model.parameters()):
                    low.copy_(master)
        step_losses = []
        for chunk, chunk_ids in zip(batch.tokens.split(t.micro_batch_size), ids):
            logits = compute(chunk[:, :-1], document_ids=None if chunk_ids is None else chunk_ids[:, :-1])
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
    # val_loss as the trainer defines it: the first eval_batches x micro_batch_size val windows of seq_len per rank,
    # for each count of windows an engine run evaluates (its ranks' windows follow one another)
    val = TokenWindows(cache_split(config.data.path, manifest, fingerprint, "val", config.data.cache_dir),
                       manifest.dtype, t.seq_len)
    val_losses = {}
    for count in (4 * t.eval_batches, 8 * t.eval_batches, 16 * t.eval_batches):
        tokens, val_ids = (torch.from_numpy(a) for a in val.gather(range(count), True))
        assert not documents or (val_ids[:, :-1] != val_ids[:, :1]).any(), "no val window crosses a document"
        with torch.no_grad():
            val_losses[count] = tuple(
                F.cross_entropy(model.eval()(tokens[:, :-1], document_ids=ids).flatten(0, 1),
                                tokens[:, 1:].flatten()).item()
                for ids in (val_ids[:, :-1] if documents else None, None))
    return {"loss": losses, "grad_norm": grad_norms, "windows_hash": window_hashes, "weights": model.state_dict(),
            "boundary_crossing_fraction": crossing, "val_losses": val_losses}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("engine_reference")


@pytest.fixture(scope="module")
def reference(workdir, dataset_path):
    """The reference loop's results per precision, computed on first use."""
    results = {}

    def get(precision: str, encoding: str, attention: str = "causal", eval_batches: int = 1) -> dict:
        if (precision, encoding, attention) not in results:
            config = write_config(workdir / f"reference-{precision}-{encoding}-{attention}.yaml", dataset_path,
                                  workdir / "reference", **SETTINGS, **{"model.positional.name": encoding,
                                                                        "model.attention": attention,
                                                                        "trainer.eval_batches": eval_batches})
            results[precision, encoding, attention] = reference_training(config, bf16=precision == "bf16")
        return results[precision, encoding, attention]

    return get


def export_weights(directory: Path) -> dict[str, torch.Tensor]:
    """An export's tensors in our naming (non-RoPE exports prefix them with the Hugging Face wrapper's "model.")."""
    return {k.removeprefix("model."): v for k, v in load_file(str(directory / "model.safetensors")).items()}


def engine_run(workdir, dataset_path, name) -> dict:
    processes, engine, stage, precision, encoding = VARIANTS[name]
    config = write_config(workdir / f"{name}.yaml", dataset_path, workdir / name, **{**SETTINGS, **{
        "parallel.engine": engine, "parallel.zero_stage": stage, "trainer.precision": precision,
        "model.positional.name": encoding}, **EXTRA_SETTINGS.get(name, {})})
    stdout = run(train_command(0 if processes == 1 else processes, config)).stdout
    if engine == "fsdp2":  # the layout the parameters really have (HSDP: replicated across 2, sharded within 2)
        hsdp = "replicate_degree" in str(EXTRA_SETTINGS.get(name, {}))
        layout = ("{'replicate': 2, 'shard': 2}, placements ['R', 'S(0)'], reshard_after_forward=False" if hsdp
                  else f"{{'shard': {processes}}}, placements ['S(0)'], reshard_after_forward=True")
        assert f"fsdp2: parameters on mesh {layout}" in stdout
    weights = export_weights(workdir / name / "export")  # the end-of-run export: live weights
    # the last checkpoint consolidated offline, through the engine's interface (export_checkpoint -> consolidate)
    export_checkpoint(str(workdir / name), str(workdir / f"{name}-consolidated"))
    consolidated = export_weights(workdir / f"{name}-consolidated")
    return {"metrics": metrics(workdir / name), "weights": weights, "consolidated": consolidated}


def relative(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


@pytest.mark.parametrize("name", PARAMS)
def test_engine_matches_the_reference_loop(workdir, dataset_path, reference, name):
    precision, encoding = VARIANTS[name][3:]
    extra = EXTRA_SETTINGS.get(name, {})
    want = reference(precision, encoding, extra.get("model.attention", "causal"), extra.get("trainer.eval_batches", 1))
    tol = TOLERANCES[precision]
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
    assert set(weights) == set(want["weights"]) == set(result["consolidated"])
    for key, value in result["consolidated"].items():  # offline consolidation is exactly the live fp32 weights
        assert torch.equal(value, weights[key]), (name, key)
    for key, expected in want["weights"].items():
        if key.endswith("positional.mlp.2.bias"):
            # FIRE's output bias adds one constant per head to every logit of a row: softmax cancels it, so its
            # gradient is zero up to rounding, and Adam turns that rounding into full-size steps of random sign.
            continue
        error = ((weights[key] - expected).norm() / max(expected.norm().item(), 1e-12)).item()
        assert error <= tol["weights"], (name, key, error)
        if precision == "bf16" and weights[key].numel() >= 16 and weights[key].abs().max() > 0:
            # the export holds the fp32 master weights (and unrounded frozen ones), not the bf16 module copy
            assert not torch.equal(weights[key], weights[key].to(torch.bfloat16).float()), (name, key)
    # The data side: same windows in the same order on every engine and world size, and the metrics a user reads.
    assert [records[s]["windows_hash"] for s in range(1, STEPS + 1)] == want["windows_hash"]
    # every rank's count of tokens that see across a document boundary, summed
    assert [records[s]["boundary_crossing_fraction"] for s in range(1, STEPS + 1)] == pytest.approx(
        want["boundary_crossing_fraction"], abs=1e-12)
    if precision == "fp32":  # the final evaluation, with document attention where the run trains with it
        val = [json.loads(line) for line in (workdir / name / "metrics.jsonl").read_text().splitlines()
               if "val_loss" in line][-1]
        windows = extra.get("trainer.eval_batches", 1) * extra.get("trainer.micro_batch_size", 4) * VARIANTS[name][0]
        want_val, causal_val = want["val_losses"][windows]
        error = abs(val["val_loss"] - want_val)
        assert error <= tol["weights"] * want_val, (name, val["val_loss"], want_val)
        if want_val != causal_val:  # document mode: closer to it than to causal attention
            assert error < abs(want_val - causal_val) / 10, (name, val["val_loss"], want_val, causal_val)
    record = records[3]
    assert record["tokens"] == 3 * 1024 and record["seq_len"] == 64
    assert math.isclose(record["lr"], learning_rate(2, STEPS, 3e-3, load_config(workdir / f"{name}.yaml").schedule))
    for key in ("tokens_per_s", "step_time_s"):
        assert record[key] > 0


def test_reference_learns(reference):
    losses = reference("fp32", "tape")["loss"]
    assert losses[-1] < losses[0] - 0.3


def test_deepspeed_bf16_accumulates_and_reduces_in_fp32(tmp_path, dataset_path):
    from tape_pretrain.config import ConfigError
    from tape_pretrain.distributed.deepspeed_engine import deepspeed_config
    from tape_pretrain.distributed.engine import EngineSetup
    from tape_pretrain.distributed.env import DistEnv

    env = DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"), backend="gloo")
    config = load_config(write_config(tmp_path / "c.yaml", dataset_path, tmp_path / "run", **SETTINGS,
                                      **{"trainer.precision": "bf16", "parallel.zero_stage": 2}))
    ds = deepspeed_config(EngineSetup.from_run(config, env, grad_accum=4))
    assert ds["bf16"]["enabled"] and ds["data_types"]["grad_accum_dtype"] == "fp32"
    assert ds["communication_data_type"] == "fp32"
    assert "overlap_comm" not in ds["zero_optimization"]  # null on a CPU: DeepSpeed's own default
    config.parallel.overlap_comm = False
    zero = deepspeed_config(EngineSetup.from_run(config, env, grad_accum=4))["zero_optimization"]
    assert zero["overlap_comm"] is False
    config.parallel.zero_stage = 0
    with pytest.raises(ConfigError, match="ZeRO-0 in bf16"):
        deepspeed_config(EngineSetup.from_run(config, env, grad_accum=4))
