"""The Hugging Face tokenizer files of an export load with stock ``AutoTokenizer`` (no remote code, no
``tape_pretrain`` installed) and encode and decode exactly like our SentencePiece model."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import sentencepiece as spm

from tape_pretrain.train.hf_tokenizer import write_hf_tokenizer
from tests.conftest import stdlib_texts

pytest.importorskip("transformers")

TEXTS = [
    "", " ", "  ", "   x", "\t", "\n", "\n\n\n", "x", " x", "\tx", "hello world", "trailing spaces   ",
    "def f(x):\n    return x + 1\n", "class A:\n\tpass\r\n", "a  b   c    d     e", " " * 37 + "deep",
    "12345 67.890 1e-10 0x1F", "café naïve Ångström über", "日本語のテキストです。中文", "emoji 😀🎉 👩‍💻",
    "😀", " 😀 ", "\u00a0no-break\u2003em space", "<s>tags</s> <unk> <pad> <0x41>", "</s>",
]
NOT_ROUND_TRIP = ["▁", "x▁y", " ▁ "]  # SentencePiece decodes its whitespace symbol U+2581 as a space


def varied_texts() -> list[str]:
    rng = random.Random(0)
    alphabet = list("ab e_\t\n1é日😀<>/") + ["  ", "    "]
    randoms = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))) for _ in range(300)]
    runs = ["x" + " " * n + "y" for n in range(1, 40)]
    return TEXTS + NOT_ROUND_TRIP + runs + randoms + stdlib_texts(6, skip=100)


# Runs with `python -I` (no PYTHONPATH, no user site) from an empty directory; the editable install of tape_pretrain
# in the venv is blocked by a None entry in sys.modules, so importing it raises ImportError.
CHILD = textwrap.dedent("""
    import sys
    sys.modules["tape_pretrain"] = None
    import importlib.util, json
    assert importlib.util.find_spec("tape_pretrain") is None
    try:
        import tape_pretrain
    except ImportError:
        pass
    else:
        raise AssertionError("tape_pretrain is importable")
    from transformers import AutoTokenizer

    texts = json.loads(open(sys.argv[1], encoding="utf-8").read())
    out = {}
    for directory in sys.argv[2:]:
        tok = AutoTokenizer.from_pretrained(directory)
        plain = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        default = [tok(t)["input_ids"] for t in texts]
        out[directory] = {
            "class": type(tok).__name__, "len": len(tok),
            "special": [tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id],
            "plain": plain, "default": default, "batch": tok(texts)["input_ids"],
            "decoded": [tok.decode(ids) for ids in plain],
            "decoded_eos": tok.decode(plain[10] + [tok.eos_token_id], skip_special_tokens=True),
        }
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tokenizer_path):
    """The tokenizer written into a RoPE-like export (Llama config.json) and one of our own (no model_type)."""
    data = Path(tokenizer_path).read_bytes()
    root = tmp_path_factory.mktemp("hf_tok")
    llama, own = root / "llama", root / "own"
    for directory, config in ((llama, {"model_type": "llama", "vocab_size": 512}),
                              (own, {"tape_pretrain": {"positional": {"name": "tape"}}})):
        write_hf_tokenizer(directory, data)
        (directory / "config.json").write_text(json.dumps(config))
    return data, [llama, own]


@pytest.fixture(scope="module")
def loaded(exports, tmp_path_factory):
    """What stock transformers makes of the export directories, in a process where tape_pretrain is not importable."""
    _, directories = exports
    work = tmp_path_factory.mktemp("child")
    texts = work / "texts.json"
    texts.write_text(json.dumps(varied_texts()), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-I", "-c", CHILD, str(texts), *map(str, directories)], cwd=work, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_files_written(exports):
    data, directories = exports
    for directory in directories:
        assert (directory / "tokenizer.model").read_bytes() == data
        config = json.loads((directory / "tokenizer_config.json").read_text())
        assert config["add_bos_token"] is False and "auto_map" not in config
        assert json.loads((directory / "tokenizer.json").read_text())["model"]["type"] == "BPE"


def test_ids_special_tokens_and_decoding_match_sentencepiece(exports, loaded):
    data, directories = exports
    sp = spm.SentencePieceProcessor(model_proto=data)
    texts = varied_texts()
    expected = [sp.encode(t) for t in texts]
    assert [sp.decode(ids) == t for t, ids in zip(TEXTS, expected)] == [True] * len(TEXTS)
    assert any(len(ids) > 500 for ids in expected) and [] in expected
    for directory in directories:
        got = loaded[str(directory)]
        assert got["class"] in ("TokenizersBackend", "PreTrainedTokenizerFast")
        assert got["special"] == [0, 1, 2, 3]
        assert got["len"] == sp.get_piece_size() == 512
        for text, ids, plain, default in zip(texts, expected, got["plain"], got["default"]):
            assert plain == ids, f"{text[:60]!r}: ids differ from SentencePiece"
            assert default == ids, f"{text[:60]!r}: add_special_tokens=True must add nothing (no BOS, no EOS)"
        assert got["batch"] == expected
        for text, ids, decoded in zip(texts, expected, got["decoded"]):
            assert decoded == sp.decode(ids), f"{text[:60]!r}: decodes differently from SentencePiece"
            if text not in NOT_ROUND_TRIP and "▁" not in text:
                assert decoded == text, f"{text[:60]!r}: no round trip"
        assert got["decoded_eos"] == texts[10]
