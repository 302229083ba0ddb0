"""The special token ids, fixed for every tokenizer model type and every LM: the one definition.

pad=0 (padding, never predicted), unk=1 (a word outside the vocabulary), bos=2 (`<s>`, the context token a
sentence starts from, never predicted), eos=3 (`</s>`, predicted at the end of a sentence). Ids from
`NUM_SPECIAL` on are words / pieces. `pflm.data.tokenizer` trains SentencePiece with exactly these ids; the
device batches, PEU row choice, the unigram prior and evaluation all import them from here.
"""

from __future__ import annotations

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
NUM_SPECIAL = 4

__all__ = ["BOS_ID", "EOS_ID", "NUM_SPECIAL", "PAD_ID", "UNK_ID"]
