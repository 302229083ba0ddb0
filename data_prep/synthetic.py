"""Entry point: write the seeded synthetic voice-assistant corpus as JSONL rows {"user", "text"}.

    python -m data_prep.synthetic --num-users 100 --seed 0 --out synthetic.jsonl

The generator itself is `pflm.data.corpora.synthetic` (what `pflm prepare --corpus synthetic` uses); the names
below are re-exported for older callers.
"""

from __future__ import annotations

import argparse
import json
import sys

from pflm.data.corpora.synthetic import generate, iter_rows, user_rows

__all__ = ["generate", "iter_rows", "main", "user_rows"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-users", type=int, default=100)
    p.add_argument("--min-sentences", type=int, default=5)
    p.add_argument("--max-sentences", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="JSONL file to write")
    args = p.parse_args(argv)
    with open(args.out, "w", encoding="utf-8") as f:
        for user, text in iter_rows(args.num_users, (args.min_sentences, args.max_sentences), args.seed):
            f.write(json.dumps({"user": user, "text": text}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
