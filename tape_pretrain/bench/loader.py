"""bench loader: tokens/s the loader delivers from the local cache, batches built exactly as the trainer does."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from tape_pretrain.bench.timing import format_result
from tape_pretrain.data.cache import cache_split
from tape_pretrain.data.loader import GlobalBatchLoader, TokenWindows, WindowSource
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


def _rate(loader: GlobalBatchLoader, seq_len: int, micro_batch_size: int, batches: int) -> float:
    start = time.perf_counter()
    tokens = 0
    for _ in range(batches):
        batch = loader.next_batch()
        for chunk in batch.tokens.split(micro_batch_size):  # the trainer's micro-batch reshape (to seq_len / 4)
            inputs = chunk[:, :-1].reshape(-1, seq_len // 4)
            tokens += inputs.numel()
    return tokens / (time.perf_counter() - start)


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
    print(f"loader: {batches} global batches of {global_windows}x{seq_len + 1} tokens from {len(split.shards)} "
          f"cached shards, one process, no prefetch thread; document ids "
          f"{'included' if windows.has_documents else 'NOT recorded by this prep'}")
    result["documents_vs_plain"] = result["documents_tokens_per_s"] / result["loader_tokens_per_s"]
    result["mixture_vs_plain"] = result["mixture_tokens_per_s"] / result["loader_tokens_per_s"]
    print(format_result(result))
    return result
