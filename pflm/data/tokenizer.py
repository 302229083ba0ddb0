"""SentencePiece tokenizer (word / unigram / bpe) with fixed special ids, from train users, public text or a DP list.

Special ids are fixed for every model type: pad=0, unk=1, bos=2, eos=3. `encode` never adds bos/eos.

Unknown words: with the `word` model a word outside the vocabulary maps to the single id `unk_id` (1), and
`decode` renders it as " ⁇ ". With `unigram`/`bpe` an unseen word is spelled with smaller pieces; only characters
never seen in training become `unk`, unless `byte_fallback=True`, which spells them as UTF-8 byte pieces instead
(256 byte pieces are then reserved in the vocabulary).

Vocabulary size is a hard limit (SentencePiece `hard_vocab_limit=True`): the model has exactly `vocab_size`
pieces or training fails. We chose this over `hard_vocab_limit=False` (which silently shrinks the vocabulary)
because downstream code sizes embedding and output layers from the requested size, and a silently smaller
vocabulary hides a data problem. When the data cannot fill the request, `train_tokenizer` raises `DataError`
with the largest size the data supports. For the `word` model that maximum is the number of distinct words in
the tokenizer's training text plus the 4 special pieces; e.g. a >= 100k word vocabulary needs >= 99,996
distinct words.

Privacy (docs/vocabulary.md): the vocabulary and its piece scores come from the tokenizer's training text. By
default that is the *train users'* text, so the vocabulary is private user data (a word one user typed can be in
it). `tokenizer_input` trains it on a public file or the public wordfreq list instead; `pflm prepare --vocab-source
dp` builds it from a DP release (pflm.data.dp_vocab). Public and DP word vocabularies are both built by
`train_word_model_from_counts`, so tokenizer.model then holds only those words and public/DP scores.
"""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import sentencepiece as spm

from pflm.errors import ConfigError, DataError
from pflm.tokens import BOS_ID, EOS_ID, NUM_SPECIAL, PAD_ID, UNK_ID

MODEL_TYPES = ("word", "unigram", "bpe")
PUBLIC_WORDFREQ = "wordfreq"  # --tokenizer-input wordfreq: public English word list (pflm/data/public_vocab.py)
MAX_PIECE_CHARS = 512  # SentencePiece's own upper bound for max_sentencepiece_length
_TOO_HIGH = re.compile(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)")


@dataclass(frozen=True)
class TokenizerConfig:
    """How to train the tokenizer (see the module docstring for unknown-word handling and privacy)."""

    model_type: str = "word"
    vocab_size: int = 10_000
    byte_fallback: bool = False
    input_sentence_size: int = 5_000_000  # sample at most this many sentences (0 = all)
    tokenizer_input: str | None = None  # public text file (one sentence a line) to train on instead of train users
    num_threads: int = 2

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise ConfigError(f"model type {self.model_type!r} unknown; use one of {', '.join(MODEL_TYPES)}")
        if self.vocab_size < NUM_SPECIAL + 1:
            raise ConfigError(f"vocab size must be > {NUM_SPECIAL} (the special pieces), got {self.vocab_size}")
        if self.byte_fallback and self.model_type == "word":
            raise ConfigError("byte_fallback only applies to unigram/bpe models; drop it or change --model-type")
        if self.input_sentence_size < 0 or self.num_threads < 1:
            raise ConfigError("input_sentence_size must be >= 0 and num_threads >= 1")


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, i


