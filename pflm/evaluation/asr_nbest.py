"""Real ASR N-best lists: synthesize sentences with flite, decode with pocketsphinx, cache per sentence, write JSONL.

The library behind `pflm nbest` (pflm.evaluation.rescore_cli); `python -m data_prep.nbest` measures its WER on
chitchat sentences.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from importlib.metadata import version as _pkg_version
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from pflm.errors import ConfigError, DataError, PflmError
from pflm.evaluation.nbest import Hypothesis, NBestUtterance, write_nbest
from pflm.io_utils import atomic_write_json

log = logging.getLogger(__name__)

VOICES = ("slt", "awb", "kal16", "rms", "kal")
SAMPLE_RATE = 16000
# Bumped whenever the synthesis/decoding recipe changes, so old cache entries are never reused.
CACHE_FORMAT = 1
# pocketsphinx.Decoder() defaults: bundled en-US acoustic model, 3-gram LM and CMU dictionary.
DECODER_CONFIG: dict[str, Any] = {}
DEFAULT_CACHE_DIR = Path(os.environ.get("PFLM_CACHE_DIR", Path.home() / ".cache" / "pflm")) / "nbest"

_PUNCT = re.compile(r"[^\w\s']+")
_EDGE_APOSTROPHE = re.compile(r"(?<!\w)'|'(?!\w)")


def default_normalize(text: str) -> str:
    """Lowercase, drop punctuation except apostrophes inside words, collapse whitespace."""
    text = _PUNCT.sub(" ", text.lower().replace("\u2019", "'"))
    text = _EDGE_APOSTROPHE.sub(" ", text).replace("_", " ")
    return " ".join(text.split())


def resolve_normalize(normalize: Callable[[str], str] | None = None) -> Callable[[str], str]:
    """The given callable, else the data pipeline's default `pflm.data.normalize.Normalizer()`, else
    `default_normalize` (same rules without Unicode folding) when the pipeline is not installed.

    For sentences from a prepared data directory pass `FederatedData.normalizer` (the dataset's exact settings).
    """
    if normalize is not None:
        return normalize
    try:
        from pflm.data.normalize import Normalizer
    except ImportError:
        return default_normalize
    return Normalizer()


@dataclass
class GenerationConfig:
    """What determines the recognizer output (all of it goes into the cache key)."""

    voice: str = "slt"
    nbest: int = 50
    workers: int = 2
    max_raw_hyps: int = 2000  # stop walking the lattice's N-best after this many (mostly duplicate) paths

    def __post_init__(self) -> None:
        if self.voice not in VOICES:
            raise ConfigError(f"voice '{self.voice}' is not a Debian flite voice here; use one of {', '.join(VOICES)}")
        if self.nbest < 1:
            raise ConfigError(f"nbest={self.nbest} must be >= 1; use e.g. 50")
        if self.workers < 1:
            raise ConfigError(f"workers={self.workers} must be >= 1; use e.g. 2")
        if self.max_raw_hyps < self.nbest:
            raise ConfigError(f"max_raw_hyps={self.max_raw_hyps} must be >= nbest={self.nbest}")


@dataclass
class GenerationStats:
    """Timing of one generate call (decoding time covers only sentences not found in the cache)."""

    utterances: int = 0
    cached: int = 0
    decoded: int = 0
    audio_seconds: float = 0.0
    worker_seconds: float = 0.0  # synthesis + conversion + decoding, summed over workers
    wall_seconds: float = 0.0


def check_tools() -> None:
    missing = [b for b in ("flite", "sox") if shutil.which(b) is None]
    if missing:
        raise PflmError(f"{' and '.join(missing)} not found on PATH; install with `apt-get install -y flite sox`")


def _tool_versions() -> dict[str, str]:
    flite = subprocess.run(["flite", "--version"], capture_output=True, text=True).stdout.strip()
    return {"pocketsphinx": _pkg_version("pocketsphinx"), "flite": flite.splitlines()[0] if flite else ""}


def cache_key(text: str, cfg: GenerationConfig, versions: dict[str, str]) -> str:
    blob = {
        "format": CACHE_FORMAT,
        "text": text,
        "voice": cfg.voice,
        "nbest": cfg.nbest,
        "max_raw_hyps": cfg.max_raw_hyps,
        "decoder": DECODER_CONFIG,
        "versions": versions,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode("utf-8")).hexdigest()


def synthesize(text: str, voice: str, workdir: str) -> bytes:
    """Speak `text` with flite and return 16 kHz mono signed 16-bit little-endian raw audio."""
    wav = os.path.join(workdir, "tts.wav")
    proc = subprocess.run(["flite", "-voice", voice, "-t", text, "-o", wav], capture_output=True, text=True)
    if proc.returncode != 0 or not os.path.exists(wav):
        raise PflmError(f"flite failed on {text[:40]!r}: {proc.stderr.strip()[:200]}")
    proc2 = subprocess.run(
        ["sox", wav, "-r", str(SAMPLE_RATE), "-c", "1", "-b", "16", "-e", "signed-integer", "-L", "-t", "raw", "-"],
        capture_output=True,
    )
    if proc2.returncode != 0:
        raise PflmError(f"sox failed converting flite output: {proc2.stderr.decode(errors='replace').strip()[:200]}")
    return proc2.stdout


def decode_nbest(decoder: Any, raw: bytes, nbest: int, max_raw_hyps: int) -> list[tuple[str, float]]:
    """Decode one utterance; return up to `nbest` unique (text, natural-log score) pairs, best first."""
    decoder.start_utt()
    decoder.process_raw(raw, full_utt=True)
    decoder.end_utt()
    best: dict[str, float] = {}
    for i, hyp in enumerate(decoder.nbest()):
        if i >= max_raw_hyps or len(best) >= nbest:
            break
        if hyp is None or hyp.score <= 0.0:  # score is exponentiated; 0 means it underflowed: unusably unlikely
            continue
        text = " ".join(hyp.hypstr.split())
        score = math.log(hyp.score)
        if score > best.get(text, -math.inf):
            best[text] = score
    if not best:  # nothing recognized (e.g. silence): keep one empty hypothesis so the list is never empty
        h = decoder.hyp()
        best[h.hypstr if h is not None else ""] = 0.0
    return sorted(best.items(), key=lambda kv: -kv[1])


_DECODER: Any = None


def _work(task: tuple[str, str, int, int]) -> dict[str, Any]:
    """Synthesize and decode one sentence (the decoder is created once per process)."""
    global _DECODER
    text, voice, nbest, max_raw = task
    if _DECODER is None:
        from pocketsphinx import Decoder

        _DECODER = Decoder(**DECODER_CONFIG)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pflm-tts-") as tmp:
        raw = synthesize(text, voice, tmp)
    hyps = decode_nbest(_DECODER, raw, nbest, max_raw)
    return {
        "text": text,
        "hyps": hyps,
        "audio_seconds": len(raw) / (2 * SAMPLE_RATE),
        "worker_seconds": time.perf_counter() - t0,
    }


def _worker_main(task_file: str) -> int:
    """Worker process: read tasks (JSON lines) from `task_file`, print one JSON result line per task."""
    with open(task_file, encoding="utf-8") as f:
        tasks = [tuple(json.loads(line)) for line in f if line.strip()]
    for task in tasks:
        try:
            res = _work(task)  # type: ignore[arg-type]
        except Exception as e:  # reported to the parent, which raises it as one clear error
            res = {"error": f"{type(e).__name__}: {e}", "text": task[0]}
        sys.stdout.write(json.dumps(res) + "\n")
        sys.stdout.flush()
        if "error" in res:
            return 1
    return 0


def _run_parallel(tasks: list[tuple[str, str, int, int]], workers: int, tmpdir: str) -> Iterator[dict[str, Any]]:
    """Yield results from `workers` subprocesses (`python -m pflm.evaluation.asr_nbest --worker FILE`), round-robin split.

    Plain subprocesses instead of multiprocessing: callers need no `if __name__ == "__main__"` guard and nothing is
    forked from a parent that may hold torch threads.
    """
    results: queue.Queue[dict[str, Any] | None] = queue.Queue()
    procs = []
    for w in range(workers):
        task_file = os.path.join(tmpdir, f"tasks-{w}.jsonl")
        with open(task_file, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(t) + "\n" for t in tasks[w::workers])
        err = open(os.path.join(tmpdir, f"stderr-{w}.txt"), "w+", encoding="utf-8")
        cmd = [sys.executable, "-m", "pflm.evaluation.asr_nbest", "--worker", task_file]
        procs.append((subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True), err))

    def pump(proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("{"):
                results.put(json.loads(line))
        results.put(None)

    threads = [threading.Thread(target=pump, args=(p,), daemon=True) for p, _ in procs]
    for t in threads:
        t.start()
    try:
        done = 0
        while done < len(procs):
            item = results.get()
            if item is None:
                done += 1
            elif "error" in item:
                raise PflmError(f"N-best worker failed on {item['text'][:40]!r}: {item['error']}")
            else:
                yield item
        for p, err in procs:
            if p.wait() != 0:
                err.seek(0)
                raise PflmError(f"N-best worker exited with {p.returncode}: {err.read().strip()[-300:]}")
    finally:
        for p, err in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
            err.close()


def _load_cached(path: Path, text: str) -> dict[str, Any] | None:
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(entry, dict) or entry.get("text") != text or not entry.get("hyps"):
        return None  # corrupt or colliding entry: decode again
    return entry


def generate_nbest_with_stats(
    sentences: Sequence[tuple[str, str]],
    out_path: str | os.PathLike,
    voice: str = "slt",
    nbest: int = 50,
    cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR,
    normalize: Callable[[str], str] | None = None,
    workers: int = 2,
) -> tuple[Path, GenerationStats]:
    """Synthesize each (utt_id, text) with flite, decode with pocketsphinx, write the N-best JSONL to `out_path`;
    returns (its path, timing statistics).

    Refs and hypotheses are normalized with `normalize` (default: the training-text normalizer). Decoding results are
    cached per sentence under `cache_dir`, keyed by a hash of the text, voice, N-best size, decoder config and tool
    versions, so repeated calls only re-read the cache.
    """
    cfg = GenerationConfig(voice=voice, nbest=nbest, workers=workers)
    if not sentences:
        raise DataError("no sentences to synthesize; give at least one (utt_id, text) pair")
    ids = [u for u, _ in sentences]
    if len(set(ids)) != len(ids):
        raise DataError("utterance ids must be unique; make each utt_id distinct")
    norm = resolve_normalize(normalize)
    check_tools()
    t_start = time.perf_counter()
    versions = _tool_versions()
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    stats = GenerationStats(utterances=len(sentences))

    entries: dict[str, dict[str, Any]] = {}
    todo: list[str] = []
    for text in dict.fromkeys(t for _, t in sentences):  # distinct texts, in order
        hit = _load_cached(cache / f"{cache_key(text, cfg, versions)}.json", text)
        if hit is not None:
            entries[text] = hit
        else:
            todo.append(text)
    stats.cached = len(entries)
    if todo:
        tasks = [(t, cfg.voice, cfg.nbest, cfg.max_raw_hyps) for t in todo]
        n_workers = min(cfg.workers, len(tasks))
        with tempfile.TemporaryDirectory(prefix="pflm-nbest-") as tmpdir:
            results = map(_work, tasks) if n_workers == 1 else _run_parallel(tasks, n_workers, tmpdir)
            for res in results:
                atomic_write_json(cache / f"{cache_key(res['text'], cfg, versions)}.json", res)
                entries[res["text"]] = res
                stats.decoded += 1
                stats.audio_seconds += res["audio_seconds"]
                stats.worker_seconds += res["worker_seconds"]

    utts = []
    for utt_id, text in sentences:
        merged: dict[str, float] = {}
        for hyp_text, score in entries[text]["hyps"]:
            key = norm(hyp_text)
            merged[key] = max(score, merged.get(key, -math.inf))
        ranked = sorted(merged.items(), key=lambda kv: -kv[1])[: cfg.nbest]
        utts.append(
            NBestUtterance(utt_id=utt_id, ref=norm(text), nbest=tuple(Hypothesis(t, s) for t, s in ranked))
        )
    path = write_nbest(out_path, utts)
    stats.wall_seconds = time.perf_counter() - t_start
    log.info("N-best for %d utterances -> %s (%d cached, %d decoded)", len(utts), path, stats.cached, stats.decoded)
    return path, stats


def generate_nbest(sentences: Sequence[tuple[str, str]], out_path: str | os.PathLike, **options: Any) -> Path:
    """`generate_nbest_with_stats` (same options: voice, nbest, cache_dir, normalize, workers) without the statistics."""
    return generate_nbest_with_stats(sentences, out_path, **options)[0]


if __name__ == "__main__":  # a worker of `_run_parallel`
    if sys.argv[1:2] != ["--worker"] or len(sys.argv) != 3:
        sys.exit("usage: python -m pflm.evaluation.asr_nbest --worker TASK_FILE (started by generate_nbest)")
    sys.exit(_worker_main(sys.argv[2]))
