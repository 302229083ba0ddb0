"""Entry point: print the public wordfreq English word list as TSV (word, pseudo-count), most frequent first.

    python -m data_prep.wordfreq_vocab --size 10000 > public_words.tsv

The loader itself is `pflm.data.public_vocab.public_word_counts` (what `pflm prepare --tokenizer-input wordfreq`
uses); it is re-exported here for older callers.
"""

from __future__ import annotations

import argparse
import sys

from pflm.data.public_vocab import public_word_counts

__all__ = ["main", "public_word_counts"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=10_000)
    args = p.parse_args(argv)
    for word, count in public_word_counts(args.size):
        sys.stdout.write(f"{word}\t{count}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
