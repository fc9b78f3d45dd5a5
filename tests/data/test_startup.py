"""Start-up (data.access=copy): a node's first rank fetches with progress and its own deadline, the node's other
ranks wait on a marker file (not a collective) and stop with one clear line when it fails or the deadline passes;
markers of other launches are never taken; preflight compares the cache disk with what the data will need."""

import io
import os
import re
import shutil
import threading
import time

import fsspec
import pytest
import torch

from tape_pretrain.config import RunConfig
from tape_pretrain.data.cache import CachedSplit, FetchProgress, NodeHandshake, cache_split
from tape_pretrain.data.manifest import load_manifest
from tape_pretrain.distributed.env import DistEnv
from tape_pretrain.distributed.preflight import bytes_the_data_fetches, preflight
from tape_pretrain.errors import DataError


def node(cache, url, fp, launch="launch-1", split="train"):
    return NodeHandshake(cache, url, fp, split, launch)


def lead_in_thread(handshake, fetch):
    """The leader, in a thread of its own (another local rank, as far as the marker file is concerned)."""
    failures = []

    def lead():
        try:
            handshake.lead(fetch)
        except Exception as exc:
            failures.append(exc)
    thread = threading.Thread(target=lead)
    thread.start()
    return thread, failures


@pytest.fixture
def tampered(dataset_path, tmp_path):
    """A copy of the test dataset whose second train shard has one byte changed."""
    copy = tmp_path / "ds"
    shutil.copytree(dataset_path, copy)
    manifest, fp = load_manifest(str(copy))
    shard = copy / manifest.splits["train"][1].path
    data = bytearray(shard.read_bytes())
    data[10] ^= 1
    shard.write_bytes(bytes(data))
    return str(copy), manifest, fp


def test_a_waiting_rank_gets_the_leaders_failure_in_one_line(tmp_path, tampered):
    url, manifest, fp = tampered
    cache = tmp_path / "cache" / fp[:16]
    leader = node(cache, url, fp)
    thread, failures = lead_in_thread(leader, lambda: (time.sleep(0.3), cache_split(
        url, manifest, fp, "train", str(tmp_path / "cache")))[1])
    with pytest.raises(DataError) as waited:
        node(cache, url, fp).wait(timeout_s=30, poll_s=0.05)
    thread.join()
    message = str(waited.value)
    assert "\n" not in message
    assert message.startswith(f"data: the node's leader (local rank 0) failed to fetch {url} (train split): ")
    assert message.endswith(str(failures[0]))  # the leader's own error, word for word
    assert "train/shard_000001.bin: sha256 mismatch" in message


def test_a_multi_line_leader_error_reaches_the_waiting_rank_as_one_line(tmp_path):
    cache = tmp_path / "cache"

    def fail():
        raise RuntimeError("connection reset\n  while reading s3://bucket/ds/train/shard_000000.bin")

    thread, _ = lead_in_thread(node(cache, "s3://bucket/ds", "f" * 64), fail)
    thread.join()
    with pytest.raises(DataError, match=r"failed to fetch s3://bucket/ds \(train split\): RuntimeError: connection "
                                        r"reset while reading s3://bucket/ds/train/shard_000000.bin$"):
        node(cache, "s3://bucket/ds", "f" * 64).wait(timeout_s=5)


def test_the_waiting_ranks_reuse_the_leaders_verified_copies(tmp_path, dataset_path):
    manifest, fp = load_manifest(dataset_path)
    cache = tmp_path / "cache" / fp[:16]
    calls = []

    def fetch():
        calls.append(1)
        return cache_split(dataset_path, manifest, fp, "val", str(tmp_path / "cache"))

    thread, failures = lead_in_thread(node(cache, dataset_path, fp, split="val"), fetch)
    got = node(cache, dataset_path, fp, split="val").wait(timeout_s=30, poll_s=0.05)
    thread.join()
    assert not failures and len(calls) == 1  # one fetch on the node
    assert got.to_json() == cache_split(dataset_path, manifest, fp, "val", str(tmp_path / "cache")).to_json()