def _fields(buf: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """Minimal protobuf wire-format walk: (field number, wire type, value)."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        field_no, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
            yield field_no, wire, value
        elif wire == 2:
            n, i = _varint(buf, i)
            yield field_no, wire, buf[i:i + n]
            i += n
        elif wire in (1, 5):
            i += 8 if wire == 1 else 4
        else:
            raise ValueError(f"unsupported wire type {wire}")


def _model_type(model: bytes) -> str:
    """Read TrainerSpec.model_type (ModelProto field 2, TrainerSpec field 3) without the protobuf package,
    whose generated sentencepiece module may not match the installed protobuf runtime."""
    kind = 1  # proto default: UNIGRAM
    try:
        for no, wire, spec in _fields(model):
            if no == 2 and wire == 2:
                for sub_no, sub_wire, value in _fields(spec):  # type: ignore[arg-type]
                    if sub_no == 3 and sub_wire == 0:
                        kind = int(value)  # type: ignore[arg-type]
    except (IndexError, ValueError):
        return "unknown"
    return {1: "unigram", 2: "bpe", 3: "word", 4: "char"}.get(kind, "unknown")


class Tokenizer:
    """A loaded SentencePiece model with pflm's fixed special ids."""

    pad_id = PAD_ID
    unk_id = UNK_ID
    bos_id = BOS_ID
    eos_id = EOS_ID

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"tokenizer model not found: {self.path}; re-run `pflm prepare`")
        self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
        got = (self._sp.pad_id(), self._sp.unk_id(), self._sp.bos_id(), self._sp.eos_id())
        if got != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
            raise DataError(f"{self.path}: special ids {got} != (pad 0, unk 1, bos 2, eos 3); re-run `pflm prepare`")
        self.model_type = _model_type(self.path.read_bytes())
        # SentencePiece's word model glues an out-of-vocabulary word to the words after it ("▁zzz▁mom" -> one
        # unk), so word-model encoding is a whitespace split plus a dictionary lookup: one id per word, always.
        self._word_ids: dict[str, int] | None = None
        if self.model_type == "word":
            sp = self._sp
            self._word_ids = {
                sp.id_to_piece(i)[1:]: i for i in range(sp.vocab_size())
                if not (sp.is_control(i) or sp.is_unknown(i)) and sp.id_to_piece(i).startswith("\u2581")
            }

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        return cls(path)

    @property
    def vocab_size(self) -> int:
        return int(self._sp.vocab_size())

    def encode(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        """Token ids per text (no bos/eos). Word model: exactly one id per whitespace-separated word."""
        if self._word_ids is not None:
            get = self._word_ids.get
            return [[get(w, UNK_ID) for w in t.split()] for t in texts]
        return self._sp.encode(list(texts), out_type=int, num_threads=num_threads)

    def encode_one(self, text: str) -> list[int]:
        return self.encode([text])[0]

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    def piece_to_id(self, piece: str) -> int:
        return int(self._sp.piece_to_id(piece))

    def word_to_id(self, word: str) -> int:
        """Id of a whole word (its "▁word" piece), or unk_id when the vocabulary has no such piece."""
        return self.piece_to_id("\u2581" + word)

    def __repr__(self) -> str:
        return f"Tokenizer({self.path.name}, {self.model_type}, vocab={self.vocab_size})"


def _public_sentences(path: str) -> Iterator[str]:
    from pflm.data.load import check_utf8

    if not Path(path).is_file():
        raise DataError(f"tokenizer input file not found: {path}; check --tokenizer-input")
    check_utf8(path)
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                yield line


def max_word_vocab(sentences: Iterable[str]) -> int:
    """Largest `word`-model vocabulary these sentences support: distinct words (<= 512 chars) + 4 specials."""
    words: set[str] = set()
    for s in sentences:
        words.update(s.split())
    return sum(1 for w in words if len(w) <= MAX_PIECE_CHARS) + NUM_SPECIAL


def train_tokenizer(
    sentences: Sequence[str], cfg: TokenizerConfig, out_dir: str | os.PathLike, seed: int = 0,
    normalize: Callable[[str], str] | None = None,
) -> Tokenizer:
    """Train on `sentences` (the train users' normalised text) or on `cfg.tokenizer_input` (normalised with
    `normalize`), writing `out_dir/tokenizer.model` and `tokenizer.vocab`. Raises `DataError` if the data cannot
    support the vocab. Corpora over `cfg.input_sentence_size` sentences are sampled (seeded) before training, in
    place of SentencePiece's own input_sentence_size/shuffle_input_sentence, so the vocab-limit check and the
    trainer see the same text."""
    out_dir = Path(out_dir)
    if cfg.tokenizer_input == PUBLIC_WORDFREQ:
        return _train_from_public_counts(cfg, out_dir, seed, normalize)
    if cfg.tokenizer_input:
        source = f"--tokenizer-input {cfg.tokenizer_input}"
        lines = _public_sentences(cfg.tokenizer_input)
        corpus: list[str] = [t for t in (normalize(s) if normalize else s for s in lines) if t]
    else:
        source = "the train users' text"
        corpus = list(sentences)
    if not corpus:
        raise DataError(f"no text to train the tokenizer on ({source}); give non-empty text")
    if cfg.input_sentence_size and len(corpus) > cfg.input_sentence_size:
        # Sample here (seeded) instead of in SentencePiece, so the limit check below sees the same text.
        corpus = random.Random(seed).sample(corpus, cfg.input_sentence_size)
    if cfg.model_type == "word":
        limit = max_word_vocab(corpus)
        if cfg.vocab_size > limit:
            raise DataError(
                f"vocab size {cfg.vocab_size} is larger than the data supports: {source} has {limit - NUM_SPECIAL} "
                f"distinct words, so the largest word vocab is {limit}; pass --vocab-size {limit} or less, or use more "
                "data (or --tokenizer-input with a bigger public corpus)"
            )
    prefix = out_dir / "tokenizer"
    kwargs = dict(
        sentence_iterator=iter(corpus), model_prefix=str(prefix), model_type=cfg.model_type,
        vocab_size=cfg.vocab_size, pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        num_threads=cfg.num_threads, hard_vocab_limit=True, byte_fallback=cfg.byte_fallback,
        input_sentence_size=0, shuffle_input_sentence=False, max_sentence_length=1 << 20,
        character_coverage=1.0 if cfg.model_type == "word" else 0.9995, minloglevel=2,
        normalization_rule_name="identity", add_dummy_prefix=True, remove_extra_whitespaces=True,
    )
    if cfg.model_type == "word":
        kwargs["max_sentencepiece_length"] = MAX_PIECE_CHARS
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(**kwargs)
    except RuntimeError as e:
        m = _TOO_HIGH.search(str(e))
        if m:
            raise DataError(
                f"vocab size {cfg.vocab_size} is larger than {source} supports for a {cfg.model_type} model "
                f"(max {m.group(2)}); pass --vocab-size {m.group(2)} or less, or use more data"
            ) from None
        raise DataError(f"tokenizer training failed: {str(e).splitlines()[0]}") from None
    return Tokenizer(prefix.with_suffix(".model"))


def _train_from_public_counts(
    cfg: TokenizerConfig, out_dir: Path, seed: int, normalize: Callable[[str], str] | None
) -> Tokenizer:
    """Word vocabulary = the most frequent words of a public word list (no user text involved)."""
    from pflm.data.public_vocab import public_word_counts

    if cfg.model_type != "word":
        raise ConfigError("--tokenizer-input wordfreq builds a word vocabulary; use --model-type word")
    return train_word_model_from_counts(public_word_counts(cfg.vocab_size + 16, normalize), cfg, out_dir, seed)


def train_word_model_from_counts(
    counts: Sequence[tuple[str, int]], cfg: TokenizerConfig, out_dir: str | os.PathLike, seed: int = 0
) -> Tokenizer:
    """A `word` SentencePiece model holding only the `cfg.vocab_size - 4` most frequent of `counts` (word, integer
    count), scored log(count / total): the one builder for public (wordfreq) and DP vocabularies."""
    out_dir = Path(out_dir)
    tsv = out_dir / "vocab_counts.tsv"
    with open(tsv, "w", encoding="utf-8") as f:
        for w, c in counts:
            f.write(f"{w}\t{int(c)}\n")
    prefix = out_dir / "tokenizer"
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            input=str(tsv), input_format="tsv", model_prefix=str(prefix), model_type="word",
            vocab_size=cfg.vocab_size, pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
            num_threads=cfg.num_threads, hard_vocab_limit=True, character_coverage=1.0, minloglevel=2,
            max_sentencepiece_length=MAX_PIECE_CHARS, normalization_rule_name="identity", add_dummy_prefix=True,
            remove_extra_whitespaces=True,
        )
    except RuntimeError as e:
        raise DataError(f"word tokenizer training failed: {str(e).splitlines()[0]}") from None
    finally:
        tsv.unlink()
    return Tokenizer(prefix.with_suffix(".model"))


