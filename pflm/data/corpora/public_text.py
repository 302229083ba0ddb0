"""Public English text for central pretraining: the chatterbot-corpus PyPI package (BSD-3-Clause, offline).

`chatterbot-corpus` 1.3.3 ships hand-written English dialogues (greetings, small talk, trivia, …) as YAML files in
the package: about 7k utterances / 41k words, conversational like the chitchat users. It contains no pflm user
data, so a model trained only on it is public; it is installed by pyproject.toml, nothing is downloaded at run time.
Each YAML file (a topic) becomes one "user" when the corpus is prepared with `pflm prepare --corpus chatterbot`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from pflm.errors import DataError

NAME = "chatterbot"
LICENSE = "BSD-3-Clause (chatterbot-corpus 1.3.3, PyPI)"
DEFAULTS = {"model_type": "word", "vocab_size": 10_000, "min_sentences": 1}


def _data_dir() -> Path:
    try:
        import chatterbot_corpus
    except ImportError:
        raise DataError("the chatterbot-corpus package is missing; run `pip install chatterbot-corpus==1.3.3`") from None
    path = Path(chatterbot_corpus.__file__).parent / "data" / "english"
    if not path.is_dir():
        raise DataError(f"{path} not found; reinstall chatterbot-corpus==1.3.3")
    return path


def _strings(node: object) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, (list, tuple)):
        for x in node:
            yield from _strings(x)


def iter_rows() -> Iterator[tuple[str, str]]:
    """(topic, utterance) for every English utterance, topics in file-name order."""
    import yaml

    for path in sorted(_data_dir().glob("*.yml")):
        doc = yaml.load(path.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) or {}
        for text in _strings(doc.get("conversations", [])):
            if text.strip():
                yield path.stem, text.strip()


def load(max_users: int | None = None) -> dict[str, list[str]]:
    """Column dict {"user": topic, "text": utterance} (for `datasets.Dataset.from_dict`)."""
    users: list[str] = []
    texts: list[str] = []
    for u, t in iter_rows():
        if max_users is not None and u not in users and len(set(users)) >= max_users:
            continue
        users.append(u)
        texts.append(t)
    if not texts:
        raise DataError("chatterbot-corpus yielded no English utterances; reinstall chatterbot-corpus==1.3.3")
    return {"user": users, "text": texts}


def sentences() -> list[str]:
    """Every English utterance (raw text; normalise with the target data's normaliser)."""
    return [t for _, t in iter_rows()]
