"""The `pflm` command line: one subcommand per pipeline stage; user errors print one line and exit 2."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

Registrar = Callable[[argparse._SubParsersAction], None]

# Each command module exposes `register(subparsers)`, adding its subcommand(s) with `set_defaults(func=...)`;
# `func(args)` returns an exit code (or None for 0). The imports sit inside these functions so that a command
# loads only its own stage (`pflm privacy` never imports `datasets`, `pflm prepare` never imports opacus).


def _prepare(sub: argparse._SubParsersAction) -> None:
    from pflm.data.prepare import register

    register(sub)


def _train(sub: argparse._SubParsersAction) -> None:
    from pflm.commands.train import register

    register(sub)


def _device_report(sub: argparse._SubParsersAction) -> None:
    from pflm.commands.device_report import register

    register(sub)


def _node_worker(sub: argparse._SubParsersAction) -> None:
    from pflm.commands.node_worker import register

    register(sub)


def _privacy(sub: argparse._SubParsersAction) -> None:
    from pflm.privacy.cli import register

    register(sub)


def _rescore(sub: argparse._SubParsersAction) -> None:
    from pflm.evaluation.rescore_cli import register

    register(sub)


def _pretrain(sub: argparse._SubParsersAction) -> None:
    from pflm.commands.pretrain import register

    register(sub)


def _sweep(sub: argparse._SubParsersAction) -> None:
    from pflm.commands.sweep import register

    register(sub)


def _report(sub: argparse._SubParsersAction) -> None:
    from pflm.commands.report import register

    register(sub)


def _audit(sub: argparse._SubParsersAction) -> None:
    from pflm.commands.audit import register

    register(sub)


COMMANDS: dict[str, Registrar] = {
    "prepare": _prepare,
    "train": _train,
    "eval": _train,
    "device-report": _device_report,
    "node-worker": _node_worker,
    "privacy": _privacy,
    "rescore": _rescore,
    "nbest": _rescore,
    "sweep": _sweep,
    "report": _report,
    "audit": _audit,
    "pretrain": _pretrain,
}
SUBCOMMAND_MODULES: list[Registrar] = list(dict.fromkeys(COMMANDS.values()))  # all of them, each once (--help)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """Register only the invoked command's stage (torch etc. load lazily); all of them for --help."""
    parser = argparse.ArgumentParser(prog="pflm", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    first = next((a for a in (argv or []) if not a.startswith("-")), None)
    for register in [COMMANDS[first]] if first in COMMANDS else SUBCOMMAND_MODULES:
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from pflm.errors import PflmError

    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args, extra = parser.parse_known_args(argv)
    # `k=v` overrides may follow options (`pflm train R --no-progress rounds=3`): argparse leaves them over.
    if extra and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except PflmError as e:
        print(f"pflm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pflm {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
