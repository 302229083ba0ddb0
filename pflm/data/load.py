"""Load raw (user, text) rows through Hugging Face `datasets`, turning bad input into one-line `DataError`s."""

from __future__ import annotations

import codecs
import glob
import os
from pathlib import Path

import datasets

from pflm.errors import DataError

# File suffix -> `datasets` builder name.
_BUILDERS = {
    ".jsonl": "json",
    ".json": "json",
    ".ndjson": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".tsv": "csv",
    ".txt": "text",
    ".text": "text",
}
_TEXT_BUILDERS = {"json", "csv", "text"}  # formats whose bytes must be valid UTF-8
_CHUNK = 1 << 20


def check_utf8(path: str | os.PathLike) -> None:
    """Raise `DataError` naming the file and byte offset of the first invalid UTF-8 sequence (streamed, O(1) RAM)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
    offset = 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_CHUNK)
            final = not chunk
            try:
                decoder.decode(chunk, final=final)
            except UnicodeDecodeError as e:
                # e.start is relative to the bytes the decoder saw in this call (pending bytes + chunk).
                pending = len(e.object) - len(chunk)
                pos = offset - pending + e.start
                raise DataError(
                    f"{path}: invalid UTF-8 at byte offset {pos} (byte 0x{e.object[e.start]:02x}); "
                    "re-encode the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"
                ) from None
            if final:
                return
            offset += len(chunk)


def _looks_local(source: str) -> bool:
    """A path (existing or not), as opposed to a hub name like "owner/name"."""
    return (
        source.startswith((".", "/", "~"))
        or Path(source).suffix.lower() in _BUILDERS
        or any(ch in source for ch in "*?")
        or Path(source).expanduser().exists()
    )


def _local_files(source: str) -> tuple[str, list[str]]:
    path = Path(source).expanduser()
    if any(ch in source for ch in "*?"):
        files = sorted(glob.glob(str(path)))
    elif path.is_dir():
        files = sorted(str(p) for p in path.iterdir() if p.is_file() and p.suffix.lower() in _BUILDERS)
        if not files:
            raise DataError(f"{source}: directory has no {'/'.join(sorted(_BUILDERS))} files; point --input at a file")
    elif path.is_file():
        files = [str(path)]
    else:
        raise DataError(f"input file not found: {source}; check the path given to --input")
    if not files:
        raise DataError(f"no files match {source}; check the pattern given to --input")
    suffixes = {Path(f).suffix.lower() for f in files}
    unknown = sorted(s for s in suffixes if s not in _BUILDERS)
    if unknown:
        raise DataError(
            f"{source}: unsupported file type {unknown[0] or '(none)'}; use one of {', '.join(sorted(_BUILDERS))}"
        )
    builders = {_BUILDERS[s] for s in suffixes}
    if len(builders) > 1:
        raise DataError(f"{source}: mixes file types {sorted(suffixes)}; give files of one type")
    return builders.pop(), files


def load_table(
    source: str,
    text_column: str = "text",
    user_column: str | None = None,
    hub_split: str = "train",
) -> datasets.Dataset:
    """Load `source` (a local file / directory / glob, or a hub dataset name) and return a `Dataset` with
    columns `text` (and `user` when `user_column` is given), unmodified. Raises `DataError` on bad input."""
    if _looks_local(source):
        builder, files = _local_files(source)
        if builder in _TEXT_BUILDERS:
            for f in files:
                check_utf8(f)
        if builder == "text" and user_column:
            raise DataError(f"{source}: plain-text files have no user column; drop --user-column or use JSONL/CSV")
        kwargs = {"delimiter": "\t"} if builder == "csv" and files[0].lower().endswith(".tsv") else {}
        if all(os.path.getsize(f) == 0 for f in files):
            raise DataError(f"{source}: input is empty (0 bytes); give a file with at least one sentence")
        try:
            ds = datasets.load_dataset(builder, data_files=files, split="train", **kwargs)
        except Exception as e:  # datasets raises many types for malformed files
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(f"{source}: could not parse as {builder}: {first}; fix the file format") from None
    else:
        try:
            ds = datasets.load_dataset(source, split=hub_split)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(
                f"could not load hub dataset {source!r} (split {hub_split!r}): {first}; check the name, go online "
                "(unset HF_DATASETS_OFFLINE) or give a local file"
            ) from None
    if isinstance(ds, datasets.DatasetDict):  # pragma: no cover - split= makes this unreachable
        ds = ds[hub_split]
    return select_columns(ds, source, text_column, user_column)


def select_columns(
    ds: datasets.Dataset, source: str, text_column: str, user_column: str | None
) -> datasets.Dataset:
    """Keep and rename the text (and user) columns; `DataError` listing the available columns if one is missing."""
    available = list(ds.column_names)
    for flag, col in (("--text-column", text_column), ("--user-column", user_column)):
        if col is not None and col not in available:
            raise DataError(f"{source}: unknown column {col!r} for {flag}; available columns: {', '.join(available)}")
    if ds.num_rows == 0:
        raise DataError(f"{source}: corpus is empty (0 rows); give data with at least one sentence")
    keep = [text_column] + ([user_column] if user_column else [])
    ds = ds.select_columns(keep)
    mapping = {text_column: "text"}
    if user_column:
        mapping[user_column] = "user"
    mapping = {k: v for k, v in mapping.items() if k != v}
    if mapping:
        if any(v in ds.column_names and v not in mapping for v in mapping.values()):  # pragma: no cover
            raise DataError(f"{source}: column name clash while renaming {mapping}")
        ds = ds.rename_columns(mapping)
    return ds
