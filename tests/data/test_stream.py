"""data.access=stream: the train split read through a bounded cache from an S3-compatible server on loopback (or a
shared disk, for a mixture) gives bitwise the batches (and document ids) of copy mode, evicting and after a loader
state round trip; a tampered shard is refused when first read; a shard in use is never evicted; the prefetcher
fetches exactly what the loader reads; one training run per mode logs the same losses."""

import os
from concurrent.futures import ThreadPoolExecutor

import fsspec
import numpy as np
import pytest
import torch

from tape_pretrain.data import stream as stream_module
from tape_pretrain.data.cache import cache_split
from tape_pretrain.data.loader import GlobalBatchLoader, TokenWindows, WindowSource
from tape_pretrain.data.manifest import load_manifest
from tape_pretrain.data.stream import StreamPrefetcher, open_stream_cache
from tape_pretrain.errors import DataError
from tests.helpers import metrics, run, train_command, write_config

WINDOW = 64


@pytest.fixture
def remote(dataset_path, s3_env):
    """The test dataset in a fresh bucket: (url, manifest, fingerprint, s3 filesystem)."""
    fs = fsspec.filesystem("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], skip_instance_cache=True)
    fs.put(dataset_path, f"{s3_env}/ds", recursive=True)
    url = f"s3://{s3_env}/ds"
    manifest, fp = load_manifest(url)
    return url, manifest, fp, fs


def shard_bytes(manifest, i: int) -> int:
    shard = manifest.splits["train"][i]
    return shard.num_bytes + shard.docs_num_bytes


def stream_windows(tmp_path, url, manifest, fp, limit: int, name: str = "cache"):
    cache = open_stream_cache(str(tmp_path / name), limit)
    return cache, TokenWindows(cache.add_split(url, manifest, fp, "train"), manifest.dtype, WINDOW)


def test_stream_batches_are_copy_batches_while_evicting_and_after_a_state_round_trip(tmp_path, remote, monkeypatch):
    url, manifest, fp, _ = remote
    monkeypatch.setattr(stream_module, "PART_BYTES", 64 << 10)  # shards of many ranged reads, in several rounds
    monkeypatch.setattr(stream_module, "PARTS_AT_ONCE", 3)
    split_bytes = sum(shard_bytes(manifest, i) for i in range(len(manifest.splits["train"])))
    limit = split_bytes // 2  # half the split: shards are evicted and fetched again
    copy_windows = TokenWindows(cache_split(url, manifest, fp, "train", str(tmp_path / "copy")), manifest.dtype,
                                WINDOW)
    cache, windows = stream_windows(tmp_path, url, manifest, fp, limit)
    copy = GlobalBatchLoader(copy_windows, fp, 3, 16, 1, 2, prefetch=0, documents=True)
    stream = GlobalBatchLoader(windows, fp, 3, 16, 1, 2, prefetch=2, documents=True)  # the loader's thread reads
    prefetcher = StreamPrefetcher(stream, 4)

    def same_batches(count: int) -> None:
        for _ in range(count):
            a, b = copy.next_batch(), stream.next_batch()
            assert torch.equal(a.tokens, b.tokens) and torch.equal(a.document_ids, b.document_ids)

    same_batches(8)
    assert stream.state_dict() == copy.state_dict()
    assert cache.fetches > len(manifest.splits["train"]) and cache.peak_bytes <= limit  # evicted, within bounds
    state = stream.state_dict()
    stream.close()
    prefetcher.close()
    cache.close()
    cache, windows = stream_windows(tmp_path, url, manifest, fp, limit, "cache2")  # a new process, as it were
    stream = GlobalBatchLoader(windows, fp, 0, 16, 1, 2, prefetch=2, documents=True)
    prefetcher = StreamPrefetcher(stream, 4)
    stream.load_state_dict(state)
    same_batches(4)
    stream.close()
    prefetcher.close()
    cache.close()


def test_a_mixture_streamed_from_a_shared_disk_gives_the_copy_batches(tmp_path, dataset_path):
    manifest, fp = load_manifest(dataset_path)
    split_bytes = sum(shard_bytes(manifest, i) for i in range(len(manifest.splits["train"])))
    copy = TokenWindows(cache_split(dataset_path, manifest, fp, "train", str(tmp_path / "copy")), manifest.dtype,
                        WINDOW)
    cache = open_stream_cache(str(tmp_path / "cache"), split_bytes // 2)  # both sources share it
    streamed = [TokenWindows(cache.add_split(dataset_path, manifest, fp, "train"), manifest.dtype, WINDOW)
                for _ in range(2)]

    def mixture(a, b):
        return GlobalBatchLoader([WindowSource("a", a, 0.7, fp), WindowSource("b", b, 0.3, fp)], "mix", 1, 16, 0, 1,
                                 prefetch=0, documents=True)

    reference, stream = mixture(copy, copy), mixture(*streamed)
    prefetcher = StreamPrefetcher(stream, 3)
    for _ in range(6):
        a, b = reference.next_batch(), stream.next_batch()
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.document_ids, b.document_ids)
        assert np.array_equal(a.sources, b.sources)
    prefetcher.close()
    cache.close()


def test_a_tampered_shard_is_refused_when_first_read_naming_it(tmp_path, remote):
    url, manifest, fp, fs = remote
    bad = manifest.splits["train"][1]
    key = f"{url.removeprefix('s3://')}/{bad.path}"
    data = bytearray(fs.cat_file(key))
    data[100] ^= 1  # same size, other bytes
    fs.pipe_file(key, bytes(data))
    cache, windows = stream_windows(tmp_path, url, manifest, fp, 4 * shard_bytes(manifest, 0))
    first = windows.gather(np.array([0]))  # shard 0 is intact and reads
    assert first.shape == (1, WINDOW + 1)
    inside_bad = (bad.num_tokens // 2 + int(windows.starts[1])) // WINDOW
    with pytest.raises(DataError, match=rf"{bad.path}: sha256 mismatch \(content altered\)"):
        windows.gather(np.array([inside_bad]))
    assert not list((cache.directory / f"000-{fp[:16]}" / "train").glob("shard_000001*"))  # nothing of it kept
    cache.close()


def test_a_pinned_shard_is_never_evicted_and_oversized_shards_are_refused(tmp_path, remote):
    url, manifest, fp, _ = remote
    sizes = [shard_bytes(manifest, i) for i in range(4)]
    cache, windows = stream_windows(tmp_path, url, manifest, fp, max(sizes[:3]) * 2)  # two shards at a time
    tokens, _ = cache.acquire(0, 0, 0)  # a reader holds shard 0
    assert cache.prefetch([(0, 1), (0, 2), (0, 3)]) >= 1  # the prefetcher wants room
    assert tokens[0] is not None and cache.peak_bytes <= cache.limit_bytes  # shard 0 stayed
    expected = np.fromfile(cache.directory / f"000-{fp[:16]}" / manifest.splits["train"][0].path, dtype=manifest.dtype)
    assert np.array_equal(tokens[0][:WINDOW], expected[:WINDOW])
    cache.release(0, 0, 0)
    cache.close()
    small = open_stream_cache(str(tmp_path / "small"), sizes[0] - 1)
    with pytest.raises(DataError, match=rf"train/shard_000000.bin with its document offsets is {sizes[0]:,} bytes "
                                        rf".*more than this rank's stream cache of {sizes[0] - 1:,} bytes"):
        small.add_split(url, manifest, fp, "train")
    small.close()


def test_the_prefetcher_plans_exactly_the_shards_the_loader_reads(tmp_path, remote):
    url, manifest, fp, _ = remote
    cache, windows = stream_windows(tmp_path, url, manifest, fp, 1 << 30)
    loader = GlobalBatchLoader(windows, fp, 5, 16, 1, 2, prefetch=0)
    prefetcher = StreamPrefetcher(loader, 1)
    prefetcher.close()  # planning only, from this thread
    read = []
    acquire = cache.acquire

    def logged(split, first, last):
        read.extend((split, i) for i in range(first, last + 1))
        return acquire(split, first, last)

    cache.acquire = logged
    for position in (0, 16, 48):
        read.clear()
        loader.rank_batch(position)
        planned = prefetcher.plan(position)[cache]
        assert list(dict.fromkeys(planned)) == list(dict.fromkeys(read))  # the same shards, in the same order
    cache.close()


def test_one_training_run_per_mode_logs_the_same_losses(tmp_path, remote):
    url, *_ = remote
    commands = [train_command(0, write_config(tmp_path / f"{access}.yaml", url, tmp_path / access, **{
        "parallel.engine": "ddp", "trainer.max_steps": 3, "data.access": access,
        "data.stream_cache_gib": 0.001}))  # about 1 MB: a third of the train split
        for access in ("copy", "stream")]
    with ThreadPoolExecutor(2) as pool:  # side by side: one process each
        list(pool.map(lambda command: run(command, timeout=120), commands))
    losses = {access: {step: r["loss_hex"] for step, r in metrics(tmp_path / access).items()}
              for access in ("copy", "stream")}
    assert losses["stream"] == losses["copy"] and sorted(losses["copy"]) == [1, 2, 3]
    assert list((tmp_path / "cache" / "stream").iterdir()) == []  # the run's stream cache went with its process
