"""Document attention on a 3-source mixture, 2 processes, across a curriculum phase change: SIGTERM and kill -9
resume bitwise; per-source val losses and token counts, and no token attends across a document. A dataset prepared
before document offsets still trains (causally) and document mode names what is missing."""

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import (
    alive,
    base_env,
    descendants,
    kill_tree,
    metrics,
    run,
    start_training,
    train_command,
    write_config,
)
from tests.train.test_resume import CURRICULUM, assert_bitwise_after, wait_for_step

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

WEIGHTS = {"stdlib": 0.5, "notes": 0.3, "more": 0.2}


@pytest.fixture(scope="module")
def sources(tmp_path_factory, corpus_dir, tokenizer_path):
    """Three datasets of one tokenizer, each with document offsets."""
    from tape_pretrain.data.prep import PrepOptions, prepare
    from tests.conftest import stdlib_texts

    root = tmp_path_factory.mktemp("mixture")
    (root / "more.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in stdlib_texts(40, skip=120)))
    inputs = {"stdlib": corpus_dir / "*.jsonl", "notes": corpus_dir / "*.txt", "more": root / "more.jsonl"}
    for name, source in inputs.items():
        prepare(PrepOptions(inputs=[str(source)], tokenizer=tokenizer_path, out=str(root / name),
                            shard_tokens=20_000, val_fraction=0.1, progress=False))
    return [{"path": str(root / name), "name": name, "weight": w} for name, w in WEIGHTS.items()]


def mixture_config(tmp_path, sources, name, interval):
    return write_config(tmp_path / f"{name}.yaml", None, tmp_path / name, **{
        "data.path": None, "data.sources": sources, "model.attention": "document", "parallel.engine": "fsdp2",
        "parallel.zero_stage": 0, "trainer.max_steps": 10, "curriculum": CURRICULUM, "trainer.eval_interval": 5,
        "checkpoint.interval": interval})


def test_document_mode_mixture_resumes_bitwise_after_sigterm_and_kill_9(tmp_path, sources):
    run(train_command(2, mixture_config(tmp_path, sources, "reference", interval=3)))
    reference = metrics(tmp_path / "reference")
    assert {r["seq_len"] for r in reference.values()} == {32, 64}
    assert all(r["boundary_crossing_fraction"] == 0 for r in reference.values())
    last = reference[10]
    assert sum(last[f"tokens/{name}"] for name in WEIGHTS) == 10 * 2048
    for name, weight in WEIGHTS.items():
        assert abs(last[f"tokens/{name}"] / (10 * 2048) - weight) < 0.05
    evaluations = [json.loads(line) for line in (tmp_path / "reference" / "metrics.jsonl").read_text().splitlines()
                   if "val_loss" in line]
    assert evaluations and all(f"val_loss/{name}" in evaluations[-1] for name in WEIGHTS)
    weighted = sum(w * evaluations[-1][f"val_loss/{name}"] for name, w in WEIGHTS.items())
    assert evaluations[-1]["val_loss"] == pytest.approx(weighted, rel=1e-12)

    cmd = train_command(2, mixture_config(tmp_path, sources, "sigterm", interval=0))
    proc = start_training(cmd, step_sleep=0.5)
    wait_for_step(tmp_path / "sigterm", 3, proc)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    saved = sorted((tmp_path / "sigterm" / "checkpoints").glob("step_*/COMPLETE"))
    assert len(saved) == 1
    stopped_at = int(saved[0].parent.name.split("_")[1])
    run(cmd)
    assert_bitwise_after(metrics(tmp_path / "sigterm"), reference, stopped_at)

    cmd = train_command(2, mixture_config(tmp_path, sources, "kill", interval=3))
    proc = start_training(cmd, step_sleep=0.3)
    wait_for_step(tmp_path / "kill", 5, proc)
    workers = descendants(proc.pid)
    kill_tree(proc.pid)
    proc.wait(timeout=30)
    time.sleep(1)
    assert not [p for p in workers if alive(p)]
    assert "step_00000003" in run(cmd).stdout
    assert_bitwise_after(metrics(tmp_path / "kill"), reference, 3)


def test_a_dataset_without_document_offsets_trains_causally_and_refuses_document_mode(tmp_path, dataset_path):
    old = tmp_path / "old"
    shutil.copytree(dataset_path, old)
    manifest = json.loads((old / "manifest.json").read_text())
    for shards in manifest["splits"].values():
        for shard in shards:  # as written before document offsets existed
            shard.pop("docs_path", None), shard.pop("docs_sha256", None)
    (old / "manifest.json").write_text(json.dumps(manifest))
    config = write_config(tmp_path / "old.yaml", str(old), tmp_path / "run", **{
        "parallel.engine": "ddp", "trainer.max_steps": 2, "trainer.eval_interval": 0})
    run(train_command(0, config))
    records = metrics(tmp_path / "run")
    assert max(records) == 2 and "boundary_crossing_fraction" not in records[2]
    result = subprocess.run([sys.executable, "-m", "tape_pretrain.cli", "train", str(config),
                             f"run_dir={tmp_path / 'document'}", "model.attention=document"],
                            env=base_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: model.attention=document needs document "
                                                             "boundaries, but ")
