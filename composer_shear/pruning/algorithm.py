"""The ``targeted_pruning`` Composer algorithm: gates, optimizer groups, and the penalty.

Functional core first (:func:`apply_targeted_pruning`, usable without a Trainer), then the thin
:class:`TargetedPruning` algorithm, in the style of Composer's own algorithms. The penalty is
*computed* inside the forward pass (see :mod:`composer_shear.pruning.masking`) and *added* to the
loss
here, at ``AFTER_LOSS``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from composer.core import Algorithm, Event, State, Time, TimeUnit
from composer.distributed.mosaic_parallelism import get_mixed_precision
from composer.loggers import Logger
from composer.utils import dist
from torch import nn
from torch.optim import Optimizer

from composer_shear.data.calibration import calibration_batches
from composer_shear.data.mixer import find_multi_domain_dataset
from composer_shear.distillation.algorithm import KnowledgeDistillation
from composer_shear.pruning.gates import (
    LOG_ALPHA_MAX,
    LOG_ALPHA_MIN,
    check_init_log_alpha,
    check_log_alpha_range,
)
from composer_shear.pruning.importance import Importance, collect_importance, unit_scores
from composer_shear.pruning.mask_only import (
    OBJECTIVES,
    add_source_distillation,
    freeze_source_weights,
    source_logits,
)
from composer_shear.pruning.masking import (
    EVAL_MODES,
    INIT_BAND_HALF_WIDTH,
    ShearGates,
    attach_gates,
    find_gates,
)
from composer_shear.shape import TARGET_KEYS, ShapeError
from composer_shear.sharding import writable_gates
from composer_shear.wrappers import composer_model_of, hf_causal_lm

__all__ = [
    "AUTO_HARDEN_AT",
    "INIT_MODES",
    "TargetedPruning",
    "add_gate_param_groups",
    "apply_targeted_pruning",
    "importance_forward",
    "init_gates_from_importance",
    "rank_calibration_batches",
    "reshape_multiplier_optimizer_state",
    "set_gate_param_group_lrs",
]

log = logging.getLogger(__name__)

INIT_MODES = ("uniform", "activation")
# ``harden_at: auto`` (the default): half of the run, or the end of the Lagrangian warm-up if
# that is later. Hardening at any point lands exactly on the target; half of the run leaves
# the weights the other half to recover from the cut (the SmolLM2 recipe's measured setting).
AUTO_HARDEN_AT = "0.5dur"
# ``harden_at`` values that keep the paper's schedule (stochastic gates to the last step).
NEVER_HARDEN = (None, "never")


def add_gate_param_groups(
    optimizer: Optimizer, gates: ShearGates, gate_lr: float, lambda_lr: float
) -> None:
    """Adds the gate and multiplier parameter groups (no weight decay) to ``optimizer``.

    The multipliers maximise the Lagrangian: their group gets ``lr = -lambda_lr``, which turns
    Adam-style descent into ascent. Groups are appended in a fixed order (gates, then
    multipliers) so that checkpoints restore the same layout.
    """
    log_alphas = [gate.log_alpha for gate in gates.gates.values()]
    lambdas = [p for gate in gates.gates.values() for p in (gate.lambda_1, gate.lambda_2)]
    for params, lr in ((log_alphas, gate_lr), (lambdas, -lambda_lr)):
        group: dict[str, Any] = {"params": params, "lr": lr, "weight_decay": 0.0}
        if "initial_lr" in optimizer.param_groups[0]:
            # Composer's DecoupledAdamW reads initial_lr in step(); schedulers set it too.
            group["initial_lr"] = lr
        optimizer.add_param_group(group)


def set_gate_param_group_lrs(
    optimizers: Sequence[Optimizer], gates: ShearGates, gate_lr: float, lambda_lr: float
) -> None:
    """Sets the lr of the gate group to ``gate_lr`` and of the multipliers to ``-lambda_lr``.

    Called before a step: LR schedulers rewrite every group's lr from its base value after
    each step, so this is how a schedule is kept off the gates (``schedule_gates: false``)
    and how hardened gates are held still (both 0: Adam's momentum cannot move them either).
    """
    log_alphas = {id(gate.log_alpha) for gate in gates.gates.values()}
    lambdas = {id(gate.lambda_1) for gate in gates.gates.values()}
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            ids = {id(p) for p in group["params"]}
            if ids & log_alphas:
                group["lr"] = gate_lr
            elif ids & lambdas:
                group["lr"] = -lambda_lr


def reshape_multiplier_optimizer_state(optimizers: Sequence[Optimizer], gates: ShearGates) -> None:
    """Gives optimizer moments of the multipliers their parameters' ``(1,)`` shape.

    Checkpoints written while the multipliers were 0-dim hold 0-dim moments (Adam's
    ``exp_avg``, ``exp_avg_sq``); the gates' load hook reshapes the multipliers themselves,
    this the optimizer state that loaded with them, which the next in-place update would
    otherwise reject. The 0-dim ``step`` counter is left alone.
    """
    for optimizer in optimizers:
        for gate in gates.gates.values():
            for param in (gate.lambda_1, gate.lambda_2):
                slots = optimizer.state.get(param)
                if not slots or param.dim() != 1:
                    continue
                for key, value in slots.items():
                    if key != "step" and isinstance(value, torch.Tensor) and value.dim() == 0:
                        slots[key] = value.reshape(param.shape)


def apply_targeted_pruning(
    model: nn.Module,
    target_shape: Mapping[str, int],
    optimizers: Optimizer | list[Optimizer] | None = None,
    gate_lr: float = 1.0,
    lambda_lr: float = 1.0,
    init_log_alpha: float = 4.0,
    eval_at: str = "expected",
    seed: int = 0,
    log_alpha_range: tuple[float, float] = (LOG_ALPHA_MIN, LOG_ALPHA_MAX),
    freeze_weights: bool = False,
) -> ShearGates:
    """Injects hard-concrete gates for ``target_shape`` into ``model`` (in place).

    Args:
        model: A Hugging Face causal LM, or a Composer model wrapping one.
        target_shape: The shape to reach; omitted dimensions are kept.
        optimizers: Optimizer(s) to extend with the gate / multiplier parameter groups.
        gate_lr: Learning rate of the gates' log-alpha.
        lambda_lr: Learning rate of the Lagrange multipliers (gradient ascent).
        init_log_alpha: Initial log-alpha (high = every unit starts kept).
        eval_at: Deterministic evaluation at the ``expected`` shape (what is being trained)
            or at the ``target`` shape (what export writes).
        seed: Seed of the gates' initial noise; identical on every rank.
        log_alpha_range: Clamp range of log-alpha (default: the paper's ``[log 1e-2, log 1e2]``).
        freeze_weights: Mask-only pruning (:mod:`composer_shear.pruning.mask_only`): freeze
            every weight of the model and make the deterministic gates binary.

    Returns:
        The attached :class:`~composer_shear.pruning.masking.ShearGates`.
    """
    hf_model = hf_causal_lm(model, "targeted_pruning")
    gates = attach_gates(
        hf_model,
        dict(target_shape),
        init_log_alpha=init_log_alpha,
        seed=seed,
        eval_at=eval_at,
        log_alpha_range=log_alpha_range,
        binary=freeze_weights,
    )
    if freeze_weights:
        frozen = freeze_source_weights(hf_model, gates)
        log.info("targeted_pruning: mask-only, %d weights frozen", frozen)
    if optimizers is not None:
        for optimizer in optimizers if isinstance(optimizers, list | tuple) else [optimizers]:
            add_gate_param_groups(optimizer, gates, gate_lr, lambda_lr)
    log.info(
        "targeted_pruning: %s -> %s; gates: %s",
        gates.source.describe(),
        gates.target.describe(),
        ", ".join(f"{name}{tuple(g.shape)} keep {g.keep}" for name, g in gates.gates.items()),
    )
    return gates


def init_gates_from_importance(
    gates: ShearGates,
    importance: Importance,
    kept_log_alpha: float = 4.0,
    pruned_log_alpha: float = -4.0,
) -> None:
    """Sets the gates so that their target top-k is the one-shot importance choice.

    Every unit that one-shot pruning (:mod:`composer_shear.export.oneshot`) keeps gets a log-alpha
    near ``kept_log_alpha``, every other near ``pruned_log_alpha``, ordered by importance
    inside each band. The Lagrangian warm-up then starts from the sparsity this implies
    (:attr:`ShearGates.start_sparsity`), not from 0, so the penalty does not pull pruned
    units back in.
    """
    gates.init_from_scores(unit_scores(importance, gates.source), kept_log_alpha, pruned_log_alpha)
    gates.start_sparsity = {
        name: min(gate.expected_sparsity().item(), gate.target_sparsity)
        for name, gate in gates.gates.items()
    }


def rank_calibration_batches(
    state: State,
    data_dir: str | None,
    tokens: int,
    seed: int,
    owner: str,
    data_key: str,
    whole_rounds: bool = False,
    split: str = "train",
) -> list[torch.Tensor]:
    """This rank's share of the calibration batches of a running job.

    Every rank picks the same batches (:func:`composer_shear.data.calibration.calibration_batches`
    of ``data_dir``, default the ``multi_domain`` train loader's folder and domains; sequences
    as long as the train loader's, ``device_train_microbatch_size`` per batch) and keeps every
    ``world``-th one from its rank on; importance sums are then all-reduced. Every rank must
    run the same number of forwards (FSDP gathers inside each), so when the count does not
    divide by the ranks the list is padded cyclically (those batches count twice), unless
    ``whole_rounds`` rounds the tokens up so that it does.

    Args:
        state: The Composer state (after the train loader exists).
        data_dir: A ``DATA/<domain>/train`` MDS folder, or None for the train loader's.
        tokens: Calibration tokens in all (rounded up to whole batches).
        seed: Seed of the pick.
        owner: The algorithm's name, for messages.
        data_key: The algorithm's key that names ``data_dir``, for messages.
        whole_rounds: Round ``tokens`` up to whole rounds of one batch per rank.
        split: The data's split (``eval``: batches held out from the importance pass).
    """
    domains, seq_len = None, None
    mixer = find_multi_domain_dataset(state.dataloader)
    if mixer is not None:
        seq_len = mixer.max_seq_len
        if data_dir is None:
            # Each domain reads LOCAL/<domain>/<split>; calibration reads LOCAL's shards
            # directly (no Streaming state is touched, so training data order is unchanged).
            data_dir = mixer.local
            domains = mixer.domains
    if data_dir is None:
        raise ValueError(
            f"{owner}: importance needs calibration data: set algorithms.{owner}.{data_key} to "
            "a DATA/<domain>/train MDS folder, or use the multi_domain train loader."
        )
    if seq_len is None:  # e.g. LLM Foundry's `text` loader: StreamingTextDataset
        seq_len = getattr(getattr(state.dataloader, "dataset", None), "max_seq_len", None)
    if seq_len is None:
        raise ValueError(
            f"{owner}: cannot tell the train sequence length for calibration; use a train "
            "loader whose dataset has max_seq_len (multi_domain, text)."
        )
    batch_size = int(state.device_train_microbatch_size or 1)
    world, rank = dist.get_world_size(), dist.get_global_rank()
    if whole_rounds:
        per_round = world * batch_size * seq_len
        tokens = -(-int(tokens) // per_round) * per_round
    batches = calibration_batches(
        data_dir,
        tokens,
        seq_len,
        batch_size,
        domains=domains,
        seed=seed,
        split=split,
        tokenizer=getattr(composer_model_of(state.model), "tokenizer", None),
    )
    per_rank = -(-len(batches) // world)
    mine = [batches[(rank + world * i) % len(batches)] for i in range(per_rank)]
    log.info(
        "%s: importance on %d x %d tokens per rank (%d batches in all)",
        owner,
        len(mine),
        batch_size * seq_len,
        len(batches),
    )
    return mine


def importance_forward(state: State) -> Callable[[torch.Tensor], Any]:
    """``forward(input_ids)`` of the job's model (any Composer / FSDP wrapper), no logits."""

    def forward(ids: torch.Tensor) -> Any:
        batch = state.device.batch_to_device(
            {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        )
        # No (tokens x vocabulary) logits: importance taps the layers and the final norm
        # only (HuggingFaceModel drops the key for a model whose forward lacks it).
        batch["logits_to_keep"] = 1
        return state.model(batch)

    return forward


def _warmup_progress(state: State, warmup: Time) -> float:
    """Fraction of the Lagrangian warm-up elapsed at the current batch, in [0, 1]."""
    if warmup.value <= 0:
        return 1.0
    if warmup.unit == TimeUnit.DURATION:
        elapsed = state.get_elapsed_duration()
        done = 0.0 if elapsed is None else elapsed.value
    else:
        done = state.timestamp.get(warmup.unit).value
    return min(1.0, float(done) / float(warmup.value))


def _parse_time(key: str, value: str | int | None) -> Time | None:
    """A YAML time (``"0.75dur"``, ``"45ba"``, or an int of batches); None stays None."""
    if value is None:
        return None
    if isinstance(value, int):
        value = f"{value}ba"
    try:
        return Time.from_timestring(str(value))
    except ValueError:
        raise ValueError(
            f"targeted_pruning.{key}={value!r} is not a time: use e.g. '0.75dur' or '45ba'."
        ) from None


def _time_reached(state: State, when: Time) -> bool:
    """True once the training position at this batch's start has reached ``when``."""
    if when.unit == TimeUnit.DURATION:
        elapsed = state.get_elapsed_duration()
        return elapsed is not None and elapsed.value >= when.value
    return state.timestamp.get(when.unit).value >= when.value


def _check_reaches(state: State, key: str, when: Time | None) -> None:
    """Warns of a ``harden_at`` (or auto's warm-up end) at or after the end of the run.

    A run that never hardens ends off the target, and export then cuts units that were on;
    that is the paper's schedule, which ``harden_at: never`` asks for explicitly. A warning,
    not an error: a run stopped early on purpose and resumed with a longer ``max_duration``
    hardens in the resumed part.
    """
    end = state.max_duration
    if when is None or end is None:
        return
    fraction = when.value if when.unit == TimeUnit.DURATION else None
    if fraction is None and when.unit == end.unit:
        fraction = when.value / end.value
    if fraction is not None and fraction >= 1.0:
        log.warning(
            "targeted_pruning: %s=%s is not before the end of the run (max_duration=%s): the "
            "gates will not harden and the run will end off the target unless it is resumed "
            "with a longer max_duration; shorten it (e.g. harden_at: 0.5dur, "
            "lagrangian_warmup: 0.2dur) or set harden_at: never for the paper's schedule.",
            key,
            when,
            end,
        )


def _check_gate_precision(state: State) -> None:
    """Refuses FSDP mixed precision that would run the gates in 16 bits (FSDP1 and FSDP2).

    FSDP casts every parameter of a wrapped module to ``param_dtype`` for the forward, the
    gates' log-alphas included (they live in the root unit). In bfloat16 log-alpha near 4
    moves in steps of ~0.03, ties of the evaluation cut (top-k of log-alpha) break
    differently from the float32 export, and the penalty is computed from rounded values.
    Both Composer FSDP versions resolve the setting with ``get_mixed_precision``, so this
    reads it the same way, before FSDP wraps the model.
    """
    fsdp = getattr(state, "fsdp_config", None)
    if fsdp is None:
        return
    setting = getattr(fsdp, "mixed_precision", "DEFAULT")
    _, param_dtype, _, _ = get_mixed_precision(state.precision, setting)
    if param_dtype not in (None, torch.float32):
        raise ValueError(
            f"targeted_pruning: fsdp_config.mixed_precision={setting} with precision "
            f"{state.precision.value} runs parameters in {param_dtype} in the forward, the "
            "gates' log-alphas too: the evaluation cut could then differ from the float32 "
            "export. Set fsdp_config.mixed_precision: FULL, or "
            "{param_dtype: fp32, reduce_dtype: bf16, buffer_dtype: bf16} (parameters in "
            "float32, gradients reduced in bfloat16)."
        )


def _check_activation_checkpointing(state: State) -> None:
    """Rejects FSDP1's reentrant activation checkpointing (Composer's default when on).

    The gate masks are computed once per forward, outside the decoder layers, and every
    layer's hooks multiply them in. Reentrant checkpointing recomputes a layer inside its
    own backward call and backpropagates from there into everything the layer read,
    through the masks into the gates, freeing that shared graph; the next layer's backward
    then fails ("Trying to backward through the graph a second time"). Non-reentrant
    checkpointing (FSDP2's only kind) does not.
    """
    fsdp = getattr(state, "fsdp_config", None)
    if getattr(fsdp, "activation_checkpointing", False) and getattr(
        fsdp, "activation_checkpointing_reentrant", False
    ):
        raise ValueError(
            "targeted_pruning needs non-reentrant activation checkpointing: set "
            "fsdp_config.activation_checkpointing_reentrant: false (Composer's default is "
            "true). Reentrant checkpointing backpropagates every recomputed layer separately "
            "through the gate masks shared by all layers and fails in the second layer."
        )


def _validate_target(target_shape: Any) -> dict[str, int]:
    if not isinstance(target_shape, Mapping) or not target_shape:
        raise ShapeError(
            "targeted_pruning needs a non-empty target_shape mapping, e.g. "
            "{num_hidden_layers: 24, hidden_size: 2048}."
        )
    unknown = sorted(set(target_shape) - set(TARGET_KEYS))
    if unknown:
        raise ShapeError(
            f"Unknown target_shape key(s) {unknown}; allowed keys are {list(TARGET_KEYS)}."
        )
    return {str(key): value for key, value in target_shape.items()}


class TargetedPruning(Algorithm):
    """Sheared-LLaMA targeted structured pruning of a Hugging Face model.

    At ``INIT`` it injects hard-concrete gates (for every dimension the target shrinks) into
    the unmodified model and adds their optimizer groups; at ``FIT_START`` of a new run it
    optionally initialises the gates from activation importance (``init: activation``); at
    ``BATCH_START`` it ramps each dimension's target sparsity linearly over
    ``lagrangian_warmup``; at ``AFTER_LOSS`` it checks that the gates, multipliers and penalty
    are finite (else :class:`~composer_shear.pruning.masking.NonFiniteGateError` names the
    dimension, layer and step) and adds the Lagrangian penalty (computed in the forward pass)
    to the loss; at ``BATCH_END`` it clamps log-alpha and logs expected vs.
    target sparsity, multipliers, expected parameter count and penalty. Evaluation runs the
    deterministic masks (``eval_at``).

    YAML (LLM Foundry)::

        algorithms:
          targeted_pruning:
            target_shape: {num_hidden_layers: 24, num_attention_heads: 16,
                           num_key_value_heads: 16, intermediate_size: 5504, hidden_size: 2048}
            lagrangian_warmup: 0.2dur
            harden_at: auto          # the default: 0.5dur, after the warm-up
            gate_lr: 1.0
            lambda_lr: 1.0

    Gradient clipping: the gates and multipliers are model parameters, so Composer's
    ``gradient_clipping`` algorithm includes them in the global norm (as in the original
    recipe). The multipliers' gradient is only the constraint gap, so this rarely matters.

    Args:
        target_shape: Target sizes (keys of :data:`composer_shear.shape.TARGET_KEYS`).
        lagrangian_warmup: Time over which the target sparsity ramps to the target (``ba``,
            ``tok``, ``ep`` or ``dur``), e.g. ``"0.2dur"`` (the paper's 20% of pruning steps).
        gate_lr: Learning rate of the gates' log-alpha.
        lambda_lr: Learning rate of the Lagrange multipliers (ascent).
        init_log_alpha: Initial log-alpha of every unit (``init: uniform``) or of the kept
            units (``init: activation``); high means kept. Inside ``log_alpha_range``.
        eval_at: ``"expected"`` (default) evaluates the current expected shape, per row: the
            model being trained, as the released Sheared-LLaMA recipes do
            (``eval_target_model: false``); dynamic batch loading then reads losses of that
            model. ``"target"`` evaluates exactly the target shape that export writes.
        seed: Seed of the gates' initial noise (identical on every rank).
        init: ``"uniform"``: every unit starts kept (log-alpha ``init_log_alpha`` plus tiny
            noise), the paper's start. ``"activation"``: before the first step, activation
            importance (:mod:`composer_shear.pruning.importance`) is measured on calibration
            batches and
            the gates are set so that their target top-k is the one-shot choice
            (:mod:`composer_shear.export.oneshot`); the warm-up then starts from the sparsity this
            implies.
        init_pruned_log_alpha: ``init: activation``: log-alpha of the units one-shot would
            prune (default -4.0: mostly off from the start; a value near ``init_log_alpha``
            instead starts them on and lets the warm-up remove them gradually).
        init_data: ``init: activation``: a ``DATA/<domain>/train`` MDS folder for
            calibration; default: the ``multi_domain`` train loader's folder and domains.
        init_tokens: ``init: activation``: calibration tokens (split over ranks).
        log_alpha_range: ``[min, max]`` that log-alpha is clamped to after every step; default
            the paper's ``[log 1e-2, log 1e2]`` (about +-4.6). There a kept unit's gate is
            still sampled below 1 in about 5% of steps, and below 0.5 in 1%: for a unit whose
            removal is catastrophic (SmolLM2 without its first layer or its largest hidden
            channel loses 7-8 nats) that is a loss spike every few steps. With
            ``init: activation`` a wider range (e.g. ``[-10, 10]``) starts the most important
            units near-deterministic, the least important ones off, and leaves the noise and
            the learning to the units near the cut.
        harden_at: When to *harden* the gates. ``"auto"`` (default): at half of the run
            (``0.5dur``), or at the end of ``lagrangian_warmup`` if that is later; a time
            (``"0.75dur"``, ``"45ba"``) hardens there; ``"never"`` (or null) keeps the
            paper's schedule, stochastic gates to the last step (an ablation: runs of ours
            with it ended off the target, and export then cut units that were on). From the
            hardening batch on every gate is frozen at exactly the target values
            export writes (top-k of log-alpha per row, the kept units' values folded as in
            export), the Lagrangian is dropped and only the weights train: the rest of
            pruning trains the model that ships, so the exported model equals the last
            in-run evaluation and every row keeps exactly the target count. Logged:
            ``pruning/hardened`` and, at the hardening batch,
            ``pruning/hardening/<dim>/max_row_deviation_units`` (how far the expected shape
            was from the target when it was cut there).
        landing_eval_batches: After every evaluation round, this many batches of every
            evaluator are also scored at the *target* cut and at the *expected* shape, and
            logged as ``pruning/landing/{expected,target}_loss`` (mean over evaluators) and
            their difference ``pruning/landing/target_minus_expected``: what export would
            lose if pruning stopped there. 0 turns it off.
        schedule_gates: True (default, as the released code): the run's LR scheduler scales
            the gate and multiplier groups like every group, so a warm-up or cosine decay
            slows the constraint too. False: they keep ``gate_lr`` / ``-lambda_lr`` at every
            step, whatever the weights' schedule.
        freeze_weights: True: *mask-only* pruning (:mod:`composer_shear.pruning.mask_only`).
            Every weight is frozen at INIT (``requires_grad`` False: no weight gradient, no
            optimizer state for the weights); only the gates and multipliers train. Every
            deterministic gate is then 0/1 (evaluation, hardening, export), so the export
            (``pruned_hf_export``, ``composer-shear export``) is the source weights cut at the
            learned units, nothing folded: what ``prune-oneshot --units`` cuts. Nothing trains
            once the gates are hardened, so ``harden_at`` marks where the search ends (the rest
            of the run only evaluates the cut); the export takes the same top-k either way.
            Under FSDP1 it needs ``use_orig_params: true`` (Composer's default).
        objective: With ``freeze_weights``: ``lm`` (default), the gated model's LM loss; or
            ``distill``, the forward KL from the source model, whose logits come from an extra
            forward of the same frozen model with the gates bypassed (no teacher copy; do not
            add ``knowledge_distillation``). Logged as ``loss/train/{lm,kd,total}``.

    Mask-only YAML::

        targeted_pruning:
          target_shape: {...}
          freeze_weights: true
          objective: distill
          init: activation
          gate_lr: 0.3
          harden_at: 0.95dur
    """

    def __init__(
        self,
        target_shape: Mapping[str, int] | None,
        lagrangian_warmup: str | int = "0.2dur",
        gate_lr: float = 1.0,
        lambda_lr: float = 1.0,
        init_log_alpha: float = 4.0,
        eval_at: str = "expected",
        seed: int = 0,
        init: str = "uniform",
        init_pruned_log_alpha: float = -4.0,
        init_data: str | None = None,
        init_tokens: int = 65536,
        log_alpha_range: Sequence[float] | None = None,
        harden_at: str | int | None = "auto",
        landing_eval_batches: int = 1,
        schedule_gates: bool = True,
        freeze_weights: bool = False,
        objective: str = "lm",
    ):
        if objective not in OBJECTIVES:
            raise ValueError(
                f"targeted_pruning.objective must be one of {OBJECTIVES}, got {objective!r}."
            )
        if objective != "lm" and not freeze_weights:
            raise ValueError(
                "targeted_pruning.objective: distill needs freeze_weights: true (the frozen "
                "model is the teacher); to distil into trained weights use the "
                "knowledge_distillation algorithm."
            )
        self.freeze_weights, self.objective = bool(freeze_weights), objective
        self._teacher_logits: torch.Tensor | None = None
        self.schedule_gates = bool(schedule_gates)
        # None: a subclass settles the shape before INIT builds the gates (oneshot_pruning's
        # target_params); INIT refuses an empty one.
        self.target_shape = {} if target_shape is None else _validate_target(target_shape)
        self.harden_auto = harden_at == "auto"
        self.harden_at = (
            None
            if harden_at in NEVER_HARDEN
            else _parse_time("harden_at", AUTO_HARDEN_AT if self.harden_auto else harden_at)
        )
        if int(landing_eval_batches) < 0:
            raise ValueError(
                f"targeted_pruning.landing_eval_batches must be >= 0, got {landing_eval_batches}."
            )
        self.landing_eval_batches = int(landing_eval_batches)
        self.lagrangian_warmup = _parse_time("lagrangian_warmup", lagrangian_warmup)
        if gate_lr <= 0 or lambda_lr <= 0:
            raise ValueError("gate_lr and lambda_lr must be positive.")
        if eval_at not in EVAL_MODES:
            raise ValueError(f"eval_at must be one of {EVAL_MODES}, got {eval_at!r}.")
        if init not in INIT_MODES:
            raise ValueError(f"targeted_pruning.init must be one of {INIT_MODES}, got {init!r}.")
        if log_alpha_range is None:
            log_alpha_range = (LOG_ALPHA_MIN, LOG_ALPHA_MAX)
        try:
            self.log_alpha_range = check_log_alpha_range(log_alpha_range)
        except ValueError as error:
            raise ValueError(f"targeted_pruning.{error}") from None
        check_init_log_alpha(init_log_alpha, self.log_alpha_range)
        if init == "activation":
            check_init_log_alpha(init_pruned_log_alpha, self.log_alpha_range)
            if init_pruned_log_alpha > init_log_alpha - 2 * INIT_BAND_HALF_WIDTH:
                raise ValueError(
                    f"targeted_pruning.init_pruned_log_alpha={init_pruned_log_alpha} must be at "
                    f"least {2 * INIT_BAND_HALF_WIDTH} below init_log_alpha={init_log_alpha}."
                )
            if int(init_tokens) <= 0:
                raise ValueError(f"targeted_pruning.init_tokens must be positive: {init_tokens}")
        self.gate_lr, self.lambda_lr = float(gate_lr), float(lambda_lr)
        self.init_log_alpha = float(init_log_alpha)
        self.eval_at, self.seed = eval_at, int(seed)
        self.init = init
        self.init_pruned_log_alpha = float(init_pruned_log_alpha)
        self.init_data = init_data
        self.init_tokens = int(init_tokens)
        self.gates: ShearGates | None = None
        # Set once the gates' starting point is final (FIT_START of a new run, or a load).
        self._initialized = False

    @staticmethod
    def required_on_load() -> bool:
        """True: the gates must exist before a checkpoint loads."""
        # The gates must exist (same names, shapes, groups) before a checkpoint loads.
        return True

    def match(self, event: Event, state: State) -> bool:
        """Runs at INIT, FIT_START, BATCH_START, AFTER_LOSS and BATCH_END."""
        return event in (
            Event.INIT,
            Event.AFTER_LOAD,
            Event.FIT_START,
            Event.BATCH_START,
            Event.BEFORE_FORWARD,
            Event.AFTER_LOSS,
            Event.BATCH_END,
            Event.EVAL_AFTER_ALL,
        )

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        """See the class docstring for what happens at each event."""
        if event == Event.INIT:
            _check_activation_checkpointing(state)
            if self.objective == "distill" and any(
                isinstance(a, KnowledgeDistillation) for a in state.algorithms
            ):
                raise ValueError(
                    "targeted_pruning objective: distill already distils from the source; "
                    "remove the knowledge_distillation algorithm."
                )
            _check_gate_precision(state)
            self.gates = apply_targeted_pruning(
                state.model,
                _validate_target(self.target_shape),
                optimizers=list(state.optimizers),
                gate_lr=self.gate_lr,
                lambda_lr=self.lambda_lr,
                init_log_alpha=self.init_log_alpha,
                eval_at=self.eval_at,
                seed=self.seed,
                log_alpha_range=self.log_alpha_range,
                freeze_weights=self.freeze_weights,
            )
            return
        gates = self.gates if self.gates is not None else find_gates(state.model)
        if gates is None:
            raise RuntimeError("targeted_pruning: gates are missing (INIT did not run?).")
        if event == Event.AFTER_LOAD:
            reshape_multiplier_optimizer_state(state.optimizers, gates)
        elif event == Event.FIT_START:
            _check_reaches(state, "harden_at", self.harden_at)
            if self.harden_auto:
                _check_reaches(state, "lagrangian_warmup (harden_at: auto)", self.lagrangian_warmup)
            if not self._initialized and self.init == "activation":
                self._init_from_importance(state, gates)
            self._initialized = True
        elif event == Event.BATCH_START:
            gates.target_progress = _warmup_progress(state, self.lagrangian_warmup)
            gates.start_step(self.seed, int(state.timestamp.batch), dist.get_global_rank())
            harden = self.harden_at is not None and not gates.hardened
            if harden and self.harden_auto:
                harden = gates.target_progress >= 1.0  # auto: never before the warm-up ends
            if harden and _time_reached(state, self.harden_at):
                self._harden(state, gates, logger)
            if gates.hardened:
                set_gate_param_group_lrs(state.optimizers, gates, 0.0, 0.0)
            elif not self.schedule_gates:
                set_gate_param_group_lrs(state.optimizers, gates, self.gate_lr, self.lambda_lr)
        elif event == Event.EVAL_AFTER_ALL:
            if self.landing_eval_batches > 0:
                self._log_landing(state, gates, logger)
        elif event == Event.BEFORE_FORWARD:
            if self.objective == "distill":
                self._teacher_logits = source_logits(state, gates)
        elif event == Event.AFTER_LOSS:
            gates.check_finite(int(state.timestamp.batch) + 1)
            if self.objective == "distill":
                add_source_distillation(state, self._teacher_logits)
                self._teacher_logits = None
            self._add_penalty(state, gates)
        elif event == Event.BATCH_END:
            gates.clamp_()
            if gates.metrics:
                # One device-to-host copy for all values instead of one sync per metric.
                names = list(gates.metrics)
                device = gates.gates_device()
                values = torch.stack([gates.metrics[n].float().to(device) for n in names])
                logger.log_metrics(dict(zip(names, values.tolist(), strict=True)))

    def _init_from_importance(self, state: State, gates: ShearGates) -> None:
        """``init: activation``: measure importance on calibration batches, set the gates."""
        mine = rank_calibration_batches(
            state, self.init_data, self.init_tokens, self.seed, "targeted_pruning", "init_data"
        )
        hf_model = hf_causal_lm(state.model, "targeted_pruning")
        was_training = state.model.training
        state.model.eval()
        try:
            with gates.bypassed():
                importance = collect_importance(
                    state.model, mine, importance_forward(state), hf_model=hf_model
                )
        finally:
            state.model.train(was_training)
        with writable_gates(state.model, gates):
            init_gates_from_importance(
                gates, importance, self.init_log_alpha, self.init_pruned_log_alpha
            )

    def _harden(self, state: State, gates: ShearGates, logger: Logger) -> None:
        """Freezes the gates at the target (``harden_at``) and logs how far off they were."""
        with writable_gates(state.model, gates):
            distance = {
                f"pruning/hardening/{name}/max_row_deviation_units": (
                    (gate.expected_keep().detach() - gate.keep).abs().max().item()
                )
                for name, gate in gates.gates.items()
            }
            gates.harden_()
        log.info(
            "targeted_pruning: hardened at batch %d; expected keep was off the target by at "
            "most %s units per row",
            int(state.timestamp.batch),
            ", ".join(f"{k.split('/')[2]} {v:.2f}" for k, v in distance.items()),
        )
        logger.log_metrics(distance)

    @torch.no_grad()
    def _log_landing(self, state: State, gates: ShearGates, logger: Logger) -> None:
        """Scores a few batches of every evaluator at the expected shape and the target cut."""
        model = state.model
        composer_model = composer_model_of(model)
        previous = gates.eval_at
        sums = {"expected": 0.0, "target": 0.0}
        labels = 0
        was_training = model.training
        model.eval()
        try:
            for evaluator in state.evaluators:
                batches = []
                for index, batch in enumerate(evaluator.dataloader.dataloader):
                    if index >= self.landing_eval_batches:
                        break
                    batches.append(state.device.batch_to_device(batch))
                # Every rank must run the same number of forwards (FSDP gathers inside each,
                # and the losses are all-reduced): the smallest rank's count.
                count = state.device.tensor_to_device(torch.tensor(len(batches)))
                dist.all_reduce(count, reduce_operation="MIN")
                batches = batches[: int(count.item())]
                if not batches:
                    continue
                labels += 1
                per_label = 0.0
                for mode in ("expected", "target"):
                    if mode == "target" and gates.hardened:
                        sums["target"] += per_label  # the same masks: no second forward
                        continue
                    gates.eval_at = mode
                    losses = [composer_model.loss(model(batch), batch).float() for batch in batches]
                    mean = torch.stack(losses).mean()
                    dist.all_reduce(mean)
                    per_label = mean.item() / dist.get_world_size()
                    sums[mode] += per_label
        finally:
            gates.eval_at = previous
            model.train(was_training)
        if labels == 0:
            return
        expected, target = sums["expected"] / labels, sums["target"] / labels
        logger.log_metrics(
            {
                "pruning/landing/expected_loss": expected,
                "pruning/landing/target_loss": target,
                "pruning/landing/target_minus_expected": target - expected,
            }
        )

    def export_info(self) -> dict[str, Any]:
        """What ``pruned_hf_export`` adds to the export's info (the learned default: nothing)."""
        return {}

    @staticmethod
    def _add_penalty(state: State, gates: ShearGates) -> None:
        penalty = gates.penalty
        if penalty is None:
            return
        gates.penalty = None  # consumed: one penalty per forward pass
        loss = state.loss
        if isinstance(loss, dict):
            base = loss.get("total", sum(loss.values()))
            state.loss = {**loss, "lagrangian": penalty, "total": base + penalty}
        elif isinstance(loss, torch.Tensor):
            state.loss = {"lm": loss, "lagrangian": penalty, "total": loss + penalty}
        else:
            raise TypeError(f"targeted_pruning cannot add a penalty to a {type(loss)} loss.")

    def state_dict(self) -> dict[str, Any]:
        """What export needs to rebuild the gates, and where the warm-up ramp starts."""
        state: dict[str, Any] = {
            "target_shape": dict(self.target_shape),
            "init_log_alpha": self.init_log_alpha,
            "eval_at": self.eval_at,
            "seed": self.seed,
            "init": self.init,
            "log_alpha_range": list(self.log_alpha_range),
            "initialized": self._initialized,
            "hardened": bool(self.gates is not None and self.gates.hardened),
            "freeze_weights": self.freeze_weights,
            "objective": self.objective,
        }
        if self.gates is not None:
            state["resolved_target"] = self.gates.target.config_updates()
            state["start_sparsity"] = dict(self.gates.start_sparsity)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores the ramp start; refuses a checkpoint pruned toward another target."""
        saved = state.get("target_shape")
        if saved is not None and dict(saved) != self.target_shape:
            raise ShapeError(
                f"The checkpoint was pruned toward {saved}, but this run's target_shape is "
                f"{self.target_shape}; resume with the same target."
            )
        if bool(state.get("freeze_weights", False)) != self.freeze_weights:
            raise ValueError(
                f"The checkpoint was written with freeze_weights={not self.freeze_weights}; "
                "resume with the same setting (it decides what trains and what export writes)."
            )
        # Gates come from the checkpoint: never re-initialise them from importance.
        self._initialized = bool(state.get("initialized", True))
        if self.gates is not None and "start_sparsity" in state:
            self.gates.start_sparsity = {k: float(v) for k, v in state["start_sparsity"].items()}
