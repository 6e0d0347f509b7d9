r"""One-shot structured pruning: keep the most important units, no training.

Importance comes from activations on a few calibration batches
(:mod:`composer_shear.importance`, Minitron / ShortGPT style), or at random (a baseline). The
kept units go through the *same* surgery as learned gates
(:func:`composer_shear.surgery.plan_from_masks`), so a one-shot model and a learned one are
sliced by one code path and load the same way.

Python::

    from composer_shear.oneshot import prune_oneshot
    compact = prune_oneshot(model, {"num_hidden_layers": 24, "hidden_size": 512}, batches)

Command line::

    composer-shear prune-oneshot SOURCE OUT --data DATA_DIR --target-shape \
        num_hidden_layers=24,hidden_size=512,num_attention_heads=6,intermediate_size=1152
    composer-shear prune-oneshot SOURCE OUT --units PRUNED_DIR   # another run's unit choice
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from composer_shear.families import get_family
from composer_shear.gates import top_k_mask
from composer_shear.importance import (
    Importance,
    collect_importance,
    random_importance,
    unit_scores,
)
from composer_shear.masking import gate_specs
from composer_shear.shape import TARGET_KEYS, ModelShape, ShapeError
from composer_shear.surgery import (
    PruningPlan,
    keep_masks_from_kept_units,
    kept_units_target,
    plan_from_masks,
    prune_model,
)

__all__ = [
    "METHODS",
    "calibration_batches",
    "keep_masks_from_scores",
    "oneshot_plan",
    "parse_target_shape",
    "prune_oneshot",
    "register_cli",
    "units_plan",
]

METHODS = ("activation", "random")


def keep_masks_from_scores(
    scores: Mapping[str, torch.Tensor], source: ModelShape, target: ModelShape
) -> dict[str, torch.Tensor]:
    """The top-scored units of every row, for every dimension the target shrinks.

    Returns:
        Boolean masks shaped like the gates (see :func:`composer_shear.masking.gate_specs`).
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


def units_plan(model: nn.Module, record: Mapping[str, Any]) -> PruningPlan:
    """The plan that keeps exactly the units of a kept-units record (another run's choice).

    Args:
        model: The source model to cut (same shape as the record's source).
        record: A ``composer_shear_kept_units.json`` record
            (:func:`composer_shear.export.read_kept_units`).

    Raises:
        ShapeError: The record comes from a source of another shape, or is inconsistent.
    """
    source = get_family(model).shape(model.config)
    if record["source_shape"] != source.config_updates():
        raise ShapeError(
            f"the kept units come from a source of shape {record['source_shape']}, not this "
            f"model's {source.config_updates()}"
        )
    target = source.resolve_target(kept_units_target(record["kept"]))
    plan = plan_from_masks(
        source, target, keep_masks_from_kept_units(record["kept"], source, target)
    )
    # A record can be well-formed row by row and still not be one model's choice (a query
    # head in a dropped kv group, a layer listed twice): slicing would then keep other units.
    if _by_layer(plan.kept_units()) != _by_layer(record["kept"]):
        raise ShapeError(
            "the kept units are not one model's choice (e.g. a query head outside its layer's "
            "kept kv groups, or a repeated layer): the cut would keep other units"
        )
    return plan


def _by_layer(kept: Mapping[str, Any]) -> dict[str, Any]:
    """A kept-units record, order-free: kept layers and hidden channels, per-layer unit sets."""
    per_layer = {
        dim: {layer: sorted(row) for layer, row in zip(kept["layers"], kept[dim], strict=True)}
        for dim in ("heads", "kv_heads", "intermediate")
    }
    return {"layers": sorted(kept["layers"]), "hidden": sorted(kept["hidden"]), **per_layer}


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


