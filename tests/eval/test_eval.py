"""Perplexity with a sliding window, passkey prompts and scoring, and linear-memory attention at long lengths."""

import math
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from tape_pretrain.config import ModelConfig, PositionalConfig
from tape_pretrain.data.cache import cache_split
from tape_pretrain.data.loader import TokenWindows
from tape_pretrain.data.manifest import load_manifest
from tape_pretrain.data.tokenizer import Tokenizer
from tape_pretrain.eval.passkey import make_prompt, passkey_accuracy, score
from tape_pretrain.eval.perplexity import perplexity
from tape_pretrain.models import build_model


def small_model(name="tape", vocab=512):
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset=None, vocab_size=vocab, hidden_size=32, num_layers=2, num_heads=2,
                                    ffn_hidden_size=64, max_seq_len=512, positional=PositionalConfig(name=name))).eval()
    with torch.no_grad():
        for layer in model.layers:
            if name == "tape":
                layer.positional.pe.up_proj.weight.normal_(0, 0.2)
    return model


def test_sliding_window_scores_each_token_once_with_context(dataset_path, tmp_path):
    manifest, fp = load_manifest(dataset_path)
    windows = TokenWindows(cache_split(dataset_path, manifest, fp, "val", str(tmp_path)), manifest.dtype, 32)
    model = small_model()
    result = perplexity(model, windows, max_tokens=16 * 6, batch_size=4, device="cpu", stride=16)
    flat = np.concatenate([np.fromfile(s.path, dtype=manifest.dtype) for s in
                           cache_split(dataset_path, manifest, fp, "val", str(tmp_path)).shards]).astype(np.int64)
    losses = []
    with torch.no_grad():
        for k in range(6):  # independently: window k starts at 16k, scores its last 16 (all 32 for k = 0)
            tokens = torch.from_numpy(flat[16 * k: 16 * k + 33])[None]
            loss = F.cross_entropy(model(tokens[:, :-1])[0], tokens[0, 1:], reduction="none")
            losses.append(loss if k == 0 else loss[16:])
    expected = torch.cat(losses).double()
    assert result["tokens"] == 32 + 5 * 16
    assert result["perplexity"] == pytest.approx(math.exp(expected.mean().item()), rel=1e-6)


def test_passkey_prompt_puts_the_key_at_the_depth(tokenizer_path):
    tokenizer = Tokenizer.load(tokenizer_path)
    rng = random.Random(0)
    for depth in (0.0, 0.25, 0.5, 0.9, 1.0):
        prompt = make_prompt(tokenizer, 400, depth, rng)
        assert abs(len(prompt.ids) - 400) <= 2
        text_before = tokenizer.decode(prompt.ids[: prompt.key_position])
        text_after = tokenizer.decode(prompt.ids[prompt.key_position:])
        assert prompt.key not in text_before
        assert text_after.lstrip().startswith(f"The pass key is {prompt.key}.")
        filler = len(prompt.ids) - len(tokenizer.processor.encode(
            f" The pass key is {prompt.key}. Remember it. {prompt.key} is the pass key.")) - len(
            tokenizer.processor.encode(" What is the pass key? The pass key is"))
        assert abs(prompt.key_position - depth * filler) <= 1
        assert tokenizer.decode(prompt.ids).endswith("What is the pass key? The pass key is")


@pytest.mark.parametrize("answer, ok", [(" 12345.", True), ("12345", True), (" 123456", False), (" 1234", False),
                                        (" 54321 12345", False), (" the key", False), ("", False)])
def test_passkey_scorer_accepts_exactly_the_key(answer, ok):
    assert score(answer, "12345") is ok


class CopyingModel(torch.nn.Module):
    """Reads the key from its context and predicts it token by token: a perfect passkey retriever."""

    def __init__(self, tokenizer, vocab_size: int):
        super().__init__()
        self.tokenizer, self.vocab_size = tokenizer, vocab_size

    def forward(self, tokens):
        ids = tokens[0].tolist()
        key = re.search(r"pass key is (\d+)", self.tokenizer.decode(ids)).group(1)
        answer = self.tokenizer.processor.encode(f" {key}.")
        done = max(k for k in range(len(answer)) if k == 0 or ids[-k:] == answer[:k])  # answer tokens already out
        logits = torch.zeros(1, len(ids), self.vocab_size)
        logits[0, -1, answer[done]] = 1.0
        return logits


class ConstantModel(torch.nn.Module):
    """Ignores its context: always the same digit."""

    def __init__(self, token: int, vocab_size: int):
        super().__init__()
        self.token, self.vocab_size = token, vocab_size

    def forward(self, tokens):
        logits = torch.zeros(1, tokens.shape[1], self.vocab_size)
        logits[0, -1, self.token] = 1.0
        return logits


