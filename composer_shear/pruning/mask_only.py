"""Mask-only pruning: the gates learn which units of the *frozen* source model to keep.

With ``targeted_pruning``'s ``freeze_weights: true`` every weight of the model keeps
``requires_grad=False``: no weight gradient is computed or allocated, the optimizer keeps no
state for the weights (Composer's ``DecoupledAdamW`` creates state only for parameters that
receive a gradient), and only the gates' log-alphas and the Lagrange multipliers train. The
backward pass still runs through the frozen network to reach the gates, so a step costs about
4N instead of 6N FLOPs per token. The noise of the hard-concrete gates cannot damage the
weights, and the objective is exactly "which units of the source model to keep": the gates
are binary at evaluation, hardening and export (:class:`~composer_shear.pruning.masking.ShearGates`
``binary``), so the export is the source weights cut at the learned units.

Objectives (``objective``): ``lm``, the LM loss of the gated model; or ``distill``, the
forward KL divergence from the source model's next-token distribution. The frozen model *is*
the source, so its logits come from one extra forward of the same model with the gates
bypassed (no second copy of the weights), run under ``no_grad`` before the gated forward
(about 2N more FLOPs per token: ~6N a step, the cost of ordinary training, without the
weights' gradients and optimizer state); the loss itself is
:func:`composer_shear.distillation.algorithm.forward_kl`.
"""

from __future__ import annotations

from typing import Any

import torch
from composer.core import State
from composer.core.precision import get_precision_context
from torch import nn

from composer_shear.distillation.algorithm import (
    add_distillation_loss,
    forward_kl,
    logits_of,
    predicted_positions,
)
from composer_shear.pruning.masking import ShearGates

__all__ = ["OBJECTIVES", "add_source_distillation", "freeze_source_weights", "source_logits"]

OBJECTIVES = ("lm", "distill")


def freeze_source_weights(model: nn.Module, gates: ShearGates) -> int:
    """Sets ``requires_grad=False`` on every parameter of ``model`` except the gates'.

    Args:
        model: The Hugging Face model carrying ``gates`` (not yet wrapped by FSDP: call it
            before wrapping, as ``targeted_pruning`` does at ``INIT``).
        gates: The gates, whose log-alphas and multipliers keep training.

    Returns:
        The number of frozen parameter elements.
    """
    trained = {id(p) for p in gates.parameters()}
    frozen = 0
    for param in model.parameters():
        if id(param) not in trained:
            param.requires_grad_(False)
            frozen += param.numel()
    return frozen


@torch.no_grad()
def source_logits(state: State, gates: ShearGates) -> torch.Tensor:
    """The source model's logits for the current (micro)batch: the gated model, gates off.

    Runs ``state.model`` (any Composer / FSDP wrapper: the same call as the training forward,
    so FSDP gathers as it does there) in eval mode, without labels (no loss is computed), under
    the run's precision context. Call it before the training forward of the same batch: it
    leaves no graph and no FSDP backward state behind.
    """
    model = state.model
    batch: dict[str, Any] = {k: v for k, v in state.batch.items() if k != "labels"}
    was_training = model.training
    model.eval()  # the source, deterministically (dropout off); the gates are bypassed anyway
    try:
        with gates.bypassed(), get_precision_context(state.precision, state.precision_config):
            return logits_of(model(batch)).detach()
    finally:
        model.train(was_training)


def add_source_distillation(state: State, teacher_logits: torch.Tensor) -> None:
    """Replaces ``state.loss`` by the KD loss from ``teacher_logits`` (the LM loss is logged).

    ``state.loss`` becomes ``{"lm", "kd", "total": kd}``; the LM loss is detached, so its
    backward (a second pass over the vocabulary-sized logits) is not paid for a zero weight.
    """
    loss = state.loss
    if not isinstance(loss, torch.Tensor):
        raise TypeError(
            "targeted_pruning objective: distill expects the model's LM loss (a tensor) at "
            f"AFTER_LOSS, got {type(loss).__name__}: is another algorithm rewriting the loss "
            "(e.g. knowledge_distillation)? Use one of them."
        )
    student = logits_of(state.outputs)
    mask = predicted_positions(state.batch, student.shape[1])
    kd = forward_kl(student, teacher_logits, mask)
    state.loss = add_distillation_loss(loss.detach(), kd, alpha=1.0)
