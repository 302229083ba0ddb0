"""`pflm pretrain RECIPE --data DIR`: central, NON-private pretraining on a PUBLIC corpus, to start federated runs from.

Only public text is read (`--corpus`: the chatterbot-corpus dialogues, `pflm/data/corpora/public_text.py`, and/or
WordNet's usage examples, `pflm/data/corpora/wordnet_text.py`); the data directory
supplies just its tokenizer, normaliser and prior, which must themselves be public (or DP). The output directory
holds `model.safetensors` and `pretrain.json` (corpus, licence, tokenizer hash, model settings, held-out *public*
perplexity); a recipe starts federated fine-tuning from it with `server.init_from=OUT/model.safetensors`.
The weights are public: they depend on public text and the seed only, and no user's sentence is ever read.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from pflm.errors import ConfigError, DataError

HELDOUT_EVERY = 20  # every 20th public sentence is held out to report public perplexity
CORPORA = ("chatterbot", "wordnet", "chatterbot+wordnet")


def public_corpus(name: str) -> tuple[list[str], str, str]:
    """(raw sentences, corpus name, licence) of a public pretraining corpus: chatterbot, wordnet or both."""
    from pflm.data.corpora import public_text, wordnet_text

    if name not in CORPORA:
        raise ConfigError(f"--corpus {name!r} is not one of {', '.join(CORPORA)}")
    parts = [m for key, m in (("chatterbot", public_text), ("wordnet", wordnet_text)) if key in name.split("+")]
    texts = [t for m in parts for t in m.sentences()]
    return texts, "+".join(m.NAME for m in parts), "; ".join(m.LICENSE for m in parts)


def shuffled_batches(ids: list[list[int]], batch: int, rng: np.random.Generator, max_tokens: int):
    """One epoch of central training: sentences shuffled by `rng`, packed as the devices pack them."""
    from pflm.device.batching import pack_sentences

    order = rng.permutation(len(ids))
    for i in range(0, len(order), batch):
        yield pack_sentences([ids[j] for j in order[i : i + batch]], max_tokens)


def central_loss(model: torch.nn.Module, seqs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Mean over sentences of the full-softmax next-token loss."""
    from pflm.model.losses import full_softmax_loss

    width = int(lengths.max())
    seqs = seqs[:, :width]
    mask = torch.arange(width - 1).unsqueeze(0) < (lengths - 1).unsqueeze(1)
    feats = model.features(seqs[:, :-1])
    return full_softmax_loss(feats, model.output_weight(), model.output_bias(), seqs[:, 1:], mask).mean()


def central_epoch(model: torch.nn.Module, opt: torch.optim.Optimizer, ids: list[list[int]], batch: int,
                  rng: np.random.Generator, max_tokens: int) -> None:
    """One epoch of central training (`pflm pretrain`, scripts/asr_central_bound.py): gradient norm clipped at 1."""
    model.train()
    for seqs, lengths in shuffled_batches(ids, batch, rng, max_tokens):
        opt.zero_grad(set_to_none=True)
        central_loss(model, seqs, lengths).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()


