"""Hugging Face tokenizer files for an export: ``AutoTokenizer.from_pretrained(export_dir)`` then encodes exactly like
our SentencePiece model, with neither ``trust_remote_code`` nor this package installed.

Why a ``tokenizer.json`` built here from the SentencePiece proto, loaded as ``PreTrainedTokenizerFast``
(``TokenizersBackend`` in transformers 5), and not ``LlamaTokenizer``: in transformers 5 ``LlamaTokenizer`` rebuilds
a fixed ``Metaspace`` pipeline whatever the files say, and its ids differ from SentencePiece's (``" x"`` gives
``▁ x`` instead of ``▁▁ x``, since ``Metaspace`` skips the dummy prefix before a leading space; a literal ``"</s>"``
becomes EOS), with ``legacy``/``add_prefix_space`` either way. A ``tokenizer.json`` is used as written, and loads
faster than converting ``tokenizer.model``.

* Normalizer as SentencePiece's: prepend the dummy prefix "▁" to every non-empty text, then spaces to "▁"; runs of
  spaces, tabs and newlines are kept (``remove_extra_whitespaces=False``, rule "identity"). No pre-tokenizer: like
  SentencePiece, BPE sees the whole text as one sequence.
* BPE merges are those SentencePiece makes (pairs of normal pieces into a normal piece, by that piece's score);
  characters outside the vocabulary fall back to the ``<0xNN>`` byte pieces. The decoder maps "▁" back to spaces,
  bytes back to UTF-8, and strips one leading space (the dummy prefix).
* ``add_special_tokens`` (on by default) adds nothing: the models were trained without BOS, and the EOS that ends
  each training document is the caller's to append (``tok.eos_token_id``). The tokenizer.json post-processor decides
  this (transformers 5 drops ``add_bos_token``/``add_eos_token`` of tokenizer_config.json when a tokenizer.json
  exists); the config says ``add_bos_token: false`` too, for tools that read it.
* ``split_special_tokens``: a text that spells "</s>" is encoded as characters, as SentencePiece does.
* unk/bos/eos/pad are the model's own pieces (0/1/2/3 for ours), declared as special tokens with their ids, so
  ``len(tok)`` is the SentencePiece vocabulary size.

Other SentencePiece models (Unigram, user-defined or unused pieces, whitespace as suffix) raise ``ValueError``
rather than getting a tokenizer that might encode differently.
"""

from __future__ import annotations

import base64
import json
import pathlib

from sentencepiece import sentencepiece_model_pb2 as model_pb2

__all__ = ["write_hf_tokenizer"]

SPACE = "▁"  # SentencePiece's whitespace symbol, U+2581
# SentencePiece piece types (sentencepiece_model.proto)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE, UNUSED = 1, 2, 3, 4, 6, 5
BPE = 2
# `add_special_tokens=True` adds nothing, to one text or a pair. With a tokenizer.json, transformers 5 ignores
# add_bos_token/add_eos_token from tokenizer_config.json and keeps this post-processor.
NO_SPECIAL_TOKENS = {"type": "TemplateProcessing", "single": [{"Sequence": {"id": "A", "type_id": 0}}],
                     "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                     "special_tokens": {}}


def _bpe_merges(pieces) -> list[list[str]]:
    """The merges SentencePiece's BPE can make, in the order it prefers them.

    SentencePiece merges the adjacent pair whose concatenation is the normal piece of highest score (the leftmost
    such pair on ties), never into byte, control or unknown pieces. Two splits of one piece share its score, which
    a merge list cannot express; the split with the longer left part goes first. Either order gave the same ids as
    SentencePiece on every string of up to 8 characters over its most ambiguous characters (runs of spaces too)."""
    normal = {p.piece: (p.score, i) for i, p in enumerate(pieces) if p.type == NORMAL}
    ranked = []
    for piece, (score, index) in normal.items():
        for cut in range(len(piece) - 1, 0, -1):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-score, index, -cut, left, right))
    ranked.sort()
    return [[left, right] for *_, left, right in ranked]


