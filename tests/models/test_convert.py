"""Converters: Hugging Face Llama parity and the official TAPE layout."""

import pytest
import torch

from tape_pretrain.config import ConfigError, ModelConfig, PositionalConfig
from tape_pretrain.models import build_model
from tape_pretrain.models.convert import from_hf_llama, from_official_tape, to_hf_llama, to_official_tape
from tests.models.test_tape_ablation import ablated, randomise
from tests.models.test_tape_properties import TOL

transformers = pytest.importorskip("transformers")


def hf_llama(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, rms_norm_eps=1e-5,
                                      max_position_embeddings=128, tie_word_embeddings=False, rope_theta=10000.0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # HF zero-inits nothing we care about, but make norms non-trivial
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.1)
    return model


def test_rope_matches_transformers_llama():
    hf = hf_llama()
    ours = from_hf_llama(hf.state_dict(), num_heads=4)
    ids = torch.randint(0, 211, (2, 33))
    with torch.no_grad():
        expected = hf(ids).logits
    assert (ours(ids) - expected).abs().max().item() <= 1e-5


def test_our_rope_loads_in_transformers():
    torch.manual_seed(0)
    ours = build_model(ModelConfig(preset="tiny", vocab_size=300, positional=PositionalConfig(name="rope"))).eval()
    sd, config = to_hf_llama(ours)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval()
    hf.load_state_dict(sd, strict=True)
    ids = torch.randint(0, 300, (2, 40))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() <= 1e-5


def test_official_tape_layout_round_trip():
    torch.manual_seed(0)
    ours = build_model(ModelConfig(preset=None, vocab_size=120, hidden_size=48, num_layers=3, num_heads=6,
                                   ffn_hidden_size=80, max_seq_len=64,
                                   positional=PositionalConfig(name="tape", tape_position_size=20))).eval()
    with torch.no_grad():
        for layer in ours.layers:
            layer.positional.pe.up_proj.weight.normal_(0, 0.1)
            layer.positional.post_attention_linear.weight.normal_(0, 0.1)
    official = to_official_tape(ours)
    assert official["model.layers.1.post_attention_linear.weight"].shape == (6, 6)
    assert official["model.layers.1.pe.up_proj.weight"].shape == (20, 6)
    assert official["model.layers.1.pe.x_proj.weight"].shape == (20, 48)
    assert official["model.layers.1.pe.down_proj.weight"].shape == (6, 20)
    official["model.rotary_emb.inv_freq"] = torch.zeros(4)  # derived; must be ignored
    loaded = from_official_tape(official)
    assert loaded.config.num_heads == 6 and loaded.positional.position_size == 20
    ids = torch.randint(0, 120, (2, 17))
    torch.testing.assert_close(loaded(ids), ours(ids), rtol=1e-6, atol=1e-6)


def test_official_layout_missing_weight_is_named():
    torch.manual_seed(0)
    ours = build_model(ModelConfig(preset="tiny", vocab_size=50))
    official = to_official_tape(ours)
    del official["model.layers.2.pe.x_proj.weight"]
    with pytest.raises(ValueError, match="layers.2.positional.pe.x_proj.weight"):
        from_official_tape(official)


@pytest.mark.parametrize("variant", ["no_attention_update", "no_mlp_update", "neither"])
def test_an_ablated_tape_converts_to_the_full_tape_that_computes_it(variant):
    """The official layout has both updates in every layer: an update switched off is written as zeros, and the file
    loads back as full TAPE with the same logits (fp64; every update weight that exists away from zero)."""
    ours = randomise(ablated(variant)).eval()
    loaded = from_official_tape(to_official_tape(ours))
    assert loaded.config.positional.tape_attention_update and loaded.config.positional.tape_mlp_update
    assert loaded.state_dict().keys() == ablated("full").state_dict().keys()
    added = loaded.state_dict().keys() - ours.state_dict().keys()
    assert added and not any(loaded.state_dict()[name].any() for name in added)  # zeros: no weight is made up
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(loaded(ids), ours(ids), **TOL)


def test_only_tape_converts_to_the_official_tape_layout():
    rope = build_model(ModelConfig(preset="tiny", vocab_size=50, positional=PositionalConfig(name="rope")))
    with pytest.raises(ConfigError, match="only a tape model converts to the official TAPE layout, not rope"):
        to_official_tape(rope)
