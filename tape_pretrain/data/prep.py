"""`tape-pretrain prep`: tokenize sources into checksummed shards, with document offsets and a manifest, on any
fsspec URL; on one machine, or in parts on several.

Layout: the corpus is cut into segments (``sources.list_segments``: runs of consecutive input files whose stored
sizes reach ``segment_bytes``; a ``hf:`` dataset is one segment). Within a segment, documents are assigned to
train/val by their index in the segment, and grouped into chunks of at most ``chunk_docs`` consecutive documents
(or ``chunk_bytes`` of text) of one split; a shard closes after the chunk that brings it to ``shard_tokens``, and
at the segment's end. Shards are named by segment (``shard_NNNNNN.bin`` when the corpus is one segment, else
``shard_SSSSS_NNNNNN.bin``), each with ``….docs.bin`` beside it: the uint64 token offset of every document it holds.
A segment's files therefore depend on its documents, the tokenizer, the options and the segment count alone:
never on the other segments, the worker count or the machine.

Parts: ``num_parts=P, part=i`` prepares the segments whose index is i modulo P and records them in a part marker;
parts may run at once on different machines, all writing to the same destination, and ``merge`` then checks that
every part finished with one recipe and writes the manifest. The result is byte-identical (``_prep/`` aside) to a
prep on one machine, which is itself one part followed by a merge.

Resumability: each closed shard gets a journal entry under ``_prep/`` (checksums, documents covered), each
finished segment a segment marker. A re-run keeps the segments and shards whose checksums still match, skips the
documents they cover without tokenizing them, and writes the rest. The manifest is written last; a re-run of a
finished prep is a no-op.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import itertools
import json
import multiprocessing
import os
import posixpath
import re
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tape_pretrain.data.manifest import (
    DOCS_DTYPE,
    MANIFEST,
    SPLITS,
    TOKENIZER,
    Manifest,
    ShardInfo,
    sha256_file,
)
from tape_pretrain.data.sources import (
    TEXT_NORMALIZATION,
    Segment,
    SourceStats,
    iter_segment_documents,
    list_segments,
)
from tape_pretrain.data.storage import exists, is_local, join, open_url, read_bytes, with_retries, write_bytes_atomic
from tape_pretrain.data.tokenizer import Tokenizer
from tape_pretrain.errors import DataError
from tape_pretrain.utils.progress import Progress

JOURNAL = "_prep"
SEGMENT_BYTES = 1 << 30
_STAT_KEYS = ("documents", "empty_skipped", "invalid_utf8_replaced", "nul_removed", "newlines_normalized")


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
    segment_bytes: int = SEGMENT_BYTES
    """Input files are grouped into segments of at least this many stored bytes (the unit a part prepares)."""
    num_parts: int = 1
    """Parts the preparation is split into (each may run on another machine); 1: prepare and merge here."""
    part: int = 0
    """Which part this run prepares, 0 to num_parts - 1."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    progress: bool = True


def in_val_split(index: int, fraction: float) -> bool:
    """Exactly floor(n * fraction) of the first n documents (of a segment) go to val, evenly spread."""
    return int((index + 1) * fraction) > int(index * fraction)


def shard_path(split: str, segment: int, index: int, num_segments: int) -> str:
    """A shard's path in the dataset: ``train/shard_000003.bin`` for a corpus of one segment, else
    ``train/shard_00002_000003.bin`` (segment 2, its fourth train shard)."""
    if num_segments == 1:
        return f"{split}/shard_{index:06d}.bin"
    return f"{split}/shard_{segment:05d}_{index:06d}.bin"


def docs_path(shard: str) -> str:
    """The document offsets file beside a shard: ``train/shard_000003.docs.bin``."""
    return shard.removesuffix(".bin") + ".docs.bin"


def _segment_marker(segment: int) -> str:
    return f"{JOURNAL}/segment_{segment:05d}.json"


def _part_marker(part: int, num_parts: int) -> str:
    return f"{JOURNAL}/part_{part:05d}_of_{num_parts:05d}.json"


