"""SentencePiece tokenizer: training from sources, loading from any URL, identity by sha256."""

from __future__ import annotations

import hashlib
import io
import itertools
from dataclasses import dataclass

import numpy as np
import sentencepiece as spm

from tape_pretrain.data.sources import iter_documents
from tape_pretrain.data.storage import open_url, read_bytes, write_bytes_atomic
from tape_pretrain.errors import DataError

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3


@dataclass
class Tokenizer:
    """A loaded SentencePiece model and its identity."""

    model_bytes: bytes
    processor: spm.SentencePieceProcessor
    sha256: str

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "tokenizer") -> Tokenizer:
        if not data:
            raise DataError(f"{where}: tokenizer file is empty")
        processor = spm.SentencePieceProcessor()
        try:
            processor.LoadFromSerializedProto(data)
        except (RuntimeError, OSError) as exc:
            raise DataError(f"{where}: not a SentencePiece model ({exc})") from None
        return cls(data, processor, hashlib.sha256(data).hexdigest())

    @classmethod
    def load(cls, url: str, storage_options=None) -> Tokenizer:
        fs, path = open_url(url, storage_options)
        try:
            data = read_bytes(fs, path)
        except FileNotFoundError:
            raise DataError(f"{url}: tokenizer file does not exist") from None
        return cls.from_bytes(data, url)

    @property
    def vocab_size(self) -> int:
        return self.processor.get_piece_size()

    @property
    def eos_id(self) -> int:
        eos = self.processor.eos_id()
        if eos < 0:
            raise DataError("tokenizer has no EOS id: documents cannot be separated")
        return eos

    def special_ids(self) -> dict[str, int]:
        p = self.processor
        return {"bos_id": p.bos_id(), "eos_id": p.eos_id(), "pad_id": p.pad_id(), "unk_id": p.unk_id()}

    def token_dtype(self) -> np.dtype:
        return np.dtype(np.uint16) if self.vocab_size <= 65535 else np.dtype(np.uint32)

    def encode_documents(self, texts: list[str]) -> tuple[np.ndarray, int]:
        """Token ids of the documents, each followed by EOS, concatenated; and the document count."""
        tokens, starts = self.encode_documents_with_starts(texts)
        return tokens, len(starts)

    def encode_documents_with_starts(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """As ``encode_documents``, with the int64 offset in the tokens where each document starts (the first 0)."""
        ids = self.processor.encode(texts, out_type=int, num_threads=1)
        eos = self.eos_id
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids)) + 1
        starts = np.zeros(len(ids), dtype=np.int64)
        np.cumsum(lengths[:-1], out=starts[1:])
        out = np.empty(int(lengths.sum()), dtype=self.token_dtype())
        pos = 0
        for doc in ids:  # one slice assignment per document; the per-token work is in C
            n = len(doc)
            out[pos:pos + n] = doc
            out[pos + n] = eos
            pos += n + 1
        return out, starts

    def decode(self, ids) -> str:
        return self.processor.decode([int(i) for i in ids])


def train_tokenizer(inputs: list[str], vocab_size: int, out: str, text_field: str = "text",
                    max_sentences: int = 200_000, model_type: str = "bpe", storage_options=None) -> Tokenizer:
    """Train SentencePiece (byte fallback, unk/bos/eos/pad = 0/1/2/3) on the first documents of the sources."""
    if vocab_size < 260:
        raise DataError(f"--vocab-size {vocab_size} is too small: byte fallback alone needs 256 + 4 special ids")

    documents = iter_documents(inputs, text_field, storage_options=storage_options)
    first = next(documents, None)
    if first is None:  # SentencePiece would fail with an internal assertion instead
        raise DataError(f"{', '.join(inputs)}: the corpus is empty (no non-empty documents)")

    def sentences():
        yield first
        yield from itertools.islice(documents, max_sentences - 1)

    buffer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(), model_writer=buffer, vocab_size=vocab_size, model_type=model_type,
            byte_fallback=True, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID,
            character_coverage=0.9995, max_sentence_length=1 << 20, input_sentence_size=max_sentences,
            shuffle_input_sentence=False, train_extremely_large_corpus=False, num_threads=2,
            split_digits=True, allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
            normalization_rule_name="identity", minloglevel=2)
    except RuntimeError as exc:
        raise DataError(f"tokenizer training failed on {', '.join(inputs)}: {exc}") from None
    data = buffer.getvalue()
    fs, path = open_url(out, storage_options)
    write_bytes_atomic(fs, path, data)
    tokenizer = Tokenizer.from_bytes(data, out)
    print(f"tokenizer: vocab {tokenizer.vocab_size}, sha256 {tokenizer.sha256[:16]}…, written to {out}")
    return tokenizer
