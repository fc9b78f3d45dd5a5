"""The data a training run reads: one dataset (data.path) or a weighted mixture (data.sources), cached and verified,
the train loader over it and the validation windows of every source at every evaluated length.

data.access=copy: each node's first rank fetches and verifies every split, reporting progress, within
data.fetch_timeout_s, and the node's other ranks wait for its marker file (NodeHandshake), not in a collective.
data.access=stream: the train splits are read through a bounded StreamCache that a StreamPrefetcher fills ahead of
the loader; the val splits are copied as above."""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from tape_pretrain.config import ConfigError, DataConfig, RunConfig, source_name
from tape_pretrain.data.cache import CachedSplit, FetchProgress, NodeHandshake, cache_split
from tape_pretrain.data.loader import GlobalBatchLoader, TokenWindows, WindowSource
from tape_pretrain.data.manifest import Manifest, load_manifest
from tape_pretrain.data.stream import StreamCache, StreamedSplit, StreamPrefetcher, open_stream_cache
from tape_pretrain.distributed.env import DistEnv, all_gather_objects
from tape_pretrain.errors import DataError
from tape_pretrain.utils.redact import redact_text


@dataclass
class SourceData:
    name: str
    url: str
    weight: float
    manifest: Manifest
    fingerprint: str
    val: dict[int, TokenWindows] = field(default_factory=dict)
    """{N: the source's val split in windows of N}: trainer.seq_len and each eval length multiple (empty when the
    split is too small for one window)."""


@dataclass
class TrainingData:
    sources: list[SourceData]
    fingerprint: str
    """The dataset's fingerprint, or for a mixture a hash of every source's name and fingerprint."""
    loader: GlobalBatchLoader
    skipped_shards: list[str]
    has_documents: bool
    """Every source records document starts (batches then carry document ids)."""
    stream: StreamCache | None = None
    """data.access=stream: the cache the train splits are read through."""
    prefetcher: StreamPrefetcher | None = None
    """data.access=stream: fetches the shards of the loader's next batches in the background."""

    def close(self) -> None:
        """Stop the loader's and the stream cache's threads and delete the stream cache (it is also deleted when the
        process exits)."""
        self.loader.close()
        if self.prefetcher is not None:
            self.prefetcher.close()
        if self.stream is not None:
            self.stream.close()

    @property
    def manifest(self) -> Manifest:
        """The first source's manifest (every source has the same tokenizer)."""
        return self.sources[0].manifest

    @property
    def is_mixture(self) -> bool:
        return len(self.sources) > 1


def configured_sources(config: RunConfig) -> list[tuple[str, str, float]]:
    """(name, url, weight) of every dataset the run reads."""
    data = config.data
    if data.sources:
        return [(source_name(s), s.path, s.weight) for s in data.sources]
    if data.path is None:
        raise ConfigError("data.path is not set: point it at a dataset written by `tape-pretrain prep` (or list a "
                          "mixture in data.sources)")
    return [("main", data.path, 1.0)]


def mixture_fingerprint(sources: list[tuple[str, str]]) -> str:
    """sha256 over (name, fingerprint) pairs: a mixture's identity, without its weights (which resume may change)."""
    return hashlib.sha256(json.dumps(sources).encode()).hexdigest()


LEADER_GRACE_S = 60.0
"""How much longer than data.fetch_timeout_s a node's ranks wait for its first rank, which stops at that deadline
and reports why: its error, not theirs, should be the first to appear."""


def check_data_config(data: DataConfig) -> None:
    """The checks of data.access's settings (one clear ConfigError each)."""
    if not data.fetch_timeout_s > 0:
        raise ConfigError(f"data.fetch_timeout_s must be positive, got {data.fetch_timeout_s}")
    if not data.stream_cache_gib > 0:
        raise ConfigError(f"data.stream_cache_gib must be positive, got {data.stream_cache_gib}")
    if data.stream_lookahead_batches < 0:
        raise ConfigError(f"data.stream_lookahead_batches must be >= 0, got {data.stream_lookahead_batches}")


def launch_id(env: DistEnv) -> str:
    """An id that every rank of this launch shares and no other launch (or restart) has: global rank 0's random id,
    gathered once before any fetch, while every rank is here (it keys the node's marker files)."""
    mine = uuid.uuid4().hex
    return mine if env.world_size == 1 else all_gather_objects(mine if env.rank == 0 else None, env)[0]


