"""Weighted mixtures: the interleaving against a slow exact merge, per-source fractions, world-size independence,
state and resume with changed weights, and the checks on the sources."""

import json
import shutil
from fractions import Fraction
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tape_pretrain.config import ConfigError, load_config
from tape_pretrain.data.cache import cache_split
from tape_pretrain.data.loader import GlobalBatchLoader, TokenWindows, WindowSource
from tape_pretrain.data.manifest import load_manifest
from tape_pretrain.data.mixture import Interleaving, integer_weights
from tape_pretrain.errors import CheckpointError, DataError

WEIGHTS = [0.5, 0.3, 0.2]


def reference_order(weights: list[float], count: int) -> list[tuple[int, int]]:
    """Every source's first windows at times (k + 1/2) / w_s, merged by exact time then source: the definition."""
    exact = [Fraction(repr(w)) for w in weights]
    events = [((k + Fraction(1, 2)) / w, s, k) for s, w in enumerate(exact) for k in range(count + 1)]
    return [(s, k) for _, s, k in sorted(events)[:count]]


@pytest.mark.parametrize("weights", [WEIGHTS, [1.0, 1.0, 1.0], [0.7, 0.25, 0.05], [1 / 3, 2 / 3], [3.0]])
def test_interleaving_is_the_exact_merge_in_any_chunks(weights):
    order = reference_order(weights, 600)
    mix = Interleaving(weights)
    for chunk in (1, 7, 64):
        got = [mix.windows(first, min(chunk, 600 - first)) for first in range(0, 600, chunk)]
        sources, ordinals = np.concatenate([g[0] for g in got]), np.concatenate([g[1] for g in got])
        assert list(zip(sources.tolist(), ordinals.tolist())) == order
    for position in (0, 1, 13, 250, 599):
        assert mix.counts(position) == np.bincount([s for s, _ in order[:position]],
                                                   minlength=len(weights)).tolist()


def test_integer_weights_are_the_decimal_ratio():
    assert integer_weights([0.5, 0.3, 0.2]) == [5, 3, 2]
    assert integer_weights([2, 2]) == [1, 1]
    with pytest.raises(ValueError, match="positive"):
        Interleaving([1.0, 0.0])


@pytest.fixture(scope="module")
def windows(dataset_path, tmp_path_factory):
    manifest, fp = load_manifest(dataset_path)
    split = cache_split(dataset_path, manifest, fp, "train", str(tmp_path_factory.mktemp("cache")))
    return TokenWindows(split, manifest.dtype, 64)


def mixture(windows, weights=WEIGHTS, rank=0, world=1, prefetch=0, names=("web", "code", "books")):
    sources = [WindowSource(name, windows, w, f"{i}" * 64) for i, (name, w) in enumerate(zip(names, weights))]
    return GlobalBatchLoader(sources, "m" * 64, 3, 16, rank, world, prefetch=prefetch)


def test_observed_source_fractions_follow_the_weights(windows):
    loader = mixture(windows)
    seen = np.concatenate([loader.next_batch().sources for _ in range(200)])
    fractions = np.bincount(seen, minlength=3) / len(seen)
    assert np.abs(fractions - WEIGHTS).max() < 0.02 * min(WEIGHTS)  # within 2 % of each weight
    assert loader.source_counts() == np.bincount(seen, minlength=3).tolist()


def test_mixture_order_does_not_depend_on_world_size_and_sources_draw_their_own_windows(windows):
    whole = mixture(windows)
    ranks = [mixture(windows, rank=r, world=4) for r in range(4)]
    for _ in range(4):
        batch = whole.next_batch()
        parts = [r.next_batch() for r in ranks]
        assert torch.equal(torch.cat([p.tokens for p in parts]), batch.tokens)
        assert np.concatenate([p.sources for p in parts]).tolist() == batch.sources.tolist()
    # each source walks its own permutation of the windows: source 0 that of a one-source run, the others their own
    single = GlobalBatchLoader(windows, "0" * 64, 3, 16, 0, 1, prefetch=0)
    assert whole.permutation(0, 0).tolist() == single.permutation(0).tolist()
    assert whole.permutation(0, 1).tolist() != whole.permutation(0, 0).tolist()
    sources, ids = whole.global_windows_at(0)
    for s in range(3):  # the k-th window of source s is entry k of its permutation
        assert ids[sources == s].tolist() == whole.permutation(0, s)[:int((sources == s).sum())].tolist()