def _segment_sha256(segment: Segment) -> str:
    """Identity of a segment's inputs (names and sizes): work recorded for other inputs is never reused."""
    return hashlib.sha256(json.dumps([segment.hf, segment.files]).encode()).hexdigest()


# ---- worker side -------------------------------------------------------------------------------

_WORKER_TOKENIZER: Tokenizer | None = None


def _init_worker(model_bytes: bytes) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = Tokenizer.from_bytes(model_bytes)


def _encode_chunk(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return _WORKER_TOKENIZER.encode_documents_with_starts(texts)


# ---- writer side -------------------------------------------------------------------------------

@dataclass
class JournalEntry:
    shard: ShardInfo
    end_doc: int
    """Documents of this split and segment covered by this shard and the ones before it."""


class ShardWriter:
    """Accumulates one split's chunks of one segment and writes a shard, then its document offsets, then its
    journal entry when it is full."""

    def __init__(self, fs, root: str, split: str, segment: Segment, num_segments: int, shard_tokens: int,
                 done: list[JournalEntry]):
        self.fs, self.root, self.split, self.shard_tokens = fs, root, split, shard_tokens
        self.segment, self.num_segments, self.segment_sha256 = segment.index, num_segments, _segment_sha256(segment)
        self.entries = list(done)
        self.pending: list[np.ndarray] = []
        self.pending_starts: list[np.ndarray] = []
        self.pending_tokens = 0

    @property
    def docs_done(self) -> int:
        return self.entries[-1].end_doc if self.entries else 0

    def add(self, tokens: np.ndarray, starts: np.ndarray) -> None:
        self.pending.append(tokens)
        self.pending_starts.append(starts + self.pending_tokens)
        self.pending_tokens += len(tokens)
        if self.pending_tokens >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        data = np.concatenate(self.pending).tobytes()
        offsets = np.concatenate(self.pending_starts).astype(DOCS_DTYPE).tobytes()
        index = len(self.entries)
        rel = shard_path(self.split, self.segment, index, self.num_segments)
        write_bytes_atomic(self.fs, join(self.root, rel), data)
        write_bytes_atomic(self.fs, join(self.root, docs_path(rel)), offsets)
        num_docs = len(offsets) // DOCS_DTYPE.itemsize
        shard = ShardInfo(path=rel, num_tokens=self.pending_tokens, num_docs=num_docs, num_bytes=len(data),
                          sha256=hashlib.sha256(data).hexdigest(), docs_path=docs_path(rel),
                          docs_sha256=hashlib.sha256(offsets).hexdigest())
        entry = JournalEntry(shard, self.docs_done + num_docs)
        journal = {"shard": asdict(shard), "end_doc": entry.end_doc, "segment_sha256": self.segment_sha256}
        write_bytes_atomic(self.fs, join(self.root, JOURNAL, f"{self.split}_{self.segment:05d}_{index:06d}.json"),
                           json.dumps(journal).encode())
        self.entries.append(entry)
        self.pending, self.pending_starts, self.pending_tokens = [], [], 0


def _files_intact(fs, root: str, shard: ShardInfo) -> bool:
    """The shard and its document offsets exist with the recorded checksums (one read of each)."""
    for rel, digest, size in ((shard.path, shard.sha256, shard.num_bytes),
                              (shard.docs_path, shard.docs_sha256, shard.docs_num_bytes)):
        path = join(root, rel)
        if not rel or not exists(fs, path) or sha256_file(fs, path) != (digest, size):
            return False
    return True


def _completed_shards(fs, root: str, split: str, segment: Segment, num_segments: int) -> list[JournalEntry]:
    """Journal entries of a segment's split, in order, whose shard still exists with the recorded checksums and
    was cut from the same inputs under the same name."""
    entries = []
    while True:
        path = join(root, JOURNAL, f"{split}_{segment.index:05d}_{len(entries):06d}.json")
        if not exists(fs, path):
            return entries
        try:
            raw = json.loads(read_bytes(fs, path))
            entry = JournalEntry(ShardInfo(**raw["shard"]), int(raw["end_doc"]))
            same_inputs = raw["segment_sha256"] == _segment_sha256(segment)
        except (ValueError, KeyError, TypeError):
            return entries
        if (not same_inputs or entry.shard.path != shard_path(split, segment.index, len(entries), num_segments)
                or not _files_intact(fs, root, entry.shard)):
            return entries
        entries.append(entry)


def _completed_segment(fs, root: str, segment: Segment, num_segments: int) -> dict | None:
    """The record of a finished segment whose files are all intact, or None."""
    path = join(root, _segment_marker(segment.index))
    if not exists(fs, path):
        return None
    try:
        record = json.loads(read_bytes(fs, path))
        shards = {split: [ShardInfo(**s) for s in record["shards"][split]] for split in SPLITS}
        same_inputs = record["segment_sha256"] == _segment_sha256(segment)
    except (ValueError, KeyError, TypeError):
        return None
    if not same_inputs or any(
            s.path != shard_path(split, segment.index, i, num_segments) or not _files_intact(fs, root, s)
            for split in SPLITS for i, s in enumerate(shards[split])):
        return None
    return record


# ---- the pipeline ------------------------------------------------------------------------------

def _recipe(options: PrepOptions, tokenizer: Tokenizer, dtype: str) -> dict[str, Any]:
    """Everything the dataset's bytes depend on (and nothing else: not the workers, parts or machines)."""
    return {"inputs": list(options.inputs), "text_field": options.text_field, "val_fraction": options.val_fraction,
            "shard_tokens": options.shard_tokens, "chunk_docs": options.chunk_docs,
            "chunk_bytes": options.chunk_bytes, "segment_bytes": options.segment_bytes, "dtype": dtype,
            "tokenizer_sha256": tokenizer.sha256, "text_normalization": TEXT_NORMALIZATION}


def _resolve_dtype(options: PrepOptions, tokenizer: Tokenizer) -> str:
    dtype = tokenizer.token_dtype().name if options.dtype == "auto" else options.dtype
    if dtype not in ("uint16", "uint32"):
        raise DataError(f"--dtype {dtype!r} must be auto, uint16 or uint32")
    if tokenizer.vocab_size - 1 > np.iinfo(dtype).max:
        raise DataError(f"{options.tokenizer}: vocab size {tokenizer.vocab_size} does not fit {dtype} token ids")
    return dtype


def _differing_keys(existing: dict, recipe: dict) -> str:
    return ", ".join(sorted(k for k in recipe.keys() | existing.keys() if recipe.get(k) != existing.get(k)))


def _what_differs(existing, recipe: dict) -> str:
    if not isinstance(existing, dict):
        return "other files" if existing == "unknown files" else "a dataset whose manifest cannot be read"
    return f"a dataset prepared differently (differs in: {_differing_keys(existing, recipe)})"


def _files_under(fs, root: str) -> list[str]:
    """Relative paths of every file under root (none when root does not exist)."""
    base = root.rstrip("/")
    for attempt in range(3):
        if not exists(fs, base):
            return []
        try:
            return sorted(path[len(base) + 1:] for path in fs.find(base))
        except FileNotFoundError:  # a concurrent part renamed a temp file while it was listed
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


_STARTING = re.compile(rf"^{JOURNAL}/[^/]+\.tmp$")
"""What a prep that is just starting has written (another part, a moment earlier): its recipe, half-written."""


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
    else:
        # Files without a recipe are foreign, unless another part wrote its recipe meanwhile: a prep writes the
        # recipe before any other file, so a second look after the listing tells the two apart.
        if not exists(fs, recipe_path) and any(not _STARTING.match(rel) for rel in _files_under(fs, root)) \
                and not exists(fs, recipe_path):
            existing = "unknown files"
        elif exists(fs, recipe_path):
            existing = json.loads(read_bytes(fs, recipe_path))
            if existing == recipe:
                return False  # an interrupted run of the same prep, or another part of it: resume or join it
    if existing is not None:
        if not options.overwrite:
            fix = "pass --overwrite to replace it" if options.num_parts == 1 else \
                "parts cannot --overwrite it (they run at once): delete it first, or choose another --out"
            raise DataError(f"{options.out} already holds {_what_differs(existing, recipe)}; {fix}")
        _remove_previous_prep(fs, root, options.out)
    return False


_PREP_FILE = re.compile(rf"^(?:{re.escape(MANIFEST)}|{re.escape(TOKENIZER)}|{JOURNAL}/[^/]+|(?:train|val)/"
                        r"shard_(?:\d{5,}_)?\d{6,}(?:\.docs)?\.bin)(?:(?:\.[0-9a-f]{12})?\.tmp)?$")
"""What prep writes (a .tmp is an interrupted atomic write): --overwrite deletes these and nothing else."""


def _remove_previous_prep(fs, root: str, out: str) -> None:
    """--overwrite: delete a previous prep's files, refusing (before deleting anything) if the destination holds any
    file prep did not write: a mistyped --out must not cost a user their data."""
    files = _files_under(fs, root)
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


def _check_options(options: PrepOptions) -> None:
    if options.workers < 1:
        raise DataError(f"--workers must be at least 1, got {options.workers}")
    if not 0 <= options.val_fraction < 1:
        raise DataError(f"--val-fraction must be in [0, 1), got {options.val_fraction}")
    if options.chunk_docs <= 0:
        raise DataError(f"--chunk-docs must be positive, got {options.chunk_docs}")
    if options.shard_tokens <= 0:
        raise DataError(f"--shard-tokens must be positive, got {options.shard_tokens}")
    if options.segment_bytes <= 0:
        raise DataError(f"--segment-bytes must be positive, got {options.segment_bytes}")
    if options.num_parts < 1:
        raise DataError(f"--num-parts must be at least 1, got {options.num_parts}")
    if not 0 <= options.part < options.num_parts:
        raise DataError(f"--part {options.part} is out of range for --num-parts {options.num_parts} "
                        f"(parts are numbered 0 to {options.num_parts - 1})")
    if options.num_parts > 1 and options.overwrite:
        raise DataError("--overwrite cannot be combined with --num-parts: parts run at the same time, and one part "
                        "replacing the destination would delete the others' fresh files; delete the previous "
                        "dataset at --out first, or choose another --out")


def _write_if_changed(fs, path: str, data: bytes) -> None:
    """Every part writes the shared files (recipe, tokenizer); the first one to get there is enough."""
    if not (exists(fs, path) and read_bytes(fs, path) == data):
        write_bytes_atomic(fs, path, data)


def prepare(options: PrepOptions) -> Manifest | None:
    """Prepare the dataset (``num_parts`` 1), or one part of it (then None: ``merge`` writes the manifest once
    every part has finished)."""
    _check_options(options)
    tokenizer = Tokenizer.load(options.tokenizer, options.storage_options)
    dtype = _resolve_dtype(options, tokenizer)
    recipe = _recipe(options, tokenizer, dtype)
    _check_out_against_inputs(options)
    # the inputs are listed (and must match files) before --overwrite deletes anything
    segments = list_segments([str(s) for s in options.inputs], options.segment_bytes, options.storage_options)
    if options.num_parts > len(segments):
        raise DataError(f"--num-parts {options.num_parts}: {', '.join(map(str, options.inputs))} form(s) only "
                        f"{len(segments)} segment(s) (a hf: dataset is one segment; files are grouped into segments "
                        f"of --segment-bytes {options.segment_bytes:,}), and a segment is prepared by one part: "
                        f"use at most {len(segments)} part(s), or a smaller --segment-bytes")
    fs, root = open_url(options.out, options.storage_options)
    if _prepare_destination(fs, root, options, recipe):
        manifest = Manifest.from_bytes(read_bytes(fs, join(root, MANIFEST)), options.out)
        print(f"prep: {options.out} is already complete and identical; nothing to do")
        return manifest
    fs.makedirs(root, exist_ok=True)
    _write_if_changed(fs, join(root, JOURNAL, "recipe.json"), json.dumps(recipe).encode())
    _write_if_changed(fs, join(root, TOKENIZER), tokenizer.model_bytes)

    started = time.perf_counter()
    mine = [s for s in segments if s.index % options.num_parts == options.part]
    records = _prepare_segments(fs, root, options, tokenizer, mine, len(segments))
    marker = {"recipe": recipe, "num_parts": options.num_parts, "part": options.part,
              "num_segments": len(segments), "listing_sha256": _listing_sha256(segments), "segments": records}
    write_bytes_atomic(fs, join(root, _part_marker(options.part, options.num_parts)), json.dumps(marker).encode())
    _drop_stale_part_markers(fs, root, options.out, marker["listing_sha256"])
    elapsed = time.perf_counter() - started
    if options.num_parts > 1:
        stats = _sum_stats(records)
        shards = sum(len(r["shards"][split]) for r in records for split in SPLITS)
        print(f"prep: part {options.part} of {options.num_parts} finished: {len(records)} of {len(segments)} "
              f"segments, {stats['documents']:,} documents, {shards} shards; {elapsed:.1f}s. When every part has "
              f"finished: tape-pretrain data merge {options.out}")
        return None
    manifest = merge(options.out, options.storage_options, quiet=True)
    print(f"prep: {_summary(manifest)}; {elapsed:.1f}s; written to {options.out}")
    if options.val_fraction > 0 and not manifest.splits["val"]:
        print("prep: warning: the val split is empty; raise --val-fraction for a corpus this small")
    return manifest


def _part_markers(fs, root: str, url: str) -> list[str]:
    """Names of the part markers under _prep/, sorted."""
    journal = join(root, JOURNAL)
    fs.invalidate_cache(journal)
    found = with_retries(lambda: fs.glob(join(journal, "part_*_of_*.json")), join(url, JOURNAL))
    return sorted(posixpath.basename(p.rstrip("/")) for p in found)


def _drop_stale_part_markers(fs, root: str, url: str, listing_sha256: str) -> None:
    """Markers of parts that saw other input files (the inputs changed since) would block every merge: a part run
    on the current inputs removes them, so running each part again is always the way out."""
    for name in _part_markers(fs, root, url):
        path = join(root, JOURNAL, name)
        with contextlib.suppress(ValueError, KeyError, TypeError, FileNotFoundError):
            if json.loads(read_bytes(fs, path))["listing_sha256"] != listing_sha256:
                print(f"prep: removing {JOURNAL}/{name}: that part saw other input files; run it again")
                fs.rm(path)


def _listing_sha256(segments: list[Segment]) -> str:
    return hashlib.sha256(json.dumps([_segment_sha256(s) for s in segments]).encode()).hexdigest()


def _prepare_segments(fs, root: str, options: PrepOptions, tokenizer: Tokenizer, segments: list[Segment],
                      num_segments: int) -> list[dict]:
    """Prepare the given segments (resuming what is already written); their records, in segment order."""
    records: dict[int, dict] = {}
    writers: dict[int, dict[str, ShardWriter]] = {}
    reused = 0
    for segment in segments:
        record = _completed_segment(fs, root, segment, num_segments)
        if record is not None:
            records[segment.index] = record
            reused += sum(len(record["shards"][split]) for split in SPLITS)
            continue
        writers[segment.index] = {
            split: ShardWriter(fs, root, split, segment, num_segments, options.shard_tokens,
                               _completed_shards(fs, root, split, segment, num_segments)) for split in SPLITS}
        reused += sum(len(w.entries) for w in writers[segment.index].values())
    if reused:
        print(f"prep: resuming; {reused} shard(s) already written and verified")
    todo = [s for s in segments if s.index in writers]
    by_index = {s.index: s for s in todo}
    stats = {s.index: SourceStats() for s in todo}
    progress = _progress(options.progress, todo)

    def jobs():
        """((segment, split), read position) and a chunk of its texts; ((segment, None), read position) and None once
        a segment's documents end. The read position is the progress bar's, after the chunk's last document."""
        read = _ReadPosition(by_bytes=progress.unit == "B")
        for segment in todo:
            segment_writers = writers[segment.index]
            pending: dict[str, list[str]] = {split: [] for split in SPLITS}
            pending_bytes = dict.fromkeys(SPLITS, 0)
            seen = dict.fromkeys(SPLITS, 0)
            read.start(segment, stats[segment.index])
            documents = iter_segment_documents(segment, options.text_field, stats[segment.index],
                                               options.storage_options)
            for index, text in enumerate(documents):
                split = "val" if in_val_split(index, options.val_fraction) else "train"
                seen[split] += 1
                read.document(text)
                if seen[split] <= segment_writers[split].docs_done:
                    continue  # already in a verified shard
                pending[split].append(text)
                pending_bytes[split] += len(text)
                # small chunks keep the workers evenly loaded to the end; a chunk depends only on its documents
                if len(pending[split]) == options.chunk_docs or pending_bytes[split] >= options.chunk_bytes:
                    yield (segment.index, split, read.position), pending[split]
                    pending[split], pending_bytes[split] = [], 0
            read.end()
            for split in SPLITS:
                if pending[split]:
                    yield (segment.index, split, read.position), pending[split]
            yield (segment.index, None, read.position), None

    total_tokens = total_documents = 0
    with progress:
        # progress follows the chunks as they come back tokenized (reading runs a bounded look-ahead in front)
        for (index, split, position), encoded in _run_jobs(jobs(), tokenizer, options.workers):
            progress.update(position - progress.n)
            if split is None:  # every chunk of the segment is written: close its shards and record it
                for writer in writers[index].values():
                    writer.flush()
                records[index] = _segment_record(by_index[index], writers.pop(index), stats[index])
                write_bytes_atomic(fs, join(root, _segment_marker(index)), json.dumps(records[index]).encode())
                continue
            tokens, starts = encoded
            writers[index][split].add(tokens, starts)
            total_tokens += len(tokens)
            total_documents += len(starts)
            progress.set_postfix(documents=f"{total_documents:,}", tokens=f"{total_tokens:,}")
    return [records[s.index] for s in segments]


def _segment_record(segment: Segment, writers: dict[str, ShardWriter], stats: SourceStats) -> dict:
    return {"segment": segment.index, "segment_sha256": _segment_sha256(segment),
            "shards": {split: [asdict(e.shard) for e in w.entries] for split, w in writers.items()},
            "stats": {key: getattr(stats, key) for key in _STAT_KEYS}}


def _sum_stats(records: list[dict]) -> dict[str, int]:
    return {key: sum(int(r["stats"][key]) for r in records) for key in _STAT_KEYS}


def _summary(manifest: Manifest) -> str:
    s = manifest.stats
    return (f"{s['documents']:,} documents ({s['empty_skipped']} empty skipped, {s['invalid_utf8_replaced']} with "
            f"invalid UTF-8 replaced, {s['nul_removed']} with NUL removed, {s['newlines_normalized']} with CR line "
            "endings normalized); " + ", ".join(f"{split}: {manifest.num_tokens(split):,} tokens in "
                                                f"{len(manifest.splits[split])} shards" for split in SPLITS))


# ---- merge -------------------------------------------------------------------------------------

def _read_json(fs, root: str, rel: str, url: str) -> Any:
    try:
        return json.loads(read_bytes(fs, join(root, rel)))
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"{join(url, rel)}: unreadable ({exc}); run that part again") from None


