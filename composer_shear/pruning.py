"""The ``targeted_pruning`` Composer algorithm: gates, optimizer groups, and the penalty.

Functional core first (:func:`apply_targeted_pruning`, usable without a Trainer), then the thin
:class:`TargetedPruning` algorithm, in the style of Composer's own algorithms. The penalty is
*computed* inside the forward pass (see :mod:`composer_shear.masking`) and *added* to the loss
here, at ``AFTER_LOSS``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from composer.core import Algorithm, Event, State, Time, TimeUnit
from composer.loggers import Logger
from composer.utils import dist
from torch import nn
from torch.optim import Optimizer

from composer_shear.masking import EVAL_MODES, ShearGates, attach_gates, find_gates
from composer_shear.shape import TARGET_KEYS, ShapeError

__all__ = ["TargetedPruning", "add_gate_param_groups", "apply_targeted_pruning", "hf_model_of"]

log = logging.getLogger(__name__)


def hf_model_of(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a Composer ``HuggingFaceModel`` (or the model itself)."""
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "config") and hasattr(inner, "get_input_embeddings"):
        return inner
    if hasattr(model, "config") and hasattr(model, "get_input_embeddings"):
        return model
    raise TypeError(
        f"targeted_pruning needs a Hugging Face causal LM (e.g. llm-foundry's hf_causal_lm); "
        f"got {type(model).__name__}."
    )


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


