"""``composer-shear``: the user-facing commands of composer_shear.

Every option's help shows its default (:class:`HelpFormatter`, set once here for every
subcommand). Exit codes follow :mod:`composer_shear.interface`: 2 for a wrong command line
(argparse's errors and :class:`~composer_shear.interface.UsageError`), 1 for a command that
failed, 0 otherwise; errors go to stderr.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from composer_shear import __version__
from composer_shear.interface import UsageError


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, plus ``(default: X)`` after every option that has a default.

    Unlike ``argparse.ArgumentDefaultsHelpFormatter`` it leaves out defaults that mean "not
    given" (``None``, a flag's ``False``), and help that already says its default.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        shown = (
            action.option_strings
            # --help and --version have SUPPRESS as their default. Identity, not ==: a
            # default of 0 is shown, a flag's False is not.
            and not any(default is hidden for hidden in (None, False, argparse.SUPPRESS))
            and "default" not in text.lower()
        )
        if not shown:
            return action.help
        if isinstance(default, (list, tuple)):
            default = " ".join(str(item) for item in default)
        # Help strings are %-formatted by argparse: a literal % in the value must be doubled.
        return f"{text} (default: {str(default).replace('%', '%%')})"


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` with :class:`HelpFormatter`; subcommands inherit the class."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


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

    parser = Parser(
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
    for subparser in subparsers.choices.values():
        # main() reports a handler's UsageError through the subcommand's own parser (its
        # usage line and exit 2, as argparse does for what it rejects itself).
        subparser.set_defaults(command_parser=subparser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``composer-shear`` console script.

    Returns:
        The exit code: 0 done, 1 the command failed, 2 a wrong command line.
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except UsageError as error:
        args.command_parser.error(str(error))  # prints usage and the error, exits 2


if __name__ == "__main__":
    sys.exit(main())
