"""The dataset manifest: what shards exist, their checksums, the tokenizer and the source.

A dataset is a directory (any fsspec URL) holding ``manifest.json``, ``tokenizer.model`` and per split its shards
(``{train,val}/shard_NNNNNN.bin``, or ``shard_SSSSS_NNNNNN.bin`` where prep cut the corpus into several segments),
each with its document offsets beside it (``shard_….docs.bin``: raw little-endian uint64, the token offset in the
shard where each document starts; first 0, strictly increasing, one per document). Datasets prepared before
offsets were recorded have none (``ShardInfo.docs_path == ""``) and still load. The manifest is written last:
without it the dataset does not exist. The sha256 of the manifest's bytes is the dataset fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from tape_pretrain.data.storage import exists, is_local, join, open_url, read_bytes, with_retries
from tape_pretrain.errors import DataError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.model"
SPLITS = ("train", "val")
DOCS_DTYPE = np.dtype("<u8")
"""Document offsets files: raw little-endian uint64."""


@dataclass
class ShardInfo:
    path: str
    """Relative to the dataset root, e.g. train/shard_000000.bin."""
    num_tokens: int
    num_docs: int
    num_bytes: int
    sha256: str
    docs_path: str = ""
    """Relative path of the shard's document offsets (``DOCS_DTYPE``, ``num_docs`` entries); "" when the dataset
    was prepared before document offsets were recorded."""
    docs_sha256: str = ""
    """sha256 of the offsets file; "" exactly when ``docs_path`` is."""

    @property
    def has_document_starts(self) -> bool:
        return bool(self.docs_path)

    @property
    def docs_num_bytes(self) -> int:
        return self.num_docs * DOCS_DTYPE.itemsize


@dataclass
class Manifest:
    tokenizer: dict[str, Any]
    dtype: str
    splits: dict[str, list[ShardInfo]]
    source: dict[str, Any]
    stats: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def to_bytes(self) -> bytes:
        data = asdict(self)
        data["totals"] = {split: {"num_tokens": sum(s.num_tokens for s in shards),
                                  "num_docs": sum(s.num_docs for s in shards),
                                  "num_shards": len(shards)} for split, shards in self.splits.items()}
        return (json.dumps(data, indent=1, sort_keys=True) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> Manifest:
        try:
            raw = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"{where}: manifest is not valid JSON ({exc})") from None
        if not isinstance(raw, dict):
            raise DataError(f"{where}: manifest must be a JSON object")
        if raw.get("schema_version") != SCHEMA_VERSION:
            raise DataError(f"{where}: unsupported manifest schema_version {raw.get('schema_version')!r}")
        try:
            splits = {name: [ShardInfo(**s) for s in shards] for name, shards in raw["splits"].items()}
            manifest = cls(tokenizer=raw["tokenizer"], dtype=raw["dtype"], splits=splits, source=raw["source"],
                           stats=raw.get("stats", {}))
        except (KeyError, TypeError) as exc:
            raise DataError(f"{where}: manifest is missing or has malformed field {exc}") from None
        if manifest.dtype not in ("uint16", "uint32"):
            raise DataError(f"{where}: dtype {manifest.dtype!r} is not uint16 or uint32")
        for split, shards in manifest.splits.items():
            for shard in shards:
                check_relative_path(shard.path, f"{where}: splits.{split}")
                itemsize = np.dtype(manifest.dtype).itemsize
                if shard.num_bytes != shard.num_tokens * itemsize:
                    raise DataError(f"{where}: {shard.path}: num_bytes {shard.num_bytes} != num_tokens x "
                                    f"{itemsize}")
                if bool(shard.docs_path) != bool(shard.docs_sha256):
                    raise DataError(f"{where}: {shard.path}: docs_path and docs_sha256 must be given together")
                if shard.docs_path:
                    check_relative_path(shard.docs_path, f"{where}: splits.{split}")
                    if shard.docs_path == shard.path or not 0 < shard.num_docs <= shard.num_tokens:
                        raise DataError(f"{where}: {shard.path}: document offsets need a file of their own and "
                                        f"1 to num_tokens documents (num_docs {shard.num_docs})")
        return manifest

    def num_tokens(self, split: str) -> int:
        return sum(s.num_tokens for s in self.splits.get(split, []))

    def has_document_starts(self, split: str | None = None) -> bool:
        """Whether every shard (of ``split``, or of every split) records where its documents start."""
        splits = [split] if split is not None else list(self.splits)
        return all(s.has_document_starts for name in splits for s in self.splits.get(name, []))


def check_relative_path(path: str, where: str) -> None:
    """Paths inside a manifest are relative and stay under the dataset root."""
    if (not isinstance(path, str) or not path or "://" in path or path.startswith(("/", "\\"))
            or posixpath.normpath(path).startswith("..") or ".." in path.split("/")):
        raise DataError(f"{where}: shard path {path!r} must be relative and stay inside the dataset")


def check_document_starts(starts: np.ndarray, num_tokens: int, num_docs: int | None = None) -> str | None:
    """None if ``starts`` are a shard's document starts (first 0, strictly increasing, below ``num_tokens``, and
    ``num_docs`` of them when given), else what is wrong. Vectorised: no loop over documents."""
    if num_docs is not None and len(starts) != num_docs:
        return f"{len(starts)} document offsets != manifest num_docs {num_docs}"
    if len(starts) == 0:
        return "no document offsets"
    if int(starts[0]) != 0:
        return f"first document offset is {int(starts[0])}, not 0"
    if len(starts) > 1:
        bad = np.flatnonzero(starts[1:] <= starts[:-1])  # a comparison: no unsigned wrap-around
        if len(bad):
            i = int(bad[0]) + 1
            return f"document offsets are not strictly increasing (entry {i}: {int(starts[i])} after " \
                   f"{int(starts[i - 1])})"
    if int(starts[-1]) >= num_tokens:
        return f"last document offset {int(starts[-1])} is not below the shard's {num_tokens} tokens"
    return None


def read_document_starts(path: str, num_tokens: int, num_docs: int | None = None) -> np.ndarray:
    """The int64 document starts (token offsets within the shard, the first 0) of a local offsets file such as
    ``LocalShard.docs_path``, checked as ``check_document_starts``; DataError naming the file otherwise."""
    size = os.path.getsize(path)
    if size % DOCS_DTYPE.itemsize:
        raise DataError(f"{path}: size {size} bytes is not a whole number of uint64 document offsets")
    starts = np.fromfile(path, dtype=DOCS_DTYPE)
    reason = check_document_starts(starts, num_tokens, num_docs)
    if reason is not None:
        raise DataError(f"{path}: {reason}")
    return starts.astype(np.int64)


def document_lengths(starts: np.ndarray, num_tokens: int) -> np.ndarray:
    """int64 length of each document (EOS included) of a shard with these document starts."""
    return np.diff(starts.astype(np.int64), append=np.int64(num_tokens))


def fingerprint(manifest_bytes: bytes) -> str:
    return hashlib.sha256(manifest_bytes).hexdigest()


def load_manifest(url: str, storage_options=None) -> tuple[Manifest, str]:
    """(manifest, fingerprint) of the dataset at ``url``."""
    fs, root = open_url(url, storage_options)
    path = join(root, MANIFEST)
    if not exists(fs, path):
        raise DataError(f"{url}: no {MANIFEST}: not a prepared dataset (or its preparation did not finish)")
    data = read_bytes(fs, path)
    return Manifest.from_bytes(data, join(url, MANIFEST)), fingerprint(data)


def sha256_file(fs, path: str, chunk: int = 8 << 20) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with fs.open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def document_starts_problem(data: bytes, shard: ShardInfo) -> str | None:
    """None if ``data`` is ``shard``'s offsets file as the manifest records it (size, sha256, and starts that are
    a shard's document starts), else what is wrong."""
    if len(data) != shard.docs_num_bytes:
        return f"size {len(data)} bytes != {shard.num_docs} documents x {DOCS_DTYPE.itemsize} (truncated or extended)"
    if hashlib.sha256(data).hexdigest() != shard.docs_sha256:
        return "sha256 mismatch (content altered)"
    return check_document_starts(np.frombuffer(data, dtype=DOCS_DTYPE), shard.num_tokens, shard.num_docs)


