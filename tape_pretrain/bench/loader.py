"""bench loader: tokens/s the loader delivers from the local cache, batches built exactly as the trainer does; and
data.access=stream against copy from an S3-compatible server on loopback."""

from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from tape_pretrain.bench.timing import format_result
from tape_pretrain.data.cache import cache_split
from tape_pretrain.data.loader import GlobalBatchLoader, TokenWindows, WindowSource
from tape_pretrain.data.manifest import load_manifest
from tape_pretrain.data.prep import PrepOptions, prepare
from tape_pretrain.data.stream import StreamPrefetcher, open_stream_cache
from tape_pretrain.data.tokenizer import train_tokenizer


def prepared_dataset(tmp: str, source: str = "builtin:python-stdlib") -> str:
    tok = str(Path(tmp) / "tok.model")
    train_tokenizer([source], vocab_size=4096, out=tok, max_sentences=300)
    out = str(Path(tmp) / "ds")
    prepare(PrepOptions(inputs=[source], tokenizer=tok, out=out, workers=2, shard_tokens=1_000_000,
                        val_fraction=0.02, progress=False))
    return out


def _rate(loader: GlobalBatchLoader, seq_len: int, micro_batch_size: int, batches: int) -> float:
    start = time.perf_counter()
    tokens = 0
    for _ in range(batches):
        batch = loader.next_batch()
        for chunk in batch.tokens.split(micro_batch_size):  # the trainer's micro-batch reshape (to seq_len / 4)
            inputs = chunk[:, :-1].reshape(-1, seq_len // 4)
            tokens += inputs.numel()
    return tokens / (time.perf_counter() - start)


@contextlib.contextmanager
def loopback_s3():
    """The endpoint of moto's S3-compatible server on 127.0.0.1, with dummy credentials in the environment while
    it runs (None when moto is not installed)."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        yield None
        return
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                                            "AWS_ENDPOINT_URL")}
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=f"http://{host}:{port}")
    try:
        yield f"http://{host}:{port}"
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


def stream_vs_copy(local_url: str, tmp: str, seq_len: int = 256, global_windows: int = 32, micro_batch_size: int = 8,
                   evicting_batches: int = 20) -> dict:
    """The dataset uploaded to a loopback S3 server, then read for one epoch at the tiny preset's batch (bench
    train's 32 x 256): copy mode's fetch before step 0, and its tokens/s from the local copy; stream mode's tokens/s
    over the same batches with every shard cached (stream_vs_copy: what streaming costs per window), from a cold
    cache that holds the split (each shard fetched and verified once, while reading, with the prefetcher ahead),
    and from a cache of half the split (evicting: shards fetched again)."""
    import fsspec

    with loopback_s3() as endpoint:
        if endpoint is None:
            print("loader: stream vs copy skipped: moto is not installed (pip install 'moto[server]')")
            return {}
        fs = fsspec.filesystem("s3", endpoint_url=endpoint, skip_instance_cache=True)
        fs.mkdir("bench-loader")
        fs.put(local_url, "bench-loader/ds", recursive=True)
        url = "s3://bench-loader/ds"
        manifest, fp = load_manifest(url)
        start = time.perf_counter()
        split = cache_split(url, manifest, fp, "train", str(Path(tmp) / "copy-cache"))
        fetch_s = time.perf_counter() - start
        split_bytes = sum(s.num_bytes + s.docs_num_bytes for s in manifest.splits["train"])

        def loader_over(data) -> GlobalBatchLoader:
            return GlobalBatchLoader(TokenWindows(data, manifest.dtype, seq_len), fp, 0, global_windows, 0, 1,
                                     prefetch=0)

        def epoch_rate(loader: GlobalBatchLoader, batches: int) -> float:
            loader.load_state_dict({**loader.state_dict(), "epoch": 0, "tokens_consumed": 0})
            prefetcher = StreamPrefetcher(loader, 4) if loader is not copy else None
            try:
                return _rate(loader, seq_len, micro_batch_size, batches)
            finally:
                if prefetcher is not None:
                    prefetcher.close()

        copy = loader_over(split)
        batches = copy.windows.num_windows // global_windows  # one epoch: stream fetches every shard once
        epoch_rate(copy, 20)  # warm-up (torch's first calls)
        result = {"copy_fetch_s": fetch_s}
        cache = open_stream_cache(str(Path(tmp) / "stream-cache"), split_bytes)
        stream = loader_over(cache.add_split(url, manifest, fp, "train"))
        result["stream_cold_tokens_per_s"] = epoch_rate(stream, batches)
        result["stream_cold_fetched_x_split"] = cache.fetched_bytes / split_bytes
        rates = {"copy": [], "stream": []}
        for _ in range(3):  # every shard cached now: alternate, so that machine noise hits both alike
            rates["copy"].append(epoch_rate(copy, batches))
            rates["stream"].append(epoch_rate(stream, batches))
        result["copy_tokens_per_s"] = statistics.median(rates["copy"])
        result["stream_tokens_per_s"] = statistics.median(rates["stream"])
        assert torch.equal(copy.rank_batch(0).tokens, stream.rank_batch(0).tokens)  # the same data, by both
        cache.close()
        cache = open_stream_cache(str(Path(tmp) / "evicting-cache"), split_bytes // 2)
        evicting = loader_over(cache.add_split(url, manifest, fp, "train"))
        result["stream_evicting_tokens_per_s"] = epoch_rate(evicting, evicting_batches)
        result["stream_evicting_fetched_x_split"] = cache.fetched_bytes / split_bytes
        cache.close()
    print(f"loader: stream vs copy from S3 on loopback, {len(split.shards)} shards ({split_bytes / 1e6:.1f} MB), "
          f"{global_windows}x{seq_len + 1} tokens per batch; copy fetched the split in {fetch_s:.2f} s before its "
          f"timing; stream read one epoch ({batches} batches) from a cold cache holding the split, then again warm, "
          f"and {evicting_batches} batches through a cache of half the split (evicting); prefetcher on, no loader "
          "thread")
    result["stream_vs_copy"] = result["stream_tokens_per_s"] / result["copy_tokens_per_s"]
    result["stream_cold_vs_copy"] = result["stream_cold_tokens_per_s"] / result["copy_tokens_per_s"]
    result["stream_evicting_vs_copy"] = result["stream_evicting_tokens_per_s"] / result["copy_tokens_per_s"]
    return result


def run(seq_len: int = 1024, global_windows: int = 64, micro_batch_size: int = 8, batches: int = 200) -> dict:
    """Tokens/s of today's path, of the same batches with document ids (document mode, and causal mode's boundary
    metric), and of a 3-source mixture (weights 0.5/0.3/0.2 over three copies of the data), measured side by side."""
    with tempfile.TemporaryDirectory() as tmp:
        url = prepared_dataset(tmp)
        manifest, fp = load_manifest(url)
        split = cache_split(url, manifest, fp, "train", str(Path(tmp) / "cache"))
        windows = TokenWindows(split, manifest.dtype, seq_len)
        mixture = [WindowSource(name, windows, weight, fp) for name, weight in (("a", 0.5), ("b", 0.3), ("c", 0.2))]
        loaders = {"loader_tokens_per_s": GlobalBatchLoader(windows, fp, 0, global_windows, 0, 1, prefetch=0),
                   "documents_tokens_per_s": GlobalBatchLoader(windows, fp, 0, global_windows, 0, 1, prefetch=0,
                                                               documents=windows.has_documents),
                   "mixture_tokens_per_s": GlobalBatchLoader(mixture, fp, 0, global_windows, 0, 1, prefetch=0)}
        result = {name: _rate(loader, seq_len, micro_batch_size, batches) for name, loader in loaders.items()}
        streamed = stream_vs_copy(url, tmp)
    print(f"loader: {batches} global batches of {global_windows}x{seq_len + 1} tokens from {len(split.shards)} "
          f"cached shards, one process, no prefetch thread; document ids "
          f"{'included' if windows.has_documents else 'NOT recorded by this prep'}")
    result["documents_vs_plain"] = result["documents_tokens_per_s"] / result["loader_tokens_per_s"]
    result["mixture_vs_plain"] = result["mixture_tokens_per_s"] / result["loader_tokens_per_s"]
    result.update(streamed)
    print(format_result(result))
    return result
