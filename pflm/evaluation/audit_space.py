"""Canary phrase spaces for the memorisation audit: ASR-style secrets ("my code is four seven two nine") drawn by CSPRNG.

A space is a template of fixed words and slots; every slot takes one word of a public list (digits spelled as
words; given names from the US Social Security Administration's list of most popular names, a public-domain
list), so a phrase is a mixed-radix number and the space can be enumerated (exact exposure rank) or sampled
uniformly (extrapolated exposure). Canaries and their inserted/held-out split come from a `SecureRandom` keyed
by the audit's secret key: an attacker who knows the space still has to guess them.

Every word must be a whole word of the run's vocabulary (a word model, e.g. `pflm prepare --tokenizer-input
wordfreq`): a canary spelled with <unk> tokens would measure nothing; `check_vocabulary` refuses it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pflm.data.tokenizer import Tokenizer
from pflm.errors import ConfigError
from pflm.secure_random import SecureRandom

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Most popular US given names (SSA, births 1923–2022), skipping ones rare in web text (e.g. "patricia").
NAMES = ("james", "john", "robert", "michael", "william", "david", "richard", "joseph", "thomas", "charles",
         "mary", "jennifer", "linda", "elizabeth", "barbara", "susan", "jessica", "sarah", "karen", "nancy")
SLOTS = {"<digit>": DIGITS, "<name>": NAMES}


@dataclass(frozen=True)
class PhraseSpace:
    """Phrases `template` with each slot filled from `SLOTS`; phrase i is i written in the slots' mixed radix."""

    name: str
    template: tuple[str, ...]

    @property
    def radices(self) -> list[int]:
        return [len(SLOTS[w]) for w in self.template if w in SLOTS]

    @property
    def size(self) -> int:
        return math.prod(self.radices)

    @property
    def log2_size(self) -> float:
        """The largest exposure any canary of this space can have."""
        return math.log2(self.size)

    @property
    def words(self) -> list[str]:
        out: list[str] = []
        for w in self.template:
            out.extend(SLOTS.get(w, (w,)))
        return sorted(set(out))

    def digits(self, index: int) -> list[int]:
        if not 0 <= index < self.size:
            raise IndexError(f"phrase {index} outside a space of {self.size}")
        out = []
        for r in reversed(self.radices):
            index, d = divmod(index, r)
            out.append(d)
        return out[::-1]

    def phrase(self, index: int) -> str:
        it = iter(self.digits(index))
        return " ".join(SLOTS[w][next(it)] if w in SLOTS else w for w in self.template)

    def sample(self, rng: SecureRandom, stream: int, n: int, purpose: str) -> np.ndarray:
        """`n` uniform phrase indices (with replacement) from the keyed stream; 53-bit uniforms, so the bias of
        flooring is below |space|/2^53."""
        u = rng.uniform(stream, n, purpose).numpy()
        return np.minimum((u * self.size).astype(np.int64), self.size - 1)

    def distinct(self, rng: SecureRandom, stream: int, n: int, purpose: str) -> list[int]:
        """`n` distinct uniform phrase indices (rejection of repeats)."""
        if n > self.size:
            raise ConfigError(f"{n} canaries do not fit in the {self.size}-phrase space {self.name!r}; use fewer")
        seen: dict[int, None] = {}
        draw = 0
        while len(seen) < n:
            for i in self.sample(rng, stream * 1024 + draw, 2 * n, purpose).tolist():
                if len(seen) < n:
                    seen.setdefault(int(i))
            draw += 1
        return list(seen)


SPACES = {
    "pin": PhraseSpace("pin", ("my", "code", "is", "<digit>", "<digit>", "<digit>", "<digit>")),
    "phone": PhraseSpace("phone", ("call", "<name>", "at", *("<digit>",) * 7)),
}


def get_space(name: str) -> PhraseSpace:
    if name not in SPACES:
        raise ConfigError(f"unknown canary space {name!r}; use one of {', '.join(SPACES)}")
    return SPACES[name]


def check_vocabulary(space: PhraseSpace, tokenizer: Tokenizer) -> None:
    """Refuse a vocabulary that lacks a word of the space (the canary would be partly <unk>)."""
    missing = [w for w in space.words if tokenizer.word_to_id(w) == tokenizer.unk_id]
    if missing:
        raise ConfigError(
            f"the vocabulary lacks {len(missing)} word(s) of the canary space {space.name!r} ({', '.join(missing[:8])}); "
            "prepare the data with a public word vocabulary that has them, e.g. `pflm prepare --tokenizer-input "
            "wordfreq --vocab-size 10000`"
        )
