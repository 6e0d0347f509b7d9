r"""One-shot structured pruning: keep the most important units, no training.

Importance comes from a few calibration batches (:mod:`composer_shear.pruning.importance`):
activation magnitude (``activation``, Minitron / ShortGPT style), or first-order Taylor
importance ``|activation x gradient|`` of the calibration loss (``taylor``, as LLM-Pruner
scores structures); or at random (a baseline). Layers are scored by each method's own
measure (block influence ``1 - cos(layer input, output)`` for ``activation``, the Taylor score
for ``taylor``) unless ``layer_score`` picks the other. The
kept units go through the *same* surgery as learned gates
(:func:`composer_shear.export.surgery.plan_from_masks`), so a one-shot model and a learned one are
sliced by one code path and load the same way.

Python::

    from composer_shear.export.oneshot import prune_oneshot
    compact = prune_oneshot(model, {"num_hidden_layers": 24, "hidden_size": 512}, batches)

Command line::

    composer-shear prune-oneshot SOURCE OUT --data DATA_DIR --target-shape \
        num_hidden_layers=24,hidden_size=512,num_attention_heads=6,intermediate_size=1152
    composer-shear prune-oneshot SOURCE OUT --data DATA_DIR --method taylor \
        --layer-score block_influence --batch-size 2 --target-shape ...
    composer-shear prune-oneshot SOURCE OUT --units PRUNED_DIR   # another run's unit choice
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from composer_shear.data.calibration import calibration_batches
from composer_shear.export.search import TABLE_HEADER, candidate_shapes, search_shape
from composer_shear.export.surgery import PruningPlan, plan_from_masks, prune_model
from composer_shear.export.units import kept_units_record, read_kept_units, units_plan
from composer_shear.export.writer import (
    DTYPES,
    ExportError,
    check_out_dir,
    provenance,
    write_hf_directory,
)
from composer_shear.families import get_family
from composer_shear.interface import UsageError, device_name, model_path, positive_int
from composer_shear.pruning.gates import top_k_mask
from composer_shear.pruning.importance import (
    Importance,
    collect_importance,
    collect_taylor_importance,
    random_importance,
    unit_scores,
)
from composer_shear.pruning.masking import gate_specs
from composer_shear.shape import TARGET_KEYS, ModelShape, ShapeError

__all__ = [
    "LAYER_SCORES",
    "METHODS",
    "OneshotSummary",
    "check_method",
    "keep_masks_from_scores",
    "oneshot_importance",
    "oneshot_plan",
    "parse_target_shape",
    "prune_oneshot",
    "prune_oneshot_to_dir",
    "register_cli",
]

METHODS = ("activation", "taylor", "random")
# How layers are ranked; default: the method's own measure (NATIVE_LAYER_SCORE).
LAYER_SCORES = ("block_influence", "taylor")
NATIVE_LAYER_SCORE = {"activation": "block_influence", "taylor": "taylor"}


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
    layer_score: str | None = None,
) -> nn.Module:
    """Returns the compact model that keeps the most important units of ``model``.

    Args:
        model: A Hugging Face causal LM of a supported family (eval mode is set).
        target_shape: The shape to reach (keys of :data:`composer_shear.shape.TARGET_KEYS`).
        batches: Calibration batches (``input_ids`` tensors or dicts); needed for
            ``activation`` and ``taylor``.
        method: ``activation`` (activation magnitude), ``taylor`` (first-order Taylor
            importance, one backward pass per batch) or ``random``.
        seed: Seed of ``random``.
        layer_score: ``block_influence`` or ``taylor`` ranks the layers; default the
            method's own (see :data:`NATIVE_LAYER_SCORE`).
    """
    model.eval()
    importance = oneshot_importance(model, batches, method, seed, layer_score)
    return prune_model(model, plan=oneshot_plan(model, target_shape, importance))


def check_method(method: str, layer_score: str | None) -> None:
    """Raises ``ValueError`` for an unknown method or layer score, or a layer score of random."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if layer_score is not None:
        if layer_score not in LAYER_SCORES:
            raise ValueError(f"layer score must be one of {LAYER_SCORES}, got {layer_score!r}")
        if method == "random":
            raise ValueError("a layer score applies to activation and taylor, not random")


