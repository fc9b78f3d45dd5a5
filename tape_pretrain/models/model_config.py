"""The model's configuration: the dataclasses of `model.*`, the size presets, and their resolution to a config with
every size set.

Standard library only, like every module the model needs (transformer, positional encodings, cache): Hugging Face
exports ship these files unchanged beside their modeling code, where this package is not installed (train.export).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message names the dotted path."""


POSITIONAL_NAMES = ("tape", "rope", "nope", "alibi", "fire", "xpos", "randrope")


@dataclass
class PositionalConfig:
    name: Literal["tape", "rope", "nope", "alibi", "fire", "xpos", "randrope"] = "tape"
    """Which positional encoding the attention uses."""
    rope_base: float = 10000.0
    """Base of the rotary frequencies theta_f = base^(-2f/D) (rope, tape, xpos, randrope)."""
    tape_position_size: int | None = None
    """Width I of TAPE's positional MLP; None means 4 x num_heads."""
    tape_random_offset: bool = False
    """Draw a random global position offset k in [0, 2*max_seq_len] per training forward (TAPE)."""
    tape_attention: Literal["auto", "two_calls", "one_call"] = "auto"
    """How TAPE computes A v and A [c|s]: one attention call over [v|c|s], two calls, or the faster one per device."""
    tape_attention_update: bool = True
    """TAPE's attention-side update c, s += gamma_h (A c, A s); false (the paper's ablation) leaves the state unchanged
    through attention and creates no gamma matrix (post_attention_linear)."""
    tape_mlp_update: bool = True
    """TAPE's MLP-side update c, s += M_n (c, s); false (the paper's ablation) leaves the state unchanged through the
    MLP and creates no positional MLP (pe.x_proj, pe.up_proj, pe.down_proj). Both false is exactly RoPE."""
    xpos_scale_base: float = 2048.0
    """xPos decay scale s: q is scaled by zeta^(n/s), k by zeta^(-n/s)."""
    fire_mlp_width: int = 32
    """Hidden width of FIRE's per-layer 1 -> width -> H bias MLP."""
    fire_init_c: float = 0.1
    """Initial value of FIRE's learnable log-transform scale c."""
    fire_init_threshold: float = 512.0
    """FIRE's L~ = |lambda * this|, with lambda initialised to 1."""
    randrope_max_len: int | None = None
    """RandPE draws training positions from [0, randrope_max_len); None means 2 x model.max_seq_len."""
    randrope_eval: Literal["sample", "expected"] = "sample"
    """RandPE in eval mode at length N, over [0, R), R = floor(N x randrope_max_len / model.max_seq_len) = 2N by
    default (the training gap; 0..N-1 would halve every distance): sample (the official code's [0, 2N)): N sorted
    distinct positions drawn per row (shared by every layer), seeded by randrope_eval_seed; expected: the evenly
    spaced floor(i R / N), i.e. 2i by default, without a draw."""
    randrope_eval_seed: int = 0
    """Seed of RandPE's eval-mode draws: eval mode never touches the global RNG and is a function of its input."""
    interpolation: float = 1.0
    """Linear position interpolation (PI): rotary angles are those of position / interpolation, for RoPE, RandPE,
    xPos's rotation and TAPE's initial state (2 extends a model trained at N to 2N); 1 leaves positions as they are."""


@dataclass
class ModelConfig:
    preset: str | None = "tiny"
    """Size preset (tiny, paper-155m, 350m, 760m, 1.3b, 7b); explicit fields below override it."""
    vocab_size: int | None = None
    """Vocabulary size; None takes the preset's, or the dataset tokenizer's when training."""
    hidden_size: int | None = None
    """Model width d = num_heads x head_dim."""
    num_layers: int | None = None
    """Number of decoder blocks L."""
    num_heads: int | None = None
    """Attention heads H (no grouped-query attention)."""
    ffn_hidden_size: int | None = None
    """SwiGLU inner width d_ff."""
    max_seq_len: int | None = None
    """Longest training sequence; sizes RandPE's range and TAPE's random offset."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation of linear and embedding weights."""
    positional: PositionalConfig = field(default_factory=PositionalConfig)
    """The positional encoding, a named sub-config."""
    init_from: str | None = None
    """Start from the weights of an export directory (tape-pretrain export) instead of random init."""
    attention: Literal["causal", "document"] = "causal"
    """causal: every token sees all earlier tokens of its training window, across document boundaries, at positions
    0..N-1 of the window. document: a token sees only its own document (block-causal) and positions restart at 0 at
    each document start, for every encoding; needs a dataset whose prep recorded document offsets."""


PRESETS: dict[str, dict[str, int]] = {
    # ~1.9M parameters with vocab 4096: trains on a 2-core CPU in minutes.
    "tiny": dict(vocab_size=4096, hidden_size=128, num_layers=4, num_heads=4, ffn_hidden_size=352,
                 max_seq_len=256),
    # The paper's "155M" (TAPE.md section 1): 162,417,408 parameters with RoPE.
    "paper-155m": dict(vocab_size=32000, hidden_size=768, num_layers=12, num_heads=12, ffn_hidden_size=3072,
                       max_seq_len=1024),
    "350m": dict(vocab_size=32000, hidden_size=1024, num_layers=24, num_heads=16, ffn_hidden_size=4096,
                 max_seq_len=1024),
    "760m": dict(vocab_size=32000, hidden_size=1536, num_layers=24, num_heads=16, ffn_hidden_size=6144,
                 max_seq_len=1024),
    "1.3b": dict(vocab_size=32000, hidden_size=2048, num_layers=24, num_heads=32, ffn_hidden_size=8192,
                 max_seq_len=2048),
    # Llama-2-7B shape.
    "7b": dict(vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32, ffn_hidden_size=11008,
               max_seq_len=4096),
}


def resolve_model_config(config: ModelConfig) -> ModelConfig:
    """Return a copy with every size field set: explicit fields win over the preset's."""
    base = {}
    if config.preset is not None:
        if config.preset not in PRESETS:
            raise ConfigError(f"model.preset: unknown preset {config.preset!r} (known: {', '.join(PRESETS)})")
        base = PRESETS[config.preset]
    values = {}
    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "ffn_hidden_size", "max_seq_len"):
        value = getattr(config, name)
        if value is None:
            value = base.get(name)
        if value is None:
            raise ConfigError(f"model.{name} is not set and no model.preset provides it")
        if value <= 0:
            raise ConfigError(f"model.{name} must be positive, got {value}")
        values[name] = value
    if values["hidden_size"] % values["num_heads"]:
        raise ConfigError(f"model.hidden_size={values['hidden_size']} is not divisible by "
                          f"model.num_heads={values['num_heads']}")
    if (values["hidden_size"] // values["num_heads"]) % 2:
        raise ConfigError("model head dim (hidden_size / num_heads) must be even for rotary encodings")
    return dataclasses.replace(config, **values)


def model_config_from_dict(data: dict[str, Any]) -> ModelConfig:
    """A ModelConfig from its ``dataclasses.asdict`` form (an export's ``tape_pretrain`` section); an unknown key is
    a TypeError naming it (an export from a newer version), a missing one takes its default (an older version)."""
    values = dict(data)
    positional = PositionalConfig(**values.pop("positional", {}))
    return ModelConfig(**values, positional=positional)
