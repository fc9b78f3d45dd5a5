"""tape_pretrain: distributed pretraining of TAPE language models and positional-encoding baselines."""

__version__ = "0.1.0"
