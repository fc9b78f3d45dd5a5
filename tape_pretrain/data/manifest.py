"""The dataset manifest: what shards exist, their checksums, the tokenizer and the source.

A dataset is a directory (any fsspec URL) holding ``manifest.json``, ``tokenizer.model`` and
``{train,val}/shard_NNNNNN.bin``. The manifest is written last: without it the dataset does not exist.
The sha256 of the manifest's bytes is the dataset fingerprint.
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


@dataclass
class ShardInfo:
    path: str
    """Relative to the dataset root, e.g. train/shard_000000.bin."""
    num_tokens: int
    num_docs: int
    num_bytes: int
    sha256: str


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
        return manifest

    def num_tokens(self, split: str) -> int:
        return sum(s.num_tokens for s in self.splits.get(split, []))


def check_relative_path(path: str, where: str) -> None:
    """Paths inside a manifest are relative and stay under the dataset root."""
    if (not isinstance(path, str) or not path or "://" in path or path.startswith(("/", "\\"))
            or posixpath.normpath(path).startswith("..") or ".." in path.split("/")):
        raise DataError(f"{where}: shard path {path!r} must be relative and stay inside the dataset")


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


def scan_shard(fs, path: str, dtype: str, chunk: int = 8 << 20) -> tuple[str, int, int]:
    """sha256, size and largest token id of a shard, in one streaming read."""
    digest, size, top = hashlib.sha256(), 0, -1
    item = np.dtype(dtype).itemsize
    with fs.open(path, "rb") as f:
        while block := f.read(chunk - chunk % item):
            digest.update(block)
            size += len(block)
            usable = len(block) - len(block) % item
            if usable:
                top = max(top, int(np.frombuffer(block[:usable], dtype=dtype).max()))
    return digest.hexdigest(), size, top


def verify_dataset(url: str, storage_options=None) -> str:
    """Everything training checks, for every shard: present, inside the dataset (no escaping symlink), size and
    sha256 as in the manifest, token ids below the vocabulary size; DataError naming the first bad shard."""
    manifest, fp = load_manifest(url, storage_options)
    fs, root = open_url(url, storage_options)
    vocab = int(manifest.tokenizer["vocab_size"])
    count = tokens = 0
    for split, shards in manifest.splits.items():
        for shard in shards:
            path, where = join(root, shard.path), join(url, shard.path)
            if not exists(fs, path):
                raise DataError(f"{where}: shard is missing")
            if is_local(fs):
                real_root = os.path.realpath(root)
                if os.path.commonpath([os.path.realpath(path), real_root]) != real_root:
                    raise DataError(f"{where}: shard path {shard.path!r} resolves outside the dataset (symlink?)")
            digest, size, top = with_retries(lambda path=path: scan_shard(fs, path, manifest.dtype), where)
            if size != shard.num_bytes:
                raise DataError(f"{where}: size {size} bytes != manifest {shard.num_bytes}")
            if digest != shard.sha256:
                raise DataError(f"{where}: sha256 mismatch (content altered)")
            if top >= vocab:
                raise DataError(f"{where}: token id {top} >= vocab size {vocab}")
            count += 1
            tokens += shard.num_tokens
    tok_path = join(root, TOKENIZER)
    if hashlib.sha256(read_bytes(fs, tok_path)).hexdigest() != manifest.tokenizer["sha256"]:
        raise DataError(f"{join(url, TOKENIZER)}: sha256 does not match the manifest's tokenizer")
    return f"ok: {count} shards, {tokens:,} tokens verified; fingerprint {fp[:16]}"


def inspect_dataset(url: str, storage_options=None, sample: int = 200) -> str:
    from tape_pretrain.data.tokenizer import Tokenizer

    manifest, fp = load_manifest(url, storage_options)
    lines = [f"dataset {url}", f"  fingerprint {fp}", f"  tokenizer sha256 {manifest.tokenizer['sha256'][:16]}… "
             f"vocab {manifest.tokenizer['vocab_size']} dtype {manifest.dtype}"]
    for split, shards in manifest.splits.items():
        lines.append(f"  {split}: {len(shards)} shards, {sum(s.num_tokens for s in shards):,} tokens, "
                     f"{sum(s.num_docs for s in shards):,} documents")
    lines.append(f"  source: {json.dumps(manifest.source)}")
    lines.append(f"  stats: {json.dumps(manifest.stats)}")
    train = manifest.splits.get("train") or []
    if train and sample > 0:
        fs, root = open_url(url, storage_options)
        tokenizer = Tokenizer.from_bytes(read_bytes(fs, join(root, TOKENIZER)), join(url, TOKENIZER))
        with fs.open(join(root, train[0].path), "rb") as f:
            head = np.frombuffer(f.read(sample * np.dtype(manifest.dtype).itemsize), dtype=manifest.dtype)
        lines.append(f"  first {len(head)} tokens of {train[0].path}:")
        lines.append("    " + tokenizer.decode(head).replace("\n", "\n    "))
    return "\n".join(lines)
