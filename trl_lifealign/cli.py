"""The ``lifealign`` command line (also ``python -m trl_lifealign``).

Each sub-command lives beside the code it drives; a module listed in ``COMMAND_MODULES`` exposes
``add_commands(subparsers)`` and registers its parsers with ``set_defaults(func=...)``. A module whose optional
dependencies are missing (e.g. the Axolotl chain without Axolotl) still registers its command and fails, when run,
with a message saying what to install.
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
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            # Only a module that is not written yet may be absent; a missing dependency inside it is a real error.
            if error.name != module_name:
                raise
            continue
        module.add_commands(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
