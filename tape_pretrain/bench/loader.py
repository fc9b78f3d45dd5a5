"""bench loader: tokens/s the loader delivers from the local cache, batches built exactly as the trainer does."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from tape_pretrain.bench.timing import format_result
from tape_pretrain.data.cache import cache_split
from tape_pretrain.data.loader import GlobalBatchLoader, TokenWindows
from tape_pretrain.data.manifest import load_manifest
from tape_pretrain.data.prep import PrepOptions, prepare
from tape_pretrain.data.tokenizer import train_tokenizer


def prepared_dataset(tmp: str, source: str = "builtin:python-stdlib") -> str:
    tok = str(Path(tmp) / "tok.model")
    train_tokenizer([source], vocab_size=4096, out=tok, max_sentences=300)
    out = str(Path(tmp) / "ds")
    prepare(PrepOptions(inputs=[source], tokenizer=tok, out=out, workers=2, shard_tokens=1_000_000,
                        val_fraction=0.02, progress=False))
    return out


def run(seq_len: int = 1024, global_windows: int = 64, micro_batch_size: int = 8, batches: int = 200) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        url = prepared_dataset(tmp)
        manifest, fp = load_manifest(url)
        split = cache_split(url, manifest, fp, "train", str(Path(tmp) / "cache"))
        loader = GlobalBatchLoader(TokenWindows(split, manifest.dtype, seq_len), fp, 0, global_windows, 0, 1,
                                   prefetch=0)
        start = time.perf_counter()
        tokens = 0
        for _ in range(batches):
            batch = loader.next_batch()
            for chunk in batch.split(micro_batch_size):  # the trainer's micro-batch reshape (to seq_len / 4)
                inputs = chunk[:, :-1].reshape(-1, seq_len // 4)
                tokens += inputs.numel()
        elapsed = time.perf_counter() - start
    rate = tokens / elapsed
    print(f"loader: {batches} global batches of {global_windows}x{seq_len + 1} tokens from {len(split.shards)} "
          f"cached shards, one process, no prefetch thread")
    result = {"loader_tokens_per_s": rate}
    print(format_result(result))
    return result
