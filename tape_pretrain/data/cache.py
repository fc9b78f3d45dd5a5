"""Local, verified copies of a dataset's shards.

Remote shards are downloaded once into ``cache_dir/<fingerprint>/``, checked (size, sha256, token ids
below the vocab size) and only then renamed into place. Local shards are read in place and checked
once; the result is remembered per (path, size, mtime). Either way a shard is hashed once, never per read.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tape_pretrain.data.manifest import Manifest, ShardInfo
from tape_pretrain.data.storage import TransferCorrupt, is_local, join, open_url, with_retries
from tape_pretrain.errors import DataError


@dataclass
class LocalShard:
    path: str
    num_tokens: int


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


def cache_split(url: str, manifest: Manifest, fingerprint: str, split: str, cache_dir: str,
                storage_options=None, on_corrupt: str = "error") -> CachedSplit:
    """Make every shard of ``split`` available locally and verified; returns their local paths."""
    fs, root = open_url(url, storage_options)
    local_root = Path(os.path.expanduser(cache_dir)) / fingerprint[:16]
    local_root.mkdir(parents=True, exist_ok=True)
    verified_file = local_root / "verified.json"
    verified = json.loads(verified_file.read_text()) if verified_file.exists() else {}
    vocab = int(manifest.tokenizer["vocab_size"])
    result = CachedSplit([])
    known = dict(verified)
    for shard in manifest.splits.get(split, []):
        where = join(url, shard.path)
        if is_local(fs):
            path = join(root, shard.path)
            real_root = os.path.realpath(root)
            if os.path.commonpath([os.path.realpath(path), real_root]) != real_root:
                raise DataError(f"{where}: shard path {shard.path!r} resolves outside the dataset (symlink?)")
            if not os.path.exists(path):
                reason = "missing"
            else:
                stat = os.stat(path)
                key = f"{path}:{stat.st_size}:{stat.st_mtime_ns}:{shard.sha256}"
                reason = None if verified.get(key) else _check_shard(path, shard, manifest.dtype, vocab, where)
                if reason is None:
                    verified[key] = True
        else:
            path = str(local_root / shard.path)
            reason = None
            if not os.path.exists(path):
                reason = _download(fs, join(root, shard.path), path, shard, manifest.dtype, vocab, where)
        if reason is not None:
            if on_corrupt == "skip":
                print(f"warning: skipping shard {where}: {reason}")
                result.skipped.append(shard.path)
                continue
            raise DataError(f"{where}: {reason}; set data.on_corrupt_shard=skip to train without it")
        result.shards.append(LocalShard(path, shard.num_tokens))
    if verified != known:  # ranks on one node may get here together: private temp name, atomic rename
        tmp = verified_file.with_name(f"verified.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(verified))
        tmp.replace(verified_file)
    return result


def _download(fs, remote: str, path: str, shard: ShardInfo, dtype: str, vocab: int, where: str) -> str | None:
    """Fetch a shard into the cache; a short or garbled transfer is retried, a shard whose stored bytes are
    wrong is reported (the reason), and nothing unverified is ever left under the final name."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.part.{os.getpid()}"

    def fetch() -> str | None:
        fs.get_file(remote, tmp)
        reason = _check_shard(tmp, shard, dtype, vocab, where)
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

