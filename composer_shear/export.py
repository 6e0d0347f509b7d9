"""Export: a ``targeted_pruning`` Composer checkpoint (or live model) -> a Hugging Face directory.

Everything needed is inside the checkpoint: Composer's ``HuggingFaceModel`` stores the source
config and tokenizer, the model state holds the weights and the gates, and the algorithm's
state holds the target. Loading is always strict: a checkpoint that does not match the model
it claims to come from is an error, never a silent random init.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from composer_shear.families import get_family
from composer_shear.masking import GATES_ATTR, ShearGates, attach_gates, find_gates
from composer_shear.shape import ModelShape
from composer_shear.surgery import PruningPlan, plan_pruning, prune_model

__all__ = [
    "ExportError",
    "ExportSummary",
    "check_out_dir",
    "compare_kept_units",
    "export_checkpoint",
    "export_model",
    "find_gated_hf_model",
    "gated_model_from_checkpoint",
    "gated_model_from_weights",
    "kept_units_record",
    "load_composer_checkpoint",
    "read_kept_units",
    "register_cli",
    "write_hf_directory",
]

MODEL_PREFIX = "model."  # Composer's HuggingFaceModel keeps the HF model as `.model`
EXPORT_INFO = "composer_shear_export.json"
# Which source units the pruned model keeps: a separate, compact file (tens of thousands of
# indices would drown the readable export info).
KEPT_UNITS = "composer_shear_kept_units.json"
# Dimensions of the kept-units record, and the source-shape field that sizes each one's row.
UNIT_DIMENSIONS = {
    "layers": "num_hidden_layers",
    "heads": "num_attention_heads",
    "kv_heads": "num_key_value_heads",
    "intermediate": "intermediate_size",
    "hidden": "hidden_size",
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ExportError(RuntimeError):
    """The checkpoint or the output directory cannot be used; nothing was written."""


@dataclass
class ExportSummary:
    """What an export produced."""

    out_dir: Path
    source: ModelShape
    target: ModelShape
    kept_layers: list[int]
    seconds: float

    def describe(self) -> str:
        """Human-readable lines for the CLI."""
        src, tgt = self.source, self.target
        ratio = tgt.num_params() / src.num_params()
        return "\n".join(
            [
                f"source : {src.describe()}",
                f"pruned : {tgt.describe()}",
                f"params : {src.num_params():,} -> {tgt.num_params():,} ({ratio:.1%}); "
                f"non-embedding {src.num_non_embedding_params():,} -> "
                f"{tgt.num_non_embedding_params():,}",
                f"layers kept: {self.kept_layers}",
                f"written: {self.out_dir} ({self.seconds:.1f}s)",
            ]
        )


# -- writing ----------------------------------------------------------------------------------


def check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Raises ExportError unless ``out_dir`` is absent, empty, or may be overwritten."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir} exists and is not a directory.")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ExportError(
            f"Output directory {out_dir} is not empty; pass --overwrite to replace it."
        )


def write_hf_directory(
    model: nn.Module,
    out_dir: str | Path,
    tokenizer: Any = None,
    overwrite: bool = False,
    info: dict[str, Any] | None = None,
    kept_units: dict[str, Any] | None = None,
) -> Path:
    """Writes ``model`` (+ tokenizer) as a Hugging Face directory, atomically.

    Everything goes to a temporary sibling first and is renamed into place at the end, so a
    failure never leaves a half-written ``out_dir`` (and an existing one survives it).

    Args:
        model: The model to write.
        out_dir: Output directory.
        tokenizer: Tokenizer to save beside the weights.
        overwrite: Replace a non-empty ``out_dir``.
        info: Written as ``composer_shear_export.json``.
        kept_units: A :func:`kept_units_record`, written as ``composer_shear_kept_units.json``.
    """
    out_dir = Path(out_dir)
    check_out_dir(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    backup = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if info is not None:
            (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
        if kept_units is not None:
            (tmp / KEPT_UNITS).write_text(json.dumps(kept_units) + "\n")
        if out_dir.exists():
            out_dir.rename(backup)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if backup.exists() and not out_dir.exists():
            backup.rename(out_dir)
        raise
    shutil.rmtree(backup, ignore_errors=True)
    return out_dir


def _export_info(plan: PruningPlan, source: ModelShape) -> dict[str, Any]:
    return {
        "source_shape": source.config_updates(),
        "source_num_params": source.num_params(),
        "target_shape": plan.target.config_updates(),
        "target_num_params": plan.target.num_params(),
        "kept_layers": plan.kept_layers,
        "kept_hidden": len(plan.kept_hidden),
    }


def kept_units_record(plan: PruningPlan, source: ModelShape) -> dict[str, Any]:
    """The source shape and the source index of every unit ``plan`` keeps."""
    return {"source_shape": source.config_updates(), "kept": plan.kept_units()}


def read_kept_units(model_dir: str | Path) -> dict[str, Any]:
    """The kept-units record a pruned model directory carries.

    Raises:
        ExportError: ``model_dir`` has no record (not written by composer_shear's export or
            ``prune-oneshot``), or it is malformed.
    """
    path = Path(model_dir) / KEPT_UNITS
    if not path.is_file():
        raise ExportError(
            f"{model_dir} has no {KEPT_UNITS}: it was not written by `composer-shear export` "
            "or `composer-shear prune-oneshot` (or by a version before the record existed)."
        )
    record = json.loads(path.read_text())
    missing = [d for d in UNIT_DIMENSIONS if d not in record.get("kept", {})]
    if "source_shape" not in record or missing:
        raise ExportError(f"{path} is malformed (missing: {missing or ['source_shape']}).")
    return record


def compare_kept_units(a: dict[str, Any], b: dict[str, Any]) -> dict[str, dict[str, float]]:
    """How many of the units that ``a`` keeps ``b`` keeps too, per dimension.

    Per-layer dimensions are compared in the source layers both keep. ``chance`` is the share
    a uniformly random choice of ``b``'s size would share on average, the floor to read
    ``shared`` against: keeping 1,152 of 1,536 intermediate units, two random cuts already
    share 75%.

    Args:
        a: A :func:`kept_units_record` (e.g. of a learned route's export).
        b: Another, of a model pruned from the same source.

    Returns:
        Per dimension: ``shared`` (units of ``a`` that ``b`` keeps too, over ``a``'s count),
        ``chance``, and the counts ``kept_a``, ``kept_b``, ``both``.

    Raises:
        ExportError: The two records come from different source shapes.
    """
    if a["source_shape"] != b["source_shape"]:
        raise ExportError(
            f"the models come from different source shapes: {a['source_shape']} vs "
            f"{b['source_shape']}"
        )
    layers_a, layers_b = a["kept"]["layers"], b["kept"]["layers"]
    common = sorted(set(layers_a) & set(layers_b))
    result = {}
    for dim, size_key in UNIT_DIMENSIONS.items():
        size = a["source_shape"][size_key]
        if dim in ("layers", "hidden"):
            rows_a, rows_b = [a["kept"][dim]], [b["kept"][dim]]
        else:
            rows_a = [a["kept"][dim][layers_a.index(layer)] for layer in common]
            rows_b = [b["kept"][dim][layers_b.index(layer)] for layer in common]
        kept_a = sum(len(row) for row in rows_a)
        kept_b = sum(len(row) for row in rows_b)
        both = sum(len(set(ra) & set(rb)) for ra, rb in zip(rows_a, rows_b, strict=True))
        rows = max(len(rows_b), 1)
        result[dim] = {
            "kept_a": kept_a,
            "kept_b": kept_b,
            "both": both,
            "shared": both / kept_a if kept_a else 1.0,
            "chance": kept_b / (rows * size) if size else 1.0,
        }
    return result


def export_model(
    hf_model: nn.Module,
    out_dir: str | Path,
    tokenizer: Any = None,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
) -> ExportSummary:
    """Slices a gated Hugging Face model and writes the compact model to ``out_dir``.

    Args:
        hf_model: A HF causal LM carrying gates (not FSDP-sharded: gather first).
        out_dir: Output directory.
        tokenizer: Tokenizer to save beside the weights.
        overwrite: Replace a non-empty ``out_dir``.
        dtype: Dtype of the written weights (default: the model's).
    """
    start = time.perf_counter()
    check_out_dir(Path(out_dir), overwrite)
    gates = find_gates(hf_model)
    if gates is None:
        raise ExportError("The model carries no pruning gates.")
    plan = plan_pruning(gates)
    compact = prune_model(hf_model, gates, plan)
    if dtype is not None:
        compact = compact.to(dtype)
        compact.config.torch_dtype = dtype
    written = write_hf_directory(
        compact,
        out_dir,
        tokenizer,
        overwrite,
        info=_export_info(plan, gates.source),
        kept_units=kept_units_record(plan, gates.source),
    )
    return ExportSummary(
        written, gates.source, gates.target, plan.kept_layers, time.perf_counter() - start
    )


def find_gated_hf_model(module: nn.Module) -> nn.Module | None:
    """The Hugging Face model that carries the gates, inside any Composer / DDP wrapper."""
    for candidate in module.modules():
        if isinstance(getattr(candidate, GATES_ATTR, None), ShearGates):
            return candidate
    return None


# -- reading checkpoints ------------------------------------------------------------------------


def _resolve_checkpoint_file(path: Path) -> Path:
    if path.is_file():
        return path
    if not path.exists():
        raise ExportError(f"Checkpoint {path} does not exist.")
    if (path / ".metadata").exists():
        return path  # a sharded (torch.distributed.checkpoint) folder
    latest = path / "latest-rank0.pt"
    if latest.exists():
        return latest.resolve()
    candidates = sorted(path.glob("*.pt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise ExportError(f"No Composer checkpoint (*.pt) in {path}.")
    return candidates[-1]


def load_composer_checkpoint(path: str | Path) -> dict[str, Any]:
    """Reads a Composer checkpoint file, checkpoint folder, or sharded checkpoint folder."""
    path = _resolve_checkpoint_file(Path(path))
    if path.is_dir():
        # Sharded FSDP checkpoint: consolidate with torch's own converter.
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory() as tmp:
            merged = Path(tmp) / "consolidated.pt"
            try:
                dcp_to_torch_save(str(path), str(merged))
                checkpoint = torch.load(merged, map_location="cpu", weights_only=False)
            except Exception as error:
                raise ExportError(
                    f"Could not consolidate the sharded checkpoint {path}: {error}. Save with "
                    "`fsdp_config.state_dict_type: full` or consolidate it with "
                    "torch.distributed.checkpoint.format_utils.dcp_to_torch_save."
                ) from error
    else:
        try:
            # Composer checkpoints pickle more than tensors; only load files you trust.
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as error:
            raise ExportError(f"Cannot read checkpoint {path}: {error}") from error
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state"), dict):
        raise ExportError(f"{path} is not a Composer checkpoint (no 'state' dict).")
    checkpoint["_path"] = str(path)
    return checkpoint


def _pruning_state(checkpoint: dict[str, Any]) -> dict[str, Any]:
    for name, value in checkpoint["state"].get("algorithms", []) or []:
        if name == "TargetedPruning":
            return value
    raise ExportError(
        f"{checkpoint['_path']} has no targeted_pruning state: it was not written by a run "
        "with `algorithms: targeted_pruning`."
    )


def _hf_state(checkpoint: dict[str, Any]) -> dict[str, Any]:
    hf_state = checkpoint["state"].get("integrations", {}).get("huggingface")
    if not hf_state or "config" not in hf_state.get("model", {}):
        raise ExportError(
            f"{checkpoint['_path']} does not hold a Hugging Face config (expected a Composer "
            "HuggingFaceModel, e.g. llm-foundry's hf_causal_lm)."
        )
    return hf_state


def _strict_load(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    try:
        # strict=False only to collect *all* mismatches into one message; any is an error.
        result = module.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as error:  # shape mismatches
        raise ExportError(
            f"The checkpoint's {what} does not match the model it claims to come from: {error}"
        ) from error
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if missing or unexpected:
        raise ExportError(
            f"The checkpoint's {what} does not match the model it claims to come from: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}."
        )


def gated_model_from_checkpoint(checkpoint: dict[str, Any]) -> nn.Module:
    """Rebuilds the gated Hugging Face model of a checkpoint, loading every tensor strictly."""
    from composer.models.huggingface import get_hf_config_from_composer_state_dict

    pruning = _pruning_state(checkpoint)
    _hf_state(checkpoint)
    config = get_hf_config_from_composer_state_dict(checkpoint)
    model_state = checkpoint["state"].get("model") or {}
    if not all(key.startswith(MODEL_PREFIX) for key in model_state):
        raise ExportError("Unexpected model state layout (keys without the 'model.' prefix).")
    weights = {k[len(MODEL_PREFIX) :]: v for k, v in model_state.items()}
    if not any(k.startswith(f"{GATES_ATTR}.") for k in weights):
        raise ExportError(f"{checkpoint['_path']} holds no gate parameters.")
    return gated_model_from_weights(
        config, weights, pruning["target_shape"], seed=pruning.get("seed", 0)
    )


def gated_model_from_weights(
    config: Any, weights: dict[str, torch.Tensor], target_shape: dict[str, int], seed: int = 0
) -> nn.Module:
    """Builds the gated Hugging Face model of ``config`` from a full state dict, strictly.

    Args:
        config: The source model's ``transformers`` config.
        weights: Every tensor of the gated HF model, keyed as its ``state_dict()`` (the gates
            under ``shear_gates.``); used in place (``assign``), not copied.
        target_shape: The pruning target the gates were built for.
        seed: Seed of the gates' initial noise (irrelevant: every gate tensor is loaded).

    Raises:
        ExportError: A tensor is missing, unexpected or of the wrong shape.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    gate_prefix = f"{GATES_ATTR}."
    gate_state = {k[len(gate_prefix) :]: v for k, v in weights.items() if k.startswith(gate_prefix)}
    weights = {k: v for k, v in weights.items() if not k.startswith(gate_prefix)}
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    if config.tie_word_embeddings:
        # Some state-dict writers keep only one name of a tied pair.
        family = get_family(config)
        names = {module: name for name, module in model.named_modules()}
        embed_key = f"{names[family.embedding(model)]}.weight"
        head_key = f"{names[family.lm_head_module(model)]}.weight"
        if head_key not in weights and embed_key in weights:
            weights[head_key] = weights[embed_key]
    _strict_load(model, weights, "model weights")
    if config.tie_word_embeddings:
        model.tie_weights()
    # The initial values do not matter: every gate tensor is overwritten by the strict load.
    gates = attach_gates(model, dict(target_shape), seed=seed)
    _strict_load(gates, gate_state, "gate state")
    return model.eval()


def export_checkpoint(
    checkpoint_path: str | Path,
    out_dir: str | Path,
    overwrite: bool = False,
    tokenizer_path: str | Path | None = None,
    dtype: str = "auto",
) -> ExportSummary:
    """``composer-shear export``: Composer checkpoint -> compact Hugging Face directory.

    Args:
        checkpoint_path: A checkpoint file, a save folder, or a sharded checkpoint folder.
        out_dir: Output directory (must be empty unless ``overwrite``).
        overwrite: Replace a non-empty output directory.
        tokenizer_path: Tokenizer to use when the checkpoint carries none.
        dtype: ``auto`` (the source config's dtype, else float32), or an explicit dtype.

    Raises:
        ExportError: Bad checkpoint, no pruning state, no tokenizer, non-empty output.
    """
    start = time.perf_counter()
    check_out_dir(Path(out_dir), overwrite)
    checkpoint = load_composer_checkpoint(checkpoint_path)
    # The tokenizer's files are materialised here (not in the working directory) and must
    # outlive the export, which saves them next to the weights.
    tokenizer_dir = tempfile.TemporaryDirectory(prefix="composer_shear_tokenizer_")
    tokenizer = _tokenizer(checkpoint, tokenizer_path, tokenizer_dir.name)
    model = gated_model_from_checkpoint(checkpoint)
    del checkpoint
    if dtype == "auto":
        torch_dtype = getattr(model.config, "torch_dtype", None)
        if isinstance(torch_dtype, str):
            torch_dtype = DTYPES.get(torch_dtype)
        torch_dtype = torch_dtype or torch.float32
    else:
        torch_dtype = DTYPES[dtype]
    try:
        summary = export_model(model, out_dir, tokenizer, overwrite, dtype=torch_dtype)
    finally:
        tokenizer_dir.cleanup()
    summary.seconds = time.perf_counter() - start
    return summary


def _tokenizer(checkpoint: dict[str, Any], tokenizer_path: str | Path | None, save_dir: str) -> Any:
    from transformers import AutoTokenizer

    if tokenizer_path is not None:
        try:
            return AutoTokenizer.from_pretrained(str(tokenizer_path))
        except Exception as error:
            raise ExportError(f"Cannot load tokenizer {tokenizer_path}: {error}") from error
    from composer.models import HuggingFaceModel

    hf_state = _hf_state(checkpoint)
    tokenizer = None
    if hf_state.get("tokenizer"):
        tokenizer = HuggingFaceModel.load_huggingface_tokenizer_from_saved_state(
            hf_state, tokenizer_save_dir=save_dir
        )
    if tokenizer is None:
        raise ExportError(
            f"{checkpoint['_path']} carries no tokenizer; pass --tokenizer PATH (the source "
            "model's directory)."
        )
    return tokenizer


# -- CLI --------------------------------------------------------------------------------------


def _run_cli(args: argparse.Namespace) -> int:
    try:
        summary = export_checkpoint(
            args.checkpoint, args.out_dir, args.overwrite, args.tokenizer, args.dtype
        )
    except ExportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(summary.describe())
    return 0


def register_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Adds ``composer-shear export`` and ``composer-shear compare-units``."""
    parser = subparsers.add_parser(
        "export",
        help="write the pruned model of a targeted_pruning checkpoint as a HF directory",
        description=(
            "Apply the deterministic masks of a targeted_pruning Composer checkpoint, fold the "
            "gate values into the weights, slice, and write a standard Hugging Face directory "
            "(config, safetensors, tokenizer, generation config)."
        ),
    )
    parser.add_argument(
        "checkpoint", help="checkpoint file, save folder, or sharded checkpoint folder"
    )
    parser.add_argument("out_dir", help="output directory (must be empty or absent)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty out_dir")
    parser.add_argument("--tokenizer", help="tokenizer directory if the checkpoint has none")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", *DTYPES],
        help="dtype of the written weights (auto: the source config's torch_dtype)",
    )
    parser.set_defaults(func=_run_cli)

    compare = subparsers.add_parser(
        "compare-units",
        help="how many source units two pruned models of the same source keep in common",
        description=(
            "Read the kept-units records of two pruned model directories (written by "
            "`export` and `prune-oneshot`) and print, per dimension, the share of the first "
            "model's units the second keeps too, beside the share a random cut would keep."
        ),
    )
    compare.add_argument("model_a", help="pruned model directory")
    compare.add_argument("model_b", help="pruned model directory of the same source")
    compare.add_argument("--json", dest="json_out", help="also write the figures to this file")
    compare.set_defaults(func=_run_compare_cli)
    return parser


def _run_compare_cli(args: argparse.Namespace) -> int:
    try:
        result = compare_kept_units(read_kept_units(args.model_a), read_kept_units(args.model_b))
    except (ExportError, OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"{'dimension':<14}{'kept (a / b)':>18}{'in both':>10}{'shared':>9}{'chance':>9}")
    for dim, row in result.items():
        counts = f"{row['kept_a']:,} / {row['kept_b']:,}"
        print(f"{dim:<14}{counts:>18}{row['both']:>10,}{row['shared']:>9.3f}{row['chance']:>9.3f}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
    return 0
