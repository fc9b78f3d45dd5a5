"""User-facing errors: each carries one clear line naming what is wrong and where."""

from __future__ import annotations

from tape_pretrain.config import ConfigError


class DataError(ValueError):
    """A corpus, tokenizer, shard or manifest is unusable."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or incompatible with the run."""


class StorageError(RuntimeError):
    """Remote storage failed beyond the retry budget, or a URL cannot be reached."""


USER_ERRORS = (ConfigError, DataError, CheckpointError, StorageError)
