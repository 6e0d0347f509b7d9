r"""One-shot structured pruning: keep the most important units, no training.

Importance comes from activations on a few calibration batches
(:mod:`composer_shear.pruning.importance`, Minitron / ShortGPT style), or at random (a
baseline). The
kept units go through the *same* surgery as learned gates
(:func:`composer_shear.export.surgery.plan_from_masks`), so a one-shot model and a learned one are
sliced by one code path and load the same way.

Python::

    from composer_shear.export.oneshot import prune_oneshot
    compact = prune_oneshot(model, {"num_hidden_layers": 24, "hidden_size": 512}, batches)

Command line::

    composer-shear prune-oneshot SOURCE OUT --data DATA_DIR --target-shape \
        num_hidden_layers=24,hidden_size=512,num_attention_heads=6,intermediate_size=1152
    composer-shear prune-oneshot SOURCE OUT --units PRUNED_DIR   # another run's unit choice
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from composer_shear.data.calibration import calibration_batches
from composer_shear.export.surgery import PruningPlan, plan_from_masks, prune_model
from composer_shear.export.units import kept_units_record, read_kept_units, units_plan
from composer_shear.export.writer import (
    ExportError,
    check_out_dir,
    provenance,
    write_hf_directory,
)
from composer_shear.families import get_family
from composer_shear.pruning.gates import top_k_mask
from composer_shear.pruning.importance import (
    Importance,
    collect_importance,
    random_importance,
    unit_scores,
)
from composer_shear.pruning.masking import gate_specs
from composer_shear.shape import TARGET_KEYS, ModelShape, ShapeError

__all__ = [
    "METHODS",
    "OneshotSummary",
    "keep_masks_from_scores",
    "oneshot_plan",
    "parse_target_shape",
    "prune_oneshot",
    "prune_oneshot_to_dir",
    "register_cli",
]

METHODS = ("activation", "random")


def keep_masks_from_scores(
    scores: Mapping[str, torch.Tensor], source: ModelShape, target: ModelShape
) -> dict[str, torch.Tensor]:
    """The top-scored units of every row, for every dimension the target shrinks.

    Returns:
        Boolean masks shaped like the gates (see :func:`composer_shear.pruning.masking.gate_specs`).
    """
    masks = {}
    for name, (shape, keep) in gate_specs(source, target).items():
        score = scores[name].float()
        if tuple(score.shape) != shape:
            raise ValueError(f"{name}: scores of shape {tuple(score.shape)}, expected {shape}")
        masks[name] = top_k_mask(score, keep)
    return masks


def oneshot_plan(
    model: nn.Module, target_shape: Mapping[str, Any], importance: Importance
) -> PruningPlan:
    """What one-shot pruning keeps of ``model`` for ``target_shape``."""
    source = get_family(model).shape(model.config)
    target = source.resolve_target(dict(target_shape))
    keep = keep_masks_from_scores(unit_scores(importance, source), source, target)
    return plan_from_masks(source, target, keep)


def prune_oneshot(
    model: nn.Module,
    target_shape: Mapping[str, Any],
    batches: Iterable[Any] | None = None,
    method: str = "activation",
    seed: int = 0,
) -> nn.Module:
    """Returns the compact model that keeps the most important units of ``model``.

    Args:
        model: A Hugging Face causal LM of a supported family (eval mode is set).
        target_shape: The shape to reach (keys of :data:`composer_shear.shape.TARGET_KEYS`).
        batches: Calibration batches (``input_ids`` tensors or dicts); needed for
            ``activation``.
        method: ``activation`` (importance from activations) or ``random``.
        seed: Seed of ``random``.
    """
    model.eval()
    importance = _importance(model, batches, method, seed)
    return prune_model(model, plan=oneshot_plan(model, target_shape, importance))


def _importance(model: nn.Module, batches: Any, method: str, seed: int) -> Importance:
    if method == "random":
        return random_importance(get_family(model).shape(model.config), seed)
    if method != "activation":
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if batches is None:
        raise ValueError("activation importance needs calibration batches")
    return collect_importance(model, batches)


# -- calibration data ------------------------------------------------------------------------


# -- command line ----------------------------------------------------------------------------


def parse_target_shape(text: str) -> dict[str, int]:
    """``"num_hidden_layers=24,hidden_size=512"`` (or a JSON object) -> a target mapping."""
    text = text.strip()
    if text.startswith("{"):
        value = json.loads(text)
        if not isinstance(value, dict):
            raise ShapeError("--target-shape JSON must be an object")
        return {str(k): v for k, v in value.items()}
    target: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ShapeError(f"--target-shape: expected KEY=VALUE, got {item!r}")
        if key.strip() not in TARGET_KEYS:
            raise ShapeError(f"--target-shape: unknown key {key!r}; allowed: {list(TARGET_KEYS)}")
        try:
            target[key.strip()] = int(value)
        except ValueError:
            raise ShapeError(f"--target-shape: {key}={value!r} is not an integer") from None
    if not target:
        raise ShapeError("--target-shape is empty")
    return target


@dataclass
class OneshotSummary:
    """What :func:`prune_oneshot_to_dir` wrote."""

    out_dir: Path
    source: ModelShape
    target: ModelShape
    calibration_tokens: int
    seconds: float

    def describe(self) -> str:
        """Human-readable lines for the CLI."""
        return "\n".join(
            [
                f"source : {self.source.describe()}",
                f"pruned : {self.target.describe()}",
                f"written: {self.out_dir} ({self.seconds:.1f}s)",
            ]
        )


def prune_oneshot_to_dir(
    source: str | Path,
    out_dir: str | Path,
    target_shape: Mapping[str, Any] | None = None,
    *,
    data: str | Path | None = None,
    units: str | Path | None = None,
    method: str = "activation",
    calibration_tokens: int = 65536,
    max_seq_len: int = 2048,
    batch_size: int = 8,
    domains: Sequence[str] | None = None,
    seed: int = 0,
    overwrite: bool = False,
) -> OneshotSummary:
    """The one-shot pipeline: load a HF model, cut it, write the compact HF directory.

    ``composer-shear prune-oneshot`` is a thin wrapper of this function.

    Args:
        source: Hugging Face model directory (or hub id) of the source model.
        out_dir: Output directory (must be empty or absent unless ``overwrite``).
        target_shape: The shape to reach; may be omitted when ``units`` gives the units.
        data: ``DATA/<domain>/train`` MDS folders for calibration (``activation`` only).
        units: A pruned model directory whose kept-units record decides the cut instead of
            scores (another run's unit choice, cut from these weights).
        method: ``activation`` or ``random`` (ignored with ``units``).
        calibration_tokens: Calibration tokens (rounded up to whole batches).
        max_seq_len: Tokens per calibration sequence.
        batch_size: Sequences per calibration batch.
        domains: Domains to calibrate on (default: all).
        seed: Seed of the calibration pick and of ``random``.
        overwrite: Replace a non-empty ``out_dir`` written by an earlier export.

    Raises:
        ShapeError: Bad target, or a ``units`` record that does not fit ``source``.
        ExportError: ``out_dir`` cannot be written.
        ValueError: Missing ``data`` for ``activation``, an unknown method.
    """
    start = time.perf_counter()
    method = "units" if units else method
    if target_shape is None and not units:
        raise ValueError("a target shape is required (unless units gives the units)")
    if method not in (*METHODS, "units"):
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    check_out_dir(out_dir, overwrite)
    if method == "activation" and data is None:
        raise ValueError("calibration data (--data) is required for method activation")
    record = read_kept_units(units) if units else None
    print(f"loading {source}", flush=True)
    model = AutoModelForCausalLM.from_pretrained(str(source), torch_dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    model.eval()
    source_shape = get_family(model).shape(model.config)
    source_record = provenance(source, model.config)  # before any cut touches the config
    if record is not None:
        plan = units_plan(model, record)
        if target_shape is not None and source_shape.resolve_target(dict(target_shape)) != (
            plan.target
        ):
            raise ShapeError(
                f"target shape {dict(target_shape)} differs from the shape of the units "
                f"record ({plan.target.describe()})"
            )
    else:
        source_shape.resolve_target(dict(target_shape))  # a bad target fails before calibration
    batches = None
    if method == "activation":
        batches = calibration_batches(
            data,
            calibration_tokens,
            max_seq_len,
            batch_size=batch_size,
            domains=domains,
            seed=seed,
        )
        n_tokens = sum(b.numel() for b in batches)
        print(f"calibrating on {len(batches)} batches ({n_tokens:,} tokens)", flush=True)
    if record is None:
        plan = oneshot_plan(model, target_shape, _importance(model, batches, method, seed))
    compact = prune_model(model, plan=plan)
    n_tokens = 0 if batches is None else sum(b.numel() for b in batches)
    info = {
        "method": f"oneshot-{method}",
        "source_shape": source_shape.config_updates(),
        "source_num_params": source_shape.num_params(),
        "target_shape": plan.target.config_updates(),
        "target_num_params": plan.target.num_params(),
        "calibration_tokens": n_tokens,
        "seed": seed,
    }
    if record is not None:
        info["units_from"] = str(units)
    info["calibration_data"] = None if data is None else str(data)
    info["provenance"] = source_record
    written = write_hf_directory(
        compact,
        out_dir,
        tokenizer,
        overwrite,
        info=info,
        kept_units=kept_units_record(plan, source_shape),
        source_dir=source,
    )
    return OneshotSummary(written, source_shape, plan.target, n_tokens, time.perf_counter() - start)


def _run_cli(args: argparse.Namespace) -> int:
    try:
        target_shape = None if args.target_shape is None else parse_target_shape(args.target_shape)
        summary = prune_oneshot_to_dir(
            args.source,
            args.out_dir,
            target_shape,
            data=args.data,
            units=args.units,
            method=args.method,
            calibration_tokens=args.calibration_tokens,
            max_seq_len=args.max_seq_len,
            batch_size=args.batch_size,
            domains=args.domains,
            seed=args.seed,
            overwrite=args.overwrite,
        )
    except (ShapeError, ValueError, FileNotFoundError, ExportError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(summary.describe())
    return 0


def register_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Adds ``composer-shear prune-oneshot``."""
    parser = subparsers.add_parser(
        "prune-oneshot",
        help="one-shot structured pruning by activation importance (no training)",
        description=(
            "Keep the most important layers, kv groups, query heads, MLP units and hidden "
            "channels of a Hugging Face model for a target shape, scored on calibration batches "
            "of a multi-domain MDS folder (or exactly the units another pruned model kept, "
            "--units), and write the compact model as a HF directory (same surgery as the "
            "learned route)."
        ),
    )
    parser.add_argument("source", help="Hugging Face model directory")
    parser.add_argument("out_dir", help="output directory (must be empty or absent)")
    parser.add_argument(
        "--target-shape",
        help="e.g. num_hidden_layers=24,hidden_size=512,num_attention_heads=6,"
        "num_key_value_heads=2,intermediate_size=1152 (or a JSON object); required unless "
        "--units is given",
    )
    parser.add_argument("--data", help="DATA/<domain>/train MDS folders (composer-shear tokenize)")
    parser.add_argument("--domains", nargs="+", help="domains to calibrate on (default: all)")
    parser.add_argument("--calibration-tokens", type=int, default=65536)
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--method", choices=METHODS, default="activation")
    parser.add_argument(
        "--units",
        metavar="PRUNED_DIR",
        help="keep exactly the units another pruned model of this source kept (its "
        "composer_shear_kept_units.json, from `export` or `prune-oneshot`) instead of scoring "
        "them: e.g. a learned route's choice cut from the unpruned weights; no --data needed",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty out_dir")
    parser.set_defaults(func=_run_cli)
    return parser
