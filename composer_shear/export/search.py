"""A target by parameter budget: enumerate the shapes under it, score their one-shot cuts.

Users think in parameters ("a 3B model"), the method needs a shape. :func:`candidate_shapes`
lists every uniform shape of the source's family under a budget (GQA-valid, widths in
GPU-friendly multiples, the layer counts the family can prune), keeps the largest ones per
depth, and :func:`search_shape` scores each by the loss of its one-shot importance cut on
held-out calibration batches — one importance pass over the source, then a forward pass per
candidate — and returns the table and the winner. NVIDIA's Minitron pruning (Model Optimizer)
scores candidates the same way, without training; a short CPT of the top few is the natural
next step and is left to the caller.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from composer_shear.shape import ModelShape, ShapeError

__all__ = [
    "TABLE_HEADER",
    "Candidate",
    "candidate_shapes",
    "covering_target",
    "cut_loss",
    "ranked",
    "search_shape",
    "shapes_to_score",
]


@dataclass
class Candidate:
    """One candidate shape and, once scored, the loss of its one-shot cut."""

    shape: ModelShape
    params: int
    loss: float | None = None

    def row(self) -> str:
        """One line of the search table."""
        s = self.shape
        loss = "-" if self.loss is None else f"{self.loss:.4f}"
        return (
            f"{s.num_hidden_layers:>6} {s.hidden_size:>6} {s.num_attention_heads:>5} "
            f"{s.num_key_value_heads:>4} {s.intermediate_size:>7} {self.params:>15,} {loss:>8}"
        )


TABLE_HEADER = (
    f"{'layers':>6} {'hidden':>6} {'heads':>5} {'kv':>4} {'interm.':>7} {'params':>15} {'loss':>8}"
)


def candidate_shapes(
    source: ModelShape,
    budget: int,
    non_embedding: bool = False,
    width_multiple: int = 64,
    slack: float = 0.03,
    per_depth: int = 3,
    min_depth_fraction: float = 0.5,
) -> list[Candidate]:
    """The uniform shapes of ``source``'s family under ``budget`` parameters, largest first.

    Args:
        source: The source model's shape.
        budget: Parameter budget (total, or non-embedding with ``non_embedding``).
        non_embedding: Count parameters outside the embedding and LM head only.
        width_multiple: Hidden and intermediate sizes are multiples of this (tensor cores).
        slack: Keep shapes within this fraction below the budget (smaller ones waste it).
        per_depth: Keep at most this many shapes per layer count (the largest).
        min_depth_fraction: The shallowest depth tried, as a fraction of the source's layers.

    Raises:
        ShapeError: No valid shape fits the budget.
    """
    if budget <= 0:
        raise ShapeError(f"the parameter budget must be positive, got {budget}")
    fixed = dict(source.fixed)

    def sizes(top: int) -> list[int]:
        # Multiples of width_multiple from a quarter of the source up (a smaller cut keeps
        # too little of the source to be worth pruning), and the source size itself.
        start = max(width_multiple, math.ceil(top / 4 / width_multiple) * width_multiple)
        return sorted({top, *range(start, top, width_multiple)})

    depths = (
        [source.num_hidden_layers]
        if "num_hidden_layers" in fixed
        else range(
            math.ceil(source.num_hidden_layers * min_depth_fraction), source.num_hidden_layers + 1
        )
    )
    hiddens = [source.hidden_size] if "hidden_size" in fixed else sizes(source.hidden_size)
    inters = (
        [source.intermediate_size]
        if "intermediate_size" in fixed
        else sizes(source.intermediate_size)
    )
    # Attention layouts: drop whole kv groups (the source's query heads per group), or query
    # heads within every group; never below a quarter of the source's query heads.
    min_heads = math.ceil(source.num_attention_heads / 4)
    attention = {
        (kv * source.heads_per_group, kv) for kv in range(1, source.num_key_value_heads + 1)
    } | {
        (source.num_key_value_heads * group, source.num_key_value_heads)
        for group in range(1, source.heads_per_group + 1)
    }
    attention = {(heads, kv) for heads, kv in attention if heads >= min_heads}
    count = ModelShape.num_non_embedding_params if non_embedding else ModelShape.num_params
    by_depth: dict[int, list[Candidate]] = {}
    for depth, hidden, inter, (heads, kv) in itertools.product(depths, hiddens, inters, attention):
        target = {
            "num_hidden_layers": depth,
            "hidden_size": hidden,
            "intermediate_size": inter,
            "num_attention_heads": heads,
            "num_key_value_heads": kv,
        }
        try:
            shape = source.resolve_target(target)
        except ShapeError:
            continue  # a dimension the family cannot prune, or an invalid attention layout
        params = count(shape)
        if (1 - slack) * budget <= params <= budget:
            by_depth.setdefault(depth, []).append(Candidate(shape, params))
    if not by_depth:
        raise ShapeError(
            f"no shape of this source fits {budget:,} parameters within {slack:.0%} (source "
            f"{count(source):,}); lower the budget's precision (slack) or the width multiple"
        )
    kept = []
    for depth in sorted(by_depth, reverse=True):
        # Per depth, the largest shapes, one per hidden size (the trade-offs worth scoring are
        # between widths); among equal sizes prefer more query heads (closest to the source).
        ranked = sorted(
            by_depth[depth],
            key=lambda c: (c.params, c.shape.num_attention_heads),
            reverse=True,
        )
        widths: set[int] = set()
        for candidate in ranked:
            if candidate.shape.hidden_size not in widths and len(widths) < per_depth:
                widths.add(candidate.shape.hidden_size)
                kept.append(candidate)
    return kept


@torch.no_grad()
def cut_loss(compact: nn.Module, batches: Sequence[Any]) -> float:
    """Mean LM loss of a cut model on ``batches`` (``input_ids`` tensors)."""
    compact.eval()
    device = next(compact.parameters()).device
    with torch.no_grad():
        losses = [float(compact(input_ids=b.to(device), labels=b.to(device)).loss) for b in batches]
    return sum(losses) / len(losses)


def shapes_to_score(
    source: ModelShape,
    budget: int,
    non_embedding: bool = False,
    max_candidates: int = 24,
    **candidate_options: Any,
) -> list[Candidate]:
    """The candidates a search scores: at most ``max_candidates``, spread over the depths.

    Every depth's largest shape first, then every depth's second largest, and so on (deepest
    first), so that a small ``max_candidates`` still compares depths rather than widths of
    the deepest one. The CLI's search and the ``oneshot_pruning`` job score this same list.

    Args:
        source: The source model's shape.
        budget: Parameter budget.
        non_embedding: The budget counts non-embedding parameters.
        max_candidates: At most this many.
        **candidate_options: Passed to :func:`candidate_shapes`.

    Raises:
        ShapeError: No valid shape fits the budget, or ``max_candidates`` < 1.
    """
    if int(max_candidates) < 1:
        raise ShapeError(f"max_candidates must be at least 1, got {max_candidates}")
    per_depth: dict[int, list[Candidate]] = {}
    for candidate in candidate_shapes(source, budget, non_embedding, **candidate_options):
        per_depth.setdefault(candidate.shape.num_hidden_layers, []).append(candidate)
    columns = itertools.zip_longest(*per_depth.values())
    return [c for row in columns for c in row if c is not None][: int(max_candidates)]


def covering_target(source: ModelShape, candidates: Sequence[Candidate]) -> dict[str, int]:
    """A target that shrinks every dimension some candidate shrinks (the smallest sizes).

    Gates are built for a target before a search picks one: gates for this target can hold
    any candidate's cut (:meth:`~composer_shear.pruning.masking.ShearGates.retarget`).

    Raises:
        ShapeError: ``candidates`` is empty.
    """
    if not candidates:
        raise ShapeError("no candidate shapes to cover")
    shapes = [c.shape for c in candidates]
    kv = min(s.num_key_value_heads for s in shapes)
    per_group = min(s.heads_per_group for s in shapes)
    target = {
        "num_hidden_layers": min(s.num_hidden_layers for s in shapes),
        "hidden_size": min(s.hidden_size for s in shapes),
        "intermediate_size": min(s.intermediate_size for s in shapes),
        "num_key_value_heads": kv,
        "num_attention_heads": kv * per_group,
    }
    source.resolve_target(target)  # valid by construction; checked all the same
    return target


def search_shape(
    source: ModelShape,
    budget: int,
    cut: Callable[[ModelShape], nn.Module],
    batches: Sequence[Any],
    non_embedding: bool = False,
    max_candidates: int = 24,
    **candidate_options: Any,
) -> tuple[Candidate, list[Candidate]]:
    """Scores the candidate shapes under ``budget`` by the loss of their one-shot cut.

    Args:
        source: The source model's shape.
        budget: Parameter budget.
        cut: ``target shape -> compact model``: the one-shot cut of the source by importance
            measured on calibration batches other than ``batches``
            (:func:`composer_shear.export.oneshot.prune_oneshot_to_dir` passes it).
        batches: Held-out batches the cuts are scored on.
        non_embedding: The budget counts non-embedding parameters.
        max_candidates: Score at most this many (:func:`shapes_to_score`).
        **candidate_options: Passed to :func:`candidate_shapes`.

    Returns:
        The winner and every scored candidate (lowest loss first).
    """
    candidates = shapes_to_score(source, budget, non_embedding, max_candidates, **candidate_options)
    for index, candidate in enumerate(candidates, 1):
        candidate.loss = cut_loss(cut(candidate.shape), batches)
        print(f"  [{index}/{len(candidates)}] {candidate.row()}", flush=True)
    return ranked(candidates)


def ranked(candidates: Sequence[Candidate]) -> tuple[Candidate, list[Candidate]]:
    """The winner (lowest loss; the first listed among equals) and every candidate, best first."""
    scored = sorted(candidates, key=lambda c: c.loss)
    return scored[0], scored
