"""Kneser–Ney baseline (hand-computed values, normalisation, ARPA round trip) and the public OOV prior."""

import itertools
import math

import pytest

from pflm.evaluation.kneser_ney import KneserNeyLM
from pflm.evaluation.ngram_baseline import NgramScorer
from pflm.evaluation.oov_prior import PublicOOVPrior

CORPUS = ["a b c", "a b d", "b c a", "c a b c d", "d d a", "a c b", "a b c d e", "b b", "e"]


def test_bigram_probabilities_by_hand():
    # <s> a b </s> | <s> a c </s> | <s> b </s>. Continuation counts: a 1, b 2, c 1, </s> 2 -> unigram n1 = n2 = 2,
    # Y = 1/3, D1 = 1/3, D2 = 2; gamma() = (2/3 + 4) / 6 = 7/9; uniform 1/5 (<unk>, </s>, a, b, c).
    lm = KneserNeyLM.train(["a b", "a c", "b"], order=2)
    i = lm.index
    assert math.exp(lm.logprob_ids((), i["a"])) == pytest.approx((1 - 1 / 3) / 6 + 7 / 9 / 5)  # 4/15
    assert math.exp(lm.logprob_ids((), i["b"])) == pytest.approx(7 / 45)
    assert math.exp(lm.logprob_ids((), i["<unk>"])) == pytest.approx(7 / 45)
    # bigram counts 2,1,2,1,1,1: n1 = 4, n2 = 2 -> Y = 1/2, D1 = 1/2; context "a": S = 2, gamma = 1/2
    assert math.exp(lm.logprob_ids((i["a"],), i["b"])) == pytest.approx(1 / 4 + 7 / 90)
    assert math.exp(lm.logprob_ids((i["a"],), i["a"])) == pytest.approx(0.5 * 4 / 15)
    lp, oov = lm.sentence_logprob("a zz")
    assert oov == ["zz"]
    assert lp == pytest.approx(lm.logprob_ids((i["<s>"],), i["a"]) + lm.logprob_ids((i["a"],), i["<unk>"])
                               + lm.logprob_ids((i["<unk>"],), i["</s>"]))


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_every_context_is_a_distribution(order):
    lm = KneserNeyLM.train(CORPUS, order=order)
    words = [i for i, w in enumerate(lm.vocab) if w != "<s>"]
    ids = list(range(len(lm.vocab)))
    for ctx in itertools.chain([()], itertools.product(ids, repeat=min(order - 1, 2))):
        assert sum(math.exp(lm.logprob_ids(ctx, w)) for w in words) == pytest.approx(1.0, abs=1e-9)


def _arpa_query(text: str, order: int):
    """An independent reader of the written ARPA file with the standard backoff rule (log10)."""
    probs, bows, k = {}, {}, 0
    for line in text.splitlines():
        if line.startswith("\\") and line.endswith("-grams:"):
            k = int(line[1:].split("-")[0])
        elif k and line.strip() and not line.startswith("\\"):
            parts = line.split("\t")
            g = tuple(parts[1].split())
            probs[g] = float(parts[0])
            if len(parts) > 2:
                bows[g] = float(parts[2])

    def logp(ctx, w):
        ctx = tuple(ctx)[-(order - 1):] if order > 1 else ()
        if ctx + (w,) in probs:
            return probs[ctx + (w,)]
        return bows.get(ctx, 0.0) + logp(ctx[1:], w) if ctx else probs[(w,)]

    return logp


def test_arpa_round_trip_and_kenlm(tmp_path):
    lm = KneserNeyLM.train(CORPUS, order=3)
    path = lm.write_arpa(tmp_path / "lm.arpa")
    query = _arpa_query(path.read_text(), 3)
    for sent in ["a b c d", "e e a", "c b zz a"]:
        words = ["<s>"] + [w if w in lm.index else "<unk>" for w in sent.split()] + ["</s>"]
        arpa = sum(query(words[max(0, j - 2):j], words[j]) for j in range(1, len(words)))
        assert arpa * math.log(10) == pytest.approx(lm.sentence_logprob(sent)[0], abs=1e-5)
        try:
            import kenlm
        except ImportError:
            continue
        assert kenlm.Model(str(path)).score(sent, bos=True, eos=True) == pytest.approx(arpa, abs=1e-4)


def test_public_oov_prior_is_normalised_and_ranks_by_public_frequency():
    freq = {"the": 0.05, "cat": 0.01, "combat": 0.002, "zyzzyva": 1e-8, "ab": 0.001}
    prior = PublicOOVPrior({"the", "cat"}, frequencies=freq, char_weight=0.1)
    listed = sum(math.exp(prior.logprob(w)) for w in ("combat", "zyzzyva", "ab"))
    assert listed >= 0.9 - 1e-12  # (1 - lambda) of the mass is spread over the listed OOV words
    # the whole distribution over strings never exceeds one: listed words + every unlisted string up to length 4
    chars = sorted(set("".join(freq)))
    unlisted = sum(prior.char_weight * math.exp(prior.char_logprob("".join(s)))
                   for n in range(1, 5) for s in itertools.product(chars, repeat=n) if "".join(s) not in freq)
    assert 0 < listed + unlisted <= 1.0
    # a rare wrong word is now much less likely than a common one; both are below <unk>'s whole mass (log 1 = 0)
    assert prior.logprob("zyzzyva") < prior.logprob("combat") - 8 < 0
    assert math.isfinite(prior.logprob("qqqq-not-listed"))


def test_ngram_scorer_spreads_unk_mass():
    lm = KneserNeyLM.train(CORPUS, order=2)
    prior = PublicOOVPrior(lm.vocab, frequencies={"common": 0.01, "rareword": 1e-8})
    scorer = NgramScorer(lm, str.lower, prior)
    plain = NgramScorer(lm, str.lower, None)
    common, rare = scorer.score(["a common", "a rareword"])
    assert rare < common  # with <unk> alone both would score the same
    assert plain.score(["a common"])[0] == plain.score(["a rareword"])[0] > common
