"""NON-PRIVATE upper bound for issue 20: train an LM centrally on ALL training users' text, to ask whether any LM of
that size and data could reach a given rescoring gain on these N-best lists.

This is a diagnostic, not a product path: it reads every training user's sentences on one machine with no noise
and no clipping, so its output is NOT private and must never be published or rescored on test sets to pick a
recipe. The output directory is a run directory (`model.safetensors`, `recipe.json`, tokenizer, public manifest) so
`scripts/asr_dev_cv.py` can rescore the dev set with it; its `NOT-PRIVATE.txt` says what it is. Early stopping uses
the validation users' perplexity. Example (a 2-layer 512-unit LSTM with dropout, from the public start):

    python scripts/asr_central_bound.py --data /tmp/asr/data --out /tmp/bound/lstm512 --epochs 8 \
        --init /tmp/asr2/pretrained_wn/model.safetensors model.hidden_dim=512 model.num_layers=2 model.dropout=0.3
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pflm.commands.pretrain import central_epoch  # noqa: E402
from pflm.config import load_recipe  # noqa: E402
from pflm.data.store import FederatedData, public_manifest  # noqa: E402
from pflm.driver.artifacts import export_model, write_run_metadata  # noqa: E402
from pflm.evaluation.perplexity import evaluate, load_eval_set  # noqa: E402
from pflm.model.factory import build_model  # noqa: E402
from pflm.model.prior import init_output_bias  # noqa: E402

NOTICE = ("NOT PRIVATE: trained centrally on every training user's text without clipping or noise (issue 20 upper "
          "bound, scripts/asr_central_bound.py). Do not publish these weights or anything computed from them.\n")


def load_init(model: torch.nn.Module, path: str) -> int:
    """Copy every tensor of `path` whose name and shape match; return how many were copied."""
    from safetensors.torch import load_file

    own = model.state_dict()
    got = {k: v for k, v in load_file(path).items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(got, strict=False)
    return len(got)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="model.* key=value overrides of the recipe")
    ap.add_argument("--recipe", default="recipes/chitchat_asr.yaml")
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--init", default="", help="public weights to start from (tensors of matching shape)")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    cfg = load_recipe(args.recipe, list(args.overrides) + [f"data.dir={args.data}", "server.init_from="])
    fd = FederatedData.open(cfg.data.dir)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    train = [s for _, sents in fd.iter_users("train") for s in sents if len(s) >= 2]
    val = load_eval_set(fd, "val", cfg.data.val_users)
    model = build_model(cfg.model, fd.vocab_size)
    init_output_bias(model, fd.prior_counts())
    copied = load_init(model, args.init) if args.init else 0
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{len(train)} train sentences, {n_params / 1e6:.2f}M parameters, {copied} tensors from {args.init or '-'}",
          flush=True)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    rng = np.random.default_rng(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "NOT-PRIVATE.txt").write_text(NOTICE, encoding="utf-8")
    write_run_metadata(out, cfg, fd.tokenizer.path, public_manifest(fd.manifest))
    best = evaluate(model, val)["word_perplexity"]
    history = [{"epoch": 0, "val_word_perplexity": best}]
    print(f"epoch 0: val word ppl {best:.1f}", flush=True)
    export_model(out, model)
    t0 = time.time()
    for epoch in range(1, args.epochs + 1):
        central_epoch(model, opt, train, args.batch_size, rng, args.max_tokens)
        ppl = evaluate(model, val)["word_perplexity"]
        history.append({"epoch": epoch, "val_word_perplexity": ppl, "seconds": time.time() - t0})
        print(f"epoch {epoch}: val word ppl {ppl:.1f} ({time.time() - t0:.0f} s)", flush=True)
        if ppl < best:
            best = ppl
            export_model(out, model)
        else:  # early stop at the first epoch that does not improve; halve the rate once before giving up
            if opt.param_groups[0]["lr"] < args.lr:
                break
            for g in opt.param_groups:
                g["lr"] /= 2
    (out / "bound.json").write_text(json.dumps({"note": NOTICE.strip(), "params": n_params, "best_val_word_perplexity":
                                                best, "history": history, "args": vars(args)}, indent=1) + "\n")
    print(f"best val word ppl {best:.1f}; wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
