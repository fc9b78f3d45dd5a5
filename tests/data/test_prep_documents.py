"""Document offsets beside every shard, and prep in parts merged into the dataset one prep would write."""

import hashlib
import json
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import fsspec
import numpy as np
import pytest

from tape_pretrain.cli import main
from tape_pretrain.data.cache import cache_split
from tape_pretrain.data.manifest import (
    inspect_dataset,
    load_manifest,
    read_document_starts,
    verify_dataset,
)
from tape_pretrain.data.prep import PrepOptions, in_val_split, merge, prepare
from tape_pretrain.data.sources import iter_documents
from tape_pretrain.data.tokenizer import Tokenizer
from tape_pretrain.errors import DataError
from tests.conftest import stdlib_texts


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, corpus_dir, tokenizer_path) -> str:
    """The shared small corpus prepared with shards of several chunks each (the offsets of later chunks move)."""
    out = tmp_path_factory.mktemp("documents") / "ds"
    prepare(PrepOptions(inputs=[str(corpus_dir / "*.jsonl"), str(corpus_dir / "*.txt")], tokenizer=tokenizer_path,
                        out=str(out), shard_tokens=40_000, val_fraction=0.1, chunk_docs=3, progress=False))
    return str(out)


def reference_lengths(inputs, tokenizer_path, split, val_fraction=0.1) -> np.ndarray:
    """Each document's token count (EOS included) from tokenizing it alone, in corpus order (one segment)."""
    tok = Tokenizer.load(tokenizer_path)
    docs = [d for i, d in enumerate(iter_documents([str(i) for i in inputs]))
            if in_val_split(i, val_fraction) == (split == "val")]
    return np.array([len(tok.encode_documents([d])[0]) for d in docs])


def copy_of(source, tmp_path) -> Path:
    copy = tmp_path / "ds"
    shutil.copytree(source, copy)
    return copy


def rewrite_manifest(root: Path, edit) -> None:
    raw = json.loads((root / "manifest.json").read_text())
    edit(raw)
    (root / "manifest.json").write_text(json.dumps(raw))


def test_offsets_are_the_starts_of_the_documents(dataset, corpus_dir, tokenizer_path):
    manifest, fp = load_manifest(dataset)
    inputs = [corpus_dir / "*.jsonl", corpus_dir / "*.txt"]
    for split in ("train", "val"):
        shards = manifest.splits[split]
        assert shards and all(s.docs_path == s.path.replace(".bin", ".docs.bin") for s in shards)
        lengths = reference_lengths(inputs, tokenizer_path, split)
        expected = np.concatenate([[0], np.cumsum(lengths)[:-1]])  # where each document starts in the split
        bases = np.concatenate([[0], np.cumsum([s.num_tokens for s in shards])[:-1]])
        recorded = []
        for shard, base in zip(shards, bases):
            data = (Path(dataset) / shard.docs_path).read_bytes()
            assert hashlib.sha256(data).hexdigest() == shard.docs_sha256
            starts = read_document_starts(str(Path(dataset) / shard.docs_path), shard.num_tokens)
            assert starts.dtype == np.int64 and len(starts) == shard.num_docs
            recorded.append(starts + base)
        assert np.concatenate(recorded).tolist() == expected.tolist()
    assert verify_dataset(dataset).startswith("ok: ") and "with document offsets" in verify_dataset(dataset)


def test_cache_hands_out_verified_offsets(dataset, tmp_path):
    manifest, fp = load_manifest(dataset)
    local = cache_split(dataset, manifest, fp, "train", str(tmp_path / "c"))
    assert [s.docs_path for s in local.shards] == [str(Path(dataset) / s.docs_path)
                                                   for s in manifest.splits["train"]]
    # a remote copy: the offsets are downloaded and checked like the shards
    memory = fsspec.filesystem("memory")
    memory.put(dataset, "/docs-remote", recursive=True)
    remote = cache_split("memory://docs-remote", manifest, fp, "train", str(tmp_path / "r"))
    for shard, here in zip(manifest.splits["train"], remote.shards):
        assert here.docs_path.startswith(str(tmp_path / "r"))
        assert Path(here.docs_path).read_bytes() == (Path(dataset) / shard.docs_path).read_bytes()
    memory.rm("/docs-remote", recursive=True)


