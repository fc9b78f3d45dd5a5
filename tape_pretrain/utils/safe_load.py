"""Loading a checkpoint never unpickles arbitrary objects (RELIABILITY.md: a checkpoint must never run foreign code).

Checksums in files.json guard against corruption, not against anyone who can write the run directory or its bucket
prefix and rewrite files.json to match. So every ``torch.load`` of engine state runs weights-only (tensors,
containers, primitives and the few DeepSpeed classes listed here, which are rebuilt from their fields and run no
code), and DCP's pickled ``.metadata`` is read by an unpickler that accepts only DCP's own metadata classes.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle

import torch

from tape_pretrain.errors import CheckpointError

WEIGHTS_ONLY_ENV = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
NO_WEIGHTS_ONLY_ENV = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"
"""torch.load reads this at every call and then ignores a caller's weights_only=False (DeepSpeed passes it)."""


def deepspeed_safe_globals() -> list:
    """The non-tensor classes DeepSpeed 0.19 stores in ZeRO optimizer states (found by loading every file of a
    ZeRO 0-3 checkpoint weights-only): plain data holders."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def _refusal(exc: pickle.UnpicklingError) -> CheckpointError:
    detail = str(exc).split("WeightsUnpickler error:")[-1].strip().splitlines()[0]
    return CheckpointError(f"refusing to load a checkpoint file that is not weights-only ({detail}): it was "
                           "written by something other than tape-pretrain, or tampered with")


@contextlib.contextmanager
def weights_only_loading(extra_globals: list | None = None):
    """Within this block every torch.load is weights-only, whatever its caller asked for."""
    previous = os.environ.get(WEIGHTS_ONLY_ENV)
    overridden = os.environ.pop(NO_WEIGHTS_ONLY_ENV, None)  # torch refuses both set; ours wins inside the block
    os.environ[WEIGHTS_ONLY_ENV] = "1"
    try:
        with torch.serialization.safe_globals(extra_globals or []):
            yield
    except pickle.UnpicklingError as exc:
        raise _refusal(exc) from None
    finally:
        if previous is None:
            os.environ.pop(WEIGHTS_ONLY_ENV, None)
        else:
            os.environ[WEIGHTS_ONLY_ENV] = previous
        if overridden is not None:
            os.environ[NO_WEIGHTS_ONLY_ENV] = overridden


_DCP_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # a name -> torch.layout lookup
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("collections", "OrderedDict"),
}
"""Exactly what DCP (torch 2.13) pickles into .metadata: its metadata dataclasses, sizes, dtypes and paths."""


class _MetadataUnpickler(pickle.Unpickler):
    """Rebuilds DCP's metadata types and nothing else: no callable that could run code is reachable."""

    def find_class(self, module: str, name: str):
        is_dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) not in _DCP_METADATA_GLOBALS and not is_dtype:
            raise CheckpointError(f"refusing to unpickle {module}.{name} from DCP metadata (not a metadata type): "
                                  "the checkpoint was written by something other than tape-pretrain, or tampered with")
        return super().find_class(module, name)


def load_dcp_metadata(stream) -> object:
    """Unpickle a DCP ``.metadata`` file with the allowlist above."""
    return _MetadataUnpickler(io.BytesIO(stream.read())).load()


def _safe_dcp_reader(directory: str):
    """A DCP FileSystemReader whose metadata is read once, through the allowlist unpickler, before DCP runs (DCP
    swallows a read_metadata error and falls back to rank-local metadata, which would hide the refusal). Tensor
    files are read weights-only by DCP itself."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeFileSystemReader(FileSystemReader):
        def __init__(self, path):
            super().__init__(path)
            with self.fs.create_stream(self._get_metadata_path(None), "rb") as stream:
                self._metadata = load_dcp_metadata(stream)

        def read_metadata(self, *args, **kwargs):
            if kwargs.get("rank") is not None:
                raise FileNotFoundError("tape-pretrain writes no rank-local DCP metadata")
            metadata = self._metadata
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    try:
        return SafeFileSystemReader(directory)
    except OSError as exc:
        raise CheckpointError(f"{directory}: cannot read DCP metadata ({exc})") from None


def safe_dcp_load(state: dict, directory: str, **kwargs) -> None:
    """``dcp.load`` with the safe reader, weights-only; DCP's collective CheckpointException (a BaseException that
    wraps each rank's error with its traceback) becomes one CheckpointError naming the first cause."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with weights_only_loading():
            dcp.load(state, storage_reader=_safe_dcp_reader(directory), **kwargs)
    except CheckpointException as exc:
        causes = [cause for cause, _ in exc.failures.values()]
        for cause in causes:
            if isinstance(cause, CheckpointError):
                raise CheckpointError(str(cause)) from None
            if isinstance(cause, pickle.UnpicklingError):
                raise _refusal(cause) from None
        first = causes[0] if causes else exc
        raise CheckpointError(f"{directory}: DCP could not load the checkpoint ({type(first).__name__}: "
                              f"{str(first).strip().splitlines()[0] if str(first).strip() else ''})") from None
