"""Local, verified copies of a dataset's shards and their document offsets.

Remote shards are downloaded once into ``cache_dir/<fingerprint>/``, checked (size, sha256, token ids
below the vocab size) and only then renamed into place. Local shards are read in place and checked
once; the result is remembered per (path, size, mtime). Either way a shard is hashed once, never per read.
A shard's document offsets file (where the manifest records one) gets the same treatment, plus a check that its
starts fit the shard and follow its EOS tokens; a bad offsets file makes its shard bad. Read the verified offsets
with ``tape_pretrain.data.manifest.read_document_starts(LocalShard.docs_path, LocalShard.num_tokens)``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tape_pretrain.data.manifest import (
    DOCS_DTYPE,
    Manifest,
    ShardInfo,
    document_end_positions,
    document_starts_problem,
    misaligned_starts,
)
from tape_pretrain.data.storage import TransferCorrupt, is_local, join, open_url, with_retries
from tape_pretrain.errors import DataError


@dataclass
class LocalShard:
    path: str
    num_tokens: int
    docs_path: str | None = None
    """Local path of the shard's verified document offsets (``manifest.read_document_starts``); None when the dataset
    records no document boundaries (prepared before document offsets)."""


@dataclass
class CachedSplit:
    shards: list[LocalShard]
    skipped: list[str] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.shards)


def _check_shard(path: str, shard: ShardInfo, dtype: str, vocab_size: int, where: str) -> str | None:
    """None if the local file matches the manifest, else the reason it does not."""
    size = os.path.getsize(path)
    if size != shard.num_bytes:
        return f"size {size} bytes != manifest {shard.num_bytes} (truncated or extended)"
    if size == 0:
        return "empty shard"
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
    if digest.hexdigest() != shard.sha256:
        return "sha256 mismatch (content altered)"
    tokens = np.memmap(path, dtype=dtype, mode="r")
    top = int(tokens.max())
    if top >= vocab_size:
        return f"token id {top} >= vocab size {vocab_size}"
    return None


def _check_docs(path: str, shard: ShardInfo, tokens_path: str, dtype: str, eos_id: int) -> str | None:
    """None if the local offsets file matches the manifest and fits the (verified) local shard, else the reason."""
    size = os.path.getsize(path)
    if size != shard.docs_num_bytes:
        return f"size {size} bytes != {shard.num_docs} documents x {DOCS_DTYPE.itemsize} (truncated or extended)"
    with open(path, "rb") as f:
        data = f.read()
    reason = document_starts_problem(data, shard)
    if reason is not None:
        return reason
    ends = document_end_positions(np.frombuffer(data, dtype=DOCS_DTYPE), shard.num_tokens)
    wrong = np.flatnonzero(np.memmap(tokens_path, dtype=dtype, mode="r")[ends] != eos_id)
    return misaligned_starts(int(ends[wrong[0]])) if len(wrong) else None


def _check_local(path: str, real_root: str, rel: str, where: str, sha256: str, verified: dict,
                 check) -> str | None:
    """A file of a local dataset, checked in place once per (path, size, mtime, sha256)."""
    if os.path.commonpath([os.path.realpath(path), real_root]) != real_root:
        raise DataError(f"{where}: shard path {rel!r} resolves outside the dataset (symlink?)")
    if not os.path.exists(path):
        return "missing"
    stat = os.stat(path)
    key = f"{path}:{stat.st_size}:{stat.st_mtime_ns}:{sha256}"
    reason = None if verified.get(key) else check(path)
    if reason is None:
        verified[key] = True
    return reason


def cache_split(url: str, manifest: Manifest, fingerprint: str, split: str, cache_dir: str,
                storage_options=None, on_corrupt: str = "error") -> CachedSplit:
    """Make every shard of ``split`` (and its document offsets, where recorded) available locally and verified;
    returns their local paths. A shard whose offsets file is bad counts as a bad shard."""
    fs, root = open_url(url, storage_options)
    local_root = Path(os.path.expanduser(cache_dir)) / fingerprint[:16]
    local_root.mkdir(parents=True, exist_ok=True)
    verified_file = local_root / "verified.json"
    verified = json.loads(verified_file.read_text()) if verified_file.exists() else {}
    vocab, eos = int(manifest.tokenizer["vocab_size"]), int(manifest.tokenizer.get("eos_id", -1))
    result = CachedSplit([])
    known = dict(verified)
    real_root = os.path.realpath(root) if is_local(fs) else ""

    def local_copy(rel: str, where: str, sha256: str, check) -> tuple[str, str | None]:
        """(local path, None) of a verified file of the dataset, or (path, the reason it is bad)."""
        if is_local(fs):
            path = join(root, rel)
            return path, _check_local(path, real_root, rel, where, sha256, verified, check)
        path = str(local_root / rel)
        return path, None if os.path.exists(path) else _download(fs, join(root, rel), path, check, where)

    for shard in manifest.splits.get(split, []):
        where = bad = join(url, shard.path)
        # the checks run within local_copy, in this iteration: the lambdas see this shard
        path, reason = local_copy(shard.path, where, shard.sha256,
                                  lambda p: _check_shard(p, shard, manifest.dtype, vocab, where))  # noqa: B023
        docs_path = None
        if reason is None and shard.docs_path:
            bad = join(url, shard.docs_path)
            docs_path, reason = local_copy(shard.docs_path, bad, shard.docs_sha256,
                                           lambda p: _check_docs(p, shard, path, manifest.dtype, eos))  # noqa: B023
        if reason is not None:
            if on_corrupt == "skip":
                detail = reason if bad == where else f"its document offsets {bad}: {reason}"
                print(f"warning: skipping shard {where}: {detail}")
                result.skipped.append(shard.path)
                continue
            without = "it" if bad == where else f"shard {shard.path}"
            raise DataError(f"{bad}: {reason}; set data.on_corrupt_shard=skip to train without {without}")
        result.shards.append(LocalShard(path, shard.num_tokens, docs_path))
    if verified != known:  # ranks on one node may get here together: private temp name, atomic rename
        tmp = verified_file.with_name(f"verified.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(verified))
        tmp.replace(verified_file)
    return result


def _download(fs, remote: str, path: str, check, where: str) -> str | None:
    """Fetch a shard (or offsets file) into the cache; a short or garbled transfer is retried, a file whose stored
    bytes are wrong (``check`` of the local copy says why) is reported, and nothing unverified is ever left under
    the final name."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.part.{os.getpid()}"

    def fetch() -> str | None:
        fs.get_file(remote, tmp)
        reason = check(tmp)
        stored = fs.info(remote)["size"]
        if reason is not None and os.path.getsize(tmp) != stored:
            raise TransferCorrupt(f"got {os.path.getsize(tmp)} of {stored} bytes")  # the transfer, not the shard
        return reason

    try:
        reason = with_retries(fetch, where)
    except FileNotFoundError:
        return "missing"
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if reason is None:
        os.replace(tmp, path)
    elif os.path.exists(tmp):
        os.unlink(tmp)
    return reason