def oneshot_importance(
    model: nn.Module,
    batches: Any,
    method: str = "activation",
    seed: int = 0,
    layer_score: str | None = None,
    *,
    forward: Callable[[Any], Any] | None = None,
    loss: Callable[[Any], torch.Tensor] | None = None,
    hf_model: nn.Module | None = None,
) -> Importance:
    """The unit scores one-shot pruning ranks by (the CLI and the ``oneshot_pruning`` job).

    Args:
        model: What runs the batches (a Hugging Face causal LM, or a Composer / FSDP wrapper
            of one together with ``forward``, ``loss`` and ``hf_model``).
        batches: Calibration batches (this rank's share in a distributed job: the sums are
            all-reduced).
        method: ``activation``, ``taylor`` or ``random``.
        seed: Seed of ``random``.
        layer_score: ``block_influence`` or ``taylor``; default the method's own.
        forward: ``forward(batch)`` for ``activation`` (default: ``model(input_ids=...)``).
        loss: ``loss(batch)`` for ``taylor`` (default: the causal LM loss of ``model``).
        hf_model: The Hugging Face model whose modules are hooked (default: ``model``).
    """
    check_method(method, layer_score)
    hf_model = model if hf_model is None else hf_model
    if method == "random":
        return random_importance(get_family(hf_model).shape(hf_model.config), seed)
    if batches is None:
        raise ValueError(f"{method} importance needs calibration batches")

    def collect(kind: str) -> Importance:
        if kind == "activation":
            return collect_importance(model, batches, forward, hf_model=hf_model)
        return collect_taylor_importance(model, batches, loss, hf_model=hf_model)

    importance = collect(method)
    if layer_score is not None and layer_score != NATIVE_LAYER_SCORE[method]:
        # The other method's layer ranking: one more pass, only its layer scores are kept.
        other = "activation" if layer_score == "block_influence" else "taylor"
        importance = replace(importance, layers=collect(other).layers)
    return importance


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
    layer_score: str | None = None,
    calibration_tokens: int = 65536,
    max_seq_len: int = 2048,
    batch_size: int = 8,
    domains: Sequence[str] | None = None,
    seed: int = 0,
    overwrite: bool = False,
    target_params: int | None = None,
    non_embedding: bool = False,
    width_multiple: int = 64,
    budget_slack: float = 0.03,
    device: str = "cpu",
    dtype: str = "float32",
) -> OneshotSummary:
    """The one-shot pipeline: load a HF model, cut it, write the compact HF directory.

    ``composer-shear prune-oneshot`` is a thin wrapper of this function.

    Args:
        source: Hugging Face model directory (or hub id) of the source model.
        out_dir: Output directory (must be empty or absent unless ``overwrite``).
        target_shape: The shape to reach; may be omitted when ``units`` gives the units.
        data: ``DATA/<domain>/train`` MDS folders for calibration (``activation`` and
            ``taylor``).
        units: A pruned model directory whose kept-units record decides the cut instead of
            scores (another run's unit choice, cut from these weights).
        method: ``activation``, ``taylor`` or ``random`` (ignored with ``units``).
        layer_score: ``block_influence`` or ``taylor`` ranks the layers (default: the
            method's own; ignored with ``units``).
        calibration_tokens: Calibration tokens (rounded up to whole batches).
        max_seq_len: Tokens per calibration sequence.
        batch_size: Sequences per calibration batch.
        domains: Domains to calibrate on (default: all).
        seed: Seed of the calibration pick and of ``random``.
        overwrite: Replace a non-empty ``out_dir`` written by an earlier export.
        target_params: A parameter budget instead of a shape: the uniform shapes under it
            are scored by the loss of their cut on the data's eval split
            (:func:`composer_shear.export.search.search_shape`) and the best is cut.
        non_embedding: ``target_params`` counts non-embedding parameters.
        width_multiple: ``target_params``' candidates have hidden and intermediate sizes in
            multiples of this (tensor cores want 64 or 128).
        budget_slack: ``target_params``' candidates are within this fraction below it.
        device: Where the model runs (``cpu``, ``cuda``, ``cuda:1``); the cut is written from
            the CPU.
        dtype: Dtype the weights are loaded, scored and written in (``float32``,
            ``bfloat16``, ``float16``); importance sums are float64 whatever it is.

    The target (shape, budget or units record) is checked against the source's config
    before any weight is read, so a wrong target fails in seconds whatever the model's size.

    Raises:
        ShapeError: Bad target, or a ``units`` record that does not fit ``source``.
        ExportError: ``out_dir`` cannot be written.
        ValueError: Missing ``data`` for ``activation`` / ``taylor``, an unknown method or
            layer score.
    """
    start = time.perf_counter()
    if units:
        method, layer_score = "units", None
    else:
        check_method(method, layer_score)
    if target_params is not None and (target_shape is not None or units):
        raise ValueError("give a target shape, a parameter budget or units, not several")
    if target_shape is None and not units and target_params is None:
        raise ValueError("a target shape or a parameter budget is required (or units)")
    check_out_dir(out_dir, overwrite)
    calibrated = method in NATIVE_LAYER_SCORE
    if target_params is not None and not calibrated:
        raise ValueError(f"a parameter budget needs a calibrated method, not {method}")
    if calibrated and data is None:
        raise ValueError(f"calibration data (--data) is required for method {method}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    run_on = torch.device(device)
    if run_on.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device}: CUDA is not available on this machine")
    record = read_kept_units(units) if units else None
    source = model_path(source)  # a missing directory: a clear error, not a hub-id error
    # The target is checked against the config alone: no weight is read (or downloaded) for
    # a target that cannot be cut.
    config = AutoConfig.from_pretrained(source)
    source_shape = get_family(config).shape(config)
    if record is not None:
        plan = units_plan(config, record)
        if target_shape is not None and source_shape.resolve_target(dict(target_shape)) != (
            plan.target
        ):
            raise ShapeError(
                f"target shape {dict(target_shape)} differs from the shape of the units "
                f"record ({plan.target.describe()})"
            )
    elif target_shape is not None:
        source_shape.resolve_target(dict(target_shape))
    else:  # a budget too small fails here
        candidate_shapes(
            source_shape, target_params, non_embedding, width_multiple, slack=budget_slack
        )
    print(f"loading {source} ({dtype}, {run_on})", flush=True)
    model = AutoModelForCausalLM.from_pretrained(source, torch_dtype=DTYPES[dtype]).to(run_on)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model.eval()
    source_record = provenance(source, model.config)  # before any cut touches the config
    batches = None
    if calibrated:
        batches = calibration_batches(
            data,
            calibration_tokens,
            max_seq_len,
            batch_size=batch_size,
            domains=domains,
            seed=seed,
            tokenizer=tokenizer,
        )
        n_tokens = sum(b.numel() for b in batches)
        print(f"calibrating on {len(batches)} batches ({n_tokens:,} tokens)", flush=True)
    search = None
    if record is None:
        importance = oneshot_importance(model, batches, method, seed, layer_score)
        if target_params is not None:
            held_out = calibration_batches(
                data,
                calibration_tokens,
                max_seq_len,
                batch_size=batch_size,
                domains=domains,
                seed=seed,
                split="eval",
            )
            print(f"scoring the shapes under {target_params:,} parameters", flush=True)
            winner, search = search_shape(
                source_shape,
                target_params,
                lambda shape: prune_model(
                    model, plan=oneshot_plan(model, shape.config_updates(), importance)
                ),
                held_out,
                non_embedding,
                width_multiple=width_multiple,
                slack=budget_slack,
            )
            print(TABLE_HEADER)
            for candidate in search:
                print(candidate.row())
            target_shape = winner.shape.config_updates()
        plan = oneshot_plan(model, target_shape, importance)
    compact = prune_model(model, plan=plan).cpu()
    n_tokens = 0 if batches is None else sum(b.numel() for b in batches)
    info = {
        "method": f"oneshot-{method}",
        "source_shape": source_shape.config_updates(),
        "source_num_params": source_shape.num_params(),
        "target_shape": plan.target.config_updates(),
        "target_num_params": plan.target.num_params(),
        "calibration_tokens": n_tokens,
        "seed": seed,
        "dtype": dtype,
    }
    if calibrated:
        info["layer_score"] = layer_score or NATIVE_LAYER_SCORE[method]
    if record is not None:
        info["units_from"] = str(units)
    info["calibration_data"] = None if data is None else str(data)
    info["provenance"] = source_record
    if search is not None:
        info["target_params"] = target_params
        info["non_embedding"] = non_embedding
        info["search"] = [
            {"shape": c.shape.config_updates(), "params": c.params, "loss": c.loss} for c in search
        ]
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
    # What the command line alone shows to be wrong is a usage error (exit 2).
    given = [name for name in ("target_shape", "target_params", "units") if getattr(args, name)]
    if not given:
        raise UsageError("--target-shape is required unless --target-params or --units is given")
    if len(given) > 1 and given != ["target_shape", "units"]:
        raise UsageError("give --target-shape, --target-params or --units, not several")
    if args.units is None and args.method in ("activation", "taylor") and args.data is None:
        raise UsageError(f"--method {args.method} needs --data (or use --units)")
    try:
        target_shape = None if args.target_shape is None else parse_target_shape(args.target_shape)
    except ValueError as error:  # ShapeError, or JSON that does not parse
        message = str(error)
        raise UsageError(
            message if "--target-shape" in message else f"--target-shape: {message}"
        ) from error
    try:
        summary = prune_oneshot_to_dir(
            args.source,
            args.out_dir,
            target_shape,
            data=args.data,
            units=args.units,
            method=args.method,
            layer_score=args.layer_score,
            calibration_tokens=args.calibration_tokens,
            max_seq_len=args.max_seq_len,
            batch_size=args.batch_size,
            domains=args.domains,
            seed=args.seed,
            overwrite=args.overwrite,
            target_params=None if args.target_params is None else int(args.target_params),
            non_embedding=args.non_embedding,
            width_multiple=args.width_multiple,
            budget_slack=args.budget_slack,
            device=args.device,
            dtype=args.dtype,
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
        help="one-shot structured pruning by importance scores (no training)",
        description=(
            "Keep the most important layers, kv groups, query heads, MLP units and hidden "
            "channels of a Hugging Face model for a target shape, scored on calibration batches "
            "of a multi-domain MDS folder (or exactly the units another pruned model kept, "
            "--units), and write the compact model as a HF directory (same surgery as the "
            "learned route)."
        ),
    )
    parser.add_argument("source", help="Hugging Face model directory (or hub id)")
    parser.add_argument("out_dir", help="output directory (must be empty or absent)")
    parser.add_argument(
        "--target-shape",
        help="e.g. num_hidden_layers=24,hidden_size=512,num_attention_heads=6,"
        "num_key_value_heads=2,intermediate_size=1152 (or a JSON object); required unless "
        "--units is given",
    )
    parser.add_argument(
        "--target-params",
        type=float,
        default=None,
        help="a parameter budget instead of --target-shape (e.g. 80e6): the uniform shapes "
        "under it are scored by the loss of their one-shot cut on the data's eval split, the "
        "table is printed and the best is cut",
    )
    parser.add_argument(
        "--non-embedding",
        action="store_true",
        help="--target-params counts parameters outside the embedding and LM head",
    )
    parser.add_argument(
        "--width-multiple",
        type=positive_int,
        default=64,
        help="--target-params' candidates have hidden and intermediate sizes in multiples of "
        "this (tensor cores want 64 or 128)",
    )
    parser.add_argument(
        "--budget-slack",
        type=float,
        default=0.03,
        help="--target-params' candidates are within this fraction below the budget",
    )
    parser.add_argument(
        "--data",
        help="DATA/<domain>/train MDS folders (composer-shear tokenize); required for the "
        "activation and taylor methods",
    )
    parser.add_argument("--domains", nargs="+", help="domains to calibrate on (default: all)")
    parser.add_argument(
        "--calibration-tokens",
        type=positive_int,
        default=65536,
        help="calibration tokens, rounded up to whole batches",
    )
    parser.add_argument(
        "--max-seq-len",
        type=positive_int,
        default=2048,
        help="tokens per calibration sequence",
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=8,
        help="sequences per calibration batch (taylor keeps one batch's activations and "
        "logits for its backward pass: lower it for large models)",
    )
    parser.add_argument(
        "--method",
        choices=METHODS,
        default="activation",
        help="how units are scored: activation = mean activation magnitude (Minitron); "
        "taylor = |activation x gradient| of the calibration loss summed per unit, first-order "
        "Taylor (LLM-Pruner), one backward pass per batch, no weight gradients; random = a "
        "baseline",
    )
    parser.add_argument(
        "--layer-score",
        choices=LAYER_SCORES,
        default=None,
        help="how layers are ranked: block_influence = 1 - cos(layer input, layer output) "
        "(Minitron / ShortGPT), taylor = the Taylor score of the layer's residual update; "
        "default: the method's own (activation: block_influence, taylor: taylor)",
    )
    parser.add_argument(
        "--units",
        metavar="PRUNED_DIR",
        help="keep exactly the units another pruned model of this source kept (its "
        "composer_shear_kept_units.json, from `export` or `prune-oneshot`) instead of scoring "
        "them: e.g. a learned route's choice cut from the unpruned weights; no --data needed",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the calibration pick and of random",
    )
    parser.add_argument(
        "--device",
        type=device_name,
        default="cpu",
        help="where the model runs for calibration and the cut (cpu, cuda, cuda:1); the "
        "output is written from the CPU",
    )
    parser.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default="float32",
        help="dtype the weights are loaded, scored and written in (bfloat16 halves the memory "
        "of a large source; importance sums stay float64)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty out_dir")
    parser.set_defaults(func=_run_cli)
    return parser
