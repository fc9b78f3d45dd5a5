"""Where a run's initial weights come from: the model's own initialisation, or model.init_from (an export, or a
Hugging Face Llama: models.llama_import), handed to the engine as a ModelSource so that it can build the model whole
or materialise it one parameter at a time."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from tape_pretrain.config import ModelConfig
from tape_pretrain.distributed.engine import ModelSource
from tape_pretrain.errors import CheckpointError
from tape_pretrain.models import build_model
from tape_pretrain.models.llama_import import LlamaWeights, is_hf_llama
from tape_pretrain.train.export import WEIGHTS


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

    def has(self, name: str) -> bool:
        return name in self.keys

    def tensor(self, name: str) -> torch.Tensor:
        return self.file.get_tensor(self.keys[name]).to(torch.float32)


def pretrained_weights(model_config: ModelConfig) -> ExportWeights | LlamaWeights | None:
    """The tensors of model.init_from (an export, or a Hugging Face Llama), checked against the model; or None."""
    if not model_config.init_from:
        return None
    if is_hf_llama(model_config.init_from):
        with torch.device("meta"):
            expected = {n: tuple(p.shape) for n, p in build_model(model_config, initialise=False).named_parameters()}
        return LlamaWeights(model_config.init_from, expected)
    return ExportWeights(model_config.init_from, model_config)


def model_source(model_config: ModelConfig) -> ModelSource:
    """The run's model: freshly initialised (a function of the seed set before the engine is built), or the weights
    of model.init_from; parameters that a Llama checkpoint lacks (a new encoding's) take their own initial values."""
    weights = pretrained_weights(model_config)

    def initial_value(model, name: str, shape: torch.Size) -> torch.Tensor:
        return weights.tensor(name) if weights is not None and weights.has(name) else model.initial_value(name, shape)

    def build(complete: bool):
        model = build_model(model_config, initialise=complete and weights is None)
        if complete and weights is not None:
            with torch.no_grad():
                for name, param in model.named_parameters():
                    param.copy_(initial_value(model, name, param.shape))
        return model

    return ModelSource(build, initial_value)


def check_pretrained_tokenizer(init_from: str, dataset_tokenizer_sha256: str) -> None:
    """The dataset must be tokenized with model.init_from's tokenizer (its tokenizer.model, by sha256): other ids
    would train the pretrained embeddings on the wrong tokens, silently."""
    from tape_pretrain.errors import DataError
    from tape_pretrain.models.llama_import import tokenizer_sha256

    if "://" in init_from:
        return
    sha256 = tokenizer_sha256(init_from)
    if sha256 is None:
        if is_hf_llama(init_from):
            raise DataError(f"model.init_from {init_from} has no tokenizer.model to check the dataset's tokenizer "
                            "against: prep the data with the checkpoint's SentencePiece tokenizer and put it there")
        return  # an export written without a tokenizer: nothing to compare
    if sha256 != dataset_tokenizer_sha256:
        raise DataError(f"the dataset was tokenized with another tokenizer than model.init_from's "
                        f"({init_from}/tokenizer.model, sha256 {sha256[:16]}…): prep it with --tokenizer "
                        f"{init_from}/tokenizer.model")
