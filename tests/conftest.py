"""Shared fixtures: a real SentencePiece tokenizer, small corpora, and an S3-compatible server on loopback."""

from __future__ import annotations

import json
import os
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def stdlib_texts(count: int, skip: int = 0) -> list[str]:
    """Real text that exists on every machine: standard-library sources, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py"))[skip:skip + count]
    return [p.read_text(encoding="utf-8", errors="replace") for p in files]


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """A small corpus as jsonl and txt files (about 120 documents)."""
    root = tmp_path_factory.mktemp("corpus")
    texts = stdlib_texts(120)
    with open(root / "part-0.jsonl", "w") as f:
        for text in texts[:80]:
            f.write(json.dumps({"text": text}) + "\n")
    for i, text in enumerate(texts[80:]):
        (root / f"doc_{i:03d}.txt").write_text(text)
    return root


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory, corpus_dir) -> str:
    from tape_pretrain.data.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tok") / "tok.model"
    train_tokenizer([str(corpus_dir / "*.jsonl")], vocab_size=512, out=str(out))
    return str(out)


@pytest.fixture(scope="session")
def dataset_path(tmp_path_factory, corpus_dir, tokenizer_path) -> str:
    """A prepared dataset (several shards) from the small corpus."""
    from tape_pretrain.data.prep import PrepOptions, prepare

    out = tmp_path_factory.mktemp("data") / "ds"
    prepare(PrepOptions(inputs=[str(corpus_dir / "*.jsonl"), str(corpus_dir / "*.txt")],
                        tokenizer=tokenizer_path, out=str(out), shard_tokens=60_000, val_fraction=0.1,
                        progress=False))
    return str(out)


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3-compatible server bound to 127.0.0.1 (its default would be every interface)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Dummy credentials and the endpoint through the standard AWS variables; a fresh bucket per test."""
    import uuid

    import s3fs

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    bucket = f"bucket-{uuid.uuid4().hex[:8]}"
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(endpoint_url=s3_server)
    fs.mkdir(bucket)
    yield bucket
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def cli_env():
    """Environment for subprocesses running the CLI from this checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


@pytest.fixture
def world_of_one():
    """This process as a world of one, for a trainer built in-process (tests.helpers.world_of_one_process)."""
    from tests.helpers import world_of_one_process

    with world_of_one_process() as env:
        yield env
