"""The ``oneshot_pruning`` Composer algorithm: the one-shot cut as an LLM Foundry job.

``composer-shear prune-oneshot`` cuts in one process; this algorithm makes the same cut inside
``llmfoundry train`` under ``composer -n N`` with FSDP, so that a 7-8B (or larger) source is
sharded over the GPUs and the calibration batches are split over the ranks. It is mask-only
``targeted_pruning`` (:mod:`composer_shear.pruning.mask_only`) whose gates are decided before
the first step instead of learned:

* ``INIT``: binary gates for ``target_shape`` are attached and every weight is frozen (as
  ``targeted_pruning`` with ``freeze_weights: true``; the same FSDP and precision checks);
* ``FIT_START`` (after FSDP wrapping): each rank scores the units on its share of the
  calibration batches with the one-shot scorers (sums all-reduced:
  :func:`composer_shear.export.oneshot.oneshot_importance`), the units are chosen by the
  CLI's own selection (:func:`composer_shear.export.oneshot.keep_masks_from_scores`), and the
  gates are hardened at exactly those units;
* the run's one batch (``max_duration: 1ba``) changes nothing: the weights are frozen (no
  gradient, no optimizer state) and hardened gates have learning rate 0;
* ``FIT_END``: ``pruned_hf_export`` gathers the model and writes the source weights cut at
  the chosen units, the tensors ``prune-oneshot`` writes for the same calibration tokens.

Composer refuses ``max_duration: 0ba`` (no training would occur), hence the one batch.

``target_params`` instead of ``target_shape`` searches the shape as ``prune-oneshot
--target-params`` does, inside the job: at ``INIT`` the gates are built for a target that
shrinks every dimension some candidate under the budget shrinks
(:func:`composer_shear.export.search.covering_target`); at ``FIT_START``, after the importance
pass, each candidate's cut is set on those gates and scored by its loss on held-out batches of
the calibration data's ``eval`` split (split over the ranks, sums all-reduced), rank 0's
winner is broadcast, and the gates are hardened at the winner's units.

YAML::

    algorithms:
      oneshot_pruning:
        target_shape: {num_hidden_layers: 28, hidden_size: 3072, ...}  # or target_params: 3.0e9
        method: activation           # or taylor
        calibration_tokens: 65536
    callbacks:
      pruned_hf_export: {save_folder: ./runs/{run_name}/pruned_hf}
    max_duration: 1ba
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from composer.core import Event, State
from composer.loggers import Logger
from composer.utils import dist

from composer_shear.export.oneshot import (
    NATIVE_LAYER_SCORE,
    check_method,
    keep_masks_from_scores,
    oneshot_importance,
)
from composer_shear.export.search import (
    TABLE_HEADER,
    Candidate,
    covering_target,
    ranked,
    shapes_to_score,
)
from composer_shear.families import get_family
from composer_shear.pruning.algorithm import (
    TargetedPruning,
    importance_forward,
    rank_calibration_batches,
)
from composer_shear.pruning.importance import unit_scores
from composer_shear.pruning.masking import ShearGates
from composer_shear.shape import ModelShape, ShapeError
from composer_shear.sharding import writable_gates
from composer_shear.wrappers import hf_causal_lm

__all__ = ["OneshotPruning"]

log = logging.getLogger(__name__)

NAME = "oneshot_pruning"


class OneshotPruning(TargetedPruning):
    """One-shot structured pruning by importance inside an LLM Foundry job (no training).

    At ``FIT_START`` it measures the importance of every prunable unit on calibration batches
    split over the ranks (FSDP-sharded model, sums all-reduced), keeps the top units of every
    row with the selection code of ``composer-shear prune-oneshot``, and hardens binary gates
    at them; every weight is frozen from ``INIT``. Run it for ``max_duration: 1ba`` with
    ``pruned_hf_export``: the batch changes nothing, and the export at fit end is the source
    weights cut at the chosen units. The FSDP settings ``targeted_pruning`` needs apply
    (float32 compute parameters, non-reentrant activation checkpointing, and under FSDP1
    ``use_orig_params: true``).

    YAML::

        algorithms:
          oneshot_pruning:
            target_shape: {num_hidden_layers: 24, hidden_size: 512, num_attention_heads: 6,
                           num_key_value_heads: 2, intermediate_size: 1152}
            method: activation
            calibration_tokens: 65536
        max_duration: 1ba

    Args:
        target_shape: Target sizes (keys of :data:`composer_shear.shape.TARGET_KEYS`).
        target_params: A parameter budget instead of ``target_shape``: the uniform shapes
            under it (``prune-oneshot --target-params``' candidates) are scored at
            ``FIT_START`` by the loss of their cut on ``search_tokens`` held-out tokens of the
            calibration data's ``eval`` split, and the best is cut; the table is logged and
            recorded in the export's info.
        non_embedding: ``target_params`` counts non-embedding parameters.
        search_candidates: Score at most this many shapes (spread over the depths).
        search_tokens: Held-out tokens each candidate is scored on (all ranks together);
            default ``calibration_tokens``.
        width_multiple: Candidates' hidden and intermediate sizes are multiples of this.
        budget_slack: Candidates are within this fraction below ``target_params``.
        method: ``activation`` (activation magnitude, Minitron), ``taylor`` (first-order
            Taylor importance ``|activation x gradient|`` of the calibration loss, one backward
            pass per batch through the frozen model) or ``random`` (a baseline, no data).
        layer_score: How layers are ranked: ``block_influence`` or ``taylor``; default the
            method's own (``activation``: block influence, ``taylor``: taylor).
        calibration_data: A ``DATA/<domain>/train`` MDS folder (local or remote, as
            ``prune-oneshot --data``); default the ``multi_domain`` train loader's folder and
            domains. Sequences are as long as the train loader's, ``device_train_microbatch_size``
            per batch (``prune-oneshot --max-seq-len`` / ``--batch-size``).
        calibration_tokens: Calibration tokens in all, split over the ranks; rounded up to
            whole rounds of one batch per rank (so that no batch counts twice).
        seed: Seed of the calibration pick (and of ``random``), ``prune-oneshot --seed``.
    """

    def __init__(
        self,
        target_shape: Mapping[str, int] | None = None,
        method: str = "activation",
        layer_score: str | None = None,
        calibration_data: str | None = None,
        calibration_tokens: int = 65536,
        seed: int = 0,
        target_params: int | float | None = None,
        non_embedding: bool = False,
        search_candidates: int = 24,
        search_tokens: int | None = None,
        width_multiple: int = 64,
        budget_slack: float = 0.03,
    ):
        try:
            check_method(method, layer_score)
        except ValueError as error:
            raise ValueError(f"{NAME}: {error}") from None
        if int(calibration_tokens) <= 0:
            raise ValueError(f"{NAME}.calibration_tokens must be positive: {calibration_tokens}")
        if (target_shape is None) == (target_params is None):
            raise ValueError(
                f"{NAME}: give target_shape (e.g. {{num_hidden_layers: 24, hidden_size: 512}}) "
                "or target_params (a parameter budget, e.g. 3.0e9), exactly one of them."
            )
        if target_params is not None:
            if method not in NATIVE_LAYER_SCORE:
                raise ValueError(
                    f"{NAME}: target_params scores candidate cuts on data; method {method!r} "
                    f"has none (use one of {sorted(NATIVE_LAYER_SCORE)})."
                )
            if float(target_params) <= 0 or float(target_params) != int(float(target_params)):
                raise ValueError(
                    f"{NAME}.target_params must be a positive whole number of parameters, "
                    f"got {target_params!r}."
                )
            if int(search_candidates) < 1:
                raise ValueError(f"{NAME}.search_candidates must be >= 1: {search_candidates}")
            if search_tokens is not None and int(search_tokens) <= 0:
                raise ValueError(f"{NAME}.search_tokens must be positive: {search_tokens}")
        self.target_params = None if target_params is None else int(float(target_params))
        self.non_embedding = bool(non_embedding)
        self.search_candidates = int(search_candidates)
        self.search_tokens = int(search_tokens or calibration_tokens)
        self.width_multiple, self.budget_slack = int(width_multiple), float(budget_slack)
        self.candidates: list[Candidate] = []  # the search's, scored at FIT_START
        super().__init__(
            None if target_shape is None else dict(target_shape),
            lagrangian_warmup="0ba",
            seed=seed,
            init="activation",  # the hook that runs once, at FIT_START of a new run
            init_data=calibration_data,
            init_tokens=int(calibration_tokens),
            eval_at="target",
            harden_at="0ba",
            landing_eval_batches=0,
            freeze_weights=True,
        )
        self.method, self.layer_score = method, layer_score
        # What the export records (filled at FIT_START).
        self.calibration_tokens_used = 0

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        """``INIT`` with ``target_params``: the gates' target covers every candidate first."""
        if event == Event.INIT and self.target_params is not None:
            config = hf_causal_lm(state.model, NAME).config
            source = get_family(config).shape(config)
            try:
                self.candidates = shapes_to_score(
                    source,
                    self.target_params,
                    self.non_embedding,
                    self.search_candidates,
                    width_multiple=self.width_multiple,
                    slack=self.budget_slack,
                )
            except ShapeError as error:
                raise ShapeError(f"{NAME}.target_params: {error}") from None
            self.target_shape = covering_target(source, self.candidates)
            log.info(
                "%s: %d candidate shapes under %s parameters; gates cover %s",
                NAME,
                len(self.candidates),
                f"{self.target_params:,}",
                self.target_shape,
            )
        super().apply(event, state, logger)

    def _init_from_importance(self, state: State, gates: ShearGates) -> None:
        """Scores the units over all ranks, keeps the CLI's choice, hardens the gates there."""
        batches: list[torch.Tensor] = []
        if self.method in NATIVE_LAYER_SCORE:
            batches = rank_calibration_batches(
                state,
                self.init_data,
                self.init_tokens,
                self.seed,
                NAME,
                "calibration_data",
                whole_rounds=True,
            )
        hf_model = hf_causal_lm(state.model, NAME)
        was_training = state.model.training
        state.model.eval()
        try:
            with gates.bypassed():
                importance = oneshot_importance(
                    state.model,
                    batches,
                    self.method,
                    self.seed,
                    self.layer_score,
                    forward=importance_forward(state),
                    loss=_calibration_loss(state),
                    hf_model=hf_model,
                )
        finally:
            state.model.train(was_training)
        scores = unit_scores(importance, gates.source)
        if self.target_params is not None:
            self._search(state, gates, scores)
        masks = gate_masks(gates, scores, gates.target)
        with writable_gates(state.model, gates):
            # Kept units score 1, pruned 0: the gates' top-k (and so the hardened 0/1 values)
            # is exactly the selection above.
            gates.init_from_scores(
                {name: mask.float() for name, mask in masks.items()},
                self.init_log_alpha,
                self.init_pruned_log_alpha,
            )
            gates.harden_()
            for name, mask in masks.items():
                kept = gates.gates[name].deterministic_keep_mask().cpu()
                if not torch.equal(kept, mask.cpu()):
                    raise RuntimeError(f"{NAME}: the hardened {name} gates differ from the cut")
        self.calibration_tokens_used = importance.tokens
        log.info(
            "%s: %s -> %s by %s importance on %d calibration tokens (all ranks, rank %d)",
            NAME,
            gates.source.describe(),
            gates.target.describe(),
            self.method,
            importance.tokens,
            dist.get_global_rank(),
        )

    def _search(self, state: State, gates: ShearGates, scores: dict[str, torch.Tensor]) -> None:
        """Scores every candidate's cut on held-out batches; retargets the gates to the best."""
        held_out = rank_calibration_batches(
            state,
            self.init_data,
            self.search_tokens,
            self.seed,
            NAME,
            "calibration_data",
            whole_rounds=True,
            split="eval",
        )
        for index, candidate in enumerate(self.candidates, 1):
            with writable_gates(state.model, gates):
                gates.retarget(candidate.shape)
                masks = gate_masks(gates, scores, candidate.shape)
                gates.init_from_scores(
                    {name: mask.float() for name, mask in masks.items()},
                    self.init_log_alpha,
                    self.init_pruned_log_alpha,
                )
            candidate.loss = _held_out_loss(state, held_out)
            if dist.get_global_rank() == 0:
                log.info("%s: [%d/%d] %s", NAME, index, len(self.candidates), candidate.row())
        winner, table = ranked(self.candidates)
        # Every rank computed the same all-reduced losses; rank 0's choice is still the one
        # every rank takes, so that no tie or rounding can split the ranks.
        choice = state.device.tensor_to_device(torch.tensor([self.candidates.index(winner)]))
        dist.broadcast(choice, src=0)
        winner = self.candidates[int(choice.item())]
        self.candidates = table
        gates.retarget(winner.shape)
        if dist.get_global_rank() == 0:
            lines = "\n".join(c.row() for c in table)
            log.info(
                "%s: shapes under %s parameters by held-out loss of their cut:\n%s\n%s",
                NAME,
                f"{self.target_params:,}",
                TABLE_HEADER,
                lines,
            )

    def export_info(self) -> dict[str, Any]:
        """What ``pruned_hf_export`` records about the cut in the export's info."""
        info: dict[str, Any] = {
            "method": f"oneshot-{self.method} ({NAME})",
            "calibration_tokens": self.calibration_tokens_used,
            "seed": self.seed,
        }
        if self.method in NATIVE_LAYER_SCORE:
            info["layer_score"] = self.layer_score or NATIVE_LAYER_SCORE[self.method]
            info["calibration_data"] = self.init_data
        if self.target_params is not None:
            info["target_params"] = self.target_params
            info["non_embedding"] = self.non_embedding
            info["search"] = [
                {"shape": c.shape.config_updates(), "params": c.params, "loss": c.loss}
                for c in self.candidates
            ]
        return info

    def state_dict(self) -> dict[str, Any]:
        """The base state, and the budget a searched target came from."""
        state = super().state_dict()
        state["target_params"] = self.target_params
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A searched run resumes (or is exported) at the shape its search chose."""
        super().load_state_dict(state)
        resolved = state.get("resolved_target")
        if self.gates is not None and resolved is not None:
            self.gates.retarget(self.gates.source.resolve_target(dict(resolved)))


def gate_masks(
    gates: ShearGates, scores: dict[str, torch.Tensor], target: ModelShape
) -> dict[str, torch.Tensor]:
    """The one-shot cut for ``target`` as a keep mask per gate (all kept where it does not cut)."""
    masks = keep_masks_from_scores(scores, gates.source, target)
    for name, gate in gates.gates.items():
        if name not in masks:
            masks[name] = torch.ones(gate.shape, dtype=torch.bool)
    return masks


@torch.no_grad()
def _held_out_loss(state: State, batches: list[torch.Tensor]) -> float:
    """Mean LM loss per batch over every rank's ``batches`` (the same count on every rank)."""
    was_training = state.model.training
    state.model.eval()
    try:
        total = state.device.tensor_to_device(torch.zeros(2, dtype=torch.float64))
        loss = _calibration_loss(state)
        for ids in batches:
            total[0] += float(loss(ids))
            total[1] += 1
    finally:
        state.model.train(was_training)
    dist.all_reduce(total)
    return float(total[0] / total[1])


def _calibration_loss(state: State) -> Any:
    """``loss(input_ids)``: the causal LM loss of the job's model (Taylor importance)."""

    def loss(ids: torch.Tensor) -> torch.Tensor:
        batch = state.device.batch_to_device(
            {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        )
        return state.model(batch).loss

    return loss
