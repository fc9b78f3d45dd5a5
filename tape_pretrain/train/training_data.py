"""The data a training run reads: one dataset (data.path) or a weighted mixture (data.sources), cached and verified,
the train loader over it and the validation windows of every source at every evaluated length."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from tape_pretrain.config import ConfigError, RunConfig, source_name
from tape_pretrain.data.cache import CachedSplit, cache_split
from tape_pretrain.data.loader import GlobalBatchLoader, TokenWindows, WindowSource
from tape_pretrain.data.manifest import Manifest, load_manifest
from tape_pretrain.distributed.env import DistEnv, barrier
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


def load_training_data(config: RunConfig, env: DistEnv, global_windows: int) -> TrainingData:
    t = config.trainer
    sources, cached = [], []
    for name, url, weight in configured_sources(config):
        manifest, fingerprint = load_manifest(url, config.data.storage_options)
        if sources and manifest.tokenizer["sha256"] != sources[0].manifest.tokenizer["sha256"]:
            raise DataError(f"data.sources: {redact_text(url)} ({name}) was tokenized with tokenizer "
                            f"{manifest.tokenizer['sha256'][:16]}, {redact_text(sources[0].url)} ({sources[0].name}) "
                            f"with {sources[0].manifest.tokenizer['sha256'][:16]}: a mixture needs one tokenizer "
                            "(prep every source with the same --tokenizer)")
        sources.append(SourceData(name, url, weight, manifest, fingerprint))
    for source in sources:
        cached.append((_cache(config, env, source, "train"), _cache(config, env, source, "val")))

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
    return TrainingData(sources, fingerprint, loader, skipped, has_documents)


def _cache(config: RunConfig, env: DistEnv, source: SourceData, split: str) -> CachedSplit:
    """A node's first rank downloads and verifies; the others then find the verified copies."""
    c = config.data

    def fetch():
        return cache_split(source.url, source.manifest, source.fingerprint, split, c.cache_dir, c.storage_options,
                           c.on_corrupt_shard)

    result = fetch() if env.local_rank == 0 else None
    barrier(env)
    return fetch() if env.local_rank != 0 else result


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
