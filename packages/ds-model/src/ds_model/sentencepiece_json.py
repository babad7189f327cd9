"""A SentencePiece BPE model as a Hugging Face ``tokenizer.json``, built with the
``tokenizers`` library (a ds-model dependency), so every checkpoint ds-model writes loads
in ``transformers.AutoTokenizer`` without transformers being installed to write it.

Supported: the BPE models ds-model's recipes train (identity normalisation, no dummy
prefix, no whitespace squeezing, byte fallback). The model file is read with a small
protobuf wire-format reader (the ``protobuf`` package is not a dependency); anything else
(unigram models, NFKC rules, dummy prefixes) is refused with the setting that differs,
because a converted tokenizer that splits text differently would be a silent wrong answer.

The mapping: spaces become ``▁`` (SentencePiece's escape), every piece is a BPE vocab
entry, a merge ``(left, right)`` exists for every split of a piece into two vocab
pieces, ranked by the merged piece's score (SentencePiece merges the best-scoring pair
first), user-defined symbols become added tokens matched before the model (as
SentencePiece matches them), control and unknown pieces are special added tokens, and
``split_special_tokens`` makes ``<s>`` in a text mean the characters, as in SentencePiece.
"""

from __future__ import annotations

import struct
from typing import Any

__all__ = ["sentencepiece_to_tokenizer_json"]

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
BPE = 2


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(data: bytes) -> list[tuple[int, int | bytes]]:
    """(field number, value) of one protobuf message: ints for varint/fixed fields,
    bytes for length-delimited ones."""
    out: list[tuple[int, int | bytes]] = []
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 1:
            value, pos = struct.unpack_from("<Q", data, pos)[0], pos + 8
        elif wire == 2:
            size, pos = _varint(data, pos)
            value, pos = data[pos : pos + size], pos + size
        elif wire == 5:
            value, pos = struct.unpack_from("<I", data, pos)[0], pos + 4
        else:
            raise ValueError(f"not a SentencePiece model: protobuf wire type {wire}")
        out.append((number, value))
    return out


def _read_model(data: bytes) -> dict[str, Any]:
    pieces: list[tuple[str, float, int]] = []
    trainer: dict[int, Any] = {}
    normalizer: dict[int, Any] = {}
    for number, value in _fields(data):
        if number == 1:
            piece = dict(_fields(value))  # type: ignore[arg-type]
            score = struct.unpack("<f", struct.pack("<I", piece.get(2, 0)))[0]
            pieces.append((piece[1].decode(), score, piece.get(3, NORMAL)))
        elif number == 2:
            trainer = dict(_fields(value))  # type: ignore[arg-type]
        elif number == 3:
            normalizer = dict(_fields(value))  # type: ignore[arg-type]
    if not pieces:
        raise ValueError("not a SentencePiece model: it has no pieces")
    return {
        "pieces": pieces,
        "model_type": trainer.get(3, 1),
        "bos_id": trainer.get(41, 1),
        "byte_fallback": bool(trainer.get(35, 0)),
        "whitespace_as_suffix": bool(trainer.get(24, 0)),
        "rule": normalizer.get(1, b"nmt_nfkc").decode(),
        "charsmap": normalizer.get(2, b""),
        "add_dummy_prefix": bool(normalizer.get(3, 1)),
        "remove_extra_whitespaces": bool(normalizer.get(4, 1)),
        "escape_whitespaces": bool(normalizer.get(5, 1)),
    }


def _check_supported(spec: dict[str, Any]) -> None:
    wanted = {
        "model_type": BPE,
        "whitespace_as_suffix": False,
        "add_dummy_prefix": False,
        "remove_extra_whitespaces": False,
        "escape_whitespaces": True,
    }
    for name, value in wanted.items():
        if spec[name] != value:
            raise ValueError(
                f"SentencePiece model has {name}={spec[name]!r}; tokenizer.json conversion "
                f"supports only {name}={value!r} (BPE, identity normalisation, no dummy prefix)"
            )
    if spec["charsmap"] or spec["rule"] != "identity":
        raise ValueError(
            f"SentencePiece model has normalization rule {spec['rule']!r}; tokenizer.json "
            "conversion supports only 'identity'"
        )


def sentencepiece_to_tokenizer_json(model: bytes, *, add_bos_token: bool = True) -> str:
    """The ``tokenizer.json`` text equivalent to the SentencePiece model ``model`` (the
    bytes of a ``.model`` file): same ids for every text, same decoding.
    ``add_bos_token`` puts BOS first when special tokens are added (as ds-model does)."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE as BPEModel

    spec = _read_model(model)
    _check_supported(spec)
    pieces = spec["pieces"]
    vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
    merges = []
    for piece, score, kind in pieces:
        if kind not in (NORMAL, USER_DEFINED, UNUSED) or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((-score, vocab[piece], vocab[left], vocab[right], left, right))
    merges.sort(key=lambda m: m[:4])
    unk = next((p for p, _, kind in pieces if kind == UNKNOWN), None)
    tokenizer = Tokenizer(
        BPEModel(
            vocab,
            [(m[4], m[5]) for m in merges],
            unk_token=unk,
            fuse_unk=True,
            byte_fallback=spec["byte_fallback"],
        )
    )
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    # Added tokens, in id order: user-defined symbols are matched before the model (as
    # SentencePiece's prefix matcher does); control and unknown pieces are special.
    for piece, _, kind in pieces:
        if kind == USER_DEFINED:
            tokenizer.add_tokens([AddedToken(piece, normalized=False, special=False)])
        elif kind in (CONTROL, UNKNOWN):
            tokenizer.add_special_tokens([AddedToken(piece, normalized=False, special=True)])
    bos_id = spec["bos_id"]
    if add_bos_token and 0 <= bos_id < len(pieces) and pieces[bos_id][2] == CONTROL:
        bos = pieces[bos_id][0]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
        )
    tokenizer.encode_special_tokens = True
    return tokenizer.to_str(pretty=False)
