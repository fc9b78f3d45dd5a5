"""Prep end to end: token counts, determinism across workers and storages, resume, bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import numpy as np
import pytest

from tape_pretrain.data.manifest import load_manifest, verify_dataset
from tape_pretrain.data.prep import PrepOptions, in_val_split, prepare
from tape_pretrain.data.sources import iter_documents
from tape_pretrain.data.tokenizer import Tokenizer, train_tokenizer
from tape_pretrain.errors import DataError, StorageError


def prep(inputs, tokenizer, out, **kw):
    kw.setdefault("shard_tokens", 60_000)
    kw.setdefault("val_fraction", 0.1)
    return prepare(PrepOptions(inputs=[str(i) for i in inputs], tokenizer=tokenizer, out=str(out),
                               progress=False, **kw))


def read_tree(url, **storage_options) -> dict[str, bytes]:
    fs, root = fsspec.core.url_to_fs(url, **storage_options)
    return {p[len(root):]: fs.cat_file(p) for p in fs.find(root) if "/_prep/" not in p}


def test_token_count_equals_sentencepiece_plus_eos(dataset_path, corpus_dir, tokenizer_path):
    manifest, _ = load_manifest(dataset_path)
    docs = list(iter_documents([str(corpus_dir / "*.jsonl"), str(corpus_dir / "*.txt")]))
    tok = Tokenizer.load(tokenizer_path)
    expected = sum(len(ids) + 1 for ids in tok.processor.encode(docs))
    assert manifest.num_tokens("train") + manifest.num_tokens("val") == expected
    assert len(manifest.splits["train"]) > 1
    # every document ends with EOS, and the shards hold exactly SentencePiece's ids
    train_docs = [d for i, d in enumerate(docs) if not in_val_split(i, 0.1)]
    shard = np.fromfile(Path(dataset_path) / manifest.splits["train"][0].path, dtype=manifest.dtype)
    first = tok.processor.encode(train_docs[0])
    assert shard[: len(first)].tolist() == first and shard[len(first)] == tok.eos_id


def test_one_and_two_workers_are_byte_identical(tmp_path, corpus_dir, tokenizer_path):
    inputs = [corpus_dir / "*.jsonl"]
    prep(inputs, tokenizer_path, tmp_path / "w1", workers=1)
    prep(inputs, tokenizer_path, tmp_path / "w2", workers=2)
    assert read_tree(tmp_path / "w1") == read_tree(tmp_path / "w2")


def test_memory_and_s3_match_local(tmp_path, corpus_dir, tokenizer_path, s3_env):
    inputs = [corpus_dir / "*.jsonl"]
    prep(inputs, tokenizer_path, tmp_path / "local")
    prep(inputs, tokenizer_path, "memory://ds-test", workers=2)
    prep(inputs, tokenizer_path, f"s3://{s3_env}/datasets/ds")
    local = read_tree(tmp_path / "local")
    assert read_tree("memory://ds-test") == local
    assert read_tree(f"s3://{s3_env}/datasets/ds") == local
    assert verify_dataset(f"s3://{s3_env}/datasets/ds").startswith("ok:")


def test_rerun_is_a_noop_and_different_dataset_refused(tmp_path, corpus_dir, tokenizer_path, capsys):
    inputs = [corpus_dir / "*.jsonl"]
    prep(inputs, tokenizer_path, tmp_path / "ds")
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "ds").rglob("*")}
    prep(inputs, tokenizer_path, tmp_path / "ds")
    assert "nothing to do" in capsys.readouterr().out
    assert before == {p: p.stat().st_mtime_ns for p in (tmp_path / "ds").rglob("*")}
    with pytest.raises(DataError, match=r"prepared differently \(differs in: shard_tokens\)"):
        prep(inputs, tokenizer_path, tmp_path / "ds", shard_tokens=30_000)
    assert before == {p: p.stat().st_mtime_ns for p in (tmp_path / "ds").rglob("*")}  # nothing touched
    prep(inputs, tokenizer_path, tmp_path / "ds", shard_tokens=30_000, overwrite=True)
    assert load_manifest(str(tmp_path / "ds"))[0].source["recipe"]["shard_tokens"] == 30_000


def test_destination_with_other_files_is_refused(tmp_path, corpus_dir, tokenizer_path):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="ds already holds other files; pass --overwrite"):
        prep([corpus_dir / "*.jsonl"], tokenizer_path, tmp_path / "ds")
    assert (tmp_path / "ds" / "notes.txt").read_text() == "keep me"


def test_overwrite_deletes_only_what_prep_wrote(tmp_path, corpus_dir, tokenizer_path):
    """R20 (no command destroys data it did not create): a previous dataset plus a user's file is refused
    whole, before anything is deleted."""
    inputs = [corpus_dir / "*.jsonl"]
    prep(inputs, tokenizer_path, tmp_path / "ds")
    (tmp_path / "ds" / "train" / "my_notes.txt").write_text("keep me")
    before = sorted(str(p) for p in (tmp_path / "ds").rglob("*"))
    with pytest.raises(DataError, match=r"holds 'train/my_notes.txt', which prep did not write"):
        prep(inputs, tokenizer_path, tmp_path / "ds", shard_tokens=30_000, overwrite=True)
    assert sorted(str(p) for p in (tmp_path / "ds").rglob("*")) == before
    assert load_manifest(str(tmp_path / "ds"))[0].source["recipe"]["shard_tokens"] != 30_000  # still the old one
    (tmp_path / "ds" / "train" / "my_notes.txt").unlink()
    before = sorted(str(p) for p in (tmp_path / "ds").rglob("*"))
    with pytest.raises(DataError, match="no input files match"):  # a typo in --input must not cost the dataset
        prep([corpus_dir / "nothing*.jsonl"], tokenizer_path, tmp_path / "ds", shard_tokens=30_000, overwrite=True)
    assert sorted(str(p) for p in (tmp_path / "ds").rglob("*")) == before


def test_input_inside_out_and_out_as_a_file_are_refused(tmp_path, corpus_dir, tokenizer_path):
    import shutil

    shutil.copytree(corpus_dir, tmp_path / "work" / "corpus")
    with pytest.raises(DataError, match=r"--input .*corpus/\*\.jsonl lies inside --out"):
        prep([tmp_path / "work" / "corpus" / "*.jsonl"], tokenizer_path, tmp_path / "work", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "work" / "corpus").iterdir()) == sorted(
        p.name for p in corpus_dir.iterdir())
    (tmp_path / "out.bin").write_text("not a directory")
    with pytest.raises(DataError, match="out.bin is a file"):
        prep([corpus_dir / "*.jsonl"], tokenizer_path, tmp_path / "out.bin", overwrite=True)
    assert (tmp_path / "out.bin").read_text() == "not a directory"


def test_killed_prep_resumes_to_the_same_dataset(tmp_path, corpus_dir, tokenizer_path, cli_env):
    inputs = [str(corpus_dir / "*.jsonl"), str(corpus_dir / "*.txt")]
    prep(inputs, tokenizer_path, tmp_path / "reference", shard_tokens=20_000, chunk_docs=4)
    args = ["prep", "--input", *inputs, "--tokenizer", tokenizer_path, "--out", str(tmp_path / "ds"),
            "--shard-tokens", "20000", "--val-fraction", "0.1", "--quiet", "--chunk-docs", "4"]
    cmd = [sys.executable, "-m", "tape_pretrain.cli", *args]
    # slow writes (0.5 s after each shard) so the kill lands mid-run
    proc = subprocess.Popen([sys.executable, "-m", "tests.slow_prep", "0.5", *args], env=cli_env)
    journal = tmp_path / "ds" / "_prep"
    deadline = time.time() + 60
    while time.time() < deadline and len(list(journal.glob("train_*.json"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "ds" / "manifest.json").exists()  # the half-written dataset does not exist
    done = len(list(journal.glob("train_*.json")))
    assert 2 <= done < len(load_manifest(str(tmp_path / "reference"))[0].splits["train"])
    out = subprocess.run(cmd, env=cli_env, capture_output=True, text=True, check=True).stdout
    assert f"{done} shard(s) already written" in out
    assert read_tree(tmp_path / "ds") == read_tree(tmp_path / "reference")


def test_verify_names_altered_and_truncated_shards(tmp_path, corpus_dir, tokenizer_path):
    prep([corpus_dir / "*.jsonl"], tokenizer_path, tmp_path / "ds")
    shard = tmp_path / "ds" / "train" / "shard_000001.bin"
    data = bytearray(shard.read_bytes())
    data[100] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match="train/shard_000001.bin: sha256 mismatch"):
        verify_dataset(str(tmp_path / "ds"))
    shard.write_bytes(bytes(data[:-2]))
    with pytest.raises(DataError, match="train/shard_000001.bin: size"):
        verify_dataset(str(tmp_path / "ds"))


def test_verify_checks_what_training_checks(tmp_path, corpus_dir, tokenizer_path):
    """Token ids at or above the vocabulary (with the manifest's checksum rewritten to match), and a shard that is
    a symlink out of the dataset: training refuses both, so verify must not say ok."""
    import hashlib
    import shutil

    prep([corpus_dir / "*.jsonl"], tokenizer_path, tmp_path / "ds")
    shutil.copytree(tmp_path / "ds", tmp_path / "ds2")
    shard = tmp_path / "ds" / "train" / "shard_000001.bin"
    data = bytearray(shard.read_bytes())
    data[0:2] = (60000).to_bytes(2, "little")
    shard.write_bytes(bytes(data))
    raw = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    entry = next(e for e in raw["splits"]["train"] if e["path"] == "train/shard_000001.bin")
    entry["sha256"] = hashlib.sha256(bytes(data)).hexdigest()
    (tmp_path / "ds" / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(DataError, match="train/shard_000001.bin: token id 60000 >= vocab size 512"):
        verify_dataset(str(tmp_path / "ds"))
    escaped = tmp_path / "ds2" / "train" / "shard_000000.bin"
    shutil.move(escaped, tmp_path / "elsewhere.bin")
    escaped.symlink_to(tmp_path / "elsewhere.bin")
    with pytest.raises(DataError, match="resolves outside the dataset"):
        verify_dataset(str(tmp_path / "ds2"))


def read_split(dataset, split) -> np.ndarray:
    manifest, _ = load_manifest(str(dataset))
    return np.concatenate([np.fromfile(Path(dataset) / s.path, dtype=manifest.dtype) for s in manifest.splits[split]])


def test_dirty_corpus_is_counted_normalized_and_deterministic(tmp_path, tokenizer_path):
    """Invalid UTF-8, empty and whitespace-only documents, NULs, CRLF, lone CR and a 1 MB single line."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_bytes(b"good text " * 50)
    (src / "b.txt").write_bytes(b"")
    (src / "c.txt").write_bytes(b"   \n\t ")
    (src / "d.txt").write_bytes(b"bad \xff\xfe bytes " * 20)
    (src / "e.txt").write_bytes(b"line one\r\nline two\r\n")
    (src / "f.txt").write_bytes(b"old mac\rline")
    (src / "g.txt").write_bytes(b"nul\x00inside\x00")
    (src / "h.txt").write_bytes(b"\x00\x00 \x00")  # nothing left once NULs go
    (src / "i.txt").write_bytes(b"word " * 200_000)  # 1 MB without a newline
    (src / "j.jsonl").write_text(json.dumps({"text": ""}) + "\n" + json.dumps({"text": "fine\r\n" * 30}) + "\n")
    inputs = [src / "*.txt", src / "*.jsonl"]
    manifest = prep(inputs, tokenizer_path, tmp_path / "w1", val_fraction=0.0, shard_tokens=100_000)
    assert manifest.stats == {"documents": 7, "empty_skipped": 4, "invalid_utf8_replaced": 1, "nul_removed": 2,
                              "newlines_normalized": 3}
    prep(inputs, tokenizer_path, tmp_path / "w2", val_fraction=0.0, shard_tokens=100_000, workers=2)
    assert read_tree(str(tmp_path / "w1")) == read_tree(str(tmp_path / "w2"))

    tok = Tokenizer.load(tokenizer_path)
    tokens = read_split(tmp_path / "w1", "train")
    assert (tokens == tok.eos_id).sum() == 7 and tokens[-1] == tok.eos_id  # every document ends with EOS
    # normalized text tokenizes exactly like the same text written with Unix line endings and no NULs
    expected = [tok.processor.encode(t) + [tok.eos_id] for t in (
        "good text " * 50, "bad \ufffd\ufffd bytes " * 20, "line one\nline two\n", "old mac\nline",
        "nulinside", "word " * 200_000, "fine\n" * 30)]
    assert tokens.tolist() == [i for ids in expected for i in ids]


@pytest.mark.parametrize("content, message", [
    ('{"body": "x"}\n', r"e.jsonl:1: record has no text field 'text'"),
    ('{"text": 5}\n', r"e.jsonl:1: field 'text' is not a string"),
    ('{"text": "a"\n', r"e.jsonl:1: not valid JSON"),
])
def test_bad_jsonl_names_the_file_and_line(tmp_path, tokenizer_path, content, message):
    (tmp_path / "e.jsonl").write_text(content)
    with pytest.raises(DataError, match=message):
        prep([tmp_path / "e.jsonl"], tokenizer_path, tmp_path / "ds")


def test_empty_corpus_is_an_error(tmp_path, tokenizer_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="the corpus is empty"):
        prep([tmp_path / "empty.txt"], tokenizer_path, tmp_path / "ds")
    assert not (tmp_path / "ds" / "manifest.json").exists()
    (tmp_path / "blank.txt").write_bytes(b" \x00\n")
    with pytest.raises(DataError, match="the corpus is empty"):
        train_tokenizer([str(tmp_path / "*.txt")], vocab_size=300, out=str(tmp_path / "tok.model"))
    assert not (tmp_path / "tok.model").exists()


def test_unknown_scheme_and_missing_input(tmp_path, tokenizer_path):
    with pytest.raises(StorageError, match=r"cannot open 'nosuch://x/\*.txt': Protocol not known"):
        prep(["nosuch://x/*.txt"], tokenizer_path, tmp_path / "ds")
    with pytest.raises(DataError, match="no input files match"):
        prep([tmp_path / "missing-*.txt"], tokenizer_path, tmp_path / "ds2")


def test_bad_tokenizers(tmp_path, corpus_dir, tokenizer_path):
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(DataError, match="junk.model: not a SentencePiece model"):
        prep([corpus_dir / "*.jsonl"], str(tmp_path / "junk.model"), tmp_path / "ds")
    (tmp_path / "empty.model").write_bytes(b"")
    with pytest.raises(DataError, match="tokenizer file is empty"):
        prep([corpus_dir / "*.jsonl"], str(tmp_path / "empty.model"), tmp_path / "ds")


def test_vocab_that_does_not_fit_the_dtype(tmp_path, corpus_dir, tokenizer_path):
    """A real SentencePiece model grown past 65,535 pieces cannot be written as uint16."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(tokenizer_path).read_bytes())
    for i in range(70_000 - len(proto.pieces)):
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = f"<extra_{i}>", 0.0, piece.USER_DEFINED
    big = tmp_path / "big.model"
    big.write_bytes(proto.SerializeToString())
    assert Tokenizer.load(str(big)).token_dtype() == np.uint32
    with pytest.raises(DataError, match="vocab size 70000 does not fit uint16"):
        prep([corpus_dir / "*.jsonl"], str(big), tmp_path / "ds", dtype="uint16")


def test_cli_errors_are_one_line(tmp_path, cli_env, tokenizer_path):
    result = subprocess.run([sys.executable, "-m", "tape_pretrain.cli", "prep", "--input",
                             str(tmp_path / "none.txt"), "--tokenizer", tokenizer_path, "--out",
                             str(tmp_path / "ds")], env=cli_env, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "no input files match" in result.stderr
    assert os.path.basename(str(tmp_path / "none.txt")) in result.stderr
