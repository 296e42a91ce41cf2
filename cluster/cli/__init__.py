"""The `gptoss-cluster` command: one sub-command group per module in this package."""

from __future__ import annotations

import argparse
import importlib
import sys

# Each module exposes `register(subparsers)`; it adds its sub-commands and sets `func` on them.
# Modules are imported lazily by name so `gptoss-cluster --help` stays fast.
COMMAND_MODULES = (
    "cluster.cli.serve",
    "cluster.cli.frontdoor",
    "cluster.cli.client",
    "cluster.cli.checkpoint",
    "cluster.cli.bench",
    "cluster.cli.simulate",
    "cluster.cli.experts",
    "cluster.cli.tiny",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptoss-cluster", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name == name:  # not written yet; any other missing import is a real error
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