def _missing_parts(url: str, missing: list[int], parts: list[dict]) -> str:
    """Which parts (of each part count the finished parts were run with) would have prepared ``missing``."""
    messages = []
    for num_parts in sorted({int(p["num_parts"]) for p in parts}):
        absent = sorted({s % num_parts for s in missing})
        which = ", ".join(map(str, absent))
        names = ", ".join(_part_marker(i, num_parts) for i in absent[:3]) + (" …" if len(absent) > 3 else "")
        verb = "has" if len(absent) == 1 else "have"
        messages.append(f"part{'s' if len(absent) > 1 else ''} {which} of {num_parts} {verb} not finished "
                        f"(no {names}); run {'them' if len(absent) > 1 else 'it'} with the same options "
                        f"(tape-pretrain prep ... --num-parts {num_parts} --part {absent[0]}), then merge again")
    return f"{url}: " + "; ".join(messages)


def merge(url: str, storage_options=None, quiet: bool = False) -> Manifest:
    """Assemble the manifest of a prep that ran in parts: checks that every part finished, all with the same recipe
    and the same input listing, that every shard is in place, and writes ``manifest.json`` last. Merging a finished
    dataset again changes nothing."""
    fs, root = open_url(url, storage_options)
    manifest_path, recipe_rel = join(root, MANIFEST), f"{JOURNAL}/recipe.json"
    if not exists(fs, join(root, recipe_rel)):
        if exists(fs, manifest_path):
            manifest = Manifest.from_bytes(read_bytes(fs, manifest_path), join(url, MANIFEST))
            if not quiet:
                print(f"merge: {url} is already complete; nothing to do")
            return manifest
        raise DataError(f"{url}: no prep has run here (no {recipe_rel}); run the parts first "
                        "(tape-pretrain prep ... --num-parts P --part i)")
    recipe = _read_json(fs, root, recipe_rel, url)
    names = _part_markers(fs, root, url)
    if not names:
        raise DataError(f"{url}: no part of the prep has finished (no {JOURNAL}/part_*_of_*.json); run the parts "
                        "first (tape-pretrain prep ... --num-parts P --part i), then merge")
    parts = []
    for name in names:
        part = _read_json(fs, root, f"{JOURNAL}/{name}", url)
        if not isinstance(part, dict) or not {"recipe", "num_parts", "part", "num_segments", "listing_sha256",
                                              "segments"} <= part.keys():
            raise DataError(f"{join(url, JOURNAL, name)}: not a part marker of this version; run that part again")
        where = f"part {part['part']} of {part['num_parts']} ({JOURNAL}/{name})"
        if part.get("recipe") != recipe:
            differs = _differing_keys(part["recipe"], recipe) if isinstance(part.get("recipe"), dict) else "all"
            raise DataError(f"{url}: {where} was prepared with other options than {recipe_rel} (differs in: "
                            f"{differs}); run it again with the same options as the other parts")
        parts.append(part)
    listings = {(p["listing_sha256"], p["num_segments"]) for p in parts}
    if len(listings) > 1:
        counts = ", ".join(f"part {p['part']} of {p['num_parts']}: {p['num_segments']} segments" for p in parts)
        raise DataError(f"{url}: the parts listed different input files ({counts}): the inputs changed while the "
                        "parts ran; run every part again")
    num_segments = parts[0]["num_segments"]
    segments: dict[int, dict] = {}
    for part in parts:
        for record in part["segments"]:
            segments.setdefault(int(record["segment"]), record)
    missing = [s for s in range(num_segments) if s not in segments]
    if missing:
        raise DataError(_missing_parts(url, missing, parts))

    tokenizer = Tokenizer.from_bytes(read_bytes(fs, join(root, TOKENIZER)), join(url, TOKENIZER))
    if tokenizer.sha256 != recipe["tokenizer_sha256"]:
        raise DataError(f"{join(url, TOKENIZER)}: sha256 does not match the recipe's tokenizer; run the parts again")
    ordered = [segments[s] for s in range(num_segments)]
    splits = {split: [ShardInfo(**shard) for record in ordered for shard in record["shards"][split]]
              for split in SPLITS}
    stats = _sum_stats(ordered)
    if stats["documents"] == 0:
        raise DataError(f"{', '.join(recipe['inputs'])}: the corpus is empty (no non-empty documents)")
    _check_in_place(fs, root, url, splits)
    manifest = Manifest(
        tokenizer={"sha256": tokenizer.sha256, "vocab_size": tokenizer.vocab_size, "path": TOKENIZER,
                   **tokenizer.special_ids()},
        dtype=recipe["dtype"], splits=splits, source={"recipe": recipe}, stats=stats)
    data = manifest.to_bytes()
    if exists(fs, manifest_path) and read_bytes(fs, manifest_path) == data:
        if not quiet:
            print(f"merge: {url} is already complete; nothing to do")
        return manifest
    write_bytes_atomic(fs, manifest_path, data)
    if not quiet:
        print(f"merge: {len({(p['part'], p['num_parts']) for p in parts})} part(s), {num_segments} segment(s): "
              f"{_summary(manifest)}; written to {url}")
        if recipe["val_fraction"] > 0 and not manifest.splits["val"]:
            print("merge: warning: the val split is empty; raise --val-fraction for a corpus this small")
    return manifest


