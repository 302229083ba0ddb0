"""Public English text for central pretraining: the usage examples of WordNet 3.0 (Debian `wordnet-base`, offline).

WordNet's synset glosses end with quoted usage examples ("he ran to the store", "the car rear-ended me"): about
48k short everyday English sentences and phrases, 285k words, 19× the chatterbot-corpus. Licence: the WordNet 3.0
licence (Princeton University; permission to use, copy, modify and distribute for any purpose, keep the copyright
notice) — permissive. It holds no pflm user data. Install with `apt-get install wordnet-base` (files under
/usr/share/wordnet); `$WNHOME/dict` or `$WNSEARCHDIR` (the layout of the upstream tarball and of NLTK's copy) also
work. Nothing is downloaded at run time. Only the examples are used, not the definitions (dictionary prose).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterator

from pflm.errors import DataError

NAME = "wordnet-examples"
LICENSE = "WordNet 3.0 licence (Princeton University; permissive), Debian package wordnet-base"
DATA_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")
DEFAULT_DIRS = ("/usr/share/wordnet",)
_QUOTED = re.compile(r'"([^"]+)"')


def data_dir() -> Path:
    """The first directory holding WordNet's data.* files: $WNSEARCHDIR, $WNHOME/dict, then Debian's path."""
    candidates = [os.environ.get("WNSEARCHDIR"), os.environ.get("WNHOME") and os.path.join(os.environ["WNHOME"], "dict")]
    for c in [*candidates, *DEFAULT_DIRS]:
        if c and all((Path(c) / f).is_file() for f in DATA_FILES):
            return Path(c)
    raise DataError("WordNet data files not found; run `apt-get install wordnet-base` (or set WNSEARCHDIR to a "
                    "directory with data.noun/data.verb/data.adj/data.adv)")


def iter_examples(directory: Path | None = None) -> Iterator[str]:
    """Every quoted usage example of every synset, in file order (duplicates kept)."""
    directory = directory or data_dir()
    for name in DATA_FILES:
        with open(directory / name, encoding="latin-1") as f:  # WordNet 3.0 files are 8-bit
            for line in f:
                if line.startswith("  ") or "|" not in line:  # licence header lines start with two spaces
                    continue
                for example in _QUOTED.findall(line.split("|", 1)[1]):
                    if example.strip():
                        yield example.strip()


def sentences(directory: Path | None = None) -> list[str]:
    """The usage examples (raw text; normalise with the target data's normaliser)."""
    out = list(iter_examples(directory))
    if not out:
        raise DataError(f"no usage examples found in {directory or data_dir()}; is it a WordNet 3.0 dict directory?")
    return out
