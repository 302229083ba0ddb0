"""The `pflm` command line: one subcommand per pipeline stage; user errors print one line and exit 2."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# Each module exposes `register(subparsers)`, adding its subcommand(s) with `set_defaults(func=...)`;
# `func(args)` returns an exit code (or None for 0).
COMMANDS = {
    "prepare": "pflm.data.prepare",
    "train": "pflm.simulation.cli",
    "eval": "pflm.simulation.cli",
    "device-report": "pflm.device.report",
    "privacy": "pflm.privacy.cli",
    "rescore": "pflm.evaluation.rescore_cli",
    "nbest": "pflm.evaluation.rescore_cli",
}
SUBCOMMAND_MODULES = list(dict.fromkeys(COMMANDS.values()))


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """Import only the invoked stage's module (torch etc. load lazily); all of them for --help."""
    parser = argparse.ArgumentParser(prog="pflm", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    first = next((a for a in (argv or []) if not a.startswith("-")), None)
    modules = [COMMANDS[first]] if first in COMMANDS else SUBCOMMAND_MODULES
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:  # a stage not built yet must not break the others
            if e.name == name:
                continue
            raise
        module.register(sub)
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
