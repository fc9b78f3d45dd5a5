"""metrics.jsonl across a resume: the steps of the attempt that did not survive, and a line half-written by a
kill -9, are dropped; the steps up to the checkpoint are kept as they were."""

import json

import pytest

from tape_pretrain.config import LoggingConfig
from tape_pretrain.train.metrics import MetricsWriter, peak_flops_for


def steps_in(path):
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_resume_keeps_steps_up_to_the_checkpoint_and_drops_a_half_written_line(tmp_path):
    lines = [json.dumps({"step": step, "loss": 1.0 / step}) for step in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 6, "lo')
    writer = MetricsWriter(tmp_path, LoggingConfig(), {}, resume_step=3, run_name="r", wandb_id=None)
    writer.log({"step": 4, "loss": 0.5})
    writer.close()
    assert steps_in(tmp_path / "metrics.jsonl") == [1, 2, 3, 4]
    assert (tmp_path / "metrics.jsonl").read_text().splitlines()[:3] == lines[:3]
    assert not list(tmp_path.glob("*.tmp"))


def test_a_fresh_run_starts_a_fresh_file(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 9}) + "\n")
    writer = MetricsWriter(tmp_path, LoggingConfig(), {}, resume_step=None, run_name="r", wandb_id=None)
    writer.log({"step": 1, "loss": 2.0})
    writer.close()
    assert steps_in(tmp_path / "metrics.jsonl") == [1]


@pytest.mark.slow
def test_empty_val_split_warns_once_at_start(tmp_path, corpus_dir, tokenizer_path):
    from tape_pretrain.data.prep import PrepOptions, prepare
    from tests.helpers import run, train_command, write_config

    prepare(PrepOptions(inputs=[str(corpus_dir / "*.jsonl")], tokenizer=tokenizer_path, out=str(tmp_path / "ds"),
                        val_fraction=0.0, progress=False))
    cfg = write_config(tmp_path / "c.yaml", str(tmp_path / "ds"), tmp_path / "run",
                       **{"trainer.max_steps": 2, "trainer.eval_interval": 1})
    out = run(train_command(0, cfg)).stdout
    assert out.count("no val_loss will be logged") == 1
    assert out.index("no val_loss will be logged") < out.index("step 1/")


@pytest.mark.slow
def test_val_loss_at_several_lengths(tmp_path, dataset_path):
    """trainer.eval_length_multipliers: val_loss@N beside val_loss, each the loss of the final weights over the same
    val tokens cut into windows of N (the reference here reads the split and the export independently)."""
    import math

    import numpy as np
    import torch

    from tape_pretrain.data.cache import cache_split
    from tape_pretrain.data.manifest import load_manifest
    from tape_pretrain.train.export import load_export_model
    from tests.helpers import run, train_command, write_config

    cfg = write_config(tmp_path / "c.yaml", dataset_path, tmp_path / "run", **{
        "trainer.max_steps": 3, "trainer.eval_interval": 2, "trainer.eval_batches": 1, "trainer.micro_batch_size": 8,
        "trainer.eval_length_multipliers": [1, 2, 4], "parallel.engine": "ddp"})
    run(train_command(0, cfg))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [2, 3]  # the interval and the last step
    for r in evals:
        assert {"val_loss@64", "val_loss@128", "val_loss@256"} <= r.keys()
        assert all(math.isfinite(r[k]) for k in r if k.startswith("val_loss"))
        assert r["val_loss@64"] == r["val_loss"]
        assert len({r["val_loss@64"], r["val_loss@128"], r["val_loss@256"]}) == 3
    assert not any(k.startswith("val_loss@") for r in records if "loss" in r for k in r)

    manifest, fingerprint = load_manifest(dataset_path)
    split = cache_split(dataset_path, manifest, fingerprint, "val", str(tmp_path / "cache"))
    tokens = torch.from_numpy(np.concatenate([np.fromfile(s.path, dtype=manifest.dtype) for s in split.shards])
                              .astype(np.int64))[:8 * 64 + 1]  # eval_batches x micro_batch_size windows of 64
    model = load_export_model(str(tmp_path / "run" / "export"))
    for n in (64, 128, 256):
        windows = torch.stack([tokens[i:i + n + 1] for i in range(0, 8 * 64, n)])  # the same 512 tokens
        with torch.no_grad():
            logits = model(windows[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten()).item()
        assert loss == pytest.approx(evals[-1][f"val_loss@{n}"], rel=1e-5), n


@pytest.mark.parametrize("overrides, message", [
    (["trainer.eval_length_multipliers=[1, 0]"], "must be positive integers, got 0"),
    (["trainer.eval_length_multipliers=[16]", "trainer.eval_batches=1", "trainer.micro_batch_size=8"],
     r"16 x seq_len is longer than the 8 windows .* raise trainer.eval_batches to at least 2"),
])
def test_bad_eval_length_multipliers_are_config_errors(overrides, message):
    from tape_pretrain.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)
    load_config(None, ["trainer.eval_length_multipliers=[16]", "trainer.eval_batches=0"])  # no evaluation at all


def test_an_eval_length_longer_than_the_val_split_is_refused_at_start(tmp_path, dataset_path):
    from types import SimpleNamespace

    from tape_pretrain.config import ConfigError, load_config
    from tape_pretrain.data.cache import cache_split
    from tape_pretrain.data.manifest import load_manifest
    from tape_pretrain.train.training_data import SourceData, _val_windows

    manifest, fingerprint = load_manifest(dataset_path)
    split = cache_split(dataset_path, manifest, fingerprint, "val", str(tmp_path / "cache"))
    seq_len, ranks = 64, 2
    fits = (split.num_tokens - 1) // (seq_len * ranks)  # the longest multiple with a window for each of 2 ranks
    config = load_config(None, [f"data.path={dataset_path}", f"trainer.seq_len={seq_len}", "trainer.eval_batches=999",
                                f"trainer.eval_length_multipliers=[1, {fits}, {fits + 1}]"])
    env = SimpleNamespace(world_size=ranks, is_main=True)
    source = SourceData("main", dataset_path, 1.0, manifest, fingerprint)
    with pytest.raises(ConfigError, match=rf"{fits + 1} x seq_len = {(fits + 1) * seq_len} tokens needs 2 window"):
        _val_windows(config, env, source, split)
    config.trainer.eval_length_multipliers = [1, fits]
    windows = _val_windows(config, env, source, split)
    assert list(windows) == [seq_len, fits * seq_len]
    assert windows[fits * seq_len].num_windows >= ranks


@pytest.mark.parametrize("device_name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H100 NVL", 835), ("NVIDIA H200", 989),
    ("NVIDIA GH200 480GB", 989), ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA B200", 2250), ("NVIDIA L40", 181),
    ("NVIDIA L40S", 362), ("NVIDIA L4", 121), ("Some Unknown GPU", None),
])
def test_peak_flops_tell_apart_the_variants_of_one_gpu(device_name, tflops):
    """MFU's denominator: the most specific name wins (an H100 PCIe is not an SXM part, an L40 not an L4)."""
    peak = peak_flops_for(device_name)
    assert (peak is None if tflops is None else peak == tflops * 1e12), (device_name, peak)
