"""Command-line subcommands above every backend: each module exposes `register(subparsers)`."""
