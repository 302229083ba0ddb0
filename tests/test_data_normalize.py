"""ASR-style normalisation rules and number spelling."""

from __future__ import annotations

import pytest

from pflm.data.normalize import Normalizer, NormalizerConfig, number_to_words, ordinal_to_words
from pflm.errors import ConfigError


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Hello, World!!", "hello world"),
        ("  multiple \t spaces\n here ", "multiple spaces here"),
        ("Don't stop", "don't stop"),
        ("It\u2019s fine", "it's fine"),  # curly apostrophe folded
        ("'quoted' words' end", "quoted words end"),  # edge apostrophes removed
        ("rock'n'roll", "rock'n'roll"),  # in-word apostrophes kept
        ("well-known e-mail", "well known e mail"),
        ("smile \U0001F600 please", "smile please"),
        ("\uFB01ne", "fine"),  # NFKC ligature
        ("Ｆｕｌｌ ｗｉｄｔｈ", "full width"),
        ("C\u0327a va", "\u00e7a va"),  # NFKC composes the cedilla
        ("snake_case", "snake case"),
        ("...?!", ""),
        ("call 911", "call 911"),  # digits kept when digits_to_words is off
    ],
)
def test_default_rules(raw: str, expected: str) -> None:
    assert Normalizer()(raw) == expected


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("set an alarm for 7:30", "set an alarm for seven thirty"),
        ("I owe you $1,250", "i owe you one thousand two hundred fifty"),
        ("pi is 3.14", "pi is three point one four"),
        ("50% off", "fifty percent off"),
        ("the 2nd and 21st and 40th", "the second and twenty first and fortieth"),
        ("agent 007", "agent zero zero seven"),
        ("0", "zero"),
    ],
)
def test_digits_to_words(raw: str, expected: str) -> None:
    assert Normalizer(NormalizerConfig(digits_to_words=True))(raw) == expected


def test_number_to_words() -> None:
    assert number_to_words(0) == "zero"
    assert number_to_words(15) == "fifteen"
    assert number_to_words(100) == "one hundred"
    assert number_to_words(110) == "one hundred ten"
    assert number_to_words(1_000_001) == "one million one"
    assert number_to_words(2_345_678) == "two million three hundred forty five thousand six hundred seventy eight"
    assert number_to_words(-3) == "minus three"
    assert number_to_words(10**18) == "one " + "zero " * 17 + "zero"
    assert ordinal_to_words(1) == "first" and ordinal_to_words(12) == "twelfth" and ordinal_to_words(30) == "thirtieth"


def test_switches() -> None:
    keep = Normalizer(NormalizerConfig(lowercase=False, strip_punctuation=False))
    assert keep("Hello,  World!") == "Hello, World!"
    assert Normalizer(NormalizerConfig(collapse_whitespace=False))("a  b") == "a  b"
    assert Normalizer(NormalizerConfig(unicode_nfkc=False))("\uFB01") == "\uFB01"


def test_config_round_trip_and_validation() -> None:
    cfg = NormalizerConfig(digits_to_words=True)
    assert NormalizerConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError):
        NormalizerConfig(lowercase="yes")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="unknown normalizer"):
        NormalizerConfig.from_dict({"stem": True})
