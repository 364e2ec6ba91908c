"""The ``lifealign`` command line (also ``python -m trl_lifealign``).

Each sub-command lives beside the code it drives; a module listed in ``COMMAND_MODULES`` exposes
``add_commands(subparsers)`` and registers its parsers with ``set_defaults(func=...)``. Command modules keep their
heavy and optional imports inside the command functions, so ``lifealign --help`` imports no torch, and a command whose
optional dependencies are missing is still listed and fails, when run, with a message saying what to install.

Errors about the user's input (``trl_lifealign.errors.LifeAlignError``: recipe, data, run directory, adapter, memory)
are printed as one line and exit with status 2; third-party warnings and progress bars are hidden unless
``--verbose``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .errors import LifeAlignError

COMMAND_MODULES = (
    "trl_lifealign.lifelong.commands",  # train, report, demo
    "trl_lifealign.fpo.script",  # fpo
    "trl_lifealign.pretrained",  # fetch-model
    "axolotl_plugin.commands",  # axolotl-chain
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lifealign", description="Lifelong preference alignment (FPO + memory consolidation) for TRL and Axolotl."
    )
    parser.add_argument("--verbose", action="store_true",
                        help="show third-party warnings, notices and dataset progress bars")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).add_commands(subparsers)
    return parser


def _passthrough(argv: list[str]) -> list[str] | None:
    """The arguments after ``fpo`` when that is the command: they belong to TRL's DPO-script parser, whose options
    (``--help`` included) argparse would otherwise take for ours or reorder."""
    for index, token in enumerate(argv):
        if token == "fpo":
            return argv[index + 1:]
        if token != "--verbose":
            return None
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    fpo_arguments = _passthrough(argv)
    if fpo_arguments is not None:
        from .fpo.script import run

        try:
            return int(run(fpo_arguments) or 0)
        except LifeAlignError as error:
            if os.environ.get("LIFEALIGN_DEBUG"):
                raise
            print(f"lifealign fpo: error: {error}", file=sys.stderr)
            return 2
    parser = build_parser()
    args = parser.parse_args(argv)
    from .compat import quiet_third_party

    try:
        with quiet_third_party(enabled=not args.verbose and getattr(args, "quiet", True)):
            return int(args.func(args) or 0)
    except LifeAlignError as error:
        if os.environ.get("LIFEALIGN_DEBUG"):
            raise
        print(f"lifealign {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
