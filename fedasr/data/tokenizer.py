"""SentencePiece tokenizer with the RNN-T blank at id 0.

The model is trained with ``pad_id=0`` renamed ``<blk>`` (the transducer blank, never
produced by encoding), ``unk_id=1`` and no BOS/EOS, so token ids index the model's
output layer directly.

Transcripts are normalised by :func:`normalize_transcript` before the tokenizer is trained
and before they are stored in a federation (``fedasr shard``), and references are normalised
by the same function when they are scored (:mod:`fedasr.evaluate`).
"""

from __future__ import annotations

import io
import re
import unicodedata
from pathlib import Path
from typing import Iterable

import sentencepiece as spm

from fedasr.errors import FedasrError, OptionError
from fedasr.fsutil import atomic_write_bytes

BLANK_ID = 0
MODEL_TYPES = ("unigram", "bpe")

# The transcript convention of LibriSpeech (and of the synthetic corpus), written as one rule:
TEXT_NORMALIZATION = ("fedasr-1: Unicode NFKC, upper case; letters, digits and combining marks kept; "
                      "an apostrophe (' or U+2019) kept where it touches a letter or digit; every other "
                      "character a word boundary; single spaces")
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u02bc": "'"})


def _word_char(ch: str) -> bool:
    return unicodedata.category(ch)[0] in "LNM"


def normalize_transcript(text: str | None) -> str:
    """The transcript as the tokenizer sees it (:data:`TEXT_NORMALIZATION`).

    ``"Don't stop, Mr. O’Neil!"`` -> ``"DON'T STOP MR O'NEIL"``; ``"well-known"`` ->
    ``"WELL KNOWN"``; digits stay digits (``"7 A.M."`` -> ``"7 A M"``). Text already in
    LibriSpeech's convention (upper-case words of A-Z and apostrophes, single spaces) is
    returned unchanged, and the function is idempotent. An empty result means the
    transcript has no words.
    """
    if not text:
        return ""
    s = unicodedata.normalize("NFKC", text).translate(_APOSTROPHES).upper()
    out = []
    for i, ch in enumerate(s):
        if _word_char(ch):
            out.append(ch)
        elif ch == "'" and ((i > 0 and _word_char(s[i - 1])) or (i + 1 < len(s) and _word_char(s[i + 1]))):
            out.append(ch)
        else:
            out.append(" ")
    return " ".join("".join(out).split())


class Tokenizer:
    def __init__(self, model_proto: bytes, source: str = "<memory>"):
        self.proto = model_proto
        self.source = source
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(model_proto)
        except Exception:
            raise FedasrError(f"{source}: not a SentencePiece model") from None
        if self.sp.id_to_piece(BLANK_ID) != "<blk>" or self.sp.pad_id() != BLANK_ID:
            raise FedasrError(
                f"{source}: SentencePiece model must reserve id 0 for the blank "
                "(train it with pad_id=0, pad_piece=<blk>, e.g. with `fedasr shard`)"
            )

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        if not path.is_file():
            raise FedasrError(f"{path}: tokenizer model does not exist")
        return cls(path.read_bytes(), str(path))

    def save(self, path: str | Path) -> None:
        atomic_write_bytes(path, self.proto)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text, out_type=int)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids if i != BLANK_ID])


# Without an explicit size, `fedasr shard` takes the largest vocabulary the transcripts
# allow, up to this many pieces (a small corpus supports fewer than 256 pieces).
AUTO_MAX_VOCAB = 256


class _VocabTooLarge(OptionError):  # a usage error: the option asks for more than the data allow
    def __init__(self, requested: int, limit: int, model_type: str):
        super().__init__(f"--vocab-size: {requested} is larger than the training transcripts allow "
                         f"(at most {limit} for {model_type})")
        self.limit = limit


def train_tokenizer(texts: list[str], vocab_size: int | None, model_type: str = "unigram") -> Tokenizer:
    """Train a SentencePiece model on ``texts`` (deterministic for the same texts).

    ``vocab_size=None``: the largest vocabulary the texts allow, at most
    :data:`AUTO_MAX_VOCAB`. An explicit size the texts cannot support is an error."""
    if vocab_size is None:
        try:
            return _train(texts, AUTO_MAX_VOCAB, model_type)
        except _VocabTooLarge as e:
            return _train(texts, e.limit, model_type)
    return _train(texts, vocab_size, model_type)


def _train(texts: list[str], vocab_size: int, model_type: str) -> Tokenizer:
    if model_type not in MODEL_TYPES:
        raise OptionError(f"--tokenizer-type: unknown type {model_type!r} (choose from {', '.join(MODEL_TYPES)})")
    if vocab_size < 3:
        raise OptionError(f"--vocab-size: must be at least 3, got {vocab_size}")
    if not texts:
        raise FedasrError("--vocab-size: no training transcripts to train a tokenizer on")
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_writer=buf,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=1.0,
            pad_id=BLANK_ID,
            pad_piece="<blk>",
            unk_id=1,
            bos_id=-1,
            eos_id=-1,
            input_sentence_size=0,
            shuffle_input_sentence=False,
            num_threads=1,
            minloglevel=2,
        )
    except RuntimeError as e:
        m = re.search(r"value <= (\d+)", str(e))
        if m:
            raise _VocabTooLarge(vocab_size, int(m.group(1)), model_type) from None
        raise FedasrError(f"--vocab-size: SentencePiece training failed: {str(e).splitlines()[0]}") from None
    return Tokenizer(buf.getvalue(), "<trained>")
