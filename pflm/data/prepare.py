"""`pflm prepare`: load -> normalise -> partition users -> train tokenizer -> write the federated store, atomically."""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

import pflm
from pflm.data.load import load_table, select_columns
from pflm.data.normalize import Normalizer, NormalizerConfig
from pflm.data.partition import SPLITS, PartitionConfig, SplitRows, partition
from pflm.data.dp_vocab import DPVocabConfig, dp_vocabulary
from pflm.data.store import FORMAT_VERSION, MANIFEST, PRIOR_COUNTS, TOKEN_COUNTS, StoreWriter
from pflm.data.tokenizer import (
    MODEL_TYPES, NUM_SPECIAL, PUBLIC_WORDFREQ, Tokenizer, TokenizerConfig, file_prior_counts, max_word_vocab,
    prior_from_word_counts, public_prior_counts, train_tokenizer, train_word_model_from_counts,
)
from pflm.errors import ConfigError, DataError
from pflm.io_utils import atomic_directory, atomic_write_json

CORPORA = ("chitchat", "synthetic", "chatterbot")  # chatterbot: public BSD-3 dialogues (pflm/data/corpora/public_text.py)
VOCAB_SOURCES = ("exact", "dp")  # exact: counted on the tokenizer's text (users or --tokenizer-input); dp: DP release
_ENCODE_BATCH = 20_000


