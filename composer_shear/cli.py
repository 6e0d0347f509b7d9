"""``composer-shear``: the user-facing commands of composer_shear."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from composer_shear import __version__


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand registered."""
    # Imported here, not at the top: each pulls in torch / transformers / Composer, and
    # `composer-shear --help` should not pay for them before the parser exists.
    from composer_shear import demo, plan, weights
    from composer_shear.data import prep, reference_loss
    from composer_shear.downstream import data as downstream_data
    from composer_shear.downstream import evaluate as downstream_evaluate
    from composer_shear.export import checkpoint as export
    from composer_shear.export import oneshot
    from composer_shear.report import cli as report_cli

    parser = argparse.ArgumentParser(
        prog="composer-shear",
        description=(
            "Sheared-LLaMA targeted structured pruning and dynamic batch loading for "
            "LLM Foundry. Training runs through `llmfoundry train` / `composer -n N`; these "
            "commands prepare data and models and export results."
        ),
    )
    parser.add_argument("--version", action="version", version=f"composer_shear {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    weights.register_cli(subparsers)
    prep.register_cli(subparsers)
    reference_loss.register_cli(subparsers)
    export.register_cli(subparsers)
    oneshot.register_cli(subparsers)
    report_cli.register_cli(subparsers)
    downstream_data.register_cli(subparsers)
    downstream_evaluate.register_cli(subparsers)
    plan.register_cli(subparsers)
    demo.register_cli(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``composer-shear`` console script."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
