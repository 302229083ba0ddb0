"""Entry point: real ASR N-best lists of chitchat sentences and their first-pass / oracle WER and speed.

    python -m data_prep.nbest --num 200

The generator (flite synthesis, pocketsphinx decoding, per-sentence cache, JSONL) is `pflm.evaluation.asr_nbest`,
also behind `pflm nbest`; its public names are re-exported here for older callers.
"""

from __future__ import annotations

import argparse
import random
import sys

from pflm.data.corpora.chitchat import iter_rows
from pflm.evaluation.asr_nbest import (
    DEFAULT_CACHE_DIR, VOICES, GenerationConfig, GenerationStats, default_normalize, generate_nbest,
    generate_nbest_with_stats, resolve_normalize,
)

__all__ = ["DEFAULT_CACHE_DIR", "GenerationConfig", "GenerationStats", "chitchat_sentences", "default_normalize",
           "generate_nbest", "generate_nbest_with_stats", "main", "resolve_normalize"]


def chitchat_sentences(
    num: int = 200, seed: int = 0, min_words: int = 3, max_words: int = 15, exclude: set[str] | None = None
) -> list[tuple[str, str]]:
    """One message of `min_words`..`max_words` words from each of `num` senders drawn with a seeded shuffle."""
    by_sender: dict[str, list[str]] = {}
    for sender, text in iter_rows():
        n = len(default_normalize(text).split())
        if min_words <= n <= max_words:
            by_sender.setdefault(sender, []).append(text)
    senders = sorted(s for s in by_sender if not exclude or s not in exclude)
    rng = random.Random(seed)
    rng.shuffle(senders)
    out = []
    for sender in senders[:num]:
        out.append((f"chitchat-{sender}", rng.choice(sorted(by_sender[sender]))))
    return out


def main(argv: list[str] | None = None) -> int:
    """Measure first-pass and oracle WER and speed on chitchat sentences: `python -m data_prep.nbest --num 200`."""
    from pflm.evaluation.nbest import read_nbest
    from pflm.evaluation.wer import corpus_wer

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--num", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--voice", default="slt", choices=VOICES)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE_DIR))
    p.add_argument("--out", default="chitchat_nbest.jsonl")
    args = p.parse_args(argv)
    sents = chitchat_sentences(args.num, args.seed)
    path, st = generate_nbest_with_stats(sents, args.out, args.voice, 50, args.cache_dir, None, args.workers)
    utts = read_nbest(path)
    refs = [u.ref for u in utts]
    first = corpus_wer(refs, [max(u.nbest, key=lambda h: h.score).text for u in utts])
    from pflm.evaluation.wer import utterance_errors

    oracle_err = sum(min(utterance_errors(u.ref, h.text)[0] for h in u.nbest) for u in utts)
    words = sum(len(r.split()) for r in refs)
    per = st.worker_seconds / max(st.decoded, 1)
    print(f"utterances: {len(utts)} (decoded {st.decoded}, cached {st.cached}), ref words: {words}")
    print(f"mean hypotheses per utterance: {sum(len(u.nbest) for u in utts) / len(utts):.1f}")
    print(f"audio: {st.audio_seconds:.1f} s; worker time per decoded utterance: {per:.3f} s "
          f"(real-time factor {st.worker_seconds / max(st.audio_seconds, 1e-9):.3f}); wall {st.wall_seconds:.1f} s")
    print(f"first_pass_wer: {first:.4f}")
    print(f"oracle_wer: {oracle_err / words:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
