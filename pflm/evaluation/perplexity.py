"""Perplexity of a global model on held-out users, always with the exact full softmax.

Reported per token and per word (NLL summed over all tokens incl. </s>, divided by words + sentences), so
models with different tokenizers compare. Sentences longer than `max_tokens` are skipped (counted).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pflm.data.store import FederatedData
from pflm.device.batching import pack_sentences
from pflm.model.prior import prior_log_probs


@dataclass
class EvalSet:
    """Held-out sentences packed once for repeated evaluation."""

    seqs: torch.Tensor  # [n, L] <s> … </s> padded, sorted by length
    lengths: torch.Tensor
    num_words: int  # words + sentences (the </s> of each sentence counts as a word)
    num_tokens: int  # predicted tokens (incl. </s>)
    num_sentences: int
    skipped: int


def build_eval_set(sentences: list[list[int]], texts: list[str], max_tokens: int) -> EvalSet:
    keep = [i for i, s in enumerate(sentences) if len(s) <= max_tokens]
    sents = [sentences[i] for i in keep]
    words = sum(len(texts[i].split()) for i in keep) + len(keep)
    if not sents:
        return EvalSet(torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, dtype=torch.long), 0, 0, 0, len(sentences))
    seqs, lengths = pack_sentences(sents, max_tokens)
    order = torch.argsort(lengths, stable=True)
    return EvalSet(seqs[order], lengths[order], words, int((lengths - 1).sum()), len(sents), len(sentences) - len(keep))


@torch.no_grad()
def sequence_nll(model: torch.nn.Module, seqs: torch.Tensor, lengths: torch.Tensor, vocab_chunk: int = 0) -> torch.Tensor:
    """Summed NLL (nats) of each sequence's next-token predictions, exact softmax over the whole vocabulary."""
    width = int(lengths.max())
    seqs = seqs[:, :width]
    inputs, targets = seqs[:, :-1], seqs[:, 1:]
    mask = torch.arange(width - 1).unsqueeze(0) < (lengths - 1).unsqueeze(1)
    feats = model.features(inputs)
    w, b = model.output_weight(), model.output_bias()
    nll = torch.zeros(targets.shape, dtype=torch.float32)
    # logits only at the valid positions, in slices of at most ~8 MB (reused malloc blocks, cache-friendly)
    h, t = feats[mask], targets[mask]
    step = max(1, (2 << 20) // max(w.shape[0], 1))
    out = torch.empty(h.shape[0], dtype=torch.float32)
    for i in range(0, h.shape[0], step):
        logits = F.linear(h[i : i + step], w, b).float()
        out[i : i + step] = F.cross_entropy(logits, t[i : i + step], reduction="none")
    nll[mask] = out
    return nll.sum(1)


@torch.no_grad()
def evaluate(model: torch.nn.Module, es: EvalSet, max_batch_tokens: int = 8192) -> dict[str, float]:
    was_training = model.training
    model.eval()
    total = 0.0
    n = es.seqs.shape[0]
    i = 0
    while i < n:
        width = int(es.lengths[min(n - 1, i)])
        bs = max(1, max_batch_tokens // max(width, 1))
        j = min(n, i + bs)
        total += float(sequence_nll(model, es.seqs[i:j], es.lengths[i:j]).sum())
        i = j
    model.train(was_training)
    if es.num_tokens == 0:
        return {"nll": float("nan"), "perplexity": float("nan"), "word_perplexity": float("nan"), "tokens": 0}
    return {
        "nll": total,
        "perplexity": math.exp(total / es.num_tokens),
        "word_perplexity": math.exp(total / es.num_words),
        "tokens": es.num_tokens,
        "words": es.num_words,
        "sentences": es.num_sentences,
        "skipped_sentences": es.skipped,
    }


def unigram_baseline(prior_counts: np.ndarray, es: EvalSet) -> dict[str, float]:
    """Perplexity of the unigram LM of a public or DP prior (`pflm.model.prior`, the output-bias init)."""
    logp = prior_log_probs(prior_counts)
    width = es.seqs.shape[1] if es.seqs.numel() else 1
    mask = (torch.arange(width - 1).unsqueeze(0) < (es.lengths - 1).unsqueeze(1)).numpy()
    targets = es.seqs[:, 1:].numpy()
    total = float(-(logp[targets] * mask).sum())
    return {
        "perplexity": math.exp(total / max(es.num_tokens, 1)),
        "word_perplexity": math.exp(total / max(es.num_words, 1)),
    }


EVAL_MAX_TOKENS = 120


def load_eval_set(fd: FederatedData, split: str, max_users: int, max_tokens: int = EVAL_MAX_TOKENS) -> EvalSet:
    n = fd.num_users(split)
    users = range(n if max_users == 0 else min(n, max_users))
    sents, texts = [], []
    for u in users:
        sents.extend(fd.user_tokens(split, u))
        texts.extend(fd.user_texts(split, u))
    return build_eval_set(sents, texts, max_tokens)
