"""Loader: world-size-independent global order, rank slices, epochs, state, tokenizer checks."""

import numpy as np
import pytest
import torch

from tape_pretrain.data.cache import cache_split
from tape_pretrain.data.loader import GlobalBatchLoader, TokenWindows
from tape_pretrain.data.manifest import load_manifest
from tape_pretrain.errors import CheckpointError, DataError


@pytest.fixture(scope="module")
def windows(dataset_path, tmp_path_factory):
    manifest, fp = load_manifest(dataset_path)
    split = cache_split(dataset_path, manifest, fp, "train", str(tmp_path_factory.mktemp("cache")))
    return TokenWindows(split, manifest.dtype, 64), fp, split


def loader(windows, rank=0, world=1, global_windows=16, seed=3, prefetch=0):
    w, fp, _ = windows
    return GlobalBatchLoader(w, fp, seed, global_windows, rank, world, prefetch=prefetch)


def test_windows_are_the_concatenated_shards(windows):
    w, _, split = windows
    flat = np.concatenate([np.fromfile(s.path, dtype=np.uint16) for s in split.shards]).astype(np.int64)
    assert len(split.shards) > 1
    boundary = split.shards[0].num_tokens // 64  # a window that spans two shards
    for index in (0, 5, boundary, w.num_windows - 1):
        assert w.gather(np.array([index]))[0].tolist() == flat[index * 64: index * 64 + 65].tolist()


def test_two_ranks_see_exactly_what_one_rank_sees(windows):
    one = loader(windows)
    ranks = [loader(windows, rank=r, world=2) for r in range(2)]
    for _ in range(5):
        whole = one.next_batch()
        assert torch.equal(torch.cat([r.next_batch().tokens for r in ranks]), whole.tokens)


def test_order_does_not_depend_on_world_size(windows):
    for world in (1, 2, 4):
        assert loader(windows, world=world).global_indices(48).tolist() == loader(windows).global_indices(48).tolist()


def test_no_window_repeats_within_an_epoch(windows):
    l = loader(windows, global_windows=8)
    n = l.windows.num_windows
    seen = np.concatenate([l.global_indices(p) for p in range(0, n - n % 8, 8)])
    assert len(set(seen.tolist())) == len(seen)
    # the next epoch is a different permutation of the same windows
    assert sorted(l.permutation(1).tolist()) == sorted(l.permutation(0).tolist())
    assert l.permutation(1).tolist() != l.permutation(0).tolist()


def test_prefetch_yields_the_same_batches(windows):
    plain, fetched = loader(windows), loader(windows, prefetch=3)
    for _ in range(6):
        assert torch.equal(plain.next_batch().tokens, fetched.next_batch().tokens)
    fetched.close()


def test_state_round_trip_continues_identically(windows):
    a = loader(windows, prefetch=2)
    for _ in range(3):
        a.next_batch()
    state = a.state_dict()
    expected = [a.next_batch().tokens for _ in range(3)]
    b = loader(windows, prefetch=2)
    b.load_state_dict(state)
    assert all(torch.equal(x, b.next_batch().tokens) for x in expected)
    assert state["tokens_consumed"] == 3 * 16 * 64
    a.close(), b.close()


def test_state_from_other_data_is_refused(windows):
    a = loader(windows)
    state = dict(a.state_dict(), fingerprint="f" * 64)
    with pytest.raises(CheckpointError, match="dataset fingerprint"):
        a.load_state_dict(state)


def test_wrong_vocab_is_a_clear_error(dataset_path):
    from tape_pretrain.config import load_config
    from tape_pretrain.train.resume import resolve_run_model_config

    config = load_config(None, ["model.vocab_size=32000"])
    with pytest.raises(DataError, match="model.vocab_size=32000 but the dataset's tokenizer has 512"):
        resolve_run_model_config(config, 512)


def test_out_of_vocab_and_truncated_shards_are_caught(dataset_path, tmp_path):
    import shutil

    copy = tmp_path / "ds"
    shutil.copytree(dataset_path, copy)
    manifest, fp = load_manifest(str(copy))
    shard = copy / manifest.splits["train"][1].path
    data = np.fromfile(shard, dtype=np.uint16)
    data[10] = 600  # >= vocab 512
    data.tofile(shard)
    with pytest.raises(DataError, match="shard_000001.bin: size .*|shard_000001.bin: sha256"):
        cache_split(str(copy), manifest, fp, "train", str(tmp_path / "c1"))
    # recompute the checksum so only the vocab check can catch it
    import hashlib
    import json

    raw = json.loads((copy / "manifest.json").read_text())
    raw["splits"]["train"][1]["sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()
    (copy / "manifest.json").write_text(json.dumps(raw))
    manifest, fp = load_manifest(str(copy))
    with pytest.raises(DataError, match="shard_000001.bin: token id 600 >= vocab size 512"):
        cache_split(str(copy), manifest, fp, "train", str(tmp_path / "c2"))
    skipped = cache_split(str(copy), manifest, fp, "train", str(tmp_path / "c3"), on_corrupt="skip")
    assert skipped.skipped == [manifest.splits["train"][1].path]
    shard.write_bytes(shard.read_bytes()[:-3])
    with pytest.raises(DataError, match="shard_000001.bin: size"):
        cache_split(str(copy), manifest, fp, "train", str(tmp_path / "c4"))
