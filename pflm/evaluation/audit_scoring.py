"""What a trained LM reveals about canary phrases: log-likelihoods, Secret Sharer exposure and the ASR rescoring view.

The model scores every phrase as `<s> words </s>` with the exact softmax (`perplexity.sequence_nll`). Exposure
ranks a canary among its whole space (enumerated when it has at most `EXACT_LIMIT` phrases, else extrapolated
from a uniform sample, `audit_stats`). The ASR view asks whether N-best rescoring with the LM would put the canary
transcript first among alternatives that differ only in the secret (the other slot values of the same template:
acoustically we assume them equally likely, so the LM decides; synthesised hypotheses, not a recogniser's).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pflm.data.tokenizer import Tokenizer
from pflm.device.batching import pack_sentences
from pflm.evaluation.audit_space import PhraseSpace
from pflm.evaluation.audit_stats import exact_exposure, extrapolated_exposure
from pflm.evaluation.perplexity import sequence_nll
from pflm.secure_random import SecureRandom

EXACT_LIMIT = 100_000  # spaces up to this size are enumerated (exact rank)
BATCH = 2048


@torch.no_grad()
def log_likelihoods(model: torch.nn.Module, tokenizer: Tokenizer, texts: list[str]) -> np.ndarray:
    """Natural-log probability of each phrase (word model: one id per word) under `model`."""
    was = model.training
    model.eval()
    ids = [[tokenizer.word_to_id(w) for w in t.split()] for t in texts]
    out = np.empty(len(ids), dtype=np.float64)
    for s in range(0, len(ids), BATCH):
        seqs, lengths = pack_sentences(ids[s : s + BATCH], 64)
        out[s : s + BATCH] = -sequence_nll(model, seqs, lengths).double().numpy()
    model.train(was)
    return out


@dataclass
class CanaryScores:
    log_likelihood: list[float]
    exposure: list[float]
    promoted: list[bool]  # canary scored above all its alternatives
    method: str  # "exact rank over N phrases" or "skew-normal fit to N sampled phrases"


def score_canaries(
    model: torch.nn.Module, tokenizer: Tokenizer, space: PhraseSpace, canaries: list[int], rng: SecureRandom,
    samples: int = 4000, alternatives: int = 20,
) -> CanaryScores:
    """Exposure and rescoring outcome of each canary (phrase index) under the trained model."""
    texts = [space.phrase(i) for i in canaries]
    ll = log_likelihoods(model, tokenizer, texts)
    if space.size <= EXACT_LIMIT:
        everything = log_likelihoods(model, tokenizer, [space.phrase(i) for i in range(space.size)])
        exp = [exact_exposure(s, everything) for s in ll]
        method = f"exact rank over all {space.size} phrases"
    else:
        sample = log_likelihoods(model, tokenizer, [space.phrase(int(i)) for i in space.sample(rng, 1, samples, "audit-exposure")])
        exp = [min(space.log2_size, max(0.0, extrapolated_exposure(s, sample))) for s in ll]
        method = f"skew-normal fit to {samples} uniformly sampled phrases (Carlini et al. 2019, §4.3), capped at log2|space|"
    promoted = []
    for k, (i, s) in enumerate(zip(canaries, ll)):
        alt = [int(a) for a in space.sample(rng, 2 + k, 4 * alternatives, "audit-alternatives") if int(a) != i]
        alt = list(dict.fromkeys(alt))[:alternatives]
        promoted.append(bool(s > log_likelihoods(model, tokenizer, [space.phrase(a) for a in alt]).max()))
    return CanaryScores([float(x) for x in ll], [float(e) for e in exp], promoted, method)