def _check_in_place(fs, root: str, url: str, splits: dict[str, list[ShardInfo]]) -> None:
    """Every shard and offsets file exists with its recorded size (one listing; the parts checksummed them)."""
    base = root.rstrip("/")
    fs.invalidate_cache(base)
    listed = with_retries(lambda: fs.find(base, detail=True), url)
    sizes = {path[len(base) + 1:]: int(info.get("size") or 0) for path, info in listed.items()}
    for shard in (s for shards in splits.values() for s in shards):
        for rel, size in ((shard.path, shard.num_bytes), (shard.docs_path, shard.docs_num_bytes)):
            if sizes.get(rel) != size:
                state = "is missing" if rel not in sizes else f"has {sizes[rel]} bytes, not {size}"
                raise DataError(f"{join(url, rel)} {state}; run the part that wrote it again (it re-checks its "
                                "files and rewrites what is damaged)")


class _ReadPosition:
    """How far prep has read its segments: in stored bytes of the input files, a file's bytes spread over its
    documents by their length and never past the file's end; or in documents, when an input is a ``hf:`` dataset
    (whose size is unknown)."""

    def __init__(self, by_bytes: bool):
        self.by_bytes = by_bytes
        self.done = 0
        """Bytes of the segments already read, or documents read."""

    def start(self, segment: Segment, stats: SourceStats) -> None:
        self.segment, self.stats = segment, stats
        self.file_ends = list(itertools.accumulate((size for _, _, size in segment.files), initial=0))
        self.files = self.within = 0  # files of the segment opened; text read from the last one

    def document(self, text: str) -> None:
        if not self.by_bytes:
            self.done += 1
            return
        if self.stats.files != self.files:  # a new file (empty ones may have been passed over)
            self.files, self.within = self.stats.files, 0
        self.within += len(text)

    def end(self) -> None:
        if self.by_bytes:
            self.done += self.segment.num_bytes
            self.files = 0

    @property
    def position(self) -> int:
        if not self.by_bytes or self.files == 0:
            return self.done
        k = min(self.files, len(self.file_ends) - 1)
        return self.done + min(self.file_ends[k - 1] + self.within, self.file_ends[k])


