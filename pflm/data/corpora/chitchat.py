"""The embedded real default corpus: chitchat-dataset messages (PyPI, offline), one user per sender."""

from __future__ import annotations

from typing import Iterator

from pflm.errors import DataError

# Recipe defaults for `pflm prepare --corpus chitchat` (CLI flags override them).
DEFAULTS = {"model_type": "word", "vocab_size": 10_000, "min_sentences": 5}


def iter_rows(max_users: int | None = None) -> Iterator[tuple[str, str]]:
    """Yield (sender, text) for every message; with `max_users`, only the first `max_users` senders seen
    (in the package's conversation order), for fast tests."""
    try:
        import chitchat_dataset as ccc
    except ImportError:  # pragma: no cover - it is a declared dependency
        raise DataError("the chitchat-dataset package is missing; run `pip install chitchat-dataset`") from None
    seen: set[str] = set()
    for convo in ccc.Dataset().values():
        for turn in convo["messages"]:
            for msg in turn:
                sender, text = msg.get("sender"), msg.get("text")
                if not sender or not isinstance(text, str):
                    continue
                if max_users is not None and sender not in seen:
                    if len(seen) >= max_users:
                        continue
                    seen.add(sender)
                yield sender, text


def load(max_users: int | None = None) -> dict[str, list[str]]:
    """Column dict {"user": [...], "text": [...]} of chitchat messages (for `datasets.Dataset.from_dict`)."""
    users: list[str] = []
    texts: list[str] = []
    for u, t in iter_rows(max_users):
        users.append(u)
        texts.append(t)
    if not texts:
        raise DataError("chitchat-dataset yielded no messages; reinstall the chitchat-dataset package")
    return {"user": users, "text": texts}