@pytest.mark.parametrize("damage", ["flip", "truncate", "off_by_one"])
def test_tampered_offsets_are_refused(dataset, tmp_path, damage):
    root = copy_of(dataset, tmp_path)
    manifest, _ = load_manifest(str(root))
    shard = manifest.splits["train"][1]
    docs = root / shard.docs_path
    starts = np.fromfile(docs, dtype="<u8")
    if damage == "flip":
        data = bytearray(docs.read_bytes())
        data[9] ^= 1
        docs.write_bytes(bytes(data))
        message = "sha256 mismatch"
    elif damage == "truncate":
        docs.write_bytes(docs.read_bytes()[:-8])
        message = "size .* bytes != .* documents x 8"
    else:  # every start but the first moved by one, with the manifest's checksum rewritten to match
        starts[1:] += 1
        starts.tofile(docs)
        digest = hashlib.sha256(docs.read_bytes()).hexdigest()
        rewrite_manifest(root, lambda raw: raw["splits"]["train"][1].update(docs_sha256=digest))
        message = "document offsets do not match the shard: token .* is not EOS"
    manifest, fp = load_manifest(str(root))
    named = rf"train/shard_000001\.docs\.bin: {message}"
    with pytest.raises(DataError, match=named):
        verify_dataset(str(root))
    with pytest.raises(DataError, match=named):
        cache_split(str(root), manifest, fp, "train", str(tmp_path / "c1"))
    skipped = cache_split(str(root), manifest, fp, "train", str(tmp_path / "c2"), on_corrupt="skip")
    assert skipped.skipped == [shard.path] and len(skipped.shards) == len(manifest.splits["train"]) - 1
    memory = fsspec.filesystem("memory")  # downloaded from a remote dataset: the same check, the same message
    memory.put(str(root), f"/tampered-{damage}", recursive=True)
    with pytest.raises(DataError, match=named):
        cache_split(f"memory://tampered-{damage}", manifest, fp, "train", str(tmp_path / "c3"))
    memory.rm(f"/tampered-{damage}", recursive=True)


@pytest.mark.parametrize("starts, num_docs, message", [
    ([0, 5, 9], None, None),
    ([1, 5, 9], None, "first document offset is 1, not 0"),
    ([0, 5, 5], None, r"not strictly increasing \(entry 2: 5 after 5\)"),
    ([0, 9, 5], None, r"not strictly increasing \(entry 2: 5 after 9\)"),
    ([0, 5, 10], None, "last document offset 10 is not below the shard's 10 tokens"),
    ([0, 5, 9], 2, "3 document offsets != manifest num_docs 2"),
    ([], None, "no document offsets"),
])
def test_read_document_starts_checks_what_it_returns(tmp_path, starts, num_docs, message):
    path = tmp_path / "shard_000000.docs.bin"
    np.array(starts, dtype="<u8").tofile(path)
    if message is None:
        got = read_document_starts(str(path), 10, num_docs)
        assert got.dtype == np.int64 and got.tolist() == starts
        return
    with pytest.raises(DataError, match=rf"shard_000000\.docs\.bin: (document offsets are )?{message}"):
        read_document_starts(str(path), 10, num_docs)
    path.write_bytes(b"\0" * 12)
    with pytest.raises(DataError, match="12 bytes is not a whole number of uint64"):
        read_document_starts(str(path), 10)