def test_mixture_state_resumes_identically_with_prefetch(windows):
    a = mixture(windows, prefetch=2)
    for _ in range(5):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))  # as a checkpoint stores it
    expected = [a.next_batch() for _ in range(4)]
    b = mixture(windows, prefetch=2)
    b.load_state_dict(state)
    for want in expected:
        got = b.next_batch()
        assert torch.equal(got.tokens, want.tokens) and got.sources.tolist() == want.sources.tolist()
    a.close(), b.close()


def test_changed_weights_are_refused_unless_allowed_and_then_every_source_continues(windows):
    a = mixture(windows)
    for _ in range(10):
        a.next_batch()
    state, before = a.state_dict(), a.source_counts()
    b = mixture(windows, weights=[0.2, 0.3, 0.5])
    with pytest.raises(CheckpointError, match=r"weights \[0.2, 0.3, 0.5\] differ from the checkpoint's"):
        b.load_state_dict(state)
    b.load_state_dict(state, allow_fingerprint_change=True)
    assert b.source_counts() == before  # nothing consumed twice, nothing skipped
    sources, ids = b.global_windows_at(b.windows_consumed)
    for s in range(3):  # each source's next windows are the ones after those it had served
        served = before[s]
        assert ids[sources == s].tolist() == b.permutation(0, s)[served:served + int((sources == s).sum())].tolist()
    seen = np.concatenate([b.next_batch().sources for _ in range(100)])
    assert np.abs(np.bincount(seen, minlength=3) / len(seen) - [0.2, 0.3, 0.5]).max() < 0.004
    state = b.state_dict()  # and the rebased mixture itself resumes
    c = mixture(windows, weights=[0.2, 0.3, 0.5])
    c.load_state_dict(state)
    assert torch.equal(c.next_batch().tokens, b.next_batch().tokens)


def test_sources_cannot_change_on_resume(windows):
    state = mixture(windows).state_dict()
    with pytest.raises(CheckpointError, match=r"data sources \['web', 'code', 'books'\] differ .* \['web', 'code', "
                                              r"'papers'\]"):
        mixture(windows, names=("web", "code", "papers")).load_state_dict(state, allow_fingerprint_change=True)
    single = GlobalBatchLoader(windows, "m" * 64, 3, 16, 0, 1, prefetch=0)
    with pytest.raises(CheckpointError, match="data sources"):
        single.load_state_dict(state)


@pytest.mark.parametrize("overrides, message", [
    (["data.path=/x", "data.sources=[{path: /y}]"], "data.path and data.sources are both set"),
    (["data.sources=[{path: /y, weight: 0}]"], r"data.sources\[0\].weight must be a positive finite number, got 0.0"),
    (["data.sources=[{path: /a/web}, {path: /b/web}]"], "two sources are named 'web'"),
    (["data.sources=[{path: /a, name: 'x y'}]"], r"data.sources\[0\].name 'x y'"),
    (["data.sources=[{path: /y, weight: .inf}]"], r"data.sources\[0\].weight must be a positive finite number"),
    (["data.sources=[{weight: 1}]"], r"data.sources\[0\].path is required"),
])
def test_bad_sources_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_sources_with_different_tokenizers_are_refused_with_one_error(dataset_path, tmp_path):
    from tape_pretrain.train.training_data import load_training_data

    other = tmp_path / "other"
    shutil.copytree(dataset_path, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["tokenizer"]["sha256"] = "0" * 64  # another tokenizer's dataset, as far as the manifest says
    (other / "manifest.json").write_text(json.dumps(manifest))
    config = load_config(None, [f"data.sources=[{{path: {dataset_path}, name: a}}, {{path: {other}, name: b}}]",
                                f"data.cache_dir={tmp_path / 'cache'}"])
    env = SimpleNamespace(rank=0, local_rank=0, world_size=1, is_main=True)
    with pytest.raises(DataError, match=r"\(b\) was tokenized with tokenizer 0000000000000000, .* \(a\) with "
                                        r"[0-9a-f]{16}: a mixture needs one tokenizer"):
        load_training_data(config, env, 16)
