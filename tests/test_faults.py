"""Storage faults through a loopback proxy in front of the S3-compatible server: prep, training and
checkpointing give the fault-free results; an outage beyond the retry budget fails clearly and leaves the
last committed checkpoint loadable."""

import shutil
import time

import fsspec
import pytest

from tape_pretrain.data.manifest import verify_dataset
from tape_pretrain.data.prep import PrepOptions, prepare
from tests.fault_proxy import Fault, FaultProxy
from tests.helpers import base_env, metrics, run, train_command, write_config

pytestmark = [pytest.mark.slow]


@pytest.fixture
def proxied(s3_server, s3_env, monkeypatch):
    """(proxy, bucket): clients in this process and in subprocesses reach S3 through the fault proxy."""
    import s3fs

    proxy = FaultProxy(upstream=s3_server).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    monkeypatch.setenv("TAPE_PRETRAIN_STORAGE_BACKOFF_S", "0.05")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # leave the retrying to us, so faults reach our code
    s3fs.S3FileSystem.clear_instance_cache()
    yield proxy, s3_env
    proxy.stop()
    s3fs.S3FileSystem.clear_instance_cache()


def direct_tree(url, s3_server):
    """The stored objects, read straight from the server (not through the proxy)."""
    fs, root = fsspec.core.url_to_fs(url, endpoint_url=s3_server, skip_instance_cache=True)
    return {p[len(root):]: fs.cat_file(p) for p in fs.find(root) if "/_prep/" not in p}


def local_tree(path):
    fs, root = fsspec.core.url_to_fs(str(path))
    return {p[len(root):]: fs.cat_file(p) for p in fs.find(root) if "/_prep/" not in p}


def test_prep_and_verify_through_faults(tmp_path, corpus_dir, tokenizer_path, proxied, s3_server):
    proxy, bucket = proxied
    options = dict(inputs=[str(corpus_dir / "*.jsonl")], tokenizer=tokenizer_path, shard_tokens=60_000,
                   val_fraction=0.1, progress=False)
    prepare(PrepOptions(out=str(tmp_path / "local"), **options))
    proxy.faults = [Fault("503", method="PUT", times=3), Fault("500", method="HEAD", times=2),
                    Fault("latency", method="PUT", times=1, delay_s=1.0)]
    prepare(PrepOptions(out=f"s3://{bucket}/ds", **options))
    assert direct_tree(f"s3://{bucket}/ds", s3_server) == local_tree(tmp_path / "local")
    proxy.faults = [Fault("truncate", method="GET", path=r"shard_", times=2),
                    Fault("reset", method="GET", path=r"shard_", times=2)]
    assert verify_dataset(f"s3://{bucket}/ds").startswith("ok:")
    assert proxy.injected.get("503") == 3 and proxy.injected.get("truncate") == 2 and proxy.injected.get("reset") == 2


def test_training_and_checkpoints_through_faults(tmp_path, dataset_path, proxied, s3_server):
    proxy, bucket = proxied
    reference_cfg = write_config(tmp_path / "ref.yaml", dataset_path, tmp_path / "ref",
                                 **{"trainer.max_steps": 6, "checkpoint.interval": 2})
    run(train_command(0, reference_cfg))
    reference = metrics(tmp_path / "ref")

    fs = fsspec.filesystem("s3", endpoint_url=s3_server, skip_instance_cache=True)
    fs.put(dataset_path, f"{bucket}/ds", recursive=True)
    cfg = write_config(tmp_path / "c.yaml", f"s3://{bucket}/ds", f"s3://{bucket}/run", **{
        "trainer.max_steps": 6, "checkpoint.interval": 2, "checkpoint.staging_dir": str(tmp_path / "staging"),
        "data.cache_dir": str(tmp_path / "cache")})
    proxy.faults = [Fault("truncate", method="GET", path=r"shard_", times=2),
                    Fault("reset", method="GET", path=r"shard_", times=1),
                    Fault("503", method="PUT", path=r"checkpoints/", times=3),
                    Fault("reset", method="PUT", path=r"checkpoints/", times=1)]
    run(train_command(0, cfg, "trainer.stop_at_step=4"), env=base_env())
    shutil.rmtree(tmp_path / "staging")
    proxy.faults = [Fault("truncate", method="GET", path=r"checkpoints/", times=2),
                    Fault("503", method="GET", path=r"checkpoints/", times=2)]
    out = run(train_command(0, cfg), env=base_env())
    assert "resumed from" in out.stdout and "step_00000004" in out.stdout
    lines = fs.cat_file(f"{bucket}/run/metrics.jsonl").decode().splitlines()
    import json

    resumed = {r["step"]: r for r in map(json.loads, lines) if "loss" in r}
    assert [resumed[s]["loss_hex"] for s in range(1, 7)] == [reference[s]["loss_hex"] for s in range(1, 7)]
    assert sum(proxy.injected.values()) >= 4


def test_outage_beyond_the_budget_fails_clearly_and_keeps_the_last_checkpoint(tmp_path, dataset_path, proxied):
    proxy, bucket = proxied
    cfg = write_config(tmp_path / "c.yaml", dataset_path, f"s3://{bucket}/run", **{
        "trainer.max_steps": 6, "checkpoint.interval": 2, "checkpoint.staging_dir": str(tmp_path / "staging")})
    run(train_command(0, cfg, "trainer.stop_at_step=2"))
    proxy.outage(30)
    env = dict(base_env(), TAPE_PRETRAIN_STORAGE_RETRIES="3")
    start = time.time()
    failed = run(train_command(0, cfg), env=env, check=False)
    assert failed.returncode != 0 and time.time() - start < 60
    assert f"s3://{bucket}/run" in failed.stderr and "failed after 3 attempts" in failed.stderr
    assert failed.stderr.strip().splitlines()[-1].startswith("error:")
    proxy.outage_until = 0
    shutil.rmtree(tmp_path / "staging")
    out = run(train_command(0, cfg))
    assert "resumed from" in out.stdout and "step_00000002" in out.stdout
