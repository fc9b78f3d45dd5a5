"""Paired initialisation: for one seed, every positional encoding starts from bit-identical backbone weights, so that
runs which differ only in their encoding differ only in it. Built as a run builds its model: the trainer seeds the
global generator, the model draws one init seed from it, and each parameter's value is a function of that seed and
its name (Transformer.initial_value), whether the engine builds the model whole or materialises it from the meta
device one parameter at a time."""

import pytest
import torch

from tape_pretrain.config import ModelConfig, PositionalConfig
from tape_pretrain.models.positional import REGISTRY
from tape_pretrain.train.initial_weights import model_source

ENCODINGS = {name: PositionalConfig(name=name) for name in sorted(REGISTRY)} | {
    "tape-no-attention-update": PositionalConfig(name="tape", tape_attention_update=False),
    "tape-no-mlp-update": PositionalConfig(name="tape", tape_mlp_update=False)}


def config(positional: PositionalConfig) -> ModelConfig:
    return ModelConfig(preset=None, vocab_size=101, hidden_size=32, num_layers=3, num_heads=4, ffn_hidden_size=48,
                       max_seq_len=64, positional=positional)


def run_weights(positional: PositionalConfig, seed: int) -> dict[str, torch.Tensor]:
    """What the Trainer starts from: torch.manual_seed(run seed), then the engine builds model_source's model."""
    torch.manual_seed(seed)
    model = model_source(config(positional)).build(True)
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def materialised_weights(positional: PositionalConfig, seed: int) -> dict[str, torch.Tensor]:
    """What FSDP2 and ZeRO-3 start from: built on the meta device, each parameter filled from initial_value."""
    torch.manual_seed(seed)
    source = model_source(config(positional))
    with torch.device("meta"):
        model = source.build(False)
    return {name: source.initial_value(model, name, p.shape) for name, p in reversed(list(model.named_parameters()))}


def is_random(weight: torch.Tensor) -> bool:
    return weight.unique().numel() > 1  # not a constant init (norms, zero-initialised updates, FIRE's c)


def backbone(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: w for name, w in weights.items() if ".positional." not in name and not name.startswith("positional.")}


@pytest.mark.parametrize("seed", [1234, 7])
def test_every_encoding_starts_from_the_same_backbone(seed):
    weights = {name: run_weights(positional, seed) for name, positional in ENCODINGS.items()}
    reference = backbone(weights["rope"])
    assert len(reference) == 3 + 3 * 9  # embeddings, final norm, lm_head; per layer 2 norms, q k v o, 3 MLP
    for name, w in weights.items():
        shared = backbone(w)
        assert shared.keys() == reference.keys(), name
        different = [k for k in reference if not torch.equal(shared[k], reference[k])]
        assert not different, f"{name}: backbone weights differ from rope's for the same seed: {different[:4]}"
    # not trivially equal: another seed gives other weights, and no two parameters share a stream
    other = backbone(run_weights(ENCODINGS["rope"], seed + 1))
    assert not any(torch.equal(other[k], reference[k]) for k in reference if is_random(reference[k]))
    firsts = [w.flatten()[:8] for w in reference.values() if is_random(w)]
    assert len({tuple(f.tolist()) for f in firsts}) == len(firsts)


@pytest.mark.parametrize("name", ["tape", "fire", "rope"])
def test_materialised_models_start_from_the_same_weights(name):
    """Order-free: the meta-device path (reversed order) gives what the eager build gives, positional weights too."""
    eager, materialised = run_weights(ENCODINGS[name], 99), materialised_weights(ENCODINGS[name], 99)
    assert eager.keys() == materialised.keys()
    assert all(torch.equal(eager[k], materialised[k]) for k in eager)


def test_encoding_weights_come_from_their_own_streams():
    """TAPE's and FIRE's own weights are functions of the seed and their names: the same for the same seed, other
    for another, and TAPE's shared by its ablations where both have them."""
    tape, fire = run_weights(ENCODINGS["tape"], 3), run_weights(ENCODINGS["fire"], 3)
    for weights, other in ((tape, run_weights(ENCODINGS["tape"], 4)), (fire, run_weights(ENCODINGS["fire"], 4))):
        random = [k for k, w in weights.items() if ".positional." in k and is_random(w)]
        assert random and not any(torch.equal(weights[k], other[k]) for k in random)
    for variant in ("tape-no-attention-update", "tape-no-mlp-update"):
        ablated = run_weights(ENCODINGS[variant], 3)
        assert all(torch.equal(w, tape[k]) for k, w in ablated.items())