def document_end_positions(starts: np.ndarray, num_tokens: int) -> np.ndarray:
    """int64 positions (sorted) of each document's last token, its EOS: before every next start, and the last."""
    return np.append(starts[1:].astype(np.int64) - 1, np.int64(num_tokens - 1))


def misaligned_starts(position: int) -> str:
    return f"document offsets do not match the shard: token {position}, where a document ends, is not EOS"


def scan_shard(fs, path: str, dtype: str, chunk: int = 8 << 20, eos_at: np.ndarray | None = None,
               eos_id: int = -1) -> tuple[str, int, int, int]:
    """sha256, size and largest token id of a shard, and the first of the sorted token positions ``eos_at`` that
    does not hold ``eos_id`` (-1 if every one does), in one streaming read."""
    digest, size, top, bad = hashlib.sha256(), 0, -1, -1
    item = np.dtype(dtype).itemsize
    eos_at = np.empty(0, dtype=np.int64) if eos_at is None else eos_at
    with fs.open(path, "rb") as f:
        while block := f.read(chunk - chunk % item):
            digest.update(block)
            first = size // item
            size += len(block)
            usable = len(block) - len(block) % item
            if usable:
                tokens = np.frombuffer(block[:usable], dtype=dtype)
                top = max(top, int(tokens.max()))
                lo, hi = np.searchsorted(eos_at, [first, first + len(tokens)])
                wrong = np.flatnonzero(tokens[eos_at[lo:hi] - first] != eos_id)
                if bad < 0 and len(wrong):
                    bad = int(eos_at[lo + wrong[0]])
    return digest.hexdigest(), size, top, bad