def test_dataset_without_offsets_still_loads_and_says_so(dataset, tmp_path):
    """A dataset prepared before document offsets: no docs fields in its manifest, no offsets files."""
    root = copy_of(dataset, tmp_path)

    def strip(raw):
        for shards in raw["splits"].values():
            for shard in shards:
                del shard["docs_path"], shard["docs_sha256"]
    rewrite_manifest(root, strip)
    for docs in root.rglob("*.docs.bin"):
        docs.unlink()
    manifest, fp = load_manifest(str(root))
    assert not manifest.has_document_starts() and not manifest.has_document_starts("train")
    local = cache_split(str(root), manifest, fp, "train", str(tmp_path / "c"))
    assert len(local.shards) == len(manifest.splits["train"]) and all(s.docs_path is None for s in local.shards)
    assert "no document offsets recorded" in verify_dataset(str(root))
    report = inspect_dataset(str(root), sample=0)
    assert report.count("no document boundaries recorded (prepared before document offsets): "
                        "model.attention=document and --within-documents are unavailable; causal training works "
                        "as before") == 2  # train and val


def test_inspect_prints_document_counts_and_percentiles(dataset, corpus_dir, tokenizer_path, capsys):
    manifest, _ = load_manifest(dataset)
    assert main(["data", "inspect", dataset, "--sample", "0", "--doc-shards", "100"]) == 0
    report = capsys.readouterr().out
    for split in ("train", "val"):
        lengths = reference_lengths([corpus_dir / "*.jsonl", corpus_dir / "*.txt"], tokenizer_path, split)
        p10, p50, p90, p99 = (int(v) for v in np.percentile(lengths, [10, 50, 90, 99], method="nearest"))
        assert (f"  {split}: {len(manifest.splits[split])} shards, {lengths.sum():,} tokens, {len(lengths):,} "
                f"documents\n    document lengths (tokens incl. EOS): p10 {p10:,} p50 {p50:,} p90 {p90:,} "
                f"p99 {p99:,} max {lengths.max():,}\n") in report
    sampled = inspect_dataset(dataset, sample=0, doc_shards=2)
    assert f"from 2 of {len(manifest.splits['train'])} shards" in sampled


# ---- parts -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def many_files(tmp_path_factory) -> Path:
    """Six jsonl files of 2 to 6 documents and four txt files: ten segments of one file each at --segment-bytes 1
    (uneven, so that val by index in the corpus or in the part would pick other documents than by index in the
    segment)."""
    root = tmp_path_factory.mktemp("many")
    texts = iter(stdlib_texts(40, skip=20))
    for i, count in enumerate([3, 5, 4, 6, 2, 5]):
        with open(root / f"part-{i}.jsonl", "w") as f:
            for _ in range(count):
                f.write(json.dumps({"text": next(texts)}) + "\n")
    for i in range(4):
        (root / f"doc_{i}.txt").write_text(next(texts))
    return root


def part_options(many_files, tokenizer_path, out, **kw) -> PrepOptions:
    kw.setdefault("segment_bytes", 1)
    return PrepOptions(inputs=[str(many_files / "*.jsonl"), str(many_files / "*.txt")], tokenizer=tokenizer_path,
                       out=str(out), shard_tokens=15_000, val_fraction=0.3, chunk_docs=2, progress=False, **kw)


def read_tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and "_prep" not in p.relative_to(root).parts}


def test_three_parts_and_merge_equal_one_prep(tmp_path, many_files, tokenizer_path, capsys):
    single = prepare(part_options(many_files, tokenizer_path, tmp_path / "single"))
    names = [s.path for s in single.splits["train"]]
    assert any(n.startswith("train/shard_00000_") for n in names) and any(n.startswith("train/shard_00009_")
                                                                          for n in names)
    assert single.splits["val"]  # every segment holds val documents of its own

    def run(part):  # all three at once, as an array job would start them, sharing the destination
        prepare(part_options(many_files, tokenizer_path, tmp_path / "parts", num_parts=3, part=part,
                             workers=2 if part == 1 else 1))
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(run, range(3)))
    assert not (tmp_path / "parts" / "manifest.json").exists()
    merged = merge(str(tmp_path / "parts"))
    assert read_tree(tmp_path / "parts") == read_tree(tmp_path / "single")
    assert merged == single and verify_dataset(str(tmp_path / "parts")).startswith("ok: ")
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "parts").rglob("*")}
    capsys.readouterr()
    assert main(["data", "merge", str(tmp_path / "parts")]) == 0  # merging again changes nothing
    assert "already complete; nothing to do" in capsys.readouterr().out
    assert before == {p: p.stat().st_mtime_ns for p in (tmp_path / "parts").rglob("*")}