def apply_targeted_pruning(
    model: nn.Module,
    target_shape: Mapping[str, int],
    optimizers: Optimizer | list[Optimizer] | None = None,
    gate_lr: float = 1.0,
    lambda_lr: float = 1.0,
    init_log_alpha: float = 5.0,
    eval_at: str = "target",
    seed: int = 0,
) -> ShearGates:
    """Injects hard-concrete gates for ``target_shape`` into ``model`` (in place).

    Args:
        model: A Hugging Face causal LM, or a Composer model wrapping one.
        target_shape: The shape to reach; omitted dimensions are kept.
        optimizers: Optimizer(s) to extend with the gate / multiplier parameter groups.
        gate_lr: Learning rate of the gates' log-alpha.
        lambda_lr: Learning rate of the Lagrange multipliers (gradient ascent).
        init_log_alpha: Initial log-alpha (high = every unit starts kept).
        eval_at: Deterministic evaluation at the ``target`` or at the ``expected`` shape.
        seed: Seed of the gates' initial noise; identical on every rank.

    Returns:
        The attached :class:`~composer_shear.masking.ShearGates`.
    """
    hf_model = hf_model_of(model)
    gates = attach_gates(
        hf_model, dict(target_shape), init_log_alpha=init_log_alpha, seed=seed, eval_at=eval_at
    )
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
    the unmodified model and adds their optimizer groups; at ``BATCH_START`` it ramps each
    dimension's target sparsity linearly from 0 over ``lagrangian_warmup``; at ``AFTER_LOSS``
    it adds the Lagrangian penalty (computed in the forward pass) to the loss; at
    ``BATCH_END`` it clamps log-alpha and logs expected vs. target sparsity, multipliers,
    expected parameter count and penalty. Evaluation runs the deterministic masks.

    YAML (LLM Foundry)::

        algorithms:
          targeted_pruning:
            target_shape: {num_hidden_layers: 24, num_attention_heads: 16,
                           num_key_value_heads: 16, intermediate_size: 5504, hidden_size: 2048}
            lagrangian_warmup: 0.2dur
            gate_lr: 1.0
            lambda_lr: 1.0

    Gradient clipping: the gates and multipliers are model parameters, so Composer's
    ``gradient_clipping`` algorithm includes them in the global norm (as in the original
    recipe). The multipliers' gradient is only the constraint gap, so this rarely matters.

    Args:
        target_shape: Target sizes (keys of :data:`composer_shear.shape.TARGET_KEYS`).
        lagrangian_warmup: Time over which the target sparsity ramps from 0 (``ba``, ``tok``,
            ``ep`` or ``dur``), e.g. ``"0.2dur"`` (the paper's 20% of pruning steps).
        gate_lr: Learning rate of the gates' log-alpha.
        lambda_lr: Learning rate of the Lagrange multipliers (ascent).
        init_log_alpha: Initial log-alpha; high means all units start kept.
        eval_at: ``"target"`` evaluates at exactly the target shape; ``"expected"`` at the
            current expected shape.
        seed: Seed of the gates' initial noise (identical on every rank).
    """

    def __init__(
        self,
        target_shape: Mapping[str, int],
        lagrangian_warmup: str | int = "0.2dur",
        gate_lr: float = 1.0,
        lambda_lr: float = 1.0,
        init_log_alpha: float = 5.0,
        eval_at: str = "target",
        seed: int = 0,
    ):
        self.target_shape = _validate_target(target_shape)
        if isinstance(lagrangian_warmup, int):
            lagrangian_warmup = f"{lagrangian_warmup}ba"
        self.lagrangian_warmup = Time.from_timestring(str(lagrangian_warmup))
        if gate_lr <= 0 or lambda_lr <= 0:
            raise ValueError("gate_lr and lambda_lr must be positive.")
        if eval_at not in EVAL_MODES:
            raise ValueError(f"eval_at must be one of {EVAL_MODES}, got {eval_at!r}.")
        self.gate_lr, self.lambda_lr = float(gate_lr), float(lambda_lr)
        self.init_log_alpha = float(init_log_alpha)
        self.eval_at, self.seed = eval_at, int(seed)
        self.gates: ShearGates | None = None

    @staticmethod
    def required_on_load() -> bool:
        """True: the gates must exist before a checkpoint loads."""
        # The gates must exist (same names, shapes, groups) before a checkpoint loads.
        return True

    def match(self, event: Event, state: State) -> bool:
        """Runs at INIT, BATCH_START, AFTER_LOSS and BATCH_END."""
        return event in (Event.INIT, Event.BATCH_START, Event.AFTER_LOSS, Event.BATCH_END)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        """See the class docstring for what happens at each event."""
        if event == Event.INIT:
            self.gates = apply_targeted_pruning(
                state.model,
                self.target_shape,
                optimizers=list(state.optimizers),
                gate_lr=self.gate_lr,
                lambda_lr=self.lambda_lr,
                init_log_alpha=self.init_log_alpha,
                eval_at=self.eval_at,
                seed=self.seed,
            )
            return
        gates = self.gates if self.gates is not None else find_gates(state.model)
        if gates is None:
            raise RuntimeError("targeted_pruning: gates are missing (INIT did not run?).")
        if event == Event.BATCH_START:
            gates.target_progress = _warmup_progress(state, self.lagrangian_warmup)
            gates.start_step(self.seed, int(state.timestamp.batch), dist.get_global_rank())
        elif event == Event.AFTER_LOSS:
            self._add_penalty(state, gates)
        elif event == Event.BATCH_END:
            gates.clamp_()
            if gates.metrics:
                # One device-to-host copy for all values instead of one sync per metric.
                names = list(gates.metrics)
                device = gates.gates_device()
                values = torch.stack([gates.metrics[n].float().to(device) for n in names])
                logger.log_metrics(dict(zip(names, values.tolist(), strict=True)))

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
        """What export needs to rebuild the gates from a checkpoint."""
        state = {
            "target_shape": dict(self.target_shape),
            "init_log_alpha": self.init_log_alpha,
            "eval_at": self.eval_at,
            "seed": self.seed,
        }
        if self.gates is not None:
            state["resolved_target"] = self.gates.target.config_updates()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Refuses to resume a checkpoint pruned toward another target."""
        saved = state.get("target_shape")
        if saved is not None and dict(saved) != self.target_shape:
            raise ShapeError(
                f"The checkpoint was pruned toward {saved}, but this run's target_shape is "
                f"{self.target_shape}; resume with the same target."
            )
