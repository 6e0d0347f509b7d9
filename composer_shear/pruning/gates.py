"""Hard-concrete gates (Louizos, Welling & Kingma 2018) and their Lagrange multipliers.

One :class:`HardConcreteGate` holds the gates of one prunable *dimension* (layers, kv heads,
query heads per group, MLP intermediate units or hidden units) for the whole model, shaped
``(..., n)``: the last axis holds the ``n`` units among which ``keep`` survive, the leading axes
index layers or groups. It also holds the two Lagrange multipliers of that dimension's
sparsity constraint, so "one Lagrangian term per shrinking dimension" is one module.

This is where gates are sampled (:meth:`HardConcreteGate.sample`), where their expected L0 is
computed (:meth:`HardConcreteGate.prob_nonzero`) and where the deterministic evaluation masks
that keep exactly the target count come from (:meth:`HardConcreteGate.deterministic`).

A gate can also be *hardened* (:meth:`HardConcreteGate.harden_`): its deterministic target
values are frozen into the buffer ``hard_value`` and from then on it is no longer a random
variable. Training, evaluation and export all use the frozen values, so the model trained
after that point is exactly the model export writes (the ``harden_at`` option of
``targeted_pruning``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = [
    "LIMIT_LEFT",
    "LIMIT_RIGHT",
    "LOG_ALPHA_MAX",
    "LOG_ALPHA_MIN",
    "MULTIPLIER_SHAPE",
    "NOT_HARDENED",
    "TEMPERATURE",
    "HardConcreteGate",
    "check_init_log_alpha",
    "check_log_alpha_range",
    "descending_ranks",
    "top_k_mask",
]

# Stretch interval and temperature of the hard-concrete distribution (Louizos et al.).
LIMIT_LEFT, LIMIT_RIGHT = -0.1, 1.1
TEMPERATURE = 2.0 / 3.0
# log-alpha is clamped after every optimizer step, as in the Sheared-LLaMA recipe.
LOG_ALPHA_MIN, LOG_ALPHA_MAX = math.log(1e-2), math.log(1e2)
_EPS = 1e-6
_KEPT_FLOOR = torch.finfo(torch.float32).tiny
# Shape of each Lagrange multiplier (see HardConcreteGate.__init__).
MULTIPLIER_SHAPE = (1,)
# Fill value of ``hard_value`` while a gate is not hardened (hardened values lie in [0, 1]).
NOT_HARDENED = -1.0
# Quadrature points of E[z] (see HardConcreteGate.expected_value).
_QUADRATURE = 512
# log(-l/r): shifts log-alpha so that sigmoid(.) is the probability of a non-zero gate.
_LOG_RATIO = math.log(-LIMIT_LEFT / LIMIT_RIGHT)


def check_log_alpha_range(log_alpha_range: tuple[float, float]) -> tuple[float, float]:
    """Validates a ``(min, max)`` clamp range of log-alpha and returns it as floats.

    Raises:
        ValueError: not two numbers with ``min < 0 < max``.
    """
    try:
        low, high = (float(v) for v in log_alpha_range)
    except (TypeError, ValueError):
        message = f"log_alpha_range={log_alpha_range!r} must be two numbers [min, max]"
        raise ValueError(message) from None
    if not low < 0.0 < high:
        raise ValueError(
            f"log_alpha_range={[low, high]} must satisfy min < 0 < max (the paper's range is "
            f"[{LOG_ALPHA_MIN:.3f}, {LOG_ALPHA_MAX:.3f}], i.e. [log 1e-2, log 1e2])."
        )
    return low, high


def check_init_log_alpha(
    value: float, log_alpha_range: tuple[float, float] = (LOG_ALPHA_MIN, LOG_ALPHA_MAX)
) -> None:
    """Rejects an initial log-alpha outside the clamp range (its noise would be erased).

    Raises:
        ValueError: ``value`` is outside ``log_alpha_range``.
    """
    low, high = check_log_alpha_range(log_alpha_range)
    if not low <= float(value) <= high:
        raise ValueError(
            f"init_log_alpha={value} is outside the clamp range [{low:.3f}, {high:.3f}]: it "
            "would be clamped to a constant, erasing the symmetry-breaking noise, and ties "
            "would decide the first masks. Use e.g. 4.0."
        )


def descending_ranks(values: torch.Tensor) -> torch.Tensor:
    """Rank of every entry within its row (last axis): 0 for the largest.

    A stable sort, so ties resolve to the lowest index everywhere (and on every rank).
    """
    order = torch.sort(values, dim=-1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    positions = torch.arange(values.shape[-1], device=order.device).expand_as(order)
    ranks.scatter_(-1, order, positions.contiguous())
    return ranks


def top_k_mask(values: torch.Tensor, keep: int | torch.Tensor) -> torch.Tensor:
    """Boolean mask of the ``keep`` largest entries of every row (last axis).

    Args:
        values: Scores, shape ``(..., n)``.
        keep: Entries to keep per row: an int, or one count per row (shape ``(...)``).
    """
    keep = torch.as_tensor(keep, device=values.device)
    return descending_ranks(values) < keep.unsqueeze(-1)


class HardConcreteGate(nn.Module):
    """The gates and Lagrange multipliers of one prunable dimension.

    Args:
        shape: Gate tensor shape ``(..., n)``; the last axis holds the prunable units.
        keep: Units to keep along the last axis (the target), the same in every row.
        init_log_alpha: Initial log-alpha (high: all units start kept). It must lie inside the
            clamp range [log 1e-2, log 1e2] with room for the noise: a value above the range
            would be clamped flat, erase the noise, and let ties (index order) decide.
        init_std: Std of the symmetry-breaking noise added to ``init_log_alpha``.
        seed: Seed of that noise; identical on every rank so that ranks agree.
        device: Where to allocate (``meta`` for FSDP's deferred init).
        log_alpha_range: ``(min, max)`` log-alpha is clamped to after every step. The default
            is the paper's ``[log 1e-2, log 1e2]``, where even the most confident unit is
            sampled below 1 in ~5% of steps; a wider range lets a unit become (almost)
            deterministic, which matters for units whose loss is catastrophic (README).
    """

    def __init__(
        self,
        shape: tuple[int, ...],
        keep: int,
        init_log_alpha: float = 4.0,
        init_std: float = 0.01,
        seed: int = 0,
        device: torch.device | str | None = None,
        log_alpha_range: tuple[float, float] = (LOG_ALPHA_MIN, LOG_ALPHA_MAX),
    ):
        super().__init__()
        if not 0 < keep <= shape[-1]:
            raise ValueError(f"keep={keep} must be in [1, {shape[-1]}]")
        check_init_log_alpha(init_log_alpha, log_alpha_range)
        self.log_alpha_min, self.log_alpha_max = check_log_alpha_range(log_alpha_range)
        self.shape = tuple(shape)
        self.keep = int(keep)
        self.init_log_alpha = float(init_log_alpha)
        self.init_std = float(init_std)
        self.seed = int(seed)
        self.log_alpha = nn.Parameter(torch.empty(self.shape, device=device))
        # Multipliers of lambda_1 * (s - t) + lambda_2 * (s - t)^2, trained by gradient ascent.
        # Shaped (1,), not 0-dim: FSDP2's fully_shard rejects scalar parameters. Read them
        # as scalars with multipliers().
        self.lambda_1 = nn.Parameter(torch.zeros(MULTIPLIER_SHAPE, device=device))
        self.lambda_2 = nn.Parameter(torch.zeros(MULTIPLIER_SHAPE, device=device))
        # Frozen gate values once hardened (NOT_HARDENED before). A persistent buffer, so a
        # checkpoint taken after hardening resumes hardened; older checkpoints without it load
        # as not hardened (see _load_from_state_dict).
        self.register_buffer("hard_value", torch.full(self.shape, NOT_HARDENED, device=device))
        self._hardened, self._hardened_key = False, None  # cache of `hardened`
        if self.log_alpha.device.type != "meta":
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """(Re)initialises the gates; also called by FSDP for modules built on ``meta``."""
        generator = torch.Generator().manual_seed(self.seed)
        noise = torch.randn(self.shape, generator=generator) * self.init_std
        with torch.no_grad():
            value = (noise + self.init_log_alpha).clamp_(self.log_alpha_min, self.log_alpha_max)
            self.log_alpha.copy_(value)
            self.lambda_1.zero_()
            self.lambda_2.zero_()
            self.hard_value.fill_(NOT_HARDENED)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints written before hardening existed have no hard_value: not hardened.
        key = prefix + "hard_value"
        if key not in state_dict:
            state_dict[key] = torch.full(self.shape, NOT_HARDENED)
        # Checkpoints written before the multipliers became (1,)-shaped hold 0-dim tensors.
        for name in ("lambda_1", "lambda_2"):
            value = state_dict.get(prefix + name)
            if isinstance(value, torch.Tensor) and value.dim() == 0:
                state_dict[prefix + name] = value.reshape(MULTIPLIER_SHAPE)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def multipliers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lambda_1, lambda_2)`` as 0-dim tensors (views, differentiable)."""
        return self.lambda_1.reshape(()), self.lambda_2.reshape(())

    @property
    def hardened(self) -> bool:
        """True once :meth:`harden_` froze the gate at its target values.

        Asked several times per forward (sampling, expected L0, penalty): the answer is
        cached until ``hard_value`` changes, so it costs no device sync per call. Every write
        (``harden_``, a checkpoint load, an in-place distributed load) bumps the buffer's
        version; a move to another device replaces its storage.
        """
        buffer = self.hard_value
        if buffer.device.type == "meta":
            return False
        key = (buffer.data_ptr(), buffer._version)
        if self._hardened_key != key:
            self._hardened = bool((buffer >= 0).all())
            self._hardened_key = key
        return self._hardened

    @torch.no_grad()
    def harden_(self, binary: bool = False) -> None:
        """Freezes the gate at its deterministic target values (:meth:`deterministic`).

        From then on :meth:`sample` returns those values (no noise), :meth:`prob_nonzero` is
        the 0/1 keep mask (so the expected shape *is* the target) and the log-alphas and
        multipliers get no gradient. Every rank computes the same values from the same
        log-alphas.

        Args:
            binary: Freeze the 0/1 target mask instead (hidden gates, which are binary at
                evaluation and export).
        """
        values = self.deterministic_keep_mask() if binary else self.deterministic()
        kept = (values > 0).sum(-1)
        if not bool((kept == self.keep).all()):  # kept values are > 0 by construction
            raise RuntimeError(f"hardening kept {kept.tolist()} units per row, not {self.keep}")
        self.hard_value.copy_(values.to(self.hard_value))

    @property
    def num_units(self) -> int:
        """Units per row (the size of the last axis)."""
        return self.shape[-1]

    @property
    def target_sparsity(self) -> float:
        """Fraction of units pruned at the target."""
        return 1.0 - self.keep / self.num_units

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draws gates ``z`` in [0, 1] with the reparameterisation trick (training).

        Args:
            generator: Source of the uniform noise (the global RNG when None).
        """
        if self.hardened:
            return self.hard_value.float()
        # fp32 even when FSDP mixed precision hands us low-precision parameters: bf16 would
        # round the noise and the stretch.
        log_alpha = self.log_alpha.float()
        u = torch.rand(
            log_alpha.shape, device=log_alpha.device, dtype=torch.float32, generator=generator
        )
        u = u.clamp(_EPS, 1.0 - _EPS)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / TEMPERATURE)
        return (s * (LIMIT_RIGHT - LIMIT_LEFT) + LIMIT_LEFT).clamp(0.0, 1.0)

    def prob_nonzero(self) -> torch.Tensor:
        """P(z != 0) per unit: the expected L0 norm, differentiable in log-alpha.

        Once hardened, the 0/1 keep mask (the gate is deterministic; no gradient).
        """
        if self.hardened:
            return (self.hard_value > 0).float()
        return torch.sigmoid(self.log_alpha.float() - TEMPERATURE * _LOG_RATIO)

    def expected_sparsity(self) -> torch.Tensor:
        """Expected fraction of pruned units over the whole dimension (for logging)."""
        return 1.0 - self.prob_nonzero().mean()

    def row_sparsity(self) -> torch.Tensor:
        """Expected fraction of pruned units of every row, shape ``shape[:-1]``."""
        return 1.0 - self.prob_nonzero().mean(-1)

    def expected_keep(self) -> torch.Tensor:
        """Expected kept units per row, shape ``shape[:-1]``."""
        return self.prob_nonzero().sum(-1)

    def lagrangian(self, target_sparsity: float) -> torch.Tensor:
        """Mean over rows of ``lambda_1 (s_r - t) + lambda_2 (s_r - t)^2``.

        ``s_r`` is the expected sparsity of row ``r`` (a layer, or a kv group of a layer).
        Export keeps exactly the target count in *every* row, so every row must approach it:
        a constraint on the mean over rows would let the LM loss leave one layer with most of
        its units on and another with almost none, and export would then cut trained units of
        the first and keep near-dead units of the second. The quadratic term of each row is
        what holds it to its own budget (the linear term of the mean equals that of the mean
        gap). The released Sheared-LLaMA code computes it the same way, per row, then averages.
        """
        gap = self.row_sparsity() - target_sparsity
        lambda_1, lambda_2 = self.multipliers()
        return (lambda_1 * gap + lambda_2 * gap * gap).mean()

    @torch.no_grad()
    def expected_value(self) -> torch.Tensor:
        """``E[z]`` per unit: the mean of the hard-concrete gate, > 0 for any finite log-alpha.

        Computed by midpoint quadrature over the part of the uniform noise ``u`` where the
        gate is non-zero (the gate is a monotone function of ``u``; below ``u0`` it is exactly
        0): ``E[z] = (1 - u0) * mean z(u)`` over ``u`` in ``(u0, 1)``, with ``1 - u0 =
        P(z > 0)``. Deterministic, exact to about 1e-4 of the value, and strictly positive
        even where ``P(z > 0)`` is tiny (log-alpha -10: 2e-4), where a quadrature over the
        whole of ``(0, 1)`` has no point and would return 0.
        """
        log_alpha = self.log_alpha.detach().float().unsqueeze(-1)
        # z > 0  <=>  s > -l / (r - l)  <=>  logit(u) > T * log(-l / r) - log_alpha
        # (logit(-l / (r - l)) = log(-l / r)); so 1 - u0 is prob_nonzero().
        threshold = TEMPERATURE * _LOG_RATIO - log_alpha
        width = torch.sigmoid(-threshold)  # 1 - u0 = P(z > 0), without cancellation
        k = torch.arange(_QUADRATURE, device=log_alpha.device, dtype=torch.float32) + 0.5
        tail = width * (k / _QUADRATURE)  # 1 - u at the midpoints of (u0, 1)
        logit_u = torch.log1p(-tail) - torch.log(tail)
        s = torch.sigmoid((logit_u + log_alpha) / TEMPERATURE)
        z = (s * (LIMIT_RIGHT - LIMIT_LEFT) + LIMIT_LEFT).clamp(0.0, 1.0)
        return width.squeeze(-1) * z.mean(-1)

    @torch.no_grad()
    def deterministic(self, keep: int | torch.Tensor | None = None) -> torch.Tensor:
        """Evaluation gates: exactly ``keep`` non-zero units in every row.

        A kept unit takes ``max(median, mean)`` of its gate distribution: the Louizos
        test-time value ``clamp(sigmoid(a) (r - l) + l, 0, 1)`` (which is 1 for confidently
        kept units, so nothing is rescaled), or the gate's mean ``E[z]`` where that is larger.
        The median alone is exactly 0 for log-alpha below about -2.4, so a unit that the
        target forces us to keep would be folded into the weights as an all-zero (dead) unit
        that still counts as parameters; the mean is what the training forward saw on
        average, and it is strictly positive.

        Args:
            keep: Units to keep per row (an int, or one count per row); default the target.
                Ignored once hardened: the frozen target values are returned.
        """
        if self.hardened:
            return self.hard_value.float()
        log_alpha = self.log_alpha.detach().float()
        median = (torch.sigmoid(log_alpha) * (LIMIT_RIGHT - LIMIT_LEFT) + LIMIT_LEFT).clamp(0, 1)
        # The floor only matters where E[z] underflows fp32 (log-alpha below about -87): a
        # kept unit is never exactly 0, so its keep mask can always be read off its value.
        value = torch.maximum(median, self.expected_value()).clamp_min(_KEPT_FLOOR)
        return value * self.deterministic_keep_mask(keep)

    @torch.no_grad()
    def deterministic_keep_mask(self, keep: int | torch.Tensor | None = None) -> torch.Tensor:
        """Boolean mask of the top-``keep`` units of every row (by log-alpha).

        Args:
            keep: Units to keep per row: an int (the same in every row), a tensor of shape
                ``shape[:-1]`` (one count per row), or None for the target. Ignored once
                hardened: the frozen target mask is returned.
        """
        if self.hardened:
            return self.hard_value > 0
        keep = self.keep if keep is None else keep
        return top_k_mask(self.log_alpha.detach().float(), keep)

    @torch.no_grad()
    def expected_keep_counts(self) -> torch.Tensor:
        """Units per row kept at the *current* expected shape (``eval_at: expected``).

        One count per row (round of the row's expected kept units, at least 1), so a layer
        that the gates are emptying is evaluated with what it actually keeps.
        """
        counts = torch.round(self.expected_keep()).long()
        return counts.clamp(1, self.num_units)

    @torch.no_grad()
    def set_log_alpha(self, values: torch.Tensor) -> None:
        """Overwrites log-alpha (clamped into range), e.g. from importance scores."""
        if tuple(values.shape) != self.shape:
            raise ValueError(f"log-alpha of shape {tuple(values.shape)}, expected {self.shape}")
        values = values.to(self.log_alpha).clamp(self.log_alpha_min, self.log_alpha_max)
        self.log_alpha.copy_(values)

    @torch.no_grad()
    def clamp_(self) -> None:
        """Clamps log-alpha into its allowed range (call after each optimizer step)."""
        self.log_alpha.clamp_(self.log_alpha_min, self.log_alpha_max)

    def extra_repr(self) -> str:
        """Shape and keep count, for ``print(model)``."""
        return (
            f"shape={self.shape}, keep={self.keep}, "
            f"log_alpha_range=[{self.log_alpha_min:.3f}, {self.log_alpha_max:.3f}]"
            + (", hardened" if self.hardened else "")
        )