def test_a_part_resumes_and_a_merge_names_missing_parts(tmp_path, many_files, tokenizer_path, capsys):
    out = tmp_path / "ds"
    for part in (0, 2):
        assert main(["prep", "--input", str(many_files / "*.jsonl"), str(many_files / "*.txt"), "--tokenizer",
                     tokenizer_path, "--out", str(out), "--shard-tokens", "15000", "--val-fraction", "0.3",
                     "--chunk-docs", "2", "--segment-bytes", "1", "--num-parts", "3", "--part", str(part),
                     "--quiet"]) == 0
    assert "tape-pretrain data merge" in capsys.readouterr().out
    with pytest.raises(DataError, match=r"ds: part 1 of 3 has not finished \(no _prep/part_00001_of_00003.json\)"):
        merge(str(out))
    assert main(["data", "merge", str(out)]) == 2
    assert "part 1 of 3 has not finished" in capsys.readouterr().err
    assert not (out / "manifest.json").exists()
    (out / "_prep" / "part_00000_of_00003.json").unlink()  # part 0 killed after its last segment: it resumes
    prepare(part_options(many_files, tokenizer_path, out, num_parts=3, part=0))
    assert "shard(s) already written and verified" in capsys.readouterr().out
    prepare(part_options(many_files, tokenizer_path, out, num_parts=3, part=1))
    merge(str(out))
    prepare(part_options(many_files, tokenizer_path, tmp_path / "single"))
    assert read_tree(out) == read_tree(tmp_path / "single")


def test_parts_run_again_after_the_inputs_changed(tmp_path, many_files, tokenizer_path, capsys):
    """A part that saw other input files is not merged with the rest: running the parts again on the current inputs
    gives the dataset of the current inputs."""
    src = tmp_path / "src"
    shutil.copytree(many_files, src)
    out = tmp_path / "ds"
    for part in (0, 1):
        prepare(part_options(src, tokenizer_path, out, num_parts=2, part=part))
    (src / "part-9.jsonl").write_text(json.dumps({"text": "a document added later " * 40}) + "\n")
    prepare(part_options(src, tokenizer_path, out, num_parts=2, part=1))
    assert "removing _prep/part_00000_of_00002.json: that part saw other input files" in capsys.readouterr().out
    with pytest.raises(DataError, match="part 0 of 2 has not finished"):
        merge(str(out))
    prepare(part_options(src, tokenizer_path, out, num_parts=2, part=0))
    merge(str(out))
    prepare(part_options(src, tokenizer_path, tmp_path / "single"))
    assert read_tree(out) == read_tree(tmp_path / "single")


def test_parts_that_cannot_be_made(tmp_path, many_files, tokenizer_path):
    with pytest.raises(DataError, match=r"--part 3 is out of range for --num-parts 3 \(parts are numbered 0 to 2\)"):
        prepare(part_options(many_files, tokenizer_path, tmp_path / "ds", num_parts=3, part=3))
    with pytest.raises(DataError, match="--part -1 is out of range"):
        prepare(part_options(many_files, tokenizer_path, tmp_path / "ds", num_parts=3, part=-1))
    with pytest.raises(DataError, match=r"form\(s\) only 1 segment\(s\).*use at most 1 part\(s\), or a smaller "
                                        r"--segment-bytes"):
        prepare(part_options(many_files, tokenizer_path, tmp_path / "ds", num_parts=2, segment_bytes=1 << 30))
    with pytest.raises(DataError, match="--overwrite cannot be combined with --num-parts"):
        prepare(part_options(many_files, tokenizer_path, tmp_path / "ds", num_parts=2, overwrite=True))
    with pytest.raises(DataError, match=r"no prep has run here"):
        merge(str(tmp_path / "nothing"))
    assert not (tmp_path / "ds").exists()