def test_the_deadline_is_one_clear_error_and_other_launches_markers_are_never_taken(tmp_path):
    cache, url, fp = tmp_path / "cache", "s3://bucket/ds", "a" * 64
    earlier = node(cache, url, fp, launch="earlier-run")
    earlier.lead(lambda: CachedSplit([]))  # done, by an earlier launch
    node(cache, url, fp, launch="earlier-run", split="val")._write({"status": "failed", "error": "old news"})
    start = time.monotonic()
    with pytest.raises(DataError) as waited:
        node(cache, url, fp, launch="this-run").wait(timeout_s=0.5, poll_s=0.05)
    assert 0.5 <= time.monotonic() - start < 5
    assert str(waited.value) == (
        "data: the node's leader (local rank 0) did not finish fetching s3://bucket/ds (train split) within 0.5 s "
        "(data.fetch_timeout_s and a grace period): its own output shows its progress or error; raise "
        "data.fetch_timeout_s for a slow store or a large split, or set data.access=stream")
    with pytest.raises(DataError, match="did not finish"):  # a failed marker of another launch is not this one's
        node(cache, url, fp, launch="this-run", split="val").wait(timeout_s=0.2, poll_s=0.05)


def test_the_leader_removes_only_its_own_kind_of_stale_marker(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    old_marker = node(cache, "s3://b/ds", "b" * 64, launch="old")
    old_marker._write({"status": "done", "result": {"shards": [], "skipped": []}})
    fresh = node(cache, "s3://b/ds", "b" * 64, launch="fresh-but-concurrent")
    fresh._write({"status": "done", "result": {"shards": [], "skipped": []}})
    others = [cache / "keep.txt", cache / ".node-train-user.json", cache / "verified.json"]
    for path in others:
        path.write_text("not ours")
    day_ago = time.time() - 86_400
    for path in [old_marker.path, *others]:
        os.utime(path, (day_ago, day_ago))
    node(cache, "s3://b/ds", "b" * 64, launch="new").lead(lambda: CachedSplit([]))
    assert not old_marker.path.exists() and fresh.path.exists()
    assert all(p.exists() for p in others)


def test_the_leader_reports_progress_and_stops_at_its_deadline(tmp_path, dataset_path, s3_env):
    fs = fsspec.filesystem("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], skip_instance_cache=True)
    fs.put(dataset_path, f"{s3_env}/ds", recursive=True)
    url = f"s3://{s3_env}/ds"
    manifest, fp = load_manifest(url)
    shards = manifest.splits["train"]
    out = io.StringIO()
    cache_split(url, manifest, fp, "train", str(tmp_path / "cache"),
                progress=FetchProgress(f"{url} (train)", rank=3, interval_s=0.0, stream=out))
    lines = out.getvalue().splitlines()
    pattern = (rf"data: node \S+ rank 3: fetched (\d+)/{len(shards)} shards of {url} \(train\) "
               r"\(\d+\.\d\d/\d+\.\d\d GB, \d+ MB/s, eta \S+\)")
    assert all(re.fullmatch(pattern, line) for line in lines), lines
    assert [int(re.fullmatch(pattern, line)[1]) for line in lines][-1] == len(shards)
    with pytest.raises(DataError, match=rf"{url}: fetching and verifying the val split took longer than "
                                        r"data.fetch_timeout_s=0 s \(0 of 2 shards done\)"):
        cache_split(url, manifest, fp, "val", str(tmp_path / "cache"), timeout_s=0.0)


def test_preflight_compares_the_cache_disk_with_what_the_data_needs(tmp_path, dataset_path, s3_env):
    fs = fsspec.filesystem("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], skip_instance_cache=True)
    fs.put(dataset_path, f"{s3_env}/ds", recursive=True)
    url = f"s3://{s3_env}/ds"
    manifest, fp = load_manifest(url)
    config = RunConfig()
    config.data.path, config.data.cache_dir, config.run_dir = url, str(tmp_path / "cache"), str(tmp_path / "run")
    every = sum(s.num_bytes + s.docs_num_bytes for split in ("train", "val") for s in manifest.splits[split])
    assert bytes_the_data_fetches(config, [(url, manifest, fp)]) == every
    cache_split(url, manifest, fp, "val", config.data.cache_dir)
    val = sum(s.num_bytes + s.docs_num_bytes for s in manifest.splits["val"])
    assert bytes_the_data_fetches(config, [(url, manifest, fp)]) == every - val  # cached files are not counted
    assert bytes_the_data_fetches(config, [(dataset_path, manifest, fp)]) == 0  # read in place
    config.data.access, config.data.stream_cache_gib = "stream", 2.0
    assert bytes_the_data_fetches(config, [(url, manifest, fp)]) == 2 * 2**30  # the val split is cached already
    config.data.stream_cache_gib = 1e9  # an exabyte
    env = DistEnv(0, 1, 0, 1, torch.device("cpu"), "gloo")
    _, problems = preflight(config, env)
    assert any(re.search(rf"{config.data.cache_dir} has [\d.]+ GiB free but data.access=stream may fill about "
                         r"[\d.]+ GiB of it", p) for p in problems), problems