def _check_inside(fs, root: str, path: str, rel: str, where: str) -> None:
    if is_local(fs):
        real_root = os.path.realpath(root)
        if os.path.commonpath([os.path.realpath(path), real_root]) != real_root:
            raise DataError(f"{where}: shard path {rel!r} resolves outside the dataset (symlink?)")


def verify_dataset(url: str, storage_options=None) -> str:
    """Everything training checks, for every shard: present, inside the dataset (no escaping symlink), size and
    sha256 as in the manifest, token ids below the vocabulary size; and for its document offsets: present, inside,
    size and sha256, starts that fit the shard and fall right after its EOS tokens. DataError naming the first bad
    file."""
    manifest, fp = load_manifest(url, storage_options)
    fs, root = open_url(url, storage_options)
    vocab, eos = int(manifest.tokenizer["vocab_size"]), int(manifest.tokenizer.get("eos_id", -1))
    count = tokens = with_docs = 0
    for split, shards in manifest.splits.items():
        for shard in shards:
            path, where = join(root, shard.path), join(url, shard.path)
            if not exists(fs, path):
                raise DataError(f"{where}: shard is missing")
            _check_inside(fs, root, path, shard.path, where)
            docs_problem, eos_at = None, None
            if shard.docs_path:
                docs, docs_where = join(root, shard.docs_path), join(url, shard.docs_path)
                if not exists(fs, docs):
                    raise DataError(f"{docs_where}: document offsets are missing")
                _check_inside(fs, root, docs, shard.docs_path, docs_where)
                data = read_bytes(fs, docs)
                docs_problem = document_starts_problem(data, shard)
                if docs_problem is None:
                    eos_at = document_end_positions(np.frombuffer(data, dtype=DOCS_DTYPE), shard.num_tokens)
            digest, size, top, bad = with_retries(
                lambda path=path, eos_at=eos_at: scan_shard(fs, path, manifest.dtype, eos_at=eos_at, eos_id=eos),
                where)
            if size != shard.num_bytes:
                raise DataError(f"{where}: size {size} bytes != manifest {shard.num_bytes}")
            if digest != shard.sha256:
                raise DataError(f"{where}: sha256 mismatch (content altered)")
            if top >= vocab:
                raise DataError(f"{where}: token id {top} >= vocab size {vocab}")
            if docs_problem is not None:
                raise DataError(f"{docs_where}: {docs_problem}")
            if bad >= 0:
                raise DataError(f"{docs_where}: {misaligned_starts(bad)}")
            count += 1
            tokens += shard.num_tokens
            with_docs += bool(shard.docs_path)
    tok_path = join(root, TOKENIZER)
    if hashlib.sha256(read_bytes(fs, tok_path)).hexdigest() != manifest.tokenizer["sha256"]:
        raise DataError(f"{join(url, TOKENIZER)}: sha256 does not match the manifest's tokenizer")
    docs_note = "with document offsets" if with_docs == count else (
        "no document offsets recorded" if not with_docs else f"{with_docs} with document offsets")
    return f"ok: {count} shards ({docs_note}), {tokens:,} tokens verified; fingerprint {fp[:16]}"