def test_a_part_with_other_options_is_refused(tmp_path, many_files, tokenizer_path):
    out = tmp_path / "ds"
    prepare(part_options(many_files, tokenizer_path, out, num_parts=2, part=0))
    with pytest.raises(DataError, match=r"prepared differently \(differs in: shard_tokens\)"):
        prepare(PrepOptions(**{**vars(part_options(many_files, tokenizer_path, out, num_parts=2, part=1)),
                               "shard_tokens": 9_000}))
    # two parts racing with different options both start: the merge refuses the odd one
    marker = out / "_prep" / "part_00000_of_00002.json"
    raw = json.loads(marker.read_text())
    raw["recipe"]["val_fraction"] = 0.4
    marker.write_text(json.dumps(raw))
    prepare(part_options(many_files, tokenizer_path, out, num_parts=2, part=1))
    with pytest.raises(DataError, match=r"part 0 of 2 .* was prepared with other options .*differs in: val_fraction"):
        merge(str(out))


def test_concurrent_writers_of_one_file_do_not_collide(tmp_path):
    """Every part writes the recipe and the tokenizer; private temp names keep their atomic writes apart."""
    from tape_pretrain.data.storage import open_url, write_bytes_atomic

    fs, root = open_url(str(tmp_path))
    payload = b"x" * (1 << 20)
    barrier = threading.Barrier(8)

    def write(_):
        barrier.wait()
        write_bytes_atomic(fs, f"{root}/shared.bin", payload)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(write, range(8)))
    assert (tmp_path / "shared.bin").read_bytes() == payload and not list(tmp_path.glob("*.tmp"))


FAKE_SBATCH = r"""#!/usr/bin/env bash
# sbatch stand-in: logs its arguments, runs --wrap (each array task at once, with SLURM_ARRAY_TASK_ID), prints a job id
echo "$*" >> "$SBATCH_LOG"
array="" wrap=""
while [ $# -gt 0 ]; do
  case $1 in --array=*) array=${1#--array=};; --wrap) wrap=$2; shift;; esac
  shift
done
id=$(( $(wc -l < "$SBATCH_LOG") + 100 ))
if [ -n "$array" ]; then
  for i in $(seq "${array%-*}" "${array#*-}"); do SLURM_ARRAY_TASK_ID=$i bash -c "$wrap" >/dev/null & done
  wait
else
  bash -c "$wrap" >/dev/null
fi
echo "$id;cluster"
"""


def test_slurm_array_recipe_prepares_parts_then_merges(tmp_path, many_files, tokenizer_path, cli_env):
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH)
    (bin_dir / "sbatch").chmod(0o755)
    log = tmp_path / "sbatch.log"
    env = dict(cli_env, PATH=f"{bin_dir}{os.pathsep}{cli_env['PATH']}", SBATCH_LOG=str(log), CPUS_PER_PART="1",
               TAPE_PRETRAIN=f"{sys.executable} -m tape_pretrain.cli", SBATCH_ARGS="--partition=cpu --time=1:00:00")
    out = subprocess.run(
        ["bash", str(ROOT / "data_prep/slurm_prep_array.sh"), "3", str(tmp_path / "parts"), tokenizer_path,
         str(many_files / "*.jsonl"), str(many_files / "*.txt"), "--", "--shard-tokens", "15000", "--val-fraction",
         "0.3", "--chunk-docs", "2", "--segment-bytes", "1"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "parts: job 101 (array 0-2); merge: job 102 once every part has succeeded" in out.stdout
    array, merge_line = log.read_text().splitlines()
    assert "--array=0-2" in array and "--partition=cpu --time=1:00:00" in array
    assert "--num-parts 3 --part $SLURM_ARRAY_TASK_ID" in array
    assert "--dependency=afterok:101" in merge_line and "data merge" in merge_line
    prepare(part_options(many_files, tokenizer_path, tmp_path / "single"))
    assert read_tree(tmp_path / "parts") == read_tree(tmp_path / "single")
