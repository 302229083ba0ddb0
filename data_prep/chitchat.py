"""Entry point: write the embedded chitchat-dataset messages as JSONL rows {"user", "text"} (one user per sender).

    python -m data_prep.chitchat --max-users 500 --out chitchat.jsonl

The loader itself is `pflm.data.corpora.chitchat` (what `pflm prepare --corpus chitchat` uses); the names below
are re-exported for older callers.
"""

from __future__ import annotations

import argparse
import json
import sys

from pflm.data.corpora.chitchat import DEFAULTS, iter_rows, load

__all__ = ["DEFAULTS", "iter_rows", "load", "main"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-users", type=int, default=None)
    p.add_argument("--out", required=True, help="JSONL file to write")
    args = p.parse_args(argv)
    with open(args.out, "w", encoding="utf-8") as f:
        for user, text in iter_rows(args.max_users):
            f.write(json.dumps({"user": user, "text": text}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
