"""Document ids of training windows against a per-token reference, across shard boundaries and curriculum rows."""

from types import SimpleNamespace

import numpy as np
import pytest

from tape_pretrain.data.loader import GlobalBatchLoader, TokenWindows
from tape_pretrain.errors import DataError


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Three shards of documents of random lengths (1 to 90 tokens), with their document starts."""
    root, rng = tmp_path_factory.mktemp("docs"), np.random.default_rng(0)
    shards, document_of_token, first_document = [], [], 0
    for i, num_docs in enumerate((40, 1, 25)):
        lengths = rng.integers(1, 90, num_docs)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype("<u8")
        tokens = rng.integers(0, 500, int(lengths.sum())).astype(np.uint16)
        tokens.tofile(root / f"s{i}.bin")
        starts.tofile(root / f"s{i}.docs.bin")
        shards.append(SimpleNamespace(path=str(root / f"s{i}.bin"), num_tokens=len(tokens),
                                      docs_path=str(root / f"s{i}.docs.bin")))
        document_of_token.append(first_document + np.repeat(np.arange(num_docs), lengths))
        first_document += num_docs
    return SimpleNamespace(shards=shards), np.concatenate(document_of_token)


def test_document_ids_mark_every_document_and_shard_start(shards):
    split, document_of_token = shards
    windows = TokenWindows(split, "uint16", 32)
    tokens, ids = windows.gather(np.arange(windows.num_windows), with_documents=True)
    assert tokens.tolist() == windows.gather(np.arange(windows.num_windows)).tolist()
    for index in range(windows.num_windows):  # the slow reference: the document of each token, token by token
        start = index * 32
        reference = document_of_token[start:start + 33]
        assert ids[index].tolist() == (reference - reference[0]).tolist()  # ids count documents from the row start


def test_loader_batches_carry_document_ids_and_old_data_has_none(shards):
    split, document_of_token = shards
    windows = TokenWindows(split, "uint16", 32)
    loader = GlobalBatchLoader(windows, "f" * 64, 1, 4, 0, 1, prefetch=0, documents=True)
    batch = loader.next_batch()
    starts = loader.global_indices(0) * 32
    for row, start in enumerate(starts):
        reference = document_of_token[start:start + 33]
        assert batch.document_ids[row].tolist() == (reference - reference[0]).tolist()
    old = SimpleNamespace(shards=[SimpleNamespace(path=s.path, num_tokens=s.num_tokens, docs_path=None)
                                  for s in split.shards])
    old_windows = TokenWindows(old, "uint16", 32)
    assert not old_windows.has_documents
    assert GlobalBatchLoader(old_windows, "f" * 64, 1, 4, 0, 1, prefetch=0).next_batch().document_ids is None
    with pytest.raises(DataError, match="records no document starts"):
        GlobalBatchLoader(old_windows, "f" * 64, 1, 4, 0, 1, prefetch=0, documents=True)