def prior_from_word_counts(tokenizer: Tokenizer, counts: Mapping[str, float]) -> np.ndarray:
    """Per-id prior (float64 [V], 0 for the specials and for words missing from `counts`) of a word tokenizer."""
    prior = np.zeros(tokenizer.vocab_size, dtype=np.float64)
    for i in range(NUM_SPECIAL, tokenizer.vocab_size):
        prior[i] = counts.get(tokenizer.id_to_piece(i).lstrip("\u2581"), 0)
    return prior


def public_prior_counts(tokenizer: Tokenizer, normalize: Callable[[str], str] | None = None) -> np.ndarray:
    """Per-id public frequency prior (numpy float64 [V]) from the public word list, for PEU/NCE."""
    from pflm.data.public_vocab import public_word_counts

    return prior_from_word_counts(tokenizer, dict(public_word_counts(tokenizer.vocab_size + 16, normalize)))


def file_prior_counts(tokenizer: Tokenizer, path: str, normalize: Callable[[str], str] | None = None,
                      num_threads: int = 1) -> np.ndarray:
    """Per-id token counts (float64 [V]) over the whole public `--tokenizer-input` file: a prior with no user data."""
    counts = np.zeros(tokenizer.vocab_size, dtype=np.float64)
    batch: list[str] = []
    lines = (normalize(s) if normalize else s for s in _public_sentences(path))
    for text in lines:
        if text:
            batch.append(text)
        if len(batch) >= 20_000:
            counts += _bincount(tokenizer.encode(batch, num_threads), tokenizer.vocab_size)
            batch = []
    if batch:
        counts += _bincount(tokenizer.encode(batch, num_threads), tokenizer.vocab_size)
    return counts


def _bincount(ids: list[list[int]], size: int) -> np.ndarray:
    flat = np.fromiter((i for row in ids for i in row), dtype=np.int64)
    return np.bincount(flat, minlength=size).astype(np.float64)
