"""The ``knowledge_distillation`` Composer algorithm: a frozen teacher's logits as extra targets.

Functional core first (the forward-KL loss with its hand-written gradient, the mask of
predicted positions, the loss combination), then the thin :class:`KnowledgeDistillation`
algorithm, in the style of Composer's own algorithms. The teacher itself (its weights, build
and placement) lives in :mod:`composer_shear.distillation.teacher`.

The loss is the forward KL divergence ``KL(teacher || student)`` between the next-token
distributions of the same batch, averaged over the positions the LM loss averages over (those
whose next label is not ``-100``). The teacher is never part of ``state.model``: it is not in
the optimizer, not in checkpoints (a resumed run rebuilds it) and is not touched by the
pruning hooks, which live on the student only.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
from composer.core import Algorithm, Event, Precision, State
from composer.core.precision import get_precision_context
from composer.loggers import Logger
from composer.utils import dist
from torch import nn

from composer_shear.distillation.teacher import (
    YAML_KEY,
    build_teacher_skeleton,
    load_teacher_weights,
    local_weight_bytes,
    place_teacher,
    source_weights,
    teacher_forward,
)
from composer_shear.interface import ModelPathError, model_path
from composer_shear.wrappers import hf_causal_lm

__all__ = [
    "IGNORE_INDEX",
    "TEACHER_DTYPES",
    "TEACHER_SHARDING",
    "KnowledgeDistillation",
    "add_distillation_loss",
    "forward_kl",
    "logits_of",
    "predicted_positions",
]

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
SOURCE = "source"
TEACHER_DTYPES = {
    "auto": None,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
TEACHER_SHARDING = ("auto", "full_shard", "none")
# Elements of one (rows x vocab) fp32 chunk of the KL computation: bounds its scratch memory
# (a handful of such buffers) whatever the batch, sequence and vocabulary sizes.
CHUNK_ELEMENTS = 1 << 24


# -- the loss ---------------------------------------------------------------------------------


def predicted_positions(batch: Mapping[str, Any], seq_len: int) -> torch.Tensor:
    """``(B, T)`` bool: positions whose logits predict a token the LM loss counts.

    Hugging Face causal LMs score ``logits[:, t]`` against ``labels[:, t + 1]`` and skip
    ``-100`` labels; the last position predicts nothing. Without labels the attention mask
    (or every position) decides.
    """
    labels = batch.get("labels")
    if labels is not None:
        valid = labels[:, 1:] != IGNORE_INDEX
    elif batch.get("attention_mask") is not None:
        valid = batch["attention_mask"][:, 1:].bool()
    else:
        ids = batch["input_ids"]
        valid = torch.ones(ids.shape[0], seq_len - 1, dtype=torch.bool, device=ids.device)
    return torch.nn.functional.pad(valid, (0, 1), value=False)


class _ForwardKL(torch.autograd.Function):
    """Mean of ``T^2 KL(softmax(t / T) || softmax(s / T))`` over the masked rows.

    Rows are processed in contiguous chunks in fp32 (masked-out rows are computed and weighted
    0: slicing is far cheaper than gathering the kept rows), and the gradient with respect to
    the student logits, ``T (q - p)`` per kept row, is written during the forward pass into
    one buffer of the logits' dtype; backward scales it by ``grad_output / N``. Autograd
    through ``log_softmax`` + ``kl_div`` would keep several fp32 tensors of the full
    ``(rows, vocab)`` size alive until backward instead.
    """

    @staticmethod
    def forward(ctx, student, teacher, mask, temperature, top_k):
        vocab = student.shape[-1]
        flat_s, flat_t = student.reshape(-1, vocab), teacher.reshape(-1, vocab)
        grad = torch.empty_like(flat_s) if ctx.needs_input_grad[0] else None
        # fp32 at least (fp64 inputs stay fp64, which the gradient tests use).
        dtype = torch.promote_types(student.dtype, torch.float32)
        total = torch.zeros((), device=student.device, dtype=dtype)
        step = max(1, CHUNK_ELEMENTS // vocab)
        for start in range(0, flat_s.shape[0], step):
            keep = mask[start : start + step]
            s = flat_s[start : start + step].to(dtype)
            t = flat_t[start : start + step].to(dtype)
            if temperature != 1.0:
                s, t = s / temperature, t / temperature
            log_q = torch.log_softmax(s, dim=-1)
            if top_k is None:
                log_p = torch.log_softmax(t, dim=-1)
                p = log_p.exp()
                kl = (p * (log_p - log_q)).sum(-1)
            else:
                # The teacher's top-k tokens, renormalised: KL(p_topk || q) with q the
                # student's full distribution (gathered at the teacher's top-k ids).
                values, ids = t.topk(top_k, dim=-1)
                log_p = torch.log_softmax(values, dim=-1)
                p = log_p.exp()
                kl = (p * (log_p - log_q.gather(-1, ids))).sum(-1)
            total = total + torch.where(keep, kl, 0.0).sum()
            if grad is not None:
                g = log_q.exp_()  # q, reusing log_q's storage
                if top_k is None:
                    g.sub_(p)
                else:
                    g.scatter_add_(-1, ids, -p)
                # T (q - p) lies in [-T, T]: safe in bf16 / fp16; the 1 / N comes in backward.
                g.mul_(temperature).masked_fill_(~keep.unsqueeze(-1), 0.0)
                grad[start : start + step].copy_(g)
        count = mask.sum().clamp(min=1).to(dtype)  # a tensor: no host sync
        ctx.grad, ctx.count, ctx.shape = grad, count, student.shape
        return total * (temperature**2) / count

    @staticmethod
    def backward(ctx, grad_output):
        grad, ctx.grad = ctx.grad, None
        if grad is None:
            raise RuntimeError(
                "The KD loss was differentiated twice: its gradient buffer is consumed by the "
                "first backward (retain_graph is not supported)."
            )
        scale = grad_output.to(ctx.count.dtype) / ctx.count
        if grad.dtype in (torch.float32, torch.float64):
            grad.mul_(scale)
        else:
            # Scale in fp32, chunk by chunk: a bf16 / fp16 scale factor would round alpha
            # and the microbatch weight, and 1 / N could underflow in fp16.
            for chunk in grad.split(max(1, CHUNK_ELEMENTS // grad.shape[-1])):
                chunk.copy_(chunk.float().mul_(scale))
        return grad.view(ctx.shape), None, None, None, None


def forward_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
) -> torch.Tensor:
    """Forward KL divergence ``KL(teacher || student)`` per position, averaged over ``mask``.

    The value is ``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` (Hinton et al.'s
    ``T^2`` keeps gradient magnitudes comparable across temperatures), averaged over the
    positions where ``mask`` is true; 0 when no position is. With ``top_k`` the teacher keeps
    only its ``k`` most likely tokens (renormalised); the student's distribution stays full,
    so the loss is then ``-log`` of the teacher's top-k mass, not 0, for a student equal to
    the teacher.

    Args:
        student_logits: ``(..., V)`` logits of the model being trained (any float dtype).
        teacher_logits: ``(..., V)`` logits of the teacher on the same inputs.
        mask: ``(...)`` bool positions to average over (default: all).
        temperature: Softmax temperature ``T`` of both distributions.
        top_k: Keep only the teacher's top-k tokens per position.

    Returns:
        A scalar tensor (fp32, or fp64 for fp64 logits), differentiable with respect to
        ``student_logits`` only, once (one backward; ``retain_graph`` is not supported).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"Student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ: the teacher must share the student's "
            f"vocabulary (set {YAML_KEY}.teacher to a model with the same tokenizer)."
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}.")
    if top_k is not None and not 0 < top_k <= student_logits.shape[-1]:
        raise ValueError(f"top_k must be in [1, vocab size], got {top_k}.")
    rows = student_logits[..., 0].numel()
    if mask is None:
        keep = torch.ones(rows, dtype=torch.bool, device=student_logits.device)
    else:
        keep = mask.reshape(-1).to(device=student_logits.device, dtype=torch.bool)
        if keep.numel() != rows:
            raise ValueError(f"mask {tuple(mask.shape)} does not match the logits' positions.")
    return _ForwardKL.apply(student_logits, teacher_logits.detach(), keep, temperature, top_k)


def add_distillation_loss(
    loss: torch.Tensor | Mapping[str, torch.Tensor], kd: torch.Tensor, alpha: float
) -> dict[str, torch.Tensor]:
    """Returns the loss dict with ``kd`` logged and weighted in: ``alpha KD + (1 - alpha) LM``.

    A tensor loss is the LM loss. A dict (e.g. from ``targeted_pruning``, which adds its
    Lagrangian term) must hold ``lm``; its ``total`` gains ``alpha (kd - lm)``, so other terms
    stay in whatever the algorithm order. With ``alpha == 0`` the total is returned untouched
    (the very same tensor): the run is then bit for bit the run without distillation, and
    ``kd`` is only logged.
    """
    if isinstance(loss, torch.Tensor):
        # alpha = 1: (1 - 1) * lm == 0 and 0 + kd == kd exactly, pure KD.
        total = loss if alpha == 0 else (1.0 - alpha) * loss + alpha * kd
        return {"lm": loss, "kd": kd, "total": total}
    if isinstance(loss, Mapping):
        if "lm" not in loss:
            raise TypeError(
                f"knowledge_distillation needs the LM loss under 'lm' in a dict loss; got keys "
                f"{sorted(loss)}."
            )
        total = loss["total"] if "total" in loss else sum(loss.values())
        if alpha != 0:
            total = total + alpha * (kd - loss["lm"])
        return {**loss, "kd": kd, "total": total}
    raise TypeError(f"knowledge_distillation cannot combine with a {type(loss)} loss.")


def logits_of(outputs: Any) -> torch.Tensor:
    """The logits of a Hugging Face causal LM output (attribute or mapping key).

    Raises:
        TypeError: ``outputs`` holds no logits tensor.
    """
    logits = getattr(outputs, "logits", None)
    if logits is None and isinstance(outputs, Mapping):
        logits = outputs.get("logits")
    if not isinstance(logits, torch.Tensor):
        raise TypeError(
            f"knowledge_distillation needs the student's logits in state.outputs (a Hugging "
            f"Face causal LM output); got {type(outputs).__name__}."
        )
    return logits


def _resolve_dtype(teacher_dtype: str, precision: Precision | str) -> torch.dtype:
    dtype = TEACHER_DTYPES[teacher_dtype]
    if dtype is not None:
        return dtype
    precision = Precision(precision)
    if precision in (Precision.AMP_BF16, Precision.AMP_FP8):
        return torch.bfloat16
    if precision == Precision.AMP_FP16:
        return torch.float16
    return torch.float32


class KnowledgeDistillation(Algorithm):
    """Distils a frozen teacher into the model being trained (pruned, or continued).

    At ``INIT`` global rank 0 takes the teacher's weights: a copy of the model as loaded
    (``teacher: source``; pruning gates and hooks excluded) or a Hugging Face directory /
    name, loaded strictly. Every rank builds the teacher's skeleton on ``meta``. At
    ``FIT_START`` the teacher is placed on the device: sharded with FSDP2 across all ranks,
    or one full copy per rank, and broadcast from rank 0. At ``AFTER_LOSS`` the teacher runs
    on the same (micro)batch under ``no_grad`` and the loss becomes
    ``alpha * KD + (1 - alpha) * LM`` (plus any term another algorithm adds, e.g. the
    pruning Lagrangian), logged as ``loss/train/{lm,kd,total}``.

    The teacher is not part of the trained model: it has no gradients, is not in the
    optimizer or in checkpoints, and is rebuilt from its source when a run resumes (at
    ``INIT`` the model still holds the loaded weights; checkpoints load afterwards).

    YAML (LLM Foundry)::

        algorithms:
          knowledge_distillation:
            teacher: source      # or a Hugging Face directory / name (CPT of a pruned model)
            alpha: 0.5           # loss = alpha * KD + (1 - alpha) * LM
            temperature: 1.0

    Args:
        teacher: ``"source"`` or a ``from_pretrained`` directory / name with the student's
            vocabulary.
        alpha: Weight of the KD loss in ``[0, 1]``; 1 is pure distillation. With 0 the KD
            loss is computed and logged without entering the gradient (bit for bit the run
            without this algorithm).
        temperature: Softmax temperature of both distributions (loss scaled by ``T^2``).
        top_k: Keep only the teacher's top-k tokens per position (default: all).
        teacher_dtype: ``auto`` (bf16 / fp16 under the matching AMP precision, else fp32),
            ``float32``, ``bfloat16`` or ``float16``.
        teacher_sharding: ``auto`` (``full_shard`` when the student is FSDP-wrapped on several
            ranks, else ``none``), ``full_shard`` (FSDP2 over all ranks) or ``none`` (a full
            copy per rank).
    """

    def __init__(
        self,
        teacher: str = SOURCE,
        alpha: float = 0.5,
        temperature: float = 1.0,
        top_k: int | None = None,
        teacher_dtype: str = "auto",
        teacher_sharding: str = "auto",
    ):
        if not isinstance(teacher, str | os.PathLike) or not str(teacher):
            raise ValueError(
                f"{YAML_KEY}.teacher must be 'source' or a model directory / name, got {teacher!r}."
            )
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"{YAML_KEY}.alpha must be in [0, 1], got {alpha}.")
        if float(temperature) <= 0:
            raise ValueError(f"{YAML_KEY}.temperature must be positive, got {temperature}.")
        if top_k is not None and (isinstance(top_k, bool) or int(top_k) < 1):
            raise ValueError(f"{YAML_KEY}.top_k must be a positive integer or null, got {top_k}.")
        if teacher_dtype not in TEACHER_DTYPES:
            raise ValueError(
                f"{YAML_KEY}.teacher_dtype must be one of {list(TEACHER_DTYPES)}, got "
                f"{teacher_dtype!r}."
            )
        if teacher_sharding not in TEACHER_SHARDING:
            raise ValueError(
                f"{YAML_KEY}.teacher_sharding must be one of {list(TEACHER_SHARDING)}, got "
                f"{teacher_sharding!r}."
            )
        self.teacher_spec = str(teacher)
        self.alpha, self.temperature = float(alpha), float(temperature)
        self.top_k = None if top_k is None else int(top_k)
        self.teacher_dtype, self.teacher_sharding = teacher_dtype, teacher_sharding
        self.teacher: nn.Module | None = None
        self._weights: dict[str, torch.Tensor] | None = None
        self._placed = False

    def match(self, event: Event, state: State) -> bool:
        """Runs at INIT, FIT_START and AFTER_LOSS."""
        return event in (Event.INIT, Event.FIT_START, Event.AFTER_LOSS)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        """See the class docstring for what happens at each event."""
        if event == Event.INIT:
            self._build(state)
        elif event == Event.FIT_START:
            self._place(state, logger)
        elif event == Event.AFTER_LOSS:
            self._place(state, logger)
            self._add_kd(state)

    # -- events -------------------------------------------------------------------------------

    def _build(self, state: State) -> None:
        dtype = _resolve_dtype(self.teacher_dtype, state.precision)
        # The student's attention kernel: the same numerics on both sides (a teacher equal to
        # the student gives exactly 0).
        attn = getattr(
            hf_causal_lm(state.model, "knowledge_distillation").config, "_attn_implementation", None
        )
        on_rank0 = dist.get_global_rank() == 0
        # Rank 0 holds the weights until FIT_START and broadcasts them; the others need only
        # the config (under init_device: mixed they hold no weights anyway).
        if self.teacher_spec != SOURCE:
            # Checked here, not when the YAML is built (recipes carry placeholder paths until
            # a run fills them in): a missing directory is named instead of failing as a
            # malformed hub id inside transformers.
            try:
                model_path(self.teacher_spec, "teacher model")
            except ModelPathError as error:
                raise ModelPathError(f"{YAML_KEY}.teacher: {error}") from error
        if self.teacher_spec == SOURCE:
            if on_rank0 or dist.get_world_size() == 1:
                config, self._weights = source_weights(state.model, dtype)
            else:
                config = copy.deepcopy(hf_causal_lm(state.model, "knowledge_distillation").config)
        elif on_rank0 or dist.get_world_size() == 1:
            config, self._weights = load_teacher_weights(self.teacher_spec, dtype, attn)
        else:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(self.teacher_spec)
        self.teacher = build_teacher_skeleton(config, dtype, attn)
        self._placed = False
        log.info(
            "knowledge_distillation: teacher %s (%s, %s), alpha %s, temperature %s, top_k %s",
            self.teacher_spec,
            type(self.teacher).__name__,
            str(dtype).removeprefix("torch."),
            self.alpha,
            self.temperature,
            self.top_k,
        )

    def _place(self, state: State, logger: Logger) -> None:
        if self._placed:
            return
        if self.teacher is None:
            raise RuntimeError("knowledge_distillation: the teacher was not built (INIT?).")
        world = dist.get_world_size()
        shard = world > 1 and (
            self.teacher_sharding == "full_shard"
            or (self.teacher_sharding == "auto" and state.fsdp_enabled)
        )
        device = state.device.tensor_to_device(torch.zeros(())).device
        self.teacher = place_teacher(self.teacher, self._weights, device, shard)
        self._weights = None
        self._placed = True
        placement = {
            "knowledge_distillation/teacher": self.teacher_spec,
            "knowledge_distillation/teacher_dtype": str(next(self.teacher.parameters()).dtype),
            "knowledge_distillation/teacher_sharding": "full_shard" if shard else "none",
            "knowledge_distillation/teacher_mib_per_rank": local_weight_bytes(self.teacher) / 2**20,
        }
        logger.log_hyperparameters(placement)
        log.info("knowledge_distillation: teacher placed on %s: %s", device, placement)

    def _add_kd(self, state: State) -> None:
        student = logits_of(state.outputs)
        with get_precision_context(state.precision, state.precision_config):
            teacher = teacher_forward(self.teacher, state.batch)
        mask = predicted_positions(state.batch, student.shape[1])
        if self.alpha == 0:
            # Logged only: no graph, so the run is exactly the run without distillation.
            with torch.no_grad():
                kd = forward_kl(student.detach(), teacher, mask, self.temperature, self.top_k)
        else:
            kd = forward_kl(student, teacher, mask, self.temperature, self.top_k)
        del teacher
        state.loss = add_distillation_loss(state.loss, kd, self.alpha)

    # -- checkpoints ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The settings only: the teacher itself is rebuilt from its source, never saved."""
        return {
            "teacher": self.teacher_spec,
            "alpha": self.alpha,
            "temperature": self.temperature,
            "top_k": self.top_k,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Warns when a resumed run distils differently from the run that saved."""
        mine = self.state_dict()
        changed = {k: (state[k], mine[k]) for k in mine if k in state and state[k] != mine[k]}
        if changed:
            log.warning(
                "knowledge_distillation: the checkpoint was trained with different settings "
                "(saved, now): %s",
                changed,
            )
