"""The kept-units record: which source units a pruned model keeps (its one owner).

Every export (``composer-shear export``, the ``pruned_hf_export`` callback and
``prune-oneshot``) writes ``composer_shear_kept_units.json`` beside the weights: the source
shape and the source index of every kept layer, kv group, query head, MLP unit and hidden
channel. This module writes, reads, checks and compares the record, and turns it back into
gate-shaped keep masks and a :class:`~composer_shear.export.surgery.PruningPlan`, so one run's
unit choice can cut another copy of the source.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from composer_shear.export.surgery import PruningPlan, plan_from_masks
from composer_shear.families import get_family
from composer_shear.pruning.masking import gate_specs
from composer_shear.shape import ModelShape, ShapeError

__all__ = [
    "KEPT_UNITS",
    "KeptUnitsError",
    "compare_kept_units",
    "keep_masks_from_kept_units",
    "kept_units_record",
    "kept_units_target",
    "read_kept_units",
    "units_plan",
    "write_kept_units",
]


class KeptUnitsError(ValueError):
    """A kept-units record is missing, malformed, or does not fit the model at hand."""


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


def kept_units_record(plan: PruningPlan, source: ModelShape) -> dict[str, Any]:
    """The source shape and the source index of every unit ``plan`` keeps."""
    return {"source_shape": source.config_updates(), "kept": plan.kept_units()}


def write_kept_units(model_dir: str | Path, record: Mapping[str, Any]) -> Path:
    """Writes ``record`` (a :func:`kept_units_record`) into a model directory."""
    path = Path(model_dir) / KEPT_UNITS
    path.write_text(json.dumps(record) + "\n")
    return path


def read_kept_units(model_dir: str | Path) -> dict[str, Any]:
    """The kept-units record a pruned model directory carries.

    Raises:
        KeptUnitsError: ``model_dir`` has no record (not written by composer_shear's export or
            ``prune-oneshot``), or it is malformed.
    """
    path = Path(model_dir) / KEPT_UNITS
    if not path.is_file():
        raise KeptUnitsError(
            f"{model_dir} has no {KEPT_UNITS}: it was not written by `composer-shear export` "
            "or `composer-shear prune-oneshot` (or by a version before the record existed)."
        )
    record = json.loads(path.read_text())
    missing = [d for d in UNIT_DIMENSIONS if d not in record.get("kept", {})]
    if "source_shape" not in record or missing:
        raise KeptUnitsError(f"{path} is malformed (missing: {missing or ['source_shape']}).")
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
        KeptUnitsError: The two records come from different source shapes.
    """
    if a["source_shape"] != b["source_shape"]:
        raise KeptUnitsError(
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


def kept_units_target(kept: Mapping[str, Any]) -> dict[str, int]:
    """The target shape (``TARGET_KEYS``) of a :meth:`PruningPlan.kept_units` record."""
    rows = {dim: kept[dim] for dim in ("heads", "kv_heads", "intermediate")}
    for dim, per_layer in rows.items():
        if len(per_layer) != len(kept["layers"]) or len({len(row) for row in per_layer}) > 1:
            raise ShapeError(f"kept units: {dim} needs one row per kept layer, all the same length")
    return {
        "num_hidden_layers": len(kept["layers"]),
        "hidden_size": len(kept["hidden"]),
        "num_attention_heads": len(rows["heads"][0]) if rows["heads"] else 0,
        "num_key_value_heads": len(rows["kv_heads"][0]) if rows["kv_heads"] else 0,
        "intermediate_size": len(rows["intermediate"][0]) if rows["intermediate"] else 0,
    }


def keep_masks_from_kept_units(
    kept: Mapping[str, Any], source: ModelShape, target: ModelShape
) -> dict[str, torch.Tensor]:
    """Gate-shaped keep masks that select exactly the units of a kept-units record.

    The inverse of :meth:`PruningPlan.kept_units`: :func:`plan_from_masks` of these masks keeps
    the recorded units, so one run's unit choice can cut another copy of the source (e.g. a
    learned route's choice, cut from the unpruned weights). Rows of layers the record drops
    keep their first units; they are sliced away with the layer.

    Args:
        kept: ``kept`` of a record (``composer_shear_kept_units.json``).
        source: Shape of the model to cut (the record's source shape).
        target: :func:`kept_units_target` of the record, resolved against ``source``.

    Raises:
        ShapeError: An index outside the source or repeated in a row.
    """
    _set_unique(torch.zeros(source.num_hidden_layers, dtype=torch.bool), kept["layers"], "layers")
    n_rep = source.heads_per_group
    per_layer_rows = {
        "kv_heads": kept["kv_heads"],
        "heads": [[divmod(i, n_rep) for i in row] for row in kept["heads"]],
        "intermediate": kept["intermediate"],
    }
    masks = {}
    for name, (shape, count) in gate_specs(source, target).items():
        mask = torch.zeros(shape, dtype=torch.bool)
        if name in ("layers", "hidden"):
            _set_unique(mask, kept[name], name)
        else:
            mask[..., :count] = True  # dropped layers: any valid row (sliced away)
            for layer, row in zip(kept["layers"], per_layer_rows[name], strict=True):
                mask[layer] = False
                _set_unique(mask[layer], row, f"{name} of layer {layer}")
        masks[name] = mask
    return masks


def _set_unique(mask: torch.Tensor, indices: Sequence[Any], what: str) -> None:
    """Sets ``mask`` at every index (an int or a tuple); refuses repeats and out-of-range."""
    indices = [index if isinstance(index, tuple) else (index,) for index in indices]
    if len(set(indices)) != len(indices):
        raise ShapeError(f"kept units: {what} repeats a unit")
    for index in indices:
        if any(i < 0 or i >= size for i, size in zip(index, mask.shape, strict=True)):
            raise ShapeError(f"kept units: {what} has unit {index} outside {tuple(mask.shape)}")
        mask[index] = True


def units_plan(model: nn.Module, record: Mapping[str, Any]) -> PruningPlan:
    """The plan that keeps exactly the units of a kept-units record (another run's choice).

    Args:
        model: The source model to cut (same shape as the record's source), or its config.
        record: A ``composer_shear_kept_units.json`` record
            (:func:`composer_shear.export.checkpoint.read_kept_units`).

    Raises:
        ShapeError: The record comes from a source of another shape, or is inconsistent.
    """
    config = getattr(model, "config", model)
    source = get_family(config).shape(config)
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
