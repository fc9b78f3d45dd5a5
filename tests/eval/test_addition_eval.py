"""Addition exact match: the pure scorer, greedy answers of a real tiny model against a plain uncached greedy loop,
addition_accuracy's shape and ranges, and `tape-pretrain eval --task addition` on an export."""

import json

import pytest
import torch

from tape_pretrain.config import ConfigError, ModelConfig, PositionalConfig
from tape_pretrain.data.addition import fixed_length_problems
from tape_pretrain.data.tokenizer import Tokenizer, train_tokenizer
from tape_pretrain.eval.addition import addition_accuracy, exact_match, greedy_answers, score_predictions
from tape_pretrain.eval.passkey import wilson_interval
from tape_pretrain.models import build_model


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    out = tmp_path_factory.mktemp("addtok") / "tok.model"
    return train_tokenizer(["builtin:addition?max_digits=10&count=2000"], vocab_size=273, out=str(out))


def tiny_model(name: str, vocab: int = 273):
    torch.manual_seed(0)
    return build_model(ModelConfig(preset=None, vocab_size=vocab, hidden_size=32, num_layers=2, num_heads=2,
                                   ffn_hidden_size=64, max_seq_len=64, positional=PositionalConfig(name=name))).eval()


def test_true_sums_score_one_and_wrong_answers_zero():
    problems = {n: fixed_length_problems(n, 30, seed=0) for n in (1, 5, 20)}
    answers = {n: p.answers for n, p in problems.items()}
    perfect = score_predictions(answers, answers)
    for n in answers:
        assert perfect[n] == {"accuracy": 1.0, "correct": 30, "count": 30, "ci95": list(wilson_interval(30, 30))}
    not_reversed = score_predictions({n: [a[::-1] for a in ans] for n, ans in answers.items()}, answers)
    assert not_reversed[20]["accuracy"] == 0.0  # (a 1-digit or palindromic sum reads the same both ways)
    for wrong in (lambda a: a[:-1], lambda a: a + "0", lambda a: " " + a, lambda a: str((int(a[0]) + 1) % 10) + a[1:]):
        scored = score_predictions({n: [wrong(a) for a in ans] for n, ans in answers.items()}, answers)
        assert all(r["accuracy"] == 0.0 and r["correct"] == 0 and r["count"] == 30 for r in scored.values())


def test_exact_match_examples_and_partial_credit_counts():
    assert exact_match(["0964", "4690", "096", "09640", " 0964", ""], ["0964"] * 6) == [True] + [False] * 5
    result = score_predictions({3: ["0964", "x", "0964", "0964"]}, {3: ["0964"] * 4})[3]
    assert (result["correct"], result["count"], result["accuracy"]) == (3, 4, 0.75)
    assert result["ci95"] == list(wilson_interval(3, 4))
    with pytest.raises(ValueError, match="2 predictions for 1 answers"):
        exact_match(["1", "2"], ["1"])


def reference_greedy(model, tokenizer, prompt: str, steps: int) -> tuple[str, bool]:
    """One prompt at a time, the whole prefix recomputed each step, stopping at EOS; and whether it did."""
    ids = tokenizer.processor.encode(prompt)
    out = []
    with torch.no_grad():
        for _ in range(steps):
            next_id = int(model(torch.tensor([ids + out]))[0, -1].argmax())
            if next_id == tokenizer.eos_id:
                return "".join(tokenizer.processor.id_to_piece(t) for t in out), True
            out.append(next_id)
    return "".join(tokenizer.processor.id_to_piece(t) for t in out), False


