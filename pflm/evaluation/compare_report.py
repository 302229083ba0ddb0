"""Print, save (JSON) and plot (PNG with 95% error bars) a `pflm.evaluation.compare.Comparison`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pflm.evaluation.compare import FIRST_PASS, Comparison, SetResult


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def _rel(first: float, x: float) -> float:
    return (first - x) / first if first > 0 else 0.0


def _reached(first: float, x: float, oracle: float | None) -> float | None:
    """Share of the errors rescoring could remove that it did remove: (first pass - x) / (first pass - oracle)."""
    return (first - x) / (first - oracle) if oracle is not None and first > oracle else None


def set_summary(r: SetResult, first: SetResult, oracle_wer: float | None = None,
                oracle_rare_utt_wer: float | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "wer": r.wer, "wer_ci95": [r.wer_low, r.wer_high],
        "relative_reduction": _rel(first.wer, r.wer),
        "reachable_share": _reached(first.wer, r.wer, oracle_wer),
        "rare_utterances": r.tail.rare_utterances, "rare_utt_wer": r.tail.rare_utt_wer,
        "rare_utt_relative_reduction": _rel(first.tail.rare_utt_wer, r.tail.rare_utt_wer),
        "rare_utt_reachable_share": _reached(first.tail.rare_utt_wer, r.tail.rare_utt_wer, oracle_rare_utt_wer),
        "rare_word_tokens": r.tail.rare_tokens, "rare_word_recall": r.tail.rare_recall,
    }
    if r.test_tuned_wer is not None:
        out["test_tuned_wer_ceiling"] = r.test_tuned_wer
    if r.vs_first is not None:
        out["delta_wer_vs_first_pass"] = r.vs_first.delta
        out["delta_wer_ci95"] = [r.vs_first.low, r.vs_first.high]
        out["prob_improvement"] = r.vs_first.prob_improvement
        if r.vs_first_users is not None:
            out["delta_wer_ci95_users"] = [r.vs_first_users.low, r.vs_first_users.high]
        out["permutation_p"] = r.permutation.p_value if r.permutation else None
        out["sign_test_p"] = r.sign.p_value if r.sign else None
        out["better_utterances"] = r.sign.better if r.sign else None
        out["worse_utterances"] = r.sign.worse if r.sign else None
    return out


def _coverage_json(cmp: Comparison, k: str) -> dict[str, Any]:
    if k not in cmp.rare_coverage:
        return {}
    tokens, covered = cmp.rare_coverage[k]
    out: dict[str, Any] = {"rare_words_in_nbest": covered, "rare_recall_ceiling": covered / tokens if tokens else 0.0}
    if k in cmp.oracle_tail:
        out["oracle_rare_utt_wer"] = cmp.oracle_tail[k].rare_utt_wer
    return out


def _oracle_rare(cmp: Comparison, k: str) -> float | None:
    return cmp.oracle_tail[k].rare_utt_wer if k in cmp.oracle_tail else None


def to_json(cmp: Comparison, rare_zipf: float, resamples: int) -> dict[str, Any]:
    first = cmp.systems[0]
    return {
        "statistics": {
            "bootstrap": f"paired bootstrap over utterances (Bisani & Ney 2004), {resamples} resamples, percentile 95% CI; "
                         "*_users: the same resampling whole users (cluster bootstrap)",
            "significance": "two-sided paired sign-flip permutation test over per-utterance word errors; exact sign test",
            "rare_words": f"wordfreq Zipf frequency < {rare_zipf} (public list)",
        },
        "test_sets": {k: {"utterances": cmp.utterances[k], "users": cmp.users.get(k), "ref_words": cmp.ref_words[k],
                          "oracle_wer": cmp.oracle_wer[k], **cmp.oov.get(k, {}),
                          **_coverage_json(cmp, k)} for k in cmp.test_sets},
        "dev_oov": cmp.oov.get("dev", {}),
        "systems": [{"name": s.name, "privacy": s.privacy, "alpha": s.alpha, "beta": s.beta, "lambda": s.lam,
                     "dev_wer": s.dev_wer,
                     "test": {k: set_summary(s.sets[k], first.sets[k], cmp.oracle_wer[k], _oracle_rare(cmp, k))
                              for k in cmp.test_sets}}
                    for s in cmp.systems],
        "pairwise": [{"test_set": p["test_set"], "a": p["a"], "b": p["b"],
                      "delta_wer_b_minus_a": p["bootstrap"].delta,
                      "delta_wer_ci95": [p["bootstrap"].low, p["bootstrap"].high],
                      "prob_b_better": p["bootstrap"].prob_improvement,
                      "delta_wer_ci95_users": None if p.get("bootstrap_users") is None else
                      [p["bootstrap_users"].low, p["bootstrap_users"].high],
                      "permutation_p": p["permutation"].p_value} for p in cmp.pairwise],
    }


def format_lines(cmp: Comparison, rare_zipf: float) -> list[str]:
    lines = ["systems tuned on dev (alpha, beta, interpolation weight), then applied unchanged to each test set; "
             "WER in %, 95% CIs by paired bootstrap over utterances (Bisani & Ney 2004); p: two-sided paired "
             f"permutation test vs first pass; rare = reference has a word with public wordfreq Zipf < {rare_zipf}"]
    if "dev" in cmp.oov:
        lines.append(f"dev N-best OOV rate {_pct(cmp.oov['dev']['nbest_hyp_oov_rate'])}% of hypothesis words "
                     f"(references {_pct(cmp.oov['dev']['ref_oov_rate'])}%)")
    first = cmp.systems[0]
    for k in cmp.test_sets:
        oov = cmp.oov.get(k)
        lines.append("")
        lines.append(f"test set '{k}': {cmp.utterances[k]} utterances, {cmp.ref_words[k]} words, oracle WER "
                     f"{_pct(cmp.oracle_wer[k])}%" + (f", N-best OOV rate {_pct(oov['nbest_hyp_oov_rate'])}% "
                     f"(refs {_pct(oov['ref_oov_rate'])}%)" if oov else ""))
        lines.append(f"  {'system':<34} {'WER [95% CI]':<21} {'dWER [95% CI]':<23} {'rel':>6} {'p':>7} "
                     f"{'rare-utt WER':>12} {'rel':>6} {'recall':>6}  privacy")
        f = first.sets[k]
        for s in cmp.systems:
            r = s.sets[k]
            ci = f"{_pct(r.wer)} [{_pct(r.wer_low)},{_pct(r.wer_high)}]"
            d = (f"{100 * r.vs_first.delta:+.2f} [{100 * r.vs_first.low:+.2f},{100 * r.vs_first.high:+.2f}]"
                 if r.vs_first else "")
            p = f"{r.permutation.p_value:.4f}" if r.permutation else ""
            rel = f"{100 * _rel(f.wer, r.wer):+.1f}%" if s.name != FIRST_PASS else ""
            rrel = f"{100 * _rel(f.tail.rare_utt_wer, r.tail.rare_utt_wer):+.1f}%" if s.name != FIRST_PASS else ""
            lines.append(f"  {s.name:<34} {ci:<21} {d:<23} {rel:>6} {p:>7} {_pct(r.tail.rare_utt_wer):>12} {rrel:>6} "
                         f"{_pct(r.tail.rare_recall):>6}  {s.privacy}")
        lines.append(f"  rare-word utterances: {f.tail.rare_utterances}, rare reference words: {f.tail.rare_tokens}")
        if k in cmp.rare_coverage and cmp.rare_coverage[k][0]:
            tokens, covered = cmp.rare_coverage[k]
            lines.append(f"  rare reference words in any N-best hypothesis: {covered}/{tokens} "
                         f"({100 * covered / tokens:.1f}%): the rare-word recall no rescoring can exceed; "
                         f"the first pass already matches {f.tail.rare_hits}")
        lines.extend(_headroom_lines(cmp, k))
        by_user = [(s.name, s.sets[k].vs_first_users) for s in cmp.systems if s.sets[k].vs_first_users is not None]
        if by_user:
            lines.append(f"  dWER CI resampling the {cmp.users.get(k, '?')} users instead of utterances (cluster bootstrap): "
                         + ", ".join(f"{n} [{100 * b.low:+.2f},{100 * b.high:+.2f}]" for n, b in by_user))
        ceil = [(s.name, s.sets[k].test_tuned_wer) for s in cmp.systems if s.sets[k].test_tuned_wer is not None]
        if ceil:
            lines.append("  ceiling (weights tuned on this test set itself; a diagnostic, not a result): " + ", ".join(
                f"{n} {_pct(w)}% ({100 * _rel(f.wer, w):+.1f}%)" for n, w in ceil))
    for s in cmp.systems[1:]:
        lam = f" lambda={s.lam:g}" if s.lam is not None else ""
        lines.append(f"tuned {s.name}: alpha={s.alpha:.6g} beta={s.beta:.6g}{lam} dev WER {_pct(s.dev_wer)}%")
    for p in cmp.pairwise:
        b = p["bootstrap"]
        lines.append(f"{p['b']} vs {p['a']} on '{p['test_set']}': dWER {100 * b.delta:+.2f} "
                     f"[{100 * b.low:+.2f},{100 * b.high:+.2f}] points, P(better) {b.prob_improvement:.3f}, "
                     f"permutation p {p['permutation'].p_value:.4f}"
                     + (f"; resampling users [{100 * p['bootstrap_users'].low:+.2f},{100 * p['bootstrap_users'].high:+.2f}]"
                        if p.get("bootstrap_users") is not None else ""))
    return lines


def _headroom_lines(cmp: Comparison, k: str) -> list[str]:
    """What rescoring these lists could gain at best (the oracle), overall and on rare-word utterances, and how
    much of it each system took: a small rare-word gain with little headroom is the first pass's limit."""
    f, rare_floor = cmp.systems[0].sets[k], _oracle_rare(cmp, k)
    if rare_floor is None or not f.tail.rare_utterances:
        return []
    shares = []
    for s in cmp.systems[1:]:
        a = _reached(f.wer, s.sets[k].wer, cmp.oracle_wer[k])
        b = _reached(f.tail.rare_utt_wer, s.sets[k].tail.rare_utt_wer, rare_floor)
        shares.append(f"{s.name} {'-' if a is None else f'{100 * a:.1f}'}% / {'-' if b is None else f'{100 * b:.1f}'}%")
    lines = [f"  headroom (oracle): overall WER {_pct(cmp.oracle_wer[k])}%, rare-utt WER {_pct(rare_floor)}%; no "
             f"rescoring can lower WER by more than {100 * _rel(f.wer, cmp.oracle_wer[k]):.1f}% relative overall and "
             f"{100 * _rel(f.tail.rare_utt_wer, rare_floor):.1f}% on rare-word utterances"]
    if shares:
        lines.append("  share of that headroom taken, (first pass - system) / (first pass - oracle), overall / "
                     "rare-word utterances: " + ", ".join(shares))
    return lines