def run_pretrain(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file

    from pflm.config import load_recipe
    from pflm.data.store import FederatedData, public_manifest
    from pflm.driver.artifacts import write_run_metadata
    from pflm.model.factory import build_model
    from pflm.evaluation.perplexity import build_eval_set, evaluate
    from pflm.io_utils import atomic_directory
    from pflm.model.pretrained import PROVENANCE_FILE, WEIGHTS_FILE, file_sha256
    from pflm.model.prior import init_output_bias
    from pflm.runtime import resolve_workers

    if args.epochs < 1 or args.lr <= 0 or args.batch_size < 1 or args.max_sentences < 0:
        raise ConfigError("--epochs and --batch-size must be >= 1, --lr > 0 and --max-sentences >= 0")
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads {args.threads} must be >= 1 (or leave it out to use the recipe's `threads`)")
    cfg = load_recipe(args.recipe, list(args.overrides) + [f"data.dir={args.data}"])
    fd = FederatedData.open(cfg.data.dir)
    if fd.privacy_info["vocabulary"] == "private":
        raise DataError(f"{args.data} has a vocabulary counted on its users (private); pretrain with a public or DP "
                        "vocabulary (`pflm prepare --tokenizer-input wordfreq`)")
    raw, corpus_name, corpus_license = public_corpus(args.corpus)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads or resolve_workers(cfg.threads))  # --threads, else the recipe's `threads`
    # distinct sentences only: the corpus repeats many questions, which would leak into the held-out split
    texts = list(dict.fromkeys(t for t in (fd.normalizer(s) for s in raw) if t))
    if args.max_sentences:
        texts = texts[: args.max_sentences]
    ids = fd.tokenizer.encode(texts)
    held = [s for i, s in enumerate(ids) if i % HELDOUT_EVERY == 0 and s]
    train = [s for i, s in enumerate(ids) if i % HELDOUT_EVERY != 0 and s]
    held_es = build_eval_set(held, [texts[i] for i in range(len(ids)) if i % HELDOUT_EVERY == 0 and ids[i]], 120)
    model = build_model(cfg.model, fd.vocab_size)
    if fd.privacy_info["prior"] != "private":
        init_output_bias(model, fd.prior_counts())
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    rng = np.random.default_rng(args.seed)
    history = [{"epoch": 0, "heldout_public_perplexity": evaluate(model, held_es)["perplexity"]}]
    print(f"public corpus: {len(train)} train / {len(held)} held-out sentences; epoch 0 held-out ppl "
          f"{history[-1]['heldout_public_perplexity']:.1f}")
    best = (0, history[0]["heldout_public_perplexity"], copy.deepcopy(model.state_dict()))
    t0 = time.time()
    for epoch in range(1, args.epochs + 1):
        central_epoch(model, opt, train, args.batch_size, rng, cfg.data.max_tokens)
        ppl = evaluate(model, held_es)["perplexity"]
        history.append({"epoch": epoch, "heldout_public_perplexity": ppl})
        print(f"epoch {epoch}: held-out public perplexity {ppl:.1f} ({time.time() - t0:.0f} s)")
        if ppl < best[1]:  # the held-out sentences are public, so choosing the epoch by them costs no privacy
            best = (epoch, ppl, copy.deepcopy(model.state_dict()))
    model.load_state_dict(best[2])
    if not all(math.isfinite(h["heldout_public_perplexity"]) for h in history):
        raise DataError("pretraining diverged (non-finite held-out perplexity); lower --lr")  # nothing written
    info = {
        "data": "public",
        "corpus": corpus_name,
        "license": corpus_license,
        "sentences": len(train),
        "words": int(sum(len(s) for s in train)),
        "tokenizer_sha256": file_sha256(fd.tokenizer.path),
        "model": asdict(cfg.model),
        "epochs": args.epochs,
        "lr": args.lr,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "history": history,
        "kept_epoch": best[0],  # the epoch with the lowest held-out public perplexity (0 = the initial model)
        "note": "central, non-private training on public text only; no user data was read",
        "seconds": time.time() - t0,
    }
    out = Path(args.out)
    with atomic_directory(out, overwrite=True) as tmp:
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp / WEIGHTS_FILE))
        # recipe, tokenizer and release-safe manifest too, so `pflm rescore --compare OUT` can score the public LM
        write_run_metadata(tmp, cfg, fd.tokenizer.path, public_manifest(fd.manifest))
        (tmp / PROVENANCE_FILE).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    print(f"kept epoch {best[0]} (held-out public perplexity {best[1]:.1f})")
    print(f"wrote {out / WEIGHTS_FILE}; start federated fine-tuning with server.init_from={out / WEIGHTS_FILE}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("pretrain", help="central NON-private pretraining on a public corpus (chatterbot-corpus)")
    p.add_argument("recipe", help="the recipe whose model.* the federated run will use")
    p.add_argument("overrides", nargs="*", help="key=value recipe overrides (model.* must match the federated run)")
    p.add_argument("--data", required=True, help="`pflm prepare` output whose tokenizer/normaliser/prior to use")
    p.add_argument("--out", required=True, help="output directory (model.safetensors + pretrain.json)")
    p.add_argument("--corpus", default="chatterbot", choices=CORPORA,
                   help="public text: chatterbot-corpus (PyPI), WordNet usage examples (Debian wordnet-base), or both")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: the recipe's `threads`, 0 there = every CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-sentences", type=int, default=0, help="use only the first N public sentences (0 = all)")
    p.set_defaults(func=run_pretrain)
