"""`lifealign axolotl-chain CHAIN.yml` (also `python -m axolotl_plugin.chain CHAIN.yml`): the command line of the
Axolotl chain. Importing it costs nothing: the chain runner and Axolotl are imported when the command runs."""

from __future__ import annotations

import sys


def _command(args) -> int:
    import importlib.util

    from .spec import ChainError, load_chain

    if importlib.util.find_spec("axolotl") is None:
        raise ChainError("Axolotl is not installed in this environment: pip install 'trl-lifealign[axolotl]'")
    from .chain import launch_command, run_chain, validate_chain
    from .spec import STAGE_CONFIG_FILE, render_stage_config, stage_dir

    chain = load_chain(args.chain)
    if args.dry_run:
        import yaml

        configs = validate_chain(chain) if not args.no_validate else [
            render_stage_config(chain, i) for i in range(len(chain.stages))]
        for index, (stage, config) in enumerate(zip(chain.stages, configs)):
            command = launch_command(chain, stage_dir(chain, index) / STAGE_CONFIG_FILE)
            print(f"# stage {stage.name}: {' '.join(command)}")
            print(yaml.safe_dump(config, sort_keys=False))
        return 0
    state = run_chain(chain, validate=not args.no_validate, evaluate=not args.no_eval)
    finished = sum(1 for record in state["stages"].values() if record.get("finished"))
    print(f"[lifealign] chain done: {finished}/{len(chain.stages)} stages in {chain.output_dir}")
    return 0


def add_commands(subparsers) -> None:
    """Register `lifealign axolotl-chain`."""
    parser = subparsers.add_parser(
        "axolotl-chain",
        help="run a chain of Axolotl FPO stages with memory consolidation (resumes an interrupted chain)",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("chain", help="chain YAML file (base Axolotl YAML + ordered stages)")
    parser.add_argument("--dry-run", action="store_true", help="validate and print every stage's config, run nothing")
    parser.add_argument("--no-validate", action="store_true", help="skip the in-process Axolotl validation")
    parser.add_argument("--no-eval", action="store_true", help="skip the per-stage evaluation even if configured")
    parser.set_defaults(func=_command)


def main(argv: list[str] | None = None) -> int:
    """`python -m axolotl_plugin.chain CHAIN.yml` (same as `lifealign axolotl-chain CHAIN.yml`)."""
    from trl_lifealign.cli import main as lifealign_main

    return lifealign_main(["axolotl-chain", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
