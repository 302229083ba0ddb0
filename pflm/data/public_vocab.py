"""A public English word list with frequencies (PyPI `wordfreq`), used as a user-independent vocabulary and prior.

With `pflm prepare --tokenizer-input wordfreq`, the word vocabulary and the PEU/NCE frequency prior come from
wordfreq's published frequencies (Wikipedia, subtitles, news, books, web text, …), not from any user's
transcripts, so `peu.mode=topk` row choice needs no assumption about the users' data at all.
"""

from __future__ import annotations

from typing import Callable

from pflm.errors import DataError
from pflm.tokens import NUM_SPECIAL


def public_word_counts(size: int, normalize: Callable[[str], str] | None = None) -> list[tuple[str, int]]:
    """The `size` most frequent English words (after `normalize`), with integer pseudo-counts ∝ frequency."""
    try:
        import wordfreq
    except ImportError:  # pragma: no cover - installed by pyproject
        raise DataError("--tokenizer-input wordfreq needs the `wordfreq` package; pip install wordfreq") from None
    seen: dict[str, int] = {}
    for w in wordfreq.top_n_list("en", max(size * 2, 1000), wordlist="large"):
        n = normalize(w) if normalize else w
        if not n or " " in n or n in seen:
            continue
        seen[n] = max(1, int(round(wordfreq.word_frequency(w, "en", wordlist="large") * 1e9)))
        if len(seen) >= size:
            break
    if len(seen) < size:
        raise DataError(f"wordfreq supplies only {len(seen)} distinct words; pass --vocab-size {len(seen) + NUM_SPECIAL} or less")
    return list(seen.items())
