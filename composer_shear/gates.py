"""Hard-concrete gates (Louizos, Welling & Kingma 2018) and their Lagrange multipliers.

One :class:`HardConcreteGate` holds the gates of one prunable *dimension* (layers, kv heads,
query heads per group, MLP intermediate units or hidden units) for the whole model, shaped
``(..., n)``: the last axis holds the ``n`` units among which ``keep`` survive, the leading axes
index layers or groups. It also holds the two Lagrange multipliers of that dimension's
sparsity constraint, so "one Lagrangian term per shrinking dimension" is one module.

This is where gates are sampled (:meth:`HardConcreteGate.sample`), where their expected L0 is
computed (:meth:`HardConcreteGate.prob_nonzero`) and where the deterministic evaluation masks
that keep exactly the target count come from (:meth:`HardConcreteGate.deterministic`).
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
    "TEMPERATURE",
    "HardConcreteGate",
]

# Stretch interval and temperature of the hard-concrete distribution (Louizos et al.).
LIMIT_LEFT, LIMIT_RIGHT = -0.1, 1.1
TEMPERATURE = 2.0 / 3.0
# log-alpha is clamped after every optimizer step, as in the Sheared-LLaMA recipe.
LOG_ALPHA_MIN, LOG_ALPHA_MAX = math.log(1e-2), math.log(1e2)
_EPS = 1e-6
# log(-l/r): shifts log-alpha so that sigmoid(.) is the probability of a non-zero gate.
_LOG_RATIO = math.log(-LIMIT_LEFT / LIMIT_RIGHT)


class HardConcreteGate(nn.Module):
    """The gates and Lagrange multipliers of one prunable dimension.

    Args:
        shape: Gate tensor shape ``(..., n)``; the last axis holds the prunable units.
        keep: Units to keep along the last axis (the target), the same in every row.
        init_log_alpha: Initial log-alpha (high: all units start kept).
        init_std: Std of the symmetry-breaking noise added to ``init_log_alpha``.
        seed: Seed of that noise; identical on every rank so that ranks agree.
        device: Where to allocate (``meta`` for FSDP's deferred init).
    """

    def __init__(
        self,
        shape: tuple[int, ...],
        keep: int,
        init_log_alpha: float = 5.0,
        init_std: float = 0.01,
        seed: int = 0,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        if not 0 < keep <= shape[-1]:
            raise ValueError(f"keep={keep} must be in [1, {shape[-1]}]")
        self.shape = tuple(shape)
        self.keep = int(keep)
        self.init_log_alpha = float(init_log_alpha)
        self.init_std = float(init_std)
        self.seed = int(seed)
        self.log_alpha = nn.Parameter(torch.empty(self.shape, device=device))
        # Multipliers of lambda_1 * (s - t) + lambda_2 * (s - t)^2, trained by gradient ascent.
        self.lambda_1 = nn.Parameter(torch.zeros((), device=device))
        self.lambda_2 = nn.Parameter(torch.zeros((), device=device))
        if self.log_alpha.device.type != "meta":
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """(Re)initialises the gates; also called by FSDP for modules built on ``meta``."""
        generator = torch.Generator().manual_seed(self.seed)
        noise = torch.randn(self.shape, generator=generator) * self.init_std
        with torch.no_grad():
            value = (noise + self.init_log_alpha).clamp_(LOG_ALPHA_MIN, LOG_ALPHA_MAX)
            self.log_alpha.copy_(value)
            self.lambda_1.zero_()
            self.lambda_2.zero_()

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
        """P(z != 0) per unit: the expected L0 norm, differentiable in log-alpha."""
        return torch.sigmoid(self.log_alpha.float() - TEMPERATURE * _LOG_RATIO)

    def expected_sparsity(self) -> torch.Tensor:
        """Expected fraction of pruned units."""
        return 1.0 - self.prob_nonzero().mean()

    def expected_keep(self) -> torch.Tensor:
        """Expected kept units per row, shape ``shape[:-1]``."""
        return self.prob_nonzero().sum(-1)

    def lagrangian(self, target_sparsity: float) -> torch.Tensor:
        """``lambda_1 (s - t) + lambda_2 (s - t)^2`` for the current expected sparsity ``s``."""
        gap = self.expected_sparsity() - target_sparsity
        return self.lambda_1 * gap + self.lambda_2 * gap * gap

    @torch.no_grad()
    def deterministic(self, keep: int | None = None) -> torch.Tensor:
        """Evaluation gates: exactly ``keep`` non-zero units in every row.

        The kept units take the Louizos test-time value ``clamp(sigmoid(a) (r - l) + l, 0, 1)``
        (1 for confidently kept units); surgery folds these values into the weights.

        Args:
            keep: Units to keep per row; defaults to the target.
        """
        log_alpha = self.log_alpha.detach().float()
        value = (torch.sigmoid(log_alpha) * (LIMIT_RIGHT - LIMIT_LEFT) + LIMIT_LEFT).clamp(0, 1)
        return value * self.deterministic_keep_mask(keep)

    @torch.no_grad()
    def deterministic_keep_mask(self, keep: int | None = None) -> torch.Tensor:
        """Boolean mask of the top-``keep`` units of every row (by log-alpha)."""
        keep = self.keep if keep is None else int(keep)
        # Stable sort: ties (e.g. right after init) resolve to the lowest index everywhere.
        order = torch.sort(self.log_alpha.detach().float(), dim=-1, descending=True, stable=True)
        mask = torch.zeros(self.shape, dtype=torch.bool, device=self.log_alpha.device)
        mask.scatter_(-1, order.indices[..., :keep], True)
        return mask

    def expected_keep_count(self) -> int:
        """Units per row kept at the *current* expected sparsity (``eval_at: expected``)."""
        with torch.no_grad():
            kept = (1.0 - self.expected_sparsity().item()) * self.num_units
        return min(self.num_units, max(1, round(kept)))

    @torch.no_grad()
    def clamp_(self) -> None:
        """Clamps log-alpha into its allowed range (call after each optimizer step)."""
        self.log_alpha.clamp_(LOG_ALPHA_MIN, LOG_ALPHA_MAX)

    def extra_repr(self) -> str:
        """Shape and keep count, for ``print(model)``."""
        return f"shape={self.shape}, keep={self.keep}"
