"""ASR-style transcript normalisation, so training text looks like what a speech recogniser emits.

Rules, applied in this order (each configurable through `NormalizerConfig`):

1. Unicode NFKC (`unicode_nfkc`): compatibility forms are folded ("ﬁ" -> "fi", full-width digits -> ASCII digits).
   Curly apostrophes (U+2018, U+2019, U+02BC, U+2032) always become "'".
2. Lower-casing (`lowercase`).
3. Digits to words (`digits_to_words`, off by default): "1,250" -> "one thousand two hundred fifty",
   "3.5" -> "three point five", "50%" -> "fifty percent", "2nd" -> "second", "007" -> "zero zero seven"
   (a leading zero is read digit by digit). Years are read as cardinals ("1999" -> "one thousand nine hundred
   ninety nine"); integers with more than 18 digits are read digit by digit. When off, digits are kept as-is.
4. Punctuation stripping (`strip_punctuation`): every character that is not a letter, digit, combining mark,
   whitespace or apostrophe becomes a space (so "well-known" -> "well known", emoji and symbols vanish).
   Apostrophes survive only inside a word ("don't", "rock'n'roll"); leading/trailing ones are removed
   ("'hello'" -> "hello", "dogs'" -> "dogs").
5. Whitespace collapsing (`collapse_whitespace`): runs of whitespace become one space, ends are trimmed.

A sentence that is empty after normalisation is dropped by the pipeline (`Normalizer.__call__` returns "").
The settings are stored in the dataset manifest, and `FederatedData.normalizer` rebuilds the same callable,
so evaluation text (e.g. ASR N-best lists) can be normalised exactly like the training data.
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata
from dataclasses import dataclass
from typing import Any

from pflm.errors import ConfigError

_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen"
).split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_SCALES = ((10**15, "quadrillion"), (10**12, "trillion"), (10**9, "billion"), (10**6, "million"), (10**3, "thousand"))
_ORDINAL_WORDS = {
    "one": "first", "two": "second", "three": "third", "five": "fifth", "eight": "eighth", "nine": "ninth",
    "twelve": "twelfth",
}
_APOSTROPHES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u02bc": "'", "\u2032": "'"})

_THOUSANDS_SEP = re.compile(r"(?<=\d),(?=\d{3}\b)")
_ORDINAL = re.compile(r"\b(\d+)(st|nd|rd|th)\b", re.IGNORECASE)
_DECIMAL = re.compile(r"(\d+)\.(\d+)")
_PERCENT = re.compile(r"(\d)\s*%")
_DIGITS = re.compile(r"\d+")
_NOT_WORD = re.compile(r"[^\w\s']|_")
_EDGE_APOSTROPHE = re.compile(r"(?<!\w)'|'(?!\w)")
_SPACES = re.compile(r"\s+")


def _below_thousand(n: int) -> list[str]:
    words: list[str] = []
    if n >= 100:
        words += [_ONES[n // 100], "hundred"]
        n %= 100
    if n >= 20:
        words.append(_TENS[n // 10])
        n %= 10
        if n:
            words.append(_ONES[n])
    elif n or not words:
        words.append(_ONES[n])
    return words


def number_to_words(n: int) -> str:
    """Spell a non-negative integer in English words ("1250" -> "one thousand two hundred fifty")."""
    if n < 0:
        return "minus " + number_to_words(-n)
    if n >= 10**18:
        return " ".join(_ONES[int(d)] for d in str(n))
    if n == 0:
        return "zero"
    words: list[str] = []
    for value, name in _SCALES:
        if n >= value:
            words += _below_thousand(n // value) + [name]
            n %= value
    if n:
        words += _below_thousand(n)
    return " ".join(words)


def ordinal_to_words(n: int) -> str:
    """Spell an ordinal ("2" -> "second", "21" -> "twenty first", "40" -> "fortieth")."""
    words = number_to_words(n).split()
    last = words[-1]
    if last in _ORDINAL_WORDS:
        words[-1] = _ORDINAL_WORDS[last]
    elif last.endswith("y"):
        words[-1] = last[:-1] + "ieth"
    else:
        words[-1] = last + "th"
    return " ".join(words)


def _digit_string_to_words(digits: str) -> str:
    if len(digits) > 1 and digits.startswith("0"):
        return " ".join(_ONES[int(d)] for d in digits)
    return number_to_words(int(digits))


def _spell_numbers(text: str) -> str:
    text = _THOUSANDS_SEP.sub("", text)
    text = _PERCENT.sub(r"\1 percent", text)
    text = _ORDINAL.sub(lambda m: " " + ordinal_to_words(int(m.group(1))) + " ", text)
    text = _DECIMAL.sub(
        lambda m: f" {_digit_string_to_words(m.group(1))} point {' '.join(_ONES[int(d)] for d in m.group(2))} ", text
    )
    return _DIGITS.sub(lambda m: " " + _digit_string_to_words(m.group(0)) + " ", text)


@dataclass(frozen=True)
class NormalizerConfig:
    """Which normalisation steps to apply (see the module docstring for the exact rules)."""

    lowercase: bool = True
    strip_punctuation: bool = True
    collapse_whitespace: bool = True
    digits_to_words: bool = False
    unicode_nfkc: bool = True

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if not isinstance(getattr(self, f.name), bool):
                raise ConfigError(f"normalizer.{f.name} must be true or false, got {getattr(self, f.name)!r}")

    def to_dict(self) -> dict[str, bool]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "NormalizerConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown normalizer setting(s) {unknown}; known: {sorted(known)}")
        return cls(**d)


class Normalizer:
    """Callable `str -> str` applying a `NormalizerConfig`; returns "" when nothing speakable is left."""

    def __init__(self, config: NormalizerConfig | None = None) -> None:
        self.config = config or NormalizerConfig()

    def __call__(self, text: str) -> str:
        c = self.config
        if c.unicode_nfkc:
            text = unicodedata.normalize("NFKC", text)
        text = text.translate(_APOSTROPHES)
        if c.lowercase:
            text = text.lower()
        if c.digits_to_words:
            text = _spell_numbers(text)
        if c.strip_punctuation:
            text = _NOT_WORD.sub(" ", text)
            text = _EDGE_APOSTROPHE.sub(" ", text)
        if c.collapse_whitespace:
            text = _SPACES.sub(" ", text).strip()
        return text

    def __repr__(self) -> str:
        return f"Normalizer({self.config})"