def write_plot(cmp: Comparison, path: str | Path) -> Path:
    """Grouped bars: test WER of every system on every test set, 95% bootstrap error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    path = Path(path)
    n_sys, n_set = len(cmp.systems), len(cmp.test_sets)
    width = 0.8 / n_sys
    fig, ax = plt.subplots(figsize=(2.2 + 1.6 * n_set * max(1, n_sys / 3), 4.2))
    for i, s in enumerate(cmp.systems):
        x = np.arange(n_set) + (i - (n_sys - 1) / 2) * width
        w = np.array([s.sets[k].wer for k in cmp.test_sets]) * 100
        lo = w - np.array([s.sets[k].wer_low for k in cmp.test_sets]) * 100
        hi = np.array([s.sets[k].wer_high for k in cmp.test_sets]) * 100 - w
        label = s.name + (" [NON-PRIVATE]" if "NON-PRIVATE" in s.privacy else "")
        ax.bar(x, w, width, yerr=[lo, hi], capsize=3, label=label)
    ax.set_xticks(np.arange(n_set))
    ax.set_xticklabels([f"{k}\n({cmp.utterances[k]} utts)" for k in cmp.test_sets])
    ax.set_ylabel("test WER (%), 95% bootstrap CI")
    ax.set_title("N-best rescoring: each system tuned on dev")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
