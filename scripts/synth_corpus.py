"""A public synthetic corpus of N users (wordfreq words, Zipfian) sorted by user, for `pflm prepare --stream` at scale.

Nothing private: words are drawn from the public `wordfreq` English list with probability proportional to their
published frequency (a Zipfian unigram), sentence lengths are 3 + Poisson(5) words, and sentences per user are
Zipf(a) capped at --max-sentences (heavy-tailed, like real users). Users are `u0000000`, `u0000001`, ... so file
order is the sorted order `--stream` needs. Generated in chunks of users: memory does not grow with --users.

    python scripts/synth_corpus.py --users 1000000 --out /tmp/synth1m.parquet
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

CHUNK_USERS = 20_000


def public_words(n: int) -> tuple[list[str], np.ndarray]:
    """The n most frequent English words of wordfreq and their normalised frequencies (public data)."""
    import wordfreq

    words = [w for w in wordfreq.top_n_list("en", n * 2, wordlist="large") if w.isalpha()][:n]
    freq = np.array([wordfreq.word_frequency(w, "en", wordlist="large") for w in words], dtype=np.float64)
    return words, freq / freq.sum()


def user_chunks(users: int, seed: int, zipf_a: float, max_sentences: int, vocab: int):
    """Yield (user ids, texts) per chunk of users, rows grouped by user in sorted order."""
    words, p = public_words(vocab)
    lexicon = np.array(words, dtype=object)
    cdf = np.cumsum(p)
    width = max(7, len(str(users - 1)))
    for start in range(0, users, CHUNK_USERS):
        rng = np.random.default_rng([seed, start])  # each chunk independent: any chunk can be regenerated alone
        n = min(CHUNK_USERS, users - start)
        per_user = np.minimum(rng.zipf(zipf_a, n), max_sentences)
        lengths = 3 + rng.poisson(5, int(per_user.sum()))
        ids = np.minimum(np.searchsorted(cdf, rng.random(int(lengths.sum())) * cdf[-1]), len(words) - 1)
        flat = lexicon[ids]
        ends = np.cumsum(lengths)
        texts = [" ".join(flat[e - k:e]) for e, k in zip(ends.tolist(), lengths.tolist())]
        names = np.repeat(np.array([f"u{start + i:0{width}d}" for i in range(n)], dtype=object), per_user)
        yield names.tolist(), texts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, required=True)
    ap.add_argument("--out", required=True, help=".parquet (fast) or .jsonl")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--zipf-a", type=float, default=2.0, help="sentences per user ~ Zipf(a) (mean ~3.6 at a=2)")
    ap.add_argument("--max-sentences", type=int, default=200)
    ap.add_argument("--vocab", type=int, default=30_000, help="public words to draw from")
    args = ap.parse_args(argv)
    if args.users < 1 or args.zipf_a <= 1 or args.max_sentences < 1:
        print("error: need --users >= 1, --zipf-a > 1, --max-sentences >= 1", file=sys.stderr)
        return 2
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    t0, rows = time.perf_counter(), 0
    schema = pa.schema([("user", pa.string()), ("text", pa.string())])
    chunks = user_chunks(args.users, args.seed, args.zipf_a, args.max_sentences, args.vocab)
    if out.suffix == ".parquet":
        with pq.ParquetWriter(str(tmp), schema) as w:
            for users, texts in chunks:
                w.write_table(pa.table([users, texts], schema=schema))
                rows += len(texts)
    else:
        with open(tmp, "w", encoding="utf-8") as f:
            for users, texts in chunks:
                f.writelines(json.dumps({"user": u, "text": t}) + "\n" for u, t in zip(users, texts))
                rows += len(texts)
    tmp.replace(out)
    print(json.dumps({"out": str(out), "users": args.users, "rows": rows,
                      "seconds": round(time.perf_counter() - t0, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
