"""The builtin:addition corpus: determinism, operand lengths, the reversed-digit format checked arithmetically, strict
spec parsing, and prep end to end with a real SentencePiece tokenizer."""

import numpy as np
import pytest

from tape_pretrain.data.addition import (
    add_digits,
    fixed_length_problems,
    parse_addition_spec,
    render,
)
from tape_pretrain.data.manifest import load_manifest
from tape_pretrain.data.prep import PrepOptions, prepare
from tape_pretrain.data.sources import iter_documents, list_segments
from tape_pretrain.data.tokenizer import Tokenizer, train_tokenizer
from tape_pretrain.errors import DataError

SPEC = "builtin:addition?max_digits=7&count=3000&seed=5"


def parse(document: str) -> tuple[str, str, str]:
    """(a, b, sum) as written, least significant digit first."""
    a, rest = document.split("+")
    b, total = rest.split("=")
    return a, b, total


def test_reversed_format_by_hand():
    """123 + 4567 = 4690 is written 321+7654=0964; 5 + 5 = 10 is 5+5=01; 0 + 0 = 0 is 0+0=0."""
    a = np.array([[3, 2, 1, 0], [5, 0, 0, 0], [0, 0, 0, 0]], dtype=np.uint8)  # least significant first
    b = np.array([[7, 6, 5, 4], [5, 0, 0, 0], [0, 0, 0, 0]], dtype=np.uint8)
    len_a, len_b = np.array([3, 1, 1]), np.array([4, 1, 1])
    total, len_total = add_digits(a, b)
    assert render(a, len_a, b, len_b, total, len_total) == ["321+7654=0964", "5+5=01", "0+0=0"]
    assert render(a, len_a, b, len_b) == ["321+7654=", "5+5=", "0+0="]


def test_every_document_is_a_true_sum_written_least_significant_digit_first():
    documents = list(iter_documents([SPEC]))
    assert len(documents) == 3000
    for document in documents:
        a, b, total = parse(document)
        assert a.isdigit() and b.isdigit() and total.isdigit(), document
        # the sum exactly as str() writes it, reversed: no missing carry digit, no trailing (leading) zero
        assert total == str(int(a[::-1]) + int(b[::-1]))[::-1], document


def test_operand_lengths_are_uniform_in_1_to_max_digits_without_leading_zeros():
    lengths = []
    for document in iter_documents([SPEC]):
        for operand in parse(document)[:2]:
            lengths.append(len(operand))
            assert len(operand) == 1 or operand[-1] != "0", document  # the most significant digit is written last
    counts = np.bincount(lengths, minlength=8)
    assert counts[0] == 0 and len(counts) == 8  # 1..7 digits, nothing longer
    assert counts[1:].min() > 0.8 * len(lengths) / 7  # each length about 1/7 of the operands


def test_same_seed_same_corpus_and_other_seeds_or_sizes_differ():
    first = list(iter_documents([SPEC]))
    assert list(iter_documents([SPEC])) == first
    other_seed = list(iter_documents([SPEC.replace("seed=5", "seed=6")]))
    assert other_seed != first and len(set(other_seed) & set(first)) < 100  # only short problems coincide
    # a larger count extends the corpus (the first chunk's draws do not depend on the count)
    assert list(iter_documents([SPEC.replace("count=3000", "count=4000")]))[:3000] == first


def test_fixed_length_problems_have_exact_operand_lengths_and_true_answers():
    for length in (1, 4, 20):  # 20: twice the training lengths, past int64 for the sums of 2 x 20 digits too
        problems = fixed_length_problems(length, 50, seed=3)
        assert problems == fixed_length_problems(length, 50, seed=3)
        assert problems != fixed_length_problems(length, 50, seed=4)
        for prompt, answer in zip(problems.prompts, problems.answers, strict=True):
            a, b, written = parse(prompt + answer)
            assert written == "" or prompt.endswith("=")
            assert len(a) == len(b) == length and (length == 1 or (a[-1] != "0" and b[-1] != "0"))
            assert answer == str(int(a[::-1]) + int(b[::-1]))[::-1]


@pytest.mark.parametrize("spec, message", [
    ("builtin:addition?max_digits=0", "max_digits=0"),
    ("builtin:addition?max_digits=ten", "max_digits='ten'"),
    ("builtin:addition?max_digits=1.5", "max_digits='1.5'"),
    ("builtin:addition?count=-3", "count='-3'"),
    ("builtin:addition?count=0", "count=0"),
    ("builtin:addition?digits=10", "unknown key 'digits'"),
    ("builtin:addition?seed", "'seed' is not key=value"),
    ("builtin:addition?seed=1&seed=2", "'seed' is given twice"),
    ("builtin:addition?split=test", "split='test'"),
    ("builtin:addition?count=10&", "'' is not key=value"),
])
def test_bad_specs_are_data_errors_naming_the_key(spec, message):
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(".", r"\.")):
        parse_addition_spec(spec)
    with pytest.raises(DataError, match="addition"):
        list(iter_documents([spec]))
    with pytest.raises(DataError, match="addition"):
        list_segments([spec], 1 << 30)  # what prep lists before it touches --out


def test_spec_defaults_and_unknown_builtin():
    spec = parse_addition_spec("builtin:addition")
    assert (spec.max_digits, spec.count, spec.seed, spec.split) == (20, 100_000, 0, "train")
    with pytest.raises(DataError, match="unknown builtin corpus"):
        list(iter_documents(["builtin:additions"]))


@pytest.fixture(scope="module")
def addition_tokenizer(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("addtok") / "tok.model"
    train_tokenizer(["builtin:addition?max_digits=10&count=2000"], vocab_size=273, out=str(out))
    return str(out)


def test_prep_writes_the_problems_with_one_token_per_digit(tmp_path, addition_tokenizer):
    spec = "builtin:addition?max_digits=10&count=300&seed=1"
    prepare(PrepOptions(inputs=[spec], tokenizer=addition_tokenizer, out=str(tmp_path / "ds"), val_fraction=0.1,
                        progress=False))
    manifest, _ = load_manifest(str(tmp_path / "ds"))
    tokenizer = Tokenizer.load(addition_tokenizer)
    documents = list(iter_documents([spec]))
    tokens = np.concatenate([np.fromfile(tmp_path / "ds" / s.path, dtype=manifest.dtype)
                             for split in ("train", "val") for s in manifest.splits[split]])
    assert (tokens == tokenizer.eos_id).sum() == 300
    pieces = "".join(tokenizer.processor.id_to_piece(int(t)) for t in tokens if t != tokenizer.eos_id)
    assert sorted(pieces.split("▁")[1:]) == sorted(documents)  # every problem, each behind its dummy prefix
    for document in documents[:50]:
        ids = tokenizer.processor.encode(document)
        assert len(ids) == len(document) + 1  # the dummy prefix, then one token per character
        prompt = document[:document.index("=") + 1]
        assert tokenizer.processor.encode(prompt) == ids[:len(prompt) + 1]  # the eval's prompt is the same prefix
