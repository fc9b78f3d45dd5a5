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
from tape_pretrain.eval.passkey import evaluate_passkey, make_prompt, passkey_accuracy, score, wilson_interval
from tape_pretrain.eval.perplexity import eval_placement, perplexity
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


def test_document_attention_and_within_document_windows_score_each_document_alone(dataset_path, tmp_path):
    """Document mode scores each token with its own document only; --within-documents takes only windows inside one
    document, stride apart from its start. Both against a per-document reference built from the document offsets."""
    import json

    from tape_pretrain.cli import main

    manifest, fp = load_manifest(dataset_path)
    split = cache_split(dataset_path, manifest, fp, "val", str(tmp_path))
    flat = np.concatenate([np.fromfile(s.path, dtype=manifest.dtype) for s in split.shards]).astype(np.int64)
    offsets = np.cumsum([0] + [s.num_tokens for s in split.shards])
    starts = np.concatenate([np.fromfile(s.docs_path, dtype="<u8").astype(np.int64) + base
                             for s, base in zip(split.shards, offsets)])
    ends = np.append(starts[1:], len(flat))
    model = small_model()
    n = 32
    windows = TokenWindows(split, manifest.dtype, n)
    count = int(starts[1]) // n + 2  # through the first document boundary
    result = perplexity(model, windows, max_tokens=n * count, batch_size=4, device="cpu", attention="document")
    losses = []
    with torch.no_grad():
        for k in range(count):  # window k: each document's inputs in it alone, positions from the piece's start
            for a, b in zip(starts, ends):
                lo, hi = max(a, k * n), min(b, k * n + n)
                if hi > lo:  # a document's last input (EOS) predicts the next document's first token
                    inputs, labels = torch.from_numpy(flat[lo:hi])[None], torch.from_numpy(flat[lo + 1:hi + 1])
                    losses.append(F.cross_entropy(model(inputs)[0], labels, reduction="none"))
    reference = torch.cat(losses).double()
    assert result["tokens"] == reference.numel() == count * n
    assert any(k * n < a < k * n + n for k in range(count) for a in starts)  # some window packs two documents
    assert result["loss"] == pytest.approx(reference.mean().item(), rel=1e-9)
    causal = perplexity(model, windows, max_tokens=n * count, batch_size=4, device="cpu")
    # measured: 1.5e-10 from the reference, 9e-6 from causal attention (one boundary among many windows)
    assert abs(causal["loss"] - result["loss"]) > 1e-6
    within = perplexity(model, windows, max_tokens=10**9, batch_size=4, device="cpu", stride=16,
                        within_documents=True)
    expected_windows = sum(max(0, (b - a - n - 1) // 16 + 1) for a, b in zip(starts, ends))
    assert within["windows"] == expected_windows > 0
    assert within["tokens"] == sum(n + 16 * (max(0, (b - a - n - 1) // 16 + 1) - 1)
                                   for a, b in zip(starts, ends) if b - a > n)
    # the first windows inside documents, scored as the sliding window scores them, from the document offsets
    first = perplexity(model, windows, max_tokens=16 * 5, batch_size=2, device="cpu", stride=16,
                       within_documents=True)
    a = next(a for a, b in zip(starts, ends) if b - a > n + 16 * 4)
    losses = []
    with torch.no_grad():
        for j in range(5):
            tokens = torch.from_numpy(flat[a + 16 * j: a + 16 * j + n + 1])[None]
            loss = F.cross_entropy(model(tokens[:, :-1])[0], tokens[0, 1:], reduction="none")
            losses.append(loss if j == 0 else loss[n - 16:])
    assert first["tokens"] == n + 4 * 16
    assert first["loss"] == pytest.approx(torch.cat(losses).double().mean().item(), rel=1e-9)
    export = export_with_tokenizer(dataset_path, tmp_path / "export")
    assert main(["eval", export, "--data", dataset_path, "--lengths", "32", "--max-tokens", "256", "--device", "cpu",
                 "--attention", "document", "--within-documents", "--out", str(tmp_path / "out")]) == 0
    saved = json.loads((tmp_path / "out" / "eval.json").read_text())["32"]
    assert saved["attention"] == "document" and saved["within_documents"] is True


TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
        "I will quiz you about the important information there.")
SENTENCES = ["The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again."]
QUESTION = "What is the pass key? The pass key is"


def whole_sentences(text: str) -> list[str]:
    """The sentences of a stretch of filler, which must consist of nothing else."""
    found = re.findall(r"[A-Z][^.]*\.", text)
    assert " ".join(found) == text.strip(), text
    return found


def test_passkey_prompt_is_whole_sentences_with_the_key_at_the_depth(tokenizer_path):
    """LongLoRA / Landmark format: the task, whole filler sentences with the key sentence between two of them after
    round(depth x sentences), the question last; at most L tokens, within one filler sentence of L."""
    tokenizer = Tokenizer.load(tokenizer_path)
    encode = tokenizer.processor.encode
    rng = random.Random(0)
    for length in (260, 333, 1000):
        for depth in (0.0, 0.1, 0.25, 0.5, 0.9, 1.0):
            prompt = make_prompt(tokenizer, length, depth, rng)
            key_text = f"The pass key is {prompt.key}. Remember it. {prompt.key} is the pass key."
            text = tokenizer.decode(prompt.ids)
            assert re.fullmatch(r"[1-9]\d{4}", prompt.key)
            assert encode(text) == prompt.ids  # the prompt's tokens are its text's own: no piece cut mid-word
            assert text.startswith(TASK + " ") and text.endswith(" " + QUESTION)
            parts = text[len(TASK) + 1: -len(QUESTION) - 1].split(key_text)
            assert len(parts) == 2, text
            before, after = whole_sentences(parts[0]), whole_sentences(parts[1])
            filler = before + after
            assert filler == [SENTENCES[i % 5] for i in range(len(filler))]
            assert len(prompt.ids) <= length < len(prompt.ids) + len(encode(SENTENCES[len(filler) % 5]))
            assert len(before) == round(depth * len(filler)) and len(filler) > 3  # (tokenizer-dependent)
            assert (depth != 0.0 or before == []) and (depth != 1.0 or after == [])
            assert tokenizer.decode(prompt.ids[prompt.key_position:]).startswith(key_text)
    with pytest.raises(ValueError, match=r"passkey length 100 is too short: .* alone take \d+ tokens"):
        make_prompt(tokenizer, 100, 0.5, rng)


@pytest.mark.parametrize("answer, ok", [
    (" 68431.", True), ("68431", True), ("\n 68431 is the pass key", True), (" 68431, 68431", True),
    (" 6843", False), (" 684310", False), (" 12345", False), (" 6843 1", False), (" it is 68431", False),
    (" 168431", False), (" the key", False), ("", False)])
def test_passkey_scorer_is_an_exact_match_at_the_start(answer, ok):
    assert score(answer, "68431") is ok


@pytest.mark.parametrize("successes, low, high", [(0, 0.0, 0.1611), (10, 0.2993, 0.7007), (17, 0.6396, 0.9476),
                                                  (20, 0.8389, 1.0)])
def test_wilson_interval_of_20_trials(successes, low, high):
    """By hand: centre (p + z²/2n) / (1 + z²/n), half-width z sqrt(p(1-p)/n + z²/4n²) / (1 + z²/n), z = 1.96."""
    assert wilson_interval(successes, 20) == pytest.approx((low, high), abs=5e-5)
    assert wilson_interval(20, 20)[1] == 1.0 and wilson_interval(0, 20)[0] == 0.0  # exact ends, no 0.99999...


def read_key(tokenizer, prompt) -> str:
    return re.search(r"The pass key is (\d+)\.", tokenizer.decode(prompt.ids)).group(1)


def test_passkey_scores_answerers_that_copy_ignore_or_nearly_copy_the_key(tokenizer_path):
    tokenizer = Tokenizer.load(tokenizer_path)
    cells = dict(lengths=[200, 300], depths=[0.0, 0.5, 1.0], trials=4, seed=1)
    copying = evaluate_passkey(lambda p: f" {read_key(tokenizer, p)}. Remember it.", tokenizer, **cells)
    assert set(copying) == {(n, d) for n in (200, 300) for d in (0.0, 0.5, 1.0)}
    assert all(c.correct == c.trials == 4 and c.accuracy == 1.0 for c in copying.values()), copying
    assert all(c.max_prompt_tokens <= c.length for c in copying.values())

    def keys(lengths, depths, seed=1):  # of the cell (200, 0.5)
        seen = []
        evaluate_passkey(lambda p: seen.append((len(p.ids) <= 200, p.depth, p.key)) or "", tokenizer, lengths, depths,
                         trials=4, seed=seed)
        return [key for short, depth, key in seen if short and depth == 0.5]

    alone = keys([200], [0.5])
    assert len(set(alone)) == 4 and keys([300, 200], [0.0, 0.5]) == alone != keys([200], [0.5], seed=2)
    wrong = [lambda p: " 12345.", lambda p: f" {read_key(tokenizer, p)}0", lambda p: f" {read_key(tokenizer, p)[:4]}"]
    for answer in wrong:
        assert all(c.correct == 0 for c in evaluate_passkey(answer, tokenizer, **cells).values())


class CopyingModel(torch.nn.Module):
    """Reads the key from its context and predicts it, then ``suffix``, token by token: a perfect passkey retriever
    (or, with a digit in the suffix, one that answers a longer number)."""

    def __init__(self, tokenizer, vocab_size: int, suffix: str = ". Remember it."):
        super().__init__()
        self.tokenizer, self.vocab_size, self.suffix = tokenizer, vocab_size, suffix

    def forward(self, tokens):
        ids = tokens[0].tolist()
        key = re.search(r"pass key is (\d+)", self.tokenizer.decode(ids)).group(1)
        answer = self.tokenizer.processor.encode(f"{key}{self.suffix}")
        done = max(k for k in range(len(answer)) if k == 0 or ids[-k:] == answer[:k])  # answer tokens already out
        logits = torch.zeros(1, len(ids), self.vocab_size)
        logits[0, -1, answer[done]] = 1.0
        return logits


class ConstantModel(torch.nn.Module):
    """Ignores its context: always the same token. Counts its calls."""

    def __init__(self, token: int, vocab_size: int):
        super().__init__()
        self.token, self.vocab_size, self.calls = token, vocab_size, 0

    def forward(self, tokens):
        self.calls += 1
        logits = torch.zeros(1, tokens.shape[1], self.vocab_size)
        logits[0, -1, self.token] = 1.0
        return logits


def test_greedy_passkey_decoding_scores_a_copying_model_one_and_a_constant_one_zero(tokenizer_path):
    tokenizer = Tokenizer.load(tokenizer_path)
    cells = dict(lengths=[200, 300], depths=[0.0, 0.5, 1.0], trials=2, seed=1, device="cpu")
    copying = passkey_accuracy(CopyingModel(tokenizer, 512), tokenizer, **cells)
    assert all(c.accuracy == 1.0 for c in copying.values()), copying
    overlong = passkey_accuracy(CopyingModel(tokenizer, 512, suffix="0 is it."), tokenizer, **cells)
    assert all(c.accuracy == 0.0 for c in overlong.values()), overlong
    constant = ConstantModel(tokenizer.processor.encode("0")[-1], 512)  # no key starts with 0
    assert all(c.accuracy == 0.0 for c in passkey_accuracy(constant, tokenizer, **cells).values())
    assert constant.calls == 2 * 3 * 2  # a wrong first digit settles the answer: one forward per trial


def export_with_tokenizer(dataset_path, directory: Path, model=None) -> str:
    from tape_pretrain.train.export import save_export

    model = model or small_model()
    save_export(model.state_dict(), model.config, directory, (Path(dataset_path) / "tokenizer.model").read_bytes())
    return str(directory)


def test_eval_passkey_end_to_end_with_a_real_model(dataset_path, tmp_path, capsys):
    import json

    from tape_pretrain.cli import build_parser, main

    assert build_parser().parse_args(["eval", "x", "--data", "y"]).passkey_trials == 20
    export = export_with_tokenizer(dataset_path, tmp_path / "export")
    code = main(["eval", export, "--data", dataset_path, "--lengths", "32", "--max-tokens", "64", "--passkey",
                 "--passkey-lengths", "200,260", "--passkey-depths", "0,1", "--passkey-trials", "3",
                 "--device", "cpu", "--out", str(tmp_path / "out")])
    assert code == 0
    out = capsys.readouterr().out
    assert "Wilson 95% interval], 3 trials per cell" in out
    assert re.search(r"\| 260 \| [\d.]+ \[[\d.]+, [\d.]+\] \|", out), out
    cells = json.loads((tmp_path / "out" / "passkey.json").read_text())
    assert {(c["length"], c["depth"]) for c in cells} == {(200, 0.0), (200, 1.0), (260, 0.0), (260, 1.0)}
    for c in cells:
        assert c["trials"] == 3 and c["accuracy"] == c["correct"] / 3
        assert c["ci95"] == pytest.approx(list(wilson_interval(c["correct"], 3)))
        assert c["length"] - 13 < c["min_prompt_tokens"] <= c["max_prompt_tokens"] <= c["length"]
        assert (c["device"], c["dtype"]) == ("cpu", "fp32")
    assert (tmp_path / "out" / "passkey.png").is_file()


def test_eval_in_bf16_on_the_cpu(dataset_path, tmp_path):
    """bf16 is allowed on the CPU (as trainer.precision): the weights are cast, the loss stays close to fp32's."""
    import json

    from tape_pretrain.cli import main

    export = export_with_tokenizer(dataset_path, tmp_path / "export")
    result = {}
    for dtype in ("fp32", "bf16"):
        assert main(["eval", export, "--data", dataset_path, "--lengths", "32", "--max-tokens", "256", "--device",
                     "cpu", "--dtype", dtype, "--passkey", "--passkey-lengths", "200", "--passkey-depths", "0.5",
                     "--passkey-trials", "1", "--out", str(tmp_path / dtype)]) == 0
        result[dtype] = json.loads((tmp_path / dtype / "eval.json").read_text())["32"]
        passkey = json.loads((tmp_path / dtype / "passkey.json").read_text())
        assert result[dtype]["dtype"] == passkey[0]["dtype"] == dtype
    assert result["bf16"]["loss"] != result["fp32"]["loss"]
    assert result["bf16"]["loss"] == pytest.approx(result["fp32"]["loss"], rel=0.02)


def test_auto_placement_is_the_training_device():
    cuda = torch.cuda.is_available()
    bf16 = cuda and torch.cuda.is_bf16_supported(including_emulation=False)
    assert eval_placement() == (torch.device("cuda" if cuda else "cpu"), torch.bfloat16 if bf16 else torch.float32)
    assert eval_placement("cpu", "bf16") == (torch.device("cpu"), torch.bfloat16)


@pytest.mark.parametrize("flags, message", [
    (["--device", "tpu"], "--device 'tpu': use auto, cpu, cuda or cuda:N"),
    (["--device", "cuda"], "--device cuda: torch .* cannot use CUDA here"),
    (["--dtype", "fp16"], "--dtype 'fp16': use auto, fp32 or bf16"),
    (["--passkey", "--passkey-lengths", "100"], "--passkey-lengths: passkey length 100 is too short"),
    (["--passkey", "--passkey-depths", "0.5,1.5"], r"^error: --passkey-depths '0.5,1.5': .*each in \[0, 1\]$"),
    (["--passkey", "--passkey-lengths", ","], r"^error: --passkey-lengths ',': give at least one length$"),
    (["--passkey", "--passkey-trials", "0"], "--passkey-trials 0 must be positive"),
])
def test_bad_eval_device_dtype_and_passkey_flags_are_one_clear_error(dataset_path, tmp_path, capsys, flags, message):
    from tape_pretrain.cli import main

    if flags == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    export = export_with_tokenizer(dataset_path, tmp_path / "export")
    code = main(["eval", export, "--data", dataset_path, "--lengths", "32", "--out", str(tmp_path / "out"), *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and re.search(message, err), err
    assert not (tmp_path / "out" / "eval.json").exists()


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


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "0"], "--batch-size 0 must be a positive integer"),
    (["--batch-size", "-1"], "--batch-size -1 must be a positive integer"),
    (["--stride", "-1"], r"--stride -1 must be a positive integer \(omit --stride for non-overlapping windows\)"),
    (["--stride", "0"], r"--stride 0 must be a positive integer \(omit --stride for non-overlapping windows\)"),
    (["--max-tokens", "-5"], "--max-tokens -5 must be a positive integer"),
    (["--max-tokens", "0"], "--max-tokens 0 must be a positive integer"),
])
def test_bad_eval_batch_size_stride_and_max_tokens_are_one_clear_error(dataset_path, tmp_path, capsys, flags,
                                                                       message):
    from tape_pretrain.cli import main

    code = main(["eval", str(tmp_path / "no_export"), "--data", dataset_path, "--lengths", "32", "--out",
                 str(tmp_path / "out"), *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and re.fullmatch(f"error: {message}", err), err
    assert not (tmp_path / "out").exists()


def test_eval_refuses_a_dataset_of_another_tokenizer(dataset_path, tmp_path, capsys):
    """R9, for evaluation: the model's tokenizer against the dataset's."""
    from tape_pretrain.cli import main
    from tape_pretrain.train.export import save_export

    own = (Path(dataset_path) / "tokenizer.model").read_bytes()
    model = small_model()
    args = ["--data", dataset_path, "--lengths", "32", "--max-tokens", "64", "--out", str(tmp_path / "out")]
    save_export(model.state_dict(), model.config, tmp_path / "same", own)
    assert main(["eval", str(tmp_path / "same"), *args]) == 0
    capsys.readouterr()  # its progress line (one per length) on stderr
    from sentencepiece import sentencepiece_model_pb2

    other = sentencepiece_model_pb2.ModelProto.FromString(own)
    other.pieces[300].score -= 1.0  # another tokenizer of the same vocabulary
    save_export(model.state_dict(), model.config, tmp_path / "other", other.SerializeToString())
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