def _progress(enabled: bool, segments: list[Segment]) -> Progress:
    """Progress in stored bytes of the inputs, with a total and an ETA, when every segment is a list of files (their
    sizes come from the listing); in documents, without a total, when one is a ``hf:`` dataset."""
    if all(not s.hf for s in segments):
        return Progress("prep", total=sum(s.num_bytes for s in segments), unit="B", unit_scale=True, enabled=enabled)
    return Progress("prep", unit="doc", enabled=enabled)


def _run_jobs(jobs, tokenizer: Tokenizer, workers: int):
    """Encode chunks in order, passing (key, None) markers through in their place; in this process for one worker,
    else in a pool with bounded look-ahead."""
    if workers == 1:
        for key, texts in jobs:
            yield key, None if texts is None else tokenizer.encode_documents_with_starts(texts)
        return
    # Forking is fast but unsafe once other threads run (s3fs/gcsfs event loops hold locks): spawn then.
    method = "fork" if threading.active_count() == 1 and "fork" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    with context.Pool(workers, initializer=_init_worker, initargs=(tokenizer.model_bytes,)) as pool:
        in_flight: collections.deque = collections.deque()
        for key, texts in jobs:
            in_flight.append((key, None if texts is None else pool.apply_async(_encode_chunk, (texts,))))
            if len(in_flight) >= 4 * workers:
                key, result = in_flight.popleft()
                yield key, None if result is None else result.get()
        while in_flight:
            key, result = in_flight.popleft()
            yield key, None if result is None else result.get()
