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


@pytest.mark.parametrize("device_name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H100 NVL", 835), ("NVIDIA H200", 989),
    ("NVIDIA GH200 480GB", 989), ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA B200", 2250), ("NVIDIA L40", 181),
    ("NVIDIA L40S", 362), ("NVIDIA L4", 121), ("Some Unknown GPU", None),
])
def test_peak_flops_tell_apart_the_variants_of_one_gpu(device_name, tflops):
    """MFU's denominator: the most specific name wins (an H100 PCIe is not an SXM part, an L40 not an L4)."""
    peak = peak_flops_for(device_name)
    assert (peak is None if tflops is None else peak == tflops * 1e12), (device_name, peak)
