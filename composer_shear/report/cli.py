"""``composer-shear report RUN_DIR``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from composer_shear.report.markdown import build_report


def _run_cli(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        print(f"error: no such run folder: {run_dir}", file=sys.stderr)
        return 1
    try:
        report = build_report(run_dir, generations=not args.no_generations)
    except (OSError, ValueError) as error:
        # A model directory of run.json that is gone (interface.ModelPathError), a metrics
        # file that does not parse.
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(report)
    return 0


def register_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Adds the ``report`` subcommand to an ``argparse`` subparsers object."""
    parser = subparsers.add_parser(
        "report",
        help="write RUN_DIR/report/report.md with tables, plots and sample generations",
        description=(
            "Turn a run folder (run.json, metrics/*.jsonl, eval/losses.json, model "
            "directories) into RUN_DIR/report/report.md plus PNG plots. Prints the path."
        ),
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run folder")
    parser.add_argument(
        "--no-generations",
        action="store_true",
        help="do not load models to generate samples (a cached generations.json is still used)",
    )
    parser.set_defaults(func=_run_cli)
    return parser
