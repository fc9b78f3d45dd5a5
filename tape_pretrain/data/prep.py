"""`tape-pretrain prep`: tokenize sources into checksummed shards with a manifest, on any fsspec URL.

Determinism: documents are read in a fixed order, assigned to train/val by their index, and grouped
into chunks of at most ``chunk_docs`` consecutive documents (or ``chunk_bytes`` of text) of one split.
Chunks are tokenized in parallel but written in order, and a shard closes after the chunk that brings it
to ``shard_tokens``. The output therefore depends on the inputs, the tokenizer and the options, never
on the worker count.

Resumability: each closed shard gets a journal entry under ``_prep/`` (checksum, documents covered).
A re-run keeps the shards whose checksums still match, skips the documents they cover without
tokenizing them, and writes the rest. The manifest is written last; a re-run of a finished prep is a no-op.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import multiprocessing
import os
import re
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tape_pretrain.data.manifest import MANIFEST, SPLITS, TOKENIZER, Manifest, ShardInfo, sha256_file
from tape_pretrain.data.sources import TEXT_NORMALIZATION, SourceStats, check_inputs, iter_documents
from tape_pretrain.data.storage import exists, is_local, join, open_url, read_bytes, write_bytes_atomic
from tape_pretrain.data.tokenizer import Tokenizer
from tape_pretrain.errors import DataError

JOURNAL = "_prep"
# Fault-injection hook for tests: seconds to pause after each shard, so a kill can land mid-run.
_SLEEP_PER_SHARD = float(os.environ.get("TAPE_PRETRAIN_PREP_SLEEP_PER_SHARD", "0"))


@dataclass
class PrepOptions:
    inputs: list[str]
    tokenizer: str
    out: str
    workers: int = 1
    val_fraction: float = 0.005
    shard_tokens: int = 100_000_000
    text_field: str = "text"
    overwrite: bool = False
    dtype: str = "auto"
    chunk_docs: int = 64
    chunk_bytes: int = 256 << 10
    storage_options: dict[str, Any] = field(default_factory=dict)
    progress: bool = True


def in_val_split(index: int, fraction: float) -> bool:
    """Exactly floor(n * fraction) of the first n documents go to val, evenly spread."""
    return int((index + 1) * fraction) > int(index * fraction)


# ---- worker side -------------------------------------------------------------------------------

_WORKER_TOKENIZER: Tokenizer | None = None


def _init_worker(model_bytes: bytes) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = Tokenizer.from_bytes(model_bytes)


def _encode_chunk(job: tuple[str, list[str]]) -> tuple[str, np.ndarray, int]:
    split, texts = job
    tokens, num_docs = _WORKER_TOKENIZER.encode_documents(texts)
    return split, tokens, num_docs


# ---- writer side -------------------------------------------------------------------------------

@dataclass
class JournalEntry:
    shard: ShardInfo
    end_doc: int
    """Documents of this split covered by this shard and the ones before it."""


class ShardWriter:
    """Accumulates one split's chunks and writes a shard (then its journal entry) when it is full."""

    def __init__(self, fs, root: str, split: str, shard_tokens: int, done: list[JournalEntry]):
        self.fs, self.root, self.split, self.shard_tokens = fs, root, split, shard_tokens
        self.entries = list(done)
        self.pending: list[np.ndarray] = []
        self.pending_tokens = self.pending_docs = 0

    @property
    def docs_done(self) -> int:
        return self.entries[-1].end_doc if self.entries else 0

    def add(self, tokens: np.ndarray, num_docs: int) -> None:
        self.pending.append(tokens)
        self.pending_tokens += len(tokens)
        self.pending_docs += num_docs
        if self.pending_tokens >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        data = np.concatenate(self.pending).tobytes()
        index = len(self.entries)
        rel = f"{self.split}/shard_{index:06d}.bin"
        write_bytes_atomic(self.fs, join(self.root, rel), data)
        shard = ShardInfo(path=rel, num_tokens=self.pending_tokens, num_docs=self.pending_docs,
                          num_bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
        entry = JournalEntry(shard, self.docs_done + self.pending_docs)
        journal = {"shard": asdict(shard), "end_doc": entry.end_doc}
        write_bytes_atomic(self.fs, join(self.root, JOURNAL, f"{self.split}_{index:06d}.json"),
                           json.dumps(journal).encode())
        self.entries.append(entry)
        self.pending, self.pending_tokens, self.pending_docs = [], 0, 0
        if _SLEEP_PER_SHARD:
            time.sleep(_SLEEP_PER_SHARD)


def _completed_shards(fs, root: str, split: str) -> list[JournalEntry]:
    """Journal entries, in order, whose shard still exists with the recorded checksum."""
    entries = []
    while True:
        path = join(root, JOURNAL, f"{split}_{len(entries):06d}.json")
        if not exists(fs, path):
            return entries
        try:
            raw = json.loads(read_bytes(fs, path))
            entry = JournalEntry(ShardInfo(**raw["shard"]), int(raw["end_doc"]))
        except (ValueError, KeyError, TypeError):
            return entries
        shard_path = join(root, entry.shard.path)
        if not exists(fs, shard_path) or sha256_file(fs, shard_path) != (entry.shard.sha256, entry.shard.num_bytes):
            return entries
        entries.append(entry)


# ---- the pipeline ------------------------------------------------------------------------------

def _recipe(options: PrepOptions, tokenizer: Tokenizer, dtype: str) -> dict[str, Any]:
    return {"inputs": list(options.inputs), "text_field": options.text_field, "val_fraction": options.val_fraction,
            "shard_tokens": options.shard_tokens, "chunk_docs": options.chunk_docs,
            "chunk_bytes": options.chunk_bytes, "dtype": dtype,
            "tokenizer_sha256": tokenizer.sha256, "text_normalization": TEXT_NORMALIZATION}


def _resolve_dtype(options: PrepOptions, tokenizer: Tokenizer) -> str:
    dtype = tokenizer.token_dtype().name if options.dtype == "auto" else options.dtype
    if dtype not in ("uint16", "uint32"):
        raise DataError(f"--dtype {dtype!r} must be auto, uint16 or uint32")
    if tokenizer.vocab_size - 1 > np.iinfo(dtype).max:
        raise DataError(f"{options.tokenizer}: vocab size {tokenizer.vocab_size} does not fit {dtype} token ids")
    return dtype


def _what_differs(existing, recipe: dict) -> str:
    if not isinstance(existing, dict):
        return "other files" if existing == "unknown files" else "a dataset whose manifest cannot be read"
    keys = sorted(k for k in recipe.keys() | existing.keys() if recipe.get(k) != existing.get(k))
    return f"a dataset prepared differently (differs in: {', '.join(keys)})"


def _prepare_destination(fs, root: str, options: PrepOptions, recipe: dict) -> bool:
    """Returns True when the dataset at the destination is already complete and identical."""
    manifest_path, recipe_path = join(root, MANIFEST), join(root, JOURNAL, "recipe.json")
    existing = None
    if exists(fs, manifest_path):
        try:
            existing = Manifest.from_bytes(read_bytes(fs, manifest_path), manifest_path).source.get("recipe")
        except DataError:
            existing = "unreadable"
        if existing == recipe:
            return True
    elif exists(fs, recipe_path):
        existing = json.loads(read_bytes(fs, recipe_path))
        if existing == recipe:
            return False  # an interrupted run of the same prep: resume it
    elif exists(fs, root) and fs.ls(root, detail=False):
        existing = "unknown files"
    if existing is not None:
        if not options.overwrite:
            raise DataError(f"{options.out} already holds {_what_differs(existing, recipe)}; "
                            "pass --overwrite to replace it")
        _remove_previous_prep(fs, root, options.out)
    return False


_PREP_FILE = re.compile(rf"^(?:{re.escape(MANIFEST)}|{re.escape(TOKENIZER)}|{JOURNAL}/[^/]+|(?:train|val)/"
                        r"shard_\d{6}\.bin)(?:\.tmp)?$")
"""What prep writes (a .tmp is an interrupted atomic write): --overwrite deletes these and nothing else."""


def _remove_previous_prep(fs, root: str, out: str) -> None:
    """--overwrite: delete a previous prep's files, refusing (before deleting anything) if the destination holds any
    file prep did not write: a mistyped --out must not cost a user their data."""
    base = root.rstrip("/")
    files = sorted(path[len(base) + 1:] for path in fs.find(base))
    foreign = [rel for rel in files if not _PREP_FILE.match(rel)]
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise DataError(f"{out} holds {foreign[0]!r}{more}, which prep did not write; --overwrite deletes only a "
                        "previous prep's files: move them, or choose another --out")
    if MANIFEST in files:
        fs.rm(join(root, MANIFEST))  # the dataset stops existing before any of its shards is touched
    for rel in files:
        if rel != MANIFEST:
            fs.rm(join(root, rel))
    if is_local(fs):
        for sub in (JOURNAL, "train", "val"):
            with contextlib.suppress(OSError):
                os.rmdir(join(root, sub))  # only if empty


def _check_out_against_inputs(options: PrepOptions) -> None:
    """--out must not be a file, nor contain an input (an --overwrite, or shards written beside the inputs, would
    mix or destroy them)."""
    if "://" in options.out and not options.out.startswith("file://"):
        return
    out = Path(options.out.removeprefix("file://")).expanduser().resolve()
    if out.is_file():
        raise DataError(f"--out {options.out} is a file; give a directory for the dataset")
    for source in options.inputs:
        source = str(source)
        if source.startswith("builtin:") or ("://" in source and not source.startswith("file://")):
            continue
        literal = source.removeprefix("hf:").removeprefix("file://").split("*")[0].split("?")[0].split("[")[0]
        if not literal or (source.startswith("hf:") and not literal.startswith("/")):
            continue  # a hub dataset name
        path = Path(literal).expanduser().resolve()
        if path == out or out in path.parents:
            raise DataError(f"--input {source} lies inside --out {options.out}: write the dataset elsewhere")


def prepare(options: PrepOptions) -> Manifest:
    if options.workers < 1:
        raise DataError(f"--workers must be at least 1, got {options.workers}")
    if not 0 <= options.val_fraction < 1:
        raise DataError(f"--val-fraction must be in [0, 1), got {options.val_fraction}")
    if options.chunk_docs <= 0:
        raise DataError(f"--chunk-docs must be positive, got {options.chunk_docs}")
    if options.shard_tokens <= 0:
        raise DataError(f"--shard-tokens must be positive, got {options.shard_tokens}")
    tokenizer = Tokenizer.load(options.tokenizer, options.storage_options)
    dtype = _resolve_dtype(options, tokenizer)
    recipe = _recipe(options, tokenizer, dtype)
    _check_out_against_inputs(options)
    check_inputs([str(s) for s in options.inputs], options.storage_options)  # before --overwrite deletes anything
    fs, root = open_url(options.out, options.storage_options)
    if _prepare_destination(fs, root, options, recipe):
        manifest = Manifest.from_bytes(read_bytes(fs, join(root, MANIFEST)), options.out)
        print(f"prep: {options.out} is already complete and identical; nothing to do")
        return manifest
    fs.makedirs(root, exist_ok=True)
    write_bytes_atomic(fs, join(root, JOURNAL, "recipe.json"), json.dumps(recipe).encode())
    write_bytes_atomic(fs, join(root, TOKENIZER), tokenizer.model_bytes)

    writers = {split: ShardWriter(fs, root, split, options.shard_tokens, _completed_shards(fs, root, split))
               for split in SPLITS}
    reused = sum(len(w.entries) for w in writers.values())
    if reused:
        print(f"prep: resuming; {reused} shard(s) already written and verified")
    stats = SourceStats()
    started = time.perf_counter()
    progress = _progress(options.progress)

    def jobs():
        pending: dict[str, list[str]] = {split: [] for split in SPLITS}
        pending_bytes = dict.fromkeys(SPLITS, 0)
        seen = dict.fromkeys(SPLITS, 0)
        for index, text in enumerate(iter_documents(options.inputs, options.text_field, stats,
                                                    options.storage_options)):
            split = "val" if in_val_split(index, options.val_fraction) else "train"
            seen[split] += 1
            if progress is not None:
                progress.update(1)
            if seen[split] <= writers[split].docs_done:
                continue  # already in a verified shard
            pending[split].append(text)
            pending_bytes[split] += len(text)
            # small chunks keep the workers evenly loaded to the end; a chunk depends only on its documents
            if len(pending[split]) == options.chunk_docs or pending_bytes[split] >= options.chunk_bytes:
                yield split, pending[split]
                pending[split], pending_bytes[split] = [], 0
        for split in SPLITS:
            if pending[split]:
                yield split, pending[split]

    total_tokens = 0
    try:
        for split, tokens, num_docs in _run_jobs(jobs(), tokenizer, options.workers):
            writers[split].add(tokens, num_docs)
            total_tokens += len(tokens)
            if progress is not None:
                elapsed = time.perf_counter() - started
                progress.set_postfix(tokens=f"{total_tokens:,}", MBps=f"{stats.bytes_read / 1e6 / elapsed:.1f}",
                                     refresh=False)
        for writer in writers.values():
            writer.flush()
    finally:
        if progress is not None:
            progress.close()
    if stats.documents == 0:
        raise DataError(f"{', '.join(options.inputs)}: the corpus is empty (no non-empty documents)")

    manifest = Manifest(
        tokenizer={"sha256": tokenizer.sha256, "vocab_size": tokenizer.vocab_size, "path": TOKENIZER,
                   **tokenizer.special_ids()},
        dtype=dtype, splits={split: [e.shard for e in w.entries] for split, w in writers.items()},
        source={"recipe": recipe},
        stats={"documents": stats.documents, "empty_skipped": stats.empty_skipped,
               "invalid_utf8_replaced": stats.invalid_utf8_replaced, "nul_removed": stats.nul_removed,
               "newlines_normalized": stats.newlines_normalized})
    write_bytes_atomic(fs, join(root, MANIFEST), manifest.to_bytes())
    elapsed = time.perf_counter() - started
    print(f"prep: {stats.documents:,} documents ({stats.empty_skipped} empty skipped, "
          f"{stats.invalid_utf8_replaced} with invalid UTF-8 replaced, {stats.nul_removed} with NUL removed, "
          f"{stats.newlines_normalized} with CR line endings normalized); "
          + ", ".join(f"{s}: {manifest.num_tokens(s):,} tokens in {len(manifest.splits[s])} shards" for s in SPLITS)
          + f"; {elapsed:.1f}s; written to {options.out}")
    if options.val_fraction > 0 and not manifest.splits["val"]:
        print("prep: warning: the val split is empty; raise --val-fraction for a corpus this small")
    return manifest


def _progress(enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(unit="doc", desc="prep", mininterval=1.0, delay=2.0)  # quick runs and errors stay quiet


def _run_jobs(jobs, tokenizer: Tokenizer, workers: int):
    """Encode chunks in order; in this process for one worker, else in a pool with bounded look-ahead."""
    if workers == 1:
        for split, texts in jobs:
            tokens, num_docs = tokenizer.encode_documents(texts)
            yield split, tokens, num_docs
        return
    # Forking is fast but unsafe once other threads run (s3fs/gcsfs event loops hold locks): spawn then.
    method = "fork" if threading.active_count() == 1 and "fork" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    with context.Pool(workers, initializer=_init_worker, initargs=(tokenizer.model_bytes,)) as pool:
        in_flight: collections.deque = collections.deque()
        for job in jobs:
            in_flight.append(pool.apply_async(_encode_chunk, (job,)))
            if len(in_flight) >= 4 * workers:
                yield in_flight.popleft().get()
        while in_flight:
            yield in_flight.popleft().get()
