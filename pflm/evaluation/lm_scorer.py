"""Sentence log-probabilities from a trained `pflm train` run, for N-best rescoring.

Text is normalised with the exact settings of the run's training data, tokenised with the run's own copy of
the tokenizer, and scored with `<s> … </s>` and the full softmax. Words outside a word-level vocabulary become
<unk>; with `oov_scoring="public"` (the default) each is scored as log p(<unk> | h) + log p_public(w | w not in V)
(`pflm.evaluation.oov_prior`: public wordfreq unigram + character model), with `"unk"` as <unk> alone (the whole
OOV mass: rare wrong words look likely). `oov_penalty` (nats; default 0) is subtracted per OOV word on top.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pflm.data.normalize import Normalizer, NormalizerConfig
from pflm.data.tokenizer import Tokenizer
from pflm.device.batching import UNK_ID as UNK, pack_sentences
from pflm.evaluation.perplexity import sequence_nll
from pflm.errors import ConfigError
from pflm.evaluation.oov_prior import PublicOOVPrior
from pflm.evaluation.run_model import load_run_model

OOV_SCORING = ("public", "unk")

MAX_TOKENS = 200


class RunScorer:
    def __init__(self, run_dir: str | Path, batch_size: int = 64, oov_penalty: float = 0.0,
                 oov_scoring: str = "public", oov_prior: PublicOOVPrior | None = None) -> None:
        if oov_scoring not in OOV_SCORING:
            raise ConfigError(f"oov_scoring '{oov_scoring}' is not one of {', '.join(OOV_SCORING)}")
        self.model, self.cfg, tok_path, manifest = load_run_model(run_dir)
        self.tokenizer = Tokenizer.load(tok_path)
        self.vocab = word_vocabulary(self.tokenizer)
        self.oov_prior = None
        if oov_scoring == "public" and self.vocab is not None:
            self.oov_prior = oov_prior if oov_prior is not None else PublicOOVPrior(self.vocab)
        self._normalize = Normalizer(NormalizerConfig.from_dict(manifest.get("normalization", {})))
        self.batch_size = batch_size
        self.oov_penalty = oov_penalty
        self.max_tokens = min(MAX_TOKENS, self.cfg.model.max_len - 1) if self.cfg.model.arch == "transformer" else MAX_TOKENS

    def normalize(self, text: str) -> str:
        return self._normalize(text)

    @torch.no_grad()
    def score(self, texts: list[str]) -> list[float]:
        """Natural-log probability of each (already normalised) sentence, including </s>."""
        ids = self.tokenizer.encode(texts) if texts else []
        out: list[float] = [0.0] * len(texts)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        for s in range(0, len(order), self.batch_size):
            idx = order[s : s + self.batch_size]
            seqs, lengths = pack_sentences([ids[i] for i in idx], self.max_tokens)
            nll = sequence_nll(self.model, seqs, lengths)
            for j, i in enumerate(idx):
                oov = [w for w, t in zip(texts[i].split(), ids[i]) if t == UNK] if self.vocab is not None else []
                spread = sum(self.oov_prior.logprob(w) for w in oov) if self.oov_prior is not None else 0.0
                out[i] = -float(nll[j]) + spread - self.oov_penalty * len(oov)
        return out


def word_vocabulary(tokenizer: Tokenizer) -> frozenset[str] | None:
    """The words of a word-level tokenizer (None for subword models, which have no OOV words)."""
    if tokenizer.model_type != "word":
        return None
    pieces = (tokenizer.id_to_piece(i) for i in range(tokenizer.vocab_size))
    return frozenset(p[1:] for p in pieces if p.startswith("\u2581") and len(p) > 1)


def load_scorer(run_dir: str, **kwargs) -> RunScorer:
    return RunScorer(run_dir, **kwargs)
