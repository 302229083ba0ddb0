"""`pflm node-worker`: the warm device process a Flower SuperNode's ClientApps forward their train tasks to."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "node-worker",
        help="keep torch and the device trainer loaded for a Flower SuperNode (pflm.flower.warm)",
        description="Serve this SuperNode's train tasks on a Unix socket, keeping torch, the model and the data "
        "loaded between Flower messages. Start it beside `flower-supernode` and add worker=\"SOCKET\" to the "
        "node's --node-config.",
    )
    p.add_argument("--socket", required=True, help="Unix socket path (its key is written to SOCKET.key, mode 0600)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from pflm.errors import ConfigError
    from pflm.flower.warm import serve

    if args.threads < 0:
        raise ConfigError(f"--threads {args.threads} must be >= 0 (0 = torch's default)")
    try:
        serve(args.socket, threads=args.threads)
    except KeyboardInterrupt:
        pass
    return 0
