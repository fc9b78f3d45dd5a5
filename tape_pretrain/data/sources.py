"""Document sources: Hugging Face datasets, fsspec globs of text files, and builtin corpora.

SRC forms:
- ``hf:NAME[:CONFIG][@SPLIT]``: a hub dataset (streamed), or ``hf:/path/to/saved`` (``save_to_disk``)
- a path or URL, with globs: ``*.txt`` (one document per file), ``*.jsonl[.gz|.zst]`` (one per line),
  ``*.parquet`` (one per row); the text field is configurable (default ``text``)
- ``builtin:python-stdlib``: the running Python's standard-library sources, present on every machine
- ``builtin:addition[?max_digits=N&count=N&seed=N]``: generated addition problems, one per document
  (tape_pretrain.data.addition); like a ``hf:`` dataset, one segment

Segments: prep cuts the corpus into deterministic segments (``list_segments``), runs of consecutive input files
whose stored sizes add up to at least ``segment_bytes`` (a ``hf:`` dataset is always one segment of its own), so
that parts of one prep can run on different machines. The segments in order hold exactly the documents
``iter_documents`` yields.

Every document is normalized the same way whatever its source (``TEXT_NORMALIZATION`` names the rules, and
prep records it, so a change here is a different dataset): NUL characters are removed, and CRLF and lone
CR line endings become LF, so text from Windows or old Mac files tokenizes like the same text from Unix.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import sysconfig
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tape_pretrain.data.addition import addition_documents, is_addition_source, parse_addition_spec
from tape_pretrain.data.storage import open_url, read_bytes
from tape_pretrain.errors import DataError, StorageError

TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json.gz", ".ndjson")
TEXT_NORMALIZATION = "strip-nul,lf-newlines"


@dataclass
class SourceStats:
    """Counters of what reading the sources skipped or repaired (documents, not occurrences)."""

    documents: int = 0
    empty_skipped: int = 0
    invalid_utf8_replaced: int = 0
    nul_removed: int = 0
    newlines_normalized: int = 0
    files: int = 0
    bytes_read: int = 0
    per_source: dict[str, int] = field(default_factory=dict)


def builtin_corpus(name: str) -> list[str]:
    """Sorted file list of a builtin corpus."""
    if name == "python-stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        files = [p for p in root.rglob("*.py") if "site-packages" not in p.parts and "test" not in p.parts]
        return sorted(str(p) for p in files)
    raise DataError(f"builtin:{name}: unknown builtin corpus (known: python-stdlib, addition)")


def _decode(raw: bytes, stats: SourceStats) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        stats.invalid_utf8_replaced += 1
        return raw.decode("utf-8", errors="replace")


def _open_compressed(raw: bytes, path: str) -> bytes:
    if path.endswith(".gz"):
        try:
            return gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as exc:  # truncated, or not gzip at all
            raise DataError(f"{path}: corrupt or truncated gzip file ({exc})") from None
    if path.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise DataError(f"{path}: reading .zst needs the zstandard package (pip install zstandard)") from None
        try:
            return zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw)).read()
        except zstandard.ZstdError as exc:
            raise DataError(f"{path}: corrupt or truncated zstd file ({exc})") from None
    return raw


def _jsonl_documents(raw: bytes, path: str, text_field: str, stats: SourceStats) -> Iterator[str]:
    for line_no, line in enumerate(_open_compressed(raw, path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(_decode(line, stats))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict) or text_field not in record:
            raise DataError(f"{path}:{line_no}: record has no text field {text_field!r}")
        text = record[text_field]
        if not isinstance(text, str):
            raise DataError(f"{path}:{line_no}: field {text_field!r} is not a string")
        yield text


def _parquet_documents(fs, path: str, text_field: str) -> Iterator[str]:
    import pyarrow
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as f:
        try:
            table = pq.ParquetFile(f)
        except (pyarrow.ArrowException, OSError) as exc:
            raise DataError(f"{path}: not a readable parquet file ({exc})") from None
        if text_field not in table.schema_arrow.names:
            raise DataError(f"{path}: parquet file has no column {text_field!r} "
                            f"(columns: {', '.join(table.schema_arrow.names)})")
        try:
            for batch in table.iter_batches(columns=[text_field], batch_size=1024):
                yield from (t for t in batch.column(0).to_pylist() if t is not None)
        except (pyarrow.ArrowException, OSError) as exc:
            raise DataError(f"{path}: corrupt parquet data ({exc})") from None


def _input_file_sizes(spec: str, storage_options):
    """(filesystem, sorted (path, stored size) pairs) of a path, glob or folder input; DataError if nothing
    matches. Sizes come from the listing: no file is read."""
    fs, _ = open_url(spec, storage_options)
    try:
        if any(c in spec for c in "*?["):
            listed = fs.glob(fs._strip_protocol(spec), detail=True)
        else:
            path = fs._strip_protocol(spec)
            listed = {path: fs.info(path)} if fs.exists(path) else {}
        if len(listed) == 1 and next(iter(listed.values())).get("type") == "directory":
            listed = {p: info for p, info in fs.find(next(iter(listed)), detail=True).items()
                      if p.endswith(TEXT_SUFFIXES + JSONL_SUFFIXES + (".parquet",))}
    except (OSError, ValueError) as exc:
        raise DataError(f"{spec}: cannot list input ({exc})") from None
    if not listed:
        raise DataError(f"{spec}: no input files match")
    return fs, [(path, int(listed[path].get("size") or 0)) for path in sorted(listed)]


def _input_files(spec: str, storage_options):
    """(filesystem, sorted file paths) of a path, glob or folder input; DataError if nothing matches."""
    fs, files = _input_file_sizes(spec, storage_options)
    return fs, [path for path, _ in files]


def _one_file_documents(fs, path: str, text_field: str, stats: SourceStats) -> Iterator[str]:
    stats.files += 1
    if path.endswith(".parquet"):
        yield from _parquet_documents(fs, path, text_field)
        return
    try:
        raw = read_bytes(fs, path)
    except (OSError, StorageError) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None
    stats.bytes_read += len(raw)
    if path.endswith(JSONL_SUFFIXES):
        yield from _jsonl_documents(raw, path, text_field, stats)
    elif path.endswith(TEXT_SUFFIXES) or "." not in Path(path).name:
        yield _decode(raw, stats)
    else:
        raise DataError(f"{path}: unsupported file type (use .txt, .jsonl[.gz|.zst] or .parquet)")


def _file_documents(spec: str, text_field: str, stats: SourceStats, storage_options) -> Iterator[str]:
    fs, paths = _input_files(spec, storage_options)
    for path in paths:
        yield from _one_file_documents(fs, path, text_field, stats)


def _hf_documents(spec: str, text_field: str) -> Iterator[str]:
    import datasets

    body = spec.removeprefix("hf:")
    split = "train"
    if "@" in body:
        body, split = body.rsplit("@", 1)
    if Path(body).exists():
        ds = datasets.load_from_disk(body)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"{spec}: saved dataset has no split {split!r} (splits: {', '.join(ds)})")
            ds = ds[split]
    else:
        name, _, config = body.partition(":")
        ds = datasets.load_dataset(name, config or None, split=split, streaming=True)
    columns = getattr(ds, "column_names", None)
    if columns is not None and text_field not in columns:
        raise DataError(f"{spec}: dataset has no column {text_field!r} (columns: {', '.join(columns)})")
    for record in ds:
        yield record[text_field]


def _normalized(inner: Iterator[str], stats: SourceStats) -> Iterator[str]:
    """The non-empty documents of ``inner`` with NULs removed and LF line endings; counted in ``stats``."""
    for text in inner:
        if not text.strip():
            stats.empty_skipped += 1
            continue
        if "\x00" in text:
            stats.nul_removed += 1
            text = text.replace("\x00", "")
            if not text.strip():
                stats.empty_skipped += 1
                continue
        if "\r" in text:
            stats.newlines_normalized += 1
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        stats.documents += 1
        yield text


def iter_documents(specs: list[str], text_field: str = "text", stats: SourceStats | None = None,
                   storage_options=None) -> Iterator[str]:
    """Non-empty, normalized documents of every source, in a fixed order; counts empty and repaired ones in
    ``stats`` (a document counts once per kind of repair)."""
    stats = stats if stats is not None else SourceStats()
    for spec in specs:
        if is_addition_source(spec):
            inner: Iterator[str] = addition_documents(spec)
        elif spec.startswith("builtin:"):
            inner = (d for path in builtin_corpus(spec.removeprefix("builtin:"))
                     for d in _file_documents(path, text_field, stats, None))
        elif spec.startswith("hf:"):
            inner = _hf_documents(spec, text_field)
        else:
            inner = _file_documents(spec, text_field, stats, storage_options)
        before = stats.documents
        yield from _normalized(inner, stats)
        stats.per_source[spec] = stats.documents - before


@dataclass(frozen=True)
class Segment:
    """A run of consecutive input files (or one whole ``hf:`` dataset) that prep treats as a unit: its val split,
    shard boundaries and shard names depend on its documents alone."""

    index: int
    files: tuple[tuple[str, str, int], ...] = ()
    """(input spec, file path, stored size in bytes), in corpus order."""
    hf: str = ""
    """A ``hf:`` input (or a generated ``builtin:addition`` corpus) read whole, instead of files."""

    @property
    def num_bytes(self) -> int:
        return sum(size for _, _, size in self.files)

    def describe(self) -> str:
        if self.hf:
            return self.hf
        first, last = self.files[0][1], self.files[-1][1]
        return first if len(self.files) == 1 else f"{first} … {last} ({len(self.files)} files)"


def list_segments(specs: list[str], segment_bytes: int, storage_options=None) -> list[Segment]:
    """The corpus's segments in order: consecutive files (across inputs) grouped until their stored sizes reach
    ``segment_bytes``; each ``hf:`` input is a segment of its own. Depends only on the file listing (names and
    sizes), so every machine computes the same segments; DataError if an input matches nothing."""
    segments: list[Segment] = []
    pending: list[tuple[str, str, int]] = []
    pending_bytes = 0

    def close() -> None:
        nonlocal pending, pending_bytes
        if pending:
            segments.append(Segment(len(segments), tuple(pending)))
            pending, pending_bytes = [], 0

    for spec in specs:
        if spec.startswith("hf:") or is_addition_source(spec):
            if is_addition_source(spec):
                parse_addition_spec(spec)  # a bad spec fails with the listing, before prep touches --out
            close()
            segments.append(Segment(len(segments), hf=spec))
            continue
        if spec.startswith("builtin:"):
            files = [(path, os.path.getsize(path)) for path in builtin_corpus(spec.removeprefix("builtin:"))]
        else:
            files = _input_file_sizes(spec, storage_options)[1]
        for path, size in files:
            pending.append((spec, path, size))
            pending_bytes += size
            if pending_bytes >= segment_bytes:
                close()
    close()
    return segments


def iter_segment_documents(segment: Segment, text_field: str, stats: SourceStats,
                           storage_options=None) -> Iterator[str]:
    """The normalized documents of one segment, exactly as ``iter_documents`` yields them within the corpus."""
    if segment.hf:
        generated = is_addition_source(segment.hf)
        inner = addition_documents(segment.hf) if generated else _hf_documents(segment.hf, text_field)
        yield from _normalized(inner, stats)
        return

    def inner() -> Iterator[str]:
        for spec, path, _ in segment.files:
            local = spec.startswith("builtin:")
            fs = open_url(path)[0] if local else open_url(spec, storage_options)[0]
            yield from _one_file_documents(fs, path, text_field, stats)

    yield from _normalized(inner(), stats)
