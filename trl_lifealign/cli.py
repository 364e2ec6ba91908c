"""The ``lifealign`` command line (also ``python -m trl_lifealign``).

Each sub-command lives beside the code it drives; a module listed in ``COMMAND_MODULES`` exposes
``add_commands(subparsers)`` and registers its parsers with ``set_defaults(func=...)``. Command modules keep their
heavy and optional imports inside the command functions: a command whose optional dependencies are missing (e.g. the
Axolotl chain without Axolotl) is still listed and fails, when run, with a message saying what to install.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = (
    "trl_lifealign.lifelong.commands",  # train, report, demo
    "trl_lifealign.lifelong.bench",  # bench
    "axolotl_plugin.chain",  # axolotl-chain
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lifealign", description="Lifelong preference alignment (FPO + memory consolidation) for TRL and Axolotl."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).add_commands(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