NO_DOCUMENT_STARTS = ("no document boundaries recorded (prepared before document offsets): model.attention=document "
                      "and --within-documents are unavailable; causal training works as before (prepare the data "
                      "again to record them)")


def _document_length_line(fs, root: str, url: str, shards: list[ShardInfo], max_shards: int) -> str:
    """Document length percentiles of a split from the offsets of at most ``max_shards`` evenly spaced shards."""
    if not all(s.docs_path for s in shards):
        return NO_DOCUMENT_STARTS
    picked = sorted(set(np.linspace(0, len(shards) - 1, min(len(shards), max(1, max_shards))).round().astype(int)))
    lengths = []
    for i in picked:
        shard = shards[i]
        data = read_bytes(fs, join(root, shard.docs_path))
        problem = document_starts_problem(data, shard)
        if problem is not None:
            raise DataError(f"{join(url, shard.docs_path)}: {problem}")
        lengths.append(document_lengths(np.frombuffer(data, dtype=DOCS_DTYPE), shard.num_tokens))
    lengths = np.concatenate(lengths)
    p10, p50, p90, p99 = (int(v) for v in np.percentile(lengths, [10, 50, 90, 99], method="nearest"))
    sampled = "" if len(picked) == len(shards) else f"; from {len(picked)} of {len(shards)} shards"
    return (f"document lengths (tokens incl. EOS{sampled}): p10 {p10:,} p50 {p50:,} p90 {p90:,} p99 {p99:,} "
            f"max {int(lengths.max()):,}")


def inspect_dataset(url: str, storage_options=None, sample: int = 200, doc_shards: int = 16) -> str:
    """A readable summary: fingerprint, tokenizer, per split its shards, tokens, documents and document length
    percentiles (from the offsets of at most ``doc_shards`` shards), the recipe, and the first ``sample`` tokens
    decoded."""
    from tape_pretrain.data.tokenizer import Tokenizer

    manifest, fp = load_manifest(url, storage_options)
    fs, root = open_url(url, storage_options)
    lines = [f"dataset {url}", f"  fingerprint {fp}", f"  tokenizer sha256 {manifest.tokenizer['sha256'][:16]}… "
             f"vocab {manifest.tokenizer['vocab_size']} dtype {manifest.dtype}"]
    for split, shards in manifest.splits.items():
        lines.append(f"  {split}: {len(shards)} shards, {sum(s.num_tokens for s in shards):,} tokens, "
                     f"{sum(s.num_docs for s in shards):,} documents")
        if shards:
            lines.append("    " + _document_length_line(fs, root, url, shards, doc_shards))
    lines.append(f"  source: {json.dumps(manifest.source)}")
    lines.append(f"  stats: {json.dumps(manifest.stats)}")
    train = manifest.splits.get("train") or []
    if train and sample > 0:
        tokenizer = Tokenizer.from_bytes(read_bytes(fs, join(root, TOKENIZER)), join(url, TOKENIZER))
        with fs.open(join(root, train[0].path), "rb") as f:
            head = np.frombuffer(f.read(sample * np.dtype(manifest.dtype).itemsize), dtype=manifest.dtype)
        lines.append(f"  first {len(head)} tokens of {train[0].path}:")
        lines.append("    " + tokenizer.decode(head).replace("\n", "\n    "))
    return "\n".join(lines)