def _tokenizer_json(proto) -> dict:
    trainer, spec = proto.trainer_spec, proto.normalizer_spec
    pieces = proto.pieces
    if trainer.model_type != BPE:  # a Unigram lattice in `tokenizers` would also match "<s>" or "<0x41>" in text
        raise ValueError(f"SentencePiece model type {trainer.model_type} is not supported (only BPE)")
    if trainer.treat_whitespace_as_suffix:
        raise ValueError("SentencePiece treat_whitespace_as_suffix is not supported")
    if any(p.type in (USER_DEFINED, UNUSED) for p in pieces):
        raise ValueError("SentencePiece user-defined or unused pieces are not supported")
    if trainer.unk_id < 0 or pieces[trainer.unk_id].type != UNKNOWN:
        raise ValueError("SentencePiece model without an unknown piece")

    normalizers = []
    if spec.precompiled_charsmap:  # a normalization rule other than "identity"
        normalizers.append({"type": "Precompiled",
                            "precompiled_charsmap": base64.b64encode(spec.precompiled_charsmap).decode("ascii")})
    if spec.remove_extra_whitespaces:  # SentencePiece only counts spaces, not tabs or newlines
        normalizers += [{"type": "Replace", "pattern": {"Regex": r"\A +| +\z"}, "content": ""},
                        {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}]
    if spec.add_dummy_prefix:  # Prepend leaves the empty text empty, as SentencePiece does
        normalizers.append({"type": "Prepend", "prepend": SPACE})
    if spec.escape_whitespaces:
        normalizers.append({"type": "Replace", "pattern": {"String": " "}, "content": SPACE})

    model = {"type": "BPE", "dropout": None, "unk_token": pieces[trainer.unk_id].piece,
             "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
             "byte_fallback": trainer.byte_fallback, "ignore_merges": False,
             "vocab": {p.piece: i for i, p in enumerate(pieces)}, "merges": _bpe_merges(pieces)}

    decoders = []
    if spec.escape_whitespaces:
        decoders.append({"type": "Replace", "pattern": {"String": SPACE}, "content": " "})
    if trainer.byte_fallback:
        decoders.append({"type": "ByteFallback"})
    decoders.append({"type": "Fuse"})  # `Strip` strips each token: fuse them first, to strip the text's start only
    if spec.add_dummy_prefix:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})

    added = [{"id": i, "content": p.piece, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True}
             for i, p in enumerate(pieces) if p.type in (UNKNOWN, CONTROL)]
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            "normalizer": {"type": "Sequence", "normalizers": normalizers}, "pre_tokenizer": None,
            "post_processor": NO_SPECIAL_TOKENS, "decoder": {"type": "Sequence", "decoders": decoders}, "model": model}


def write_hf_tokenizer(out: pathlib.Path, model_bytes: bytes) -> None:
    """Write ``tokenizer.model`` (``model_bytes`` as given) and the Hugging Face files for it into ``out``."""
    proto = model_pb2.ModelProto()
    proto.ParseFromString(model_bytes)
    tokenizer = _tokenizer_json(proto)
    trainer = proto.trainer_spec

    def piece(index: int) -> str | None:
        return proto.pieces[index].piece if 0 <= index < len(proto.pieces) else None

    special = {name: piece(index) for name, index in (("unk_token", trainer.unk_id), ("bos_token", trainer.bos_id),
                                                       ("eos_token", trainer.eos_id), ("pad_token", trainer.pad_id))}
    special = {name: token for name, token in special.items() if token is not None}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": False,
        "add_eos_token": False,
        "split_special_tokens": True,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {str(t["id"]): {k: v for k, v in t.items() if k != "id"}
                                 for t in tokenizer["added_tokens"]},
    }
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(model_bytes)
    (out / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False, indent=1), encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=1), encoding="utf-8")
    (out / "special_tokens_map.json").write_text(json.dumps(special, ensure_ascii=False, indent=1),
                                                 encoding="utf-8")
