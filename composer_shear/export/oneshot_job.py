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

YAML::

    algorithms:
      oneshot_pruning:
        target_shape: {num_hidden_layers: 28, hidden_size: 3072, ...}
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
from composer.core import State
from composer.utils import dist

from composer_shear.export.oneshot import (
    NATIVE_LAYER_SCORE,
    check_method,
    keep_masks_from_scores,
    oneshot_importance,
)
from composer_shear.pruning.algorithm import (
    TargetedPruning,
    importance_forward,
    rank_calibration_batches,
)
from composer_shear.pruning.importance import unit_scores
from composer_shear.pruning.masking import ShearGates
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
        target_shape: Mapping[str, int],
        method: str = "activation",
        layer_score: str | None = None,
        calibration_data: str | None = None,
        calibration_tokens: int = 65536,
        seed: int = 0,
    ):
        try:
            check_method(method, layer_score)
        except ValueError as error:
            raise ValueError(f"{NAME}: {error}") from None
        if int(calibration_tokens) <= 0:
            raise ValueError(f"{NAME}.calibration_tokens must be positive: {calibration_tokens}")
        super().__init__(
            target_shape,
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
        masks = keep_masks_from_scores(
            unit_scores(importance, gates.source), gates.source, gates.target
        )
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
        return info


def _calibration_loss(state: State) -> Any:
    """``loss(input_ids)``: the causal LM loss of the job's model (Taylor importance)."""

    def loss(ids: torch.Tensor) -> torch.Tensor:
        batch = state.device.batch_to_device(
            {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        )
        return state.model(batch).loss

    return loss
