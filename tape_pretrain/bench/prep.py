"""bench prep: raw SentencePiece encode vs the full prep pipeline (1 and 2 workers) on the same text."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from tape_pretrain.bench.timing import format_result
from tape_pretrain.data.prep import PrepOptions, prepare
from tape_pretrain.data.sources import iter_documents
from tape_pretrain.data.tokenizer import Tokenizer, train_tokenizer


def run(source: str = "builtin:python-stdlib", vocab_size: int = 8192) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        tok_path = str(Path(tmp) / "tok.model")
        train_tokenizer([source], vocab_size=vocab_size, out=tok_path, max_sentences=300)
        tokenizer = Tokenizer.load(tok_path)
        texts = list(iter_documents([source]))

        start = time.perf_counter()
        raw_tokens = sum(map(len, tokenizer.processor.encode(texts, out_type=int, num_threads=1)))
        raw_s = time.perf_counter() - start

        timings = {}
        for workers in (1, 2):
            start = time.perf_counter()
            manifest = prepare(PrepOptions(inputs=[source], tokenizer=tok_path, out=str(Path(tmp) / f"w{workers}"),
                                           workers=workers, shard_tokens=2_000_000, progress=False))
            timings[workers] = time.perf_counter() - start
        prep_tokens = manifest.num_tokens("train") + manifest.num_tokens("val")
    raw_rate = raw_tokens / raw_s
    rate = {w: prep_tokens / t for w, t in timings.items()}
    print(f"raw SentencePiece encode (1 thread): {raw_rate / 1e6:.2f}M tokens/s over {len(texts)} documents")
    for w, r in rate.items():
        print(f"prep pipeline, {w} worker(s):         {r / 1e6:.2f}M tokens/s (read, encode, write, sha256)")
    result = {"raw_tokens_per_s": raw_rate, "prep_over_raw_1w": rate[1] / raw_rate, "speedup_2w": rate[2] / rate[1]}
    print(format_result(result))
    return result