@pytest.mark.parametrize("name", ["tape", "randrope"])  # randrope: the encoding that refuses a cache
def test_batched_cached_greedy_answers_equal_a_plain_greedy_loop(tokenizer, name):
    model = tiny_model(name)
    digits = [tokenizer.processor.piece_to_id(c) for c in "0123456789"]
    with torch.no_grad():  # answer in digits (not bytes), and end with EOS wherever a 6 would come
        scale = torch.zeros(model.config.vocab_size, 1)
        scale[digits] = 30.0
        model.lm_head.weight.mul_(scale)
        model.lm_head.weight[tokenizer.eos_id] = 1.01 * model.lm_head.weight[digits[6]]
    prompts = fixed_length_problems(3, 6, 0).prompts + fixed_length_problems(5, 5, 0).prompts
    steps = [4, 1, 2, 3, 4, 4, 6, 5, 6, 6, 2]
    got = greedy_answers(model, tokenizer, prompts, steps, "cpu", batch_size=4)
    expected = [reference_greedy(model, tokenizer, p, n) for p, n in zip(prompts, steps, strict=True)]
    assert got == [text for text, _ in expected]
    assert any(at_eos for _, at_eos in expected) and not all(at_eos for _, at_eos in expected)


def test_addition_accuracy_of_a_tiny_model_has_one_result_per_length(tokenizer):
    model = tiny_model("tape")
    results = addition_accuracy(model, tokenizer, [1, 3, 12], problems_per_length=7, seed=0, device="cpu",
                                dtype="fp32")
    assert list(results) == [1, 3, 12]
    for r in results.values():
        assert r["count"] == 7 and 0 <= r["correct"] <= 7 and r["accuracy"] == r["correct"] / 7
        assert 0.0 <= r["ci95"][0] <= r["accuracy"] <= r["ci95"][1] <= 1.0
    problems = fixed_length_problems(3, 7, 0)
    predictions = greedy_answers(model, tokenizer, problems.prompts, [len(a) + 1 for a in problems.answers], "cpu")
    assert results[3]["correct"] == sum(exact_match(predictions, problems.answers))


def test_an_answer_must_end_where_the_sum_ends(tokenizer):
    """Answers are decoded one token past the sum's length: a model that never writes EOS (here: digits only) gets
    predictions one digit too long, which no exact match accepts (the true sum then a carry digit scores 0)."""
    problems = fixed_length_problems(2, 6, 0)
    model = tiny_model("rope")
    with torch.no_grad():
        digits = [tokenizer.processor.piece_to_id(c) for c in "0123456789"]
        scale = torch.zeros(model.config.vocab_size, 1)
        scale[digits] = 30.0
        model.lm_head.weight.mul_(scale)  # digits only: never EOS
    predictions = greedy_answers(model, tokenizer, problems.prompts, [len(a) + 1 for a in problems.answers], "cpu")
    assert [len(p) for p in predictions] == [len(a) + 1 for a in problems.answers]
    results = addition_accuracy(model, tokenizer, [2], problems_per_length=6, seed=0, device="cpu", dtype="fp32")
    assert results[2]["correct"] == 0


def test_eval_task_addition_on_an_export(tmp_path, tokenizer, capsys):
    from tape_pretrain.cli import main
    from tape_pretrain.train.export import save_export

    model = tiny_model("rope")
    save_export(model.state_dict(), model.config, tmp_path / "export", tokenizer.model_bytes)
    out = tmp_path / "out"
    assert main(["eval", str(tmp_path / "export"), "--task", "addition", "--lengths", "2,4", "--problems", "5",
                 "--out", str(out)]) in (0, None)
    records = json.loads((out / "addition.json").read_text())
    assert [(r["digits"], r["count"]) for r in records] == [(2, 5), (4, 5)]
    table = (out / "addition.md").read_text()
    assert "| digits | accuracy | 95% interval | problems |" in table and table in capsys.readouterr().out + "\n"
    from tape_pretrain.cli import build_parser
    from tape_pretrain.eval.run import evaluate_command

    with pytest.raises(ConfigError, match="--data is required for --task perplexity"):
        evaluate_command(build_parser().parse_args(["eval", str(tmp_path / "export"), "--lengths", "16"]))
