"""The `pflm` command line: one subcommand per pipeline stage; user errors print one line and exit 2."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# Each module exposes `register(subparsers)`, adding its subcommand(s) with `set_defaults(func=...)`;
# `func(args)` returns an exit code (or None for 0).
SUBCOMMAND_MODULES = [
    "pflm.data.prepare",  # pflm prepare
    "pflm.simulation.cli",  # pflm train / pflm eval
    "pflm.device.report",  # pflm device-report
    "pflm.privacy.cli",  # pflm privacy epsilon|calibrate|plan
    "pflm.evaluation.rescore_cli",  # pflm rescore / pflm nbest
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pflm", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
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

    parser = build_parser()
    args = parser.parse_args(argv)
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