@dataclass(frozen=True)
class PrepareConfig:
    """Everything `prepare` needs; exactly one of `input` (path / glob / hub name) or `corpus` is set."""

    out: str
    input: str | None = None
    corpus: str | None = None
    text_column: str = "text"
    user_column: str | None = None
    hub_split: str = "train"
    overwrite: bool = False
    normalizer: NormalizerConfig = field(default_factory=NormalizerConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    synthetic_users: int = 200  # --corpus synthetic: users to generate
    synthetic_sentences: tuple[int, int] = (5, 40)  # --corpus synthetic: sentences per user (uniform range)
    max_users: int | None = None  # --corpus chitchat: keep only the first N senders (fast tests)
    vocab_source: str = "exact"  # "dp": word vocabulary + prior from the train users under DP (pflm.data.dp_vocab)
    vocab_dp: DPVocabConfig | None = None  # required with vocab_source="dp"
    stream: bool = False  # one pass, user by user, bounded memory (pflm.data.prepare_stream)

    def __post_init__(self) -> None:
        if (self.input is None) == (self.corpus is None):
            raise ConfigError("give exactly one of --input PATH_OR_HUB_NAME or --corpus chitchat|synthetic")
        if self.corpus is not None and self.corpus not in CORPORA:
            raise ConfigError(f"corpus {self.corpus!r} unknown; use one of {', '.join(CORPORA)}")
        if not self.out:
            raise ConfigError("--out DIR is required")
        if self.synthetic_users < 1:
            raise ConfigError("synthetic users must be >= 1; pass --num-users N")
        lo, hi = self.synthetic_sentences
        if not 1 <= lo <= hi:
            raise ConfigError(f"synthetic sentences per user range {lo}..{hi} is invalid; use 1 <= lo <= hi")
        if self.max_users is not None and self.max_users < 1:
            raise ConfigError("--max-users must be >= 1")
        self._check_vocab_source()
        if self.stream:
            from pflm.data.prepare_stream import check_stream_config

            check_stream_config(self)

    def _check_vocab_source(self) -> None:
        if self.vocab_source not in VOCAB_SOURCES:
            raise ConfigError(f"--vocab-source {self.vocab_source!r} unknown; use one of {', '.join(VOCAB_SOURCES)}")
        if self.vocab_source != "dp":
            if self.vocab_dp is not None:
                raise ConfigError("--vocab-dp-* flags only apply with --vocab-source dp; add it or drop them")
            return
        if self.tokenizer.tokenizer_input:
            raise ConfigError("--vocab-source dp learns the vocabulary from the train users; drop --tokenizer-input "
                              "(or drop --vocab-source dp to use that public vocabulary)")
        if self.tokenizer.model_type != "word":
            raise ConfigError("--vocab-source dp builds a word vocabulary; use --model-type word (for a public "
                              "subword vocabulary use --tokenizer-input FILE instead)")
        if self.vocab_dp is None:
            raise ConfigError("--vocab-source dp needs --vocab-dp-sigma S (noise multiplier, e.g. 4; see "
                              "docs/vocabulary.md)")

    @property
    def privacy_kind(self) -> str:
        """"public", "dp" or "private": what the vocabulary and prior are derived from."""
        if self.vocab_source == "dp":
            return "dp"
        return "public" if self.tokenizer.tokenizer_input else "private"


def _raw_rows(cfg: PrepareConfig) -> tuple[list[Any] | None, list[Any], dict[str, Any]]:
    """(user ids or None, raw texts, source description)."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    if cfg.corpus == "chitchat":
        from pflm.data.corpora import chitchat

        ds = select_columns(datasets.Dataset.from_dict(chitchat.load(cfg.max_users)), "chitchat", "text", "user")
        source: dict[str, Any] = {"corpus": "chitchat", "package": "chitchat-dataset", "max_users": cfg.max_users}
    elif cfg.corpus == "synthetic":
        from pflm.data.corpora import synthetic

        ds = datasets.Dataset.from_dict(synthetic.generate(cfg.synthetic_users, cfg.synthetic_sentences,
                                                           cfg.partition.seed))
        source = {"corpus": "synthetic", "num_users": cfg.synthetic_users,
                  "sentences_per_user": list(cfg.synthetic_sentences), "seed": cfg.partition.seed}
    elif cfg.corpus == "chatterbot":
        from pflm.data.corpora import public_text

        ds = datasets.Dataset.from_dict(public_text.load(cfg.max_users))
        source = {"corpus": "chatterbot", "package": "chatterbot-corpus", "license": public_text.LICENSE}
    else:
        assert cfg.input is not None
        ds = load_table(cfg.input, cfg.text_column, cfg.user_column, cfg.hub_split)
        source = {"input": cfg.input, "text_column": cfg.text_column, "user_column": cfg.user_column}
        if not Path(cfg.input).expanduser().exists():
            source["hub_split"] = cfg.hub_split
    table = ds.data.table if hasattr(ds.data, "table") else ds.data
    texts = table.column("text").to_pylist()
    users = table.column("user").to_pylist() if "user" in table.column_names else None
    source["raw_rows"] = len(texts)
    return users, texts, source


def prepare(cfg: PrepareConfig, log: Any = None) -> Path:
    """Build the federated dataset at `cfg.out` (appears atomically) and return its path."""
    say = log or (lambda msg: None)
    out = Path(cfg.out).expanduser()
    if out.exists() and not cfg.overwrite:
        raise ConfigError(f"output {out} already exists; pass --overwrite or choose another --out")
    if cfg.stream:
        from pflm.data.prepare_stream import prepare_stream

        return prepare_stream(cfg, say)
    t0 = time.perf_counter()
    part_cfg = cfg.partition
    if cfg.corpus is None and cfg.user_column is None and part_cfg.scheme == "natural":  # corpora carry user ids
        raise ConfigError("no --user-column given: pass it, or use --partition iid|dirichlet --num-users N")
    users, raw, source = _raw_rows(cfg)
    norm = Normalizer(cfg.normalizer)
    keep: list[int] = []
    texts: list[str] = []
    for i, t in enumerate(raw):
        s = norm(t if isinstance(t, str) else ("" if t is None else str(t)))
        if s:
            keep.append(i)
            texts.append(s)
    if not texts:
        raise DataError("corpus is empty after normalisation (no speakable text); check --text-column and the input")
    kept_users = [users[i] for i in keep] if users is not None else None
    del raw, users
    say(f"loaded {source['raw_rows']} rows, {len(texts)} non-empty after normalisation "
        f"({time.perf_counter() - t0:.1f}s)")
    part = partition(kept_users, len(texts), part_cfg)
    train_rows = part.splits["train"].rows
    train_texts = [texts[i] for i in train_rows]
    with atomic_directory(out, overwrite=cfg.overwrite) as tmp:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; give the final directory normal permissions
        if cfg.vocab_source == "dp":
            tok, prior_counts, dp_release = _dp_tokenizer(cfg, texts, part.splits["train"], tmp, say)
        else:
            tok = train_tokenizer(train_texts, cfg.tokenizer, tmp, seed=part_cfg.seed, normalize=norm)
            prior_counts, dp_release = _public_prior(cfg, tok, norm), None
        say(f"trained {tok.model_type} tokenizer, vocab {tok.vocab_size} ({time.perf_counter() - t0:.1f}s)")
        word_on_users = cfg.privacy_kind == "private" and cfg.tokenizer.model_type == "word"
        max_vocab = max_word_vocab(train_texts) if word_on_users else None
        del train_texts
        split_stats: dict[str, dict[str, int]] = {}
        for name in SPLITS:
            sp = part.splits[name]
            writer = StoreWriter(tmp / name, vocab_size=tok.vocab_size)
            bounds = np.r_[0, np.cumsum(sp.counts)]
            u = 0
            while u < len(sp.users):  # encode a batch of whole users at a time
                v = u
                while v < len(sp.users) and bounds[v + 1] - bounds[u] < _ENCODE_BATCH:
                    v += 1
                v = max(v, u + 1)
                batch = [texts[i] for i in sp.rows[bounds[u]:bounds[v]]]
                ids = tok.encode(batch, num_threads=cfg.tokenizer.num_threads)
                for j in range(u, v):
                    a, b = bounds[j] - bounds[u], bounds[j + 1] - bounds[u]
                    writer.add_user(sp.users[j], batch[a:b], ids[a:b])
                u = v
            split_stats[name] = writer.close()
            if name == "train":
                assert writer.token_counts is not None
                np.save(tmp / TOKEN_COUNTS, writer.token_counts)
        manifest = build_manifest(cfg, source, {**part_cfg.to_dict(), **part.stats}, tok, prior_counts, dp_release,
                                  max_vocab, split_stats, tmp)
        atomic_write_json(tmp / MANIFEST, manifest)
    say(f"wrote {out} ({time.perf_counter() - t0:.1f}s)")
    return out


def build_manifest(cfg: PrepareConfig, source: dict[str, Any], partition_info: dict[str, Any], tok: Tokenizer,
                   prior_counts: np.ndarray | None, dp_release: dict[str, Any] | None, max_vocab: int | None,
                   split_stats: dict[str, dict[str, int]], tmp: Path) -> dict[str, Any]:
    """The manifest of a prepared directory (also writes prior_counts.npy into `tmp` when there is one)."""
    part_cfg = cfg.partition
    kind = cfg.privacy_kind
    if prior_counts is not None:
        np.save(tmp / PRIOR_COUNTS, prior_counts)
        prior = {"path": PRIOR_COUNTS, "computed_from": _PRIOR_FROM[
            "dp" if kind == "dp" else "wordfreq" if cfg.tokenizer.tokenizer_input == PUBLIC_WORDFREQ else "file"]}
    else:
        prior = {"path": TOKEN_COUNTS, "computed_from": _PRIOR_FROM["private"]}
    manifest = {
        "format_version": FORMAT_VERSION,
        "pflm_version": pflm.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "source": source,
        "normalization": cfg.normalizer.to_dict(),
        "partition": partition_info,
        "seed": part_cfg.seed,
        "tokenizer": {
            "path": "tokenizer.model", "model_type": tok.model_type, "vocab_size": tok.vocab_size,
            "pad_id": tok.pad_id, "unk_id": tok.unk_id, "bos_id": tok.bos_id, "eos_id": tok.eos_id,
            "byte_fallback": cfg.tokenizer.byte_fallback,
            "sha256": hashlib.sha256(tok.path.read_bytes()).hexdigest(),
            "trained_on": ("public word list (wordfreq)" if cfg.tokenizer.tokenizer_input == PUBLIC_WORDFREQ
                           else "file:" + str(cfg.tokenizer.tokenizer_input)) if cfg.tokenizer.tokenizer_input
            else "train users (DP release, see privacy.dp_release)" if kind == "dp" else "train users",
            "max_word_vocab_supported": max_vocab,
        },
        "token_counts": {"path": TOKEN_COUNTS, "computed_from": "train users' tokens"},
        "prior": prior,
        "privacy": {"vocabulary": kind, "prior": kind, "dp_release": dp_release},
        "splits": {n: {**split_stats[n], "data": f"{n}/data.arrow", "index": f"{n}/index.arrow"}
                   for n in SPLITS},
    }
    return manifest


_PRIOR_FROM = {
    "wordfreq": "public word list (wordfreq); no user data",
    "file": "token counts of the public --tokenizer-input file; no user data",
    "dp": "train users, DP: noisy per-user word counts (privacy.dp_release)",
    "private": "train users' tokens (private: not DP, see docs/vocabulary.md)",
}


def _public_prior(cfg: PrepareConfig, tok: Tokenizer, norm: Normalizer) -> np.ndarray | None:
    """The prior of a public vocabulary, from the same public source (None: the vocabulary is private)."""
    source = cfg.tokenizer.tokenizer_input
    if not source:
        return None
    if source == PUBLIC_WORDFREQ:
        return public_prior_counts(tok, norm)
    return file_prior_counts(tok, source, norm, cfg.tokenizer.num_threads)


def _dp_tokenizer(cfg: PrepareConfig, texts: list[str], train: SplitRows, out: Path,
                  say: Any) -> tuple[Tokenizer, np.ndarray, dict[str, Any]]:
    """Word tokenizer + prior from one DP release over the train users (pflm.data.dp_vocab)."""
    assert cfg.vocab_dp is not None
    bounds = np.r_[0, np.cumsum(train.counts)]
    users = [[texts[i] for i in train.rows[bounds[j]:bounds[j + 1]]] for j in range(len(train.users))]
    dpv = dp_vocabulary(users, cfg.vocab_dp, cfg.tokenizer.vocab_size - NUM_SPECIAL)
    del users
    if len(dpv.words) < dpv.requested_size:  # DP outcome: safe to report; re-running would spend budget again
        say(f"DP vocabulary: only {len(dpv.words)} words passed the threshold; vocab is "
            f"{len(dpv.words) + NUM_SPECIAL}, not {cfg.tokenizer.vocab_size}")
    tok_cfg = replace(cfg.tokenizer, vocab_size=len(dpv.words) + NUM_SPECIAL)
    tok = train_word_model_from_counts(dpv.tokenizer_counts(), tok_cfg, out, seed=cfg.partition.seed)
    return tok, prior_from_word_counts(tok, dpv.prior_by_word()), dpv.release_record()


def _parse_split(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise ConfigError(f"--split {text!r} is not three comma-separated numbers; e.g. --split 0.8,0.1,0.1") from None
    if len(parts) != 3:
        raise ConfigError(f"--split {text!r} needs three fractions (train,val,test), e.g. 0.8,0.1,0.1")
    return parts  # type: ignore[return-value]


def config_from_args(args: argparse.Namespace) -> PrepareConfig:
    defaults: dict[str, Any] = {"model_type": "word", "vocab_size": 10_000, "min_sentences": 1}
    if args.corpus == "chitchat":
        from pflm.data.corpora import chitchat

        defaults.update(chitchat.DEFAULTS)
    elif args.corpus == "synthetic":
        defaults.update({"vocab_size": 300, "min_sentences": 1})
    elif args.corpus == "chatterbot":
        from pflm.data.corpora import public_text

        defaults.update(public_text.DEFAULTS)
    pick = lambda name: getattr(args, name) if getattr(args, name) is not None else defaults[name]  # noqa: E731
    synthetic = args.corpus == "synthetic"
    scheme = args.partition or ("natural" if (args.user_column or args.corpus) else "iid")
    return PrepareConfig(
        out=args.out, input=args.input, corpus=args.corpus, text_column=args.text_column,
        user_column=args.user_column, hub_split=args.hub_split, overwrite=args.overwrite,
        normalizer=NormalizerConfig(digits_to_words=args.digits_to_words, lowercase=not args.keep_case),
        partition=PartitionConfig(
            scheme=scheme, num_users=None if synthetic else args.num_users, alpha=args.alpha,
            min_sentences=pick("min_sentences"), max_sentences=args.max_sentences,
            split=_parse_split(args.split), seed=args.seed),
        tokenizer=TokenizerConfig(
            model_type=pick("model_type"), vocab_size=pick("vocab_size"), byte_fallback=args.byte_fallback,
            tokenizer_input=args.tokenizer_input),
        synthetic_users=(args.num_users or 200) if synthetic else 200,
        max_users=args.max_users,
        vocab_source=args.vocab_source or "exact",
        vocab_dp=_dp_config(args), stream=args.stream,
    )


def _dp_config(args: argparse.Namespace) -> DPVocabConfig | None:
    given = {k: getattr(args, "vocab_dp_" + k) for k in ("sigma", "max_words", "threshold_delta")}
    if args.vocab_source != "dp":
        if any(v is not None for v in given.values()):
            raise ConfigError("--vocab-dp-* flags only apply with --vocab-source dp; add it or drop them")
        return None
    if given["sigma"] is None:
        return None  # PrepareConfig names the missing flag
    extra = {"max_words_per_user": given["max_words"], "threshold_delta": given["threshold_delta"]}
    return DPVocabConfig(noise_multiplier=given["sigma"], **{k: v for k, v in extra.items() if v is not None})


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    cfg = config_from_args(args)
    t0 = time.perf_counter()
    out = prepare(cfg, log=(lambda m: print(m, flush=True)) if args.verbose else None)
    from pflm.data.store import FederatedData

    fd = FederatedData.open(out)
    m = fd.manifest
    print(f"prepared {out} in {time.perf_counter() - t0:.1f}s: {m['tokenizer']['model_type']} tokenizer, "
          f"vocab {m['tokenizer']['vocab_size']}")
    privacy = fd.privacy_info
    print(f"privacy: vocabulary {privacy['vocabulary']}, prior {privacy['prior']}"
          + (f" (DP release sigma={privacy['dp_release']['noise_multiplier']}, threshold delta="
             f"{privacy['dp_release']['threshold_delta']:g}: compose it into the run's accountant)"
             if privacy["dp_release"] else ""))
    if m["tokenizer"].get("max_word_vocab_supported"):
        print(f"largest word vocab these train users support: {m['tokenizer']['max_word_vocab_supported']}")
    print(f"{'split':<6} {'users':>9} {'sentences':>11} {'words':>12} {'tokens':>12}")
    for name in SPLITS:
        s = m["splits"][name]
        print(f"{name:<6} {s['users']:>9} {s['sentences']:>11} {s['words']:>12} {s['tokens']:>12}")
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("prepare", help="turn per-user text into a federated dataset directory",
                              description=__doc__)
    src = p.add_argument_group("source (exactly one)")
    src.add_argument("--input", help="local .jsonl/.json/.parquet/.csv/.tsv/.txt file, directory or glob, or a "
                                     "Hugging Face hub dataset name (needs network)")
    src.add_argument("--corpus", choices=CORPORA, help="embedded corpus: chitchat (real, default recipe) or synthetic")
    p.add_argument("--out", required=True, help="output directory (created atomically)")
    p.add_argument("--text-column", default="text")
    p.add_argument("--user-column", default=None, help="column with the user id (natural partition)")
    p.add_argument("--hub-split", default="train", help="split to load from a hub dataset")
    p.add_argument("--vocab-size", type=int, default=None, help="tokenizer vocabulary size (default 10000; "
                                                                 "synthetic 300)")
    p.add_argument("--model-type", choices=MODEL_TYPES, default=None, help="SentencePiece model (default word)")
    p.add_argument("--byte-fallback", action="store_true", help="unigram/bpe: spell unseen characters as bytes")
    p.add_argument("--tokenizer-input", default=None,
                   help="public text file to train the tokenizer on instead of the train users' text, or 'wordfreq' for a public English word list (word model; also gives a public PEU/NCE prior)")
    dp = p.add_argument_group("DP vocabulary (docs/vocabulary.md)")
    dp.add_argument("--vocab-source", choices=VOCAB_SOURCES, default=None,
                    help="exact (default): vocabulary counted on the tokenizer's text; dp: word vocabulary and prior "
                         "released from the train users with DP (Gaussian thresholded histogram)")
    dp.add_argument("--vocab-dp-sigma", type=float, default=None, help="dp: noise multiplier (required)")
    dp.add_argument("--vocab-dp-max-words", type=int, default=None, help="dp: distinct words per user, k (default 8)")
    dp.add_argument("--vocab-dp-threshold-delta", type=float, default=None,
                    help="dp: delta spent on the release threshold (default 1e-8)")
    p.add_argument("--partition", choices=("natural", "iid", "dirichlet"), default=None,
                   help="natural (user column) or synthetic users; default natural if users are known, else iid")
    p.add_argument("--num-users", type=int, default=None, help="iid/dirichlet users; or users to generate "
                                                               "with --corpus synthetic (default 200)")
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration (small = skewed user sizes)")
    p.add_argument("--min-sentences", type=int, default=None, help="drop users with fewer sentences "
                                                                    "(default 1; chitchat 5)")
    p.add_argument("--max-sentences", type=int, default=None, help="cap sentences per user (seeded sample)")
    p.add_argument("--split", default="0.8,0.1,0.1", help="train,val,test fractions of users")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--digits-to-words", action="store_true", help="spell numbers as words")
    p.add_argument("--keep-case", action="store_true", help="do not lower-case")
    p.add_argument("--max-users", type=int, default=None, help="chitchat: keep only the first N senders")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    p.add_argument("--stream", action="store_true", help="one pass, user by user, memory bounded whatever the number "
                   "of users: .jsonl/.parquet input sorted by --user-column, public --tokenizer-input, splits by a "
                   "keyed hash of the user id (docs/benchmarks.md)")
    p.add_argument("--verbose", "-v", action="store_true", help="print progress")
    p.set_defaults(func=run)