def load_training_data(config: RunConfig, env: DistEnv, global_windows: int) -> TrainingData:
    t, c = config.trainer, config.data
    check_data_config(c)
    sources, cached = [], []
    for name, url, weight in configured_sources(config):
        manifest, fingerprint = load_manifest(url, config.data.storage_options)
        if sources and manifest.tokenizer["sha256"] != sources[0].manifest.tokenizer["sha256"]:
            raise DataError(f"data.sources: {redact_text(url)} ({name}) was tokenized with tokenizer "
                            f"{manifest.tokenizer['sha256'][:16]}, {redact_text(sources[0].url)} ({sources[0].name}) "
                            f"with {sources[0].manifest.tokenizer['sha256'][:16]}: a mixture needs one tokenizer "
                            "(prep every source with the same --tokenizer)")
        sources.append(SourceData(name, url, weight, manifest, fingerprint))
    launch = launch_id(env)
    stream = None
    if c.access == "stream":
        # the node's disk allowance, shared evenly by its ranks (each streams its own windows)
        stream = open_stream_cache(c.cache_dir, int(c.stream_cache_gib * 2**30 / env.local_world_size))
    for source in sources:
        train = (stream.add_split(source.url, source.manifest, source.fingerprint, "train", c.storage_options)
                 if stream is not None else _cache(config, env, source, "train", launch))
        cached.append((train, _cache(config, env, source, "val", launch)))
    if stream is not None and env.is_main:
        _stream_warnings(config, stream, [train for train, _ in cached])

    windows, skipped = [], []
    for source, (train, val) in zip(sources, cached):
        windows.append(WindowSource(source.name, TokenWindows(train, source.manifest.dtype, t.seq_len,
                                                              where=f"{redact_text(source.url)}: the train split"),
                                    source.weight, source.fingerprint))
        skipped += [f"{source.name}:{p}" if len(sources) > 1 else p for p in train.skipped]
        source.val = _val_windows(config, env, source, val)
    has_documents = all(w.windows.has_documents for w in windows)
    document_mode = config.model.attention == "document"
    if document_mode and not has_documents:
        missing = next(s for s, w in zip(sources, windows) if not w.windows.has_documents)
        raise ConfigError(f"model.attention=document needs document boundaries, but {redact_text(missing.url)} "
                          "records none (prepared before document offsets): prep it again, or train with "
                          "model.attention=causal")
    fingerprint = sources[0].fingerprint if len(sources) == 1 else mixture_fingerprint(
        [(s.name, s.fingerprint) for s in sources])
    # Document ids travel with every batch where the data has them: document mode needs them, causal mode counts
    # the tokens whose context crosses a document boundary.
    loader = GlobalBatchLoader(windows, fingerprint, config.seed, global_windows, env.rank, env.world_size,
                               prefetch=config.data.prefetch_batches, documents=has_documents)
    # the loader's own thread reads up to prefetch_batches + 1 batches ahead: look beyond that
    prefetcher = None if stream is None else StreamPrefetcher(
        loader, c.prefetch_batches + 1 + c.stream_lookahead_batches)
    return TrainingData(sources, fingerprint, loader, skipped, has_documents, stream, prefetcher)


def _cache(config: RunConfig, env: DistEnv, source: SourceData, split: str, launch: str) -> CachedSplit:
    """A node's first rank fetches and verifies (with progress, within data.fetch_timeout_s); the others wait for
    its marker file and re-use its verified copies, or stop with its error."""
    c = config.data

    def fetch():
        progress = FetchProgress(f"{redact_text(source.url)} ({split})", env.rank)
        return cache_split(source.url, source.manifest, source.fingerprint, split, c.cache_dir, c.storage_options,
                           c.on_corrupt_shard, progress=progress, timeout_s=c.fetch_timeout_s)

    if env.local_world_size == 1:
        return fetch()
    handshake = NodeHandshake(Path(c.cache_dir).expanduser() / source.fingerprint[:16], source.url,
                              source.fingerprint, split, launch)
    if env.local_rank == 0:
        return handshake.lead(fetch)
    return handshake.wait(c.fetch_timeout_s + LEADER_GRACE_S)


def _stream_warnings(config: RunConfig, stream: StreamCache, splits: list[StreamedSplit]) -> None:
    c = config.data
    if c.on_corrupt_shard == "skip":
        print("warning: data.on_corrupt_shard=skip is ignored for the train split with data.access=stream (a bad "
              "shard stops the run when first read); it still applies to the val split", flush=True)
    total = sum(s.num_bytes for s in splits)
    if total > stream.limit_bytes:
        print(f"warning: the train split ({total / 2**30:.3g} GiB) is larger than each rank's stream cache "
              f"({stream.limit_bytes / 2**30:.3g} GiB of data.stream_cache_gib={c.stream_cache_gib:g} per node): "
              "windows are drawn from the whole split, so shards will be evicted and fetched again", flush=True)


def _val_windows(config: RunConfig, env: DistEnv, source: SourceData, split: CachedSplit) -> dict[int, TokenWindows]:
    t = config.trainer
    if split.num_tokens <= t.seq_len:
        if env.is_main:
            print(f"warning: the val split of {redact_text(source.url)} has {split.num_tokens} tokens, too few for "
                  f"one window of trainer.seq_len={t.seq_len}: no val_loss will be logged for it (prep with a larger "
                  "--val-fraction)", flush=True)
        return {}
    out = {t.seq_len: TokenWindows(split, source.manifest.dtype, t.seq_len)}
    for m in t.eval_length_multipliers:
        n = m * t.seq_len
        if (split.num_tokens - 1) // n < env.world_size:
            raise ConfigError(
                f"trainer.eval_length_multipliers: {m} x seq_len = {n} tokens needs {env.world_size} window(s) of "
                f"{n + 1} tokens, but the val split of {redact_text(source.url)} has {split.num_tokens}: drop the "
                "multiplier or prep with a larger --val-fraction")
        out.setdefault(n, TokenWindows(split, source.manifest.dtype, n))
    return out