def test_passkey_accuracy_is_one_for_a_copying_model_and_zero_for_a_constant_one(tokenizer_path):
    tokenizer = Tokenizer.load(tokenizer_path)
    cells = dict(lengths=[64, 200], depths=[0.0, 0.5, 1.0], trials=3, seed=1)
    copying = passkey_accuracy(CopyingModel(tokenizer, 512), tokenizer, **cells)
    assert set(copying) == {(n, d) for n in (64, 200) for d in (0.0, 0.5, 1.0)}
    assert all(a == 1.0 for a in copying.values()), copying
    constant = passkey_accuracy(ConstantModel(tokenizer.processor.encode("7")[-1], 512), tokenizer, **cells)
    assert all(a == 0.0 for a in constant.values()), constant


def test_passkey_decoding_runs_the_real_model(tokenizer_path):
    tokenizer = Tokenizer.load(tokenizer_path)
    accuracy = passkey_accuracy(small_model(), tokenizer, [64], [0.5], trials=1, seed=1)
    assert set(accuracy) == {(64, 0.5)} and accuracy[(64, 0.5)] in (0.0, 1.0)


@pytest.mark.parametrize("name", ["tape", "rope"])
def test_long_inputs_use_the_linear_memory_kernel(name):
    """8x a 512 training length: only the fused (flash) kernel is allowed, which never builds the N x N matrix;
    a formulation that needed the math kernel would raise here."""
    model = small_model(name)
    ids = torch.randint(0, 512, (1, 4096))
    with torch.no_grad(), sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        logits = model(ids)
    assert logits.shape == (1, 4096, 512) and torch.isfinite(logits).all()
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]), pytest.raises(RuntimeError):
        q = torch.randn(1, 2, 64, 16)
        F.scaled_dot_product_attention(q, q, torch.randn(1, 2, 64, 32))  # the 2D-wide single call TAPE avoids


@pytest.mark.parametrize("lengths, message", [
    ("0", "--lengths '0' must be positive integers"),
    ("64,x", "--lengths '64,x' must be comma-separated integers"),
    ("32,100000000", r"the val split has [\d,]+ tokens, too few for one window of length 100,000,000"),
])
def test_bad_eval_lengths_are_one_clear_error(dataset_path, tmp_path, capsys, lengths, message):
    from tape_pretrain.cli import main
    from tape_pretrain.train.export import save_export

    model = small_model()
    save_export(model.state_dict(), model.config, tmp_path / "export", None)
    code = main(["eval", str(tmp_path / "export"), "--data", dataset_path, "--lengths", lengths])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err
    assert not (tmp_path / "eval.json").exists()


def test_eval_refuses_a_dataset_of_another_tokenizer(dataset_path, tmp_path, capsys):
    """R9, for evaluation: the model's tokenizer against the dataset's."""
    from tape_pretrain.cli import main
    from tape_pretrain.train.export import save_export

    own = (Path(dataset_path) / "tokenizer.model").read_bytes()
    model = small_model()
    args = ["--data", dataset_path, "--lengths", "32", "--max-tokens", "64", "--out", str(tmp_path / "out")]
    save_export(model.state_dict(), model.config, tmp_path / "same", own)
    assert main(["eval", str(tmp_path / "same"), *args]) == 0
    save_export(model.state_dict(), model.config, tmp_path / "other", own + b"\0")  # another tokenizer's bytes
    assert main(["eval", str(tmp_path / "other"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "tokenized with another tokenizer" in err, err
    assert main(["eval", str(tmp_path / "other"), *args, "--allow-tokenizer-mismatch"]) == 0
    assert "warning:" in capsys.readouterr().out
    small = small_model(vocab=256)
    save_export(small.state_dict(), small.config, tmp_path / "small", own)
    assert main(["eval", str(tmp_path / "small"), *args, "--allow-tokenizer-mismatch"]) == 2
    assert "its tokenizer has 512 ids, the model only 256" in capsys.readouterr().err


def test_an_unwritable_out_is_one_error(dataset_path, tmp_path, capsys):
    """(As root, a read-only directory is still writable; a path under a regular file fails for every user.)"""
    from tape_pretrain.cli import main
    from tape_pretrain.train.export import save_export

    model = small_model()
    save_export(model.state_dict(), model.config, tmp_path / "export", None)
    (tmp_path / "plain_file").write_text("x")
    code = main(["eval", str(tmp_path / "export"), "--data", dataset_path, "--lengths", "32", "--out",
                 str(tmp_path / "plain_file" / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "give a writable --out" in err, err
