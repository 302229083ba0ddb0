"""Sentence log-probabilities from a trained `pflm train` run, for N-best rescoring.

Text is normalised with the exact settings of the run's training data, tokenised with the run's own copy of
the tokenizer, and scored with `<s> … </s>` and the full softmax. Words outside a word-level vocabulary become
<unk> and are scored as <unk> plus `oov_penalty` (nats; default 0), so hypotheses are never dropped.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pflm.data.normalize import Normalizer, NormalizerConfig
from pflm.data.tokenizer import Tokenizer
from pflm.device.batching import UNK_ID as UNK, pack_sentences
from pflm.evaluation.perplexity import sequence_nll
from pflm.evaluation.run_model import load_run_model

MAX_TOKENS = 200


class RunScorer:
    def __init__(self, run_dir: str | Path, batch_size: int = 64, oov_penalty: float = 0.0) -> None:
        self.model, self.cfg, tok_path, manifest = load_run_model(run_dir)
        self.tokenizer = Tokenizer.load(tok_path)
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
                oov = sum(1 for t in ids[i] if t == UNK)
                out[i] = -float(nll[j]) - self.oov_penalty * oov
        return out


def load_scorer(run_dir: str, **kwargs) -> RunScorer:
    return RunScorer(run_dir, **kwargs)