def calibration_batches(
    data_dir: str | Path,
    tokens: int,
    max_seq_len: int,
    batch_size: int = 8,
    domains: Sequence[str] | None = None,
    seed: int = 0,
    split: str = "train",
) -> list[torch.Tensor]:
    """Calibration batches drawn evenly from every domain's ``split`` of an MDS data folder.

    Each domain contributes the same number of sequences, picked at random (seeded) among the
    first ``8x`` that many of its samples (the reading cost stays bounded on large corpora).

    Args:
        data_dir: ``DATA/<domain>/<split>`` MDS folders (``composer-shear tokenize``).
        tokens: Calibration tokens wanted (rounded up to whole batches).
        max_seq_len: Tokens per sequence (samples are truncated; shorter ones skipped).
        batch_size: Sequences per batch.
        domains: Domains to use (default: every folder with a ``split``).
        seed: Seed of the pick.
        split: Which split (the train split: eval data stays held out).
    """
    from composer_shear.reference_loss import read_mds_token_samples

    data_dir = Path(data_dir)
    if domains is None:
        domains = sorted(p.name for p in data_dir.iterdir() if (p / split / "index.json").is_file())
    if not domains:
        raise FileNotFoundError(f"No <domain>/{split} MDS folders under {data_dir}.")
    n_batches = max(1, math.ceil(tokens / (batch_size * max_seq_len)))
    per_domain = math.ceil(n_batches * batch_size / len(domains))
    rng = np.random.default_rng(seed)
    rows: list[np.ndarray] = []
    for domain in domains:
        split_dir = data_dir / domain / split
        pool = [
            t[:max_seq_len]
            for t in read_mds_token_samples(split_dir, max_samples=8 * per_domain)
            if len(t) >= max_seq_len
        ]
        if not pool:
            raise ValueError(f"domain {domain!r}: no sample of {max_seq_len} tokens in {split_dir}")
        picks = rng.choice(len(pool), size=per_domain, replace=len(pool) < per_domain)
        rows.extend(pool[i] for i in picks)
    order = rng.permutation(len(rows))[: n_batches * batch_size]
    ids = torch.from_numpy(np.stack([rows[i] for i in order]).astype(np.int64))
    return list(ids.split(batch_size))


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


def _run_cli(args: argparse.Namespace) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from composer_shear.export import (
        ExportError,
        check_out_dir,
        kept_units_record,
        read_kept_units,
        write_hf_directory,
    )

    start = time.perf_counter()
    method = "units" if args.units else args.method
    try:
        if args.target_shape is None and not args.units:
            raise ValueError("--target-shape is required (unless --units gives the units)")
        target_shape = None if args.target_shape is None else parse_target_shape(args.target_shape)
        check_out_dir(Path(args.out_dir), args.overwrite)
        if method == "activation" and args.data is None:
            raise ValueError("--data is required for --method activation")
        record = read_kept_units(args.units) if args.units else None
        print(f"loading {args.source}", flush=True)
        model = AutoModelForCausalLM.from_pretrained(args.source, torch_dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(args.source)
        source = get_family(model).shape(model.config)
        if record is not None:
            model.eval()
            plan = units_plan(model, record)
            target = plan.target
            if target_shape is not None and source.resolve_target(target_shape) != target:
                raise ShapeError(
                    f"--target-shape {target_shape} differs from the shape of the --units "
                    f"record ({target.describe()})"
                )
        else:
            target = source.resolve_target(target_shape)
        batches = None
        if method == "activation":
            batches = calibration_batches(
                args.data,
                args.calibration_tokens,
                args.max_seq_len,
                batch_size=args.batch_size,
                domains=args.domains,
                seed=args.seed,
            )
            n_tokens = sum(b.numel() for b in batches)
            print(f"calibrating on {len(batches)} batches ({n_tokens:,} tokens)", flush=True)
        if record is None:
            # prune_oneshot's steps, kept apart here so the export records the plan's units.
            model.eval()
            importance = _importance(model, batches, method, args.seed)
            plan = oneshot_plan(model, target_shape, importance)
        compact = prune_model(model, plan=plan)
        info = {
            "method": f"oneshot-{method}",
            "source_shape": source.config_updates(),
            "source_num_params": source.num_params(),
            "target_shape": target.config_updates(),
            "target_num_params": target.num_params(),
            "calibration_tokens": 0 if batches is None else sum(b.numel() for b in batches),
            "seed": args.seed,
        }
        if record is not None:
            info["units_from"] = str(args.units)
        write_hf_directory(
            compact,
            args.out_dir,
            tokenizer,
            args.overwrite,
            info=info,
            kept_units=kept_units_record(plan, source),
        )
    except (ShapeError, ValueError, FileNotFoundError, ExportError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"source : {source.describe()}")
    print(f"pruned : {target.describe()}")
    print(f"written: {args.out_dir} ({time.perf_counter() - start:.1f}s)")
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
