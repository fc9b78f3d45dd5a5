"""Where a run's initial weights come from: the model's own initialisation, or an export (model.init_from), handed to
the engine as a ModelSource so that it can build the model whole or materialise it one parameter at a time."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from tape_pretrain.config import ModelConfig
from tape_pretrain.distributed.engine import ModelSource
from tape_pretrain.errors import CheckpointError
from tape_pretrain.models import build_model
from tape_pretrain.train.export import WEIGHTS, load_export_weights


class ExportWeights:
    """Reads an export's tensors one at a time (a 7B export is never loaded whole on every rank)."""

    def __init__(self, directory: str, model_config: ModelConfig):
        self.directory = directory
        path = Path(directory) / WEIGHTS
        if not path.is_file():
            raise CheckpointError(f"{directory}: no {WEIGHTS} (model.init_from must be an export directory)")
        try:
            self.file = safe_open(str(path), framework="pt", device="cpu")
            self.keys = {key.removeprefix("model."): key for key in self.file.keys()}  # noqa: SIM118
            shapes = {name: tuple(self.file.get_slice(key).get_shape()) for name, key in self.keys.items()}
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
        with torch.device("meta"):
            expected = {n: tuple(p.shape) for n, p in build_model(model_config, initialise=False).named_parameters()}
        missing, unexpected = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
        wrong = sorted(n for n in set(expected) & set(shapes) if expected[n] != shapes[n])
        if missing or unexpected or wrong:
            detail = "; ".join(f"{what}: {', '.join(names[:3])}" for what, names in
                               (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if names)
            raise CheckpointError(f"{directory}: weights do not fit the model config ({detail})")

    def tensor(self, name: str) -> torch.Tensor:
        return self.file.get_tensor(self.keys[name]).to(torch.float32)


def model_source(model_config: ModelConfig) -> ModelSource:
    """The run's model: freshly initialised (a function of the seed set before the engine is built), or the weights
    of model.init_from."""
    export = ExportWeights(model_config.init_from, model_config) if model_config.init_from else None

    def build(complete: bool):
        model = build_model(model_config, initialise=complete and export is None)
        if complete and export is not None:
            load_export_weights(model, export.directory)
        return model

    def initial_value(model, name: str, shape: torch.Size) -> torch.Tensor:
        return export.tensor(name) if export is not None else model.initial_value(name, shape)

    return ModelSource(build, initial_value)
