"""Gates inside an unmodified ``transformers`` model: the gate module and its forward hooks.

:class:`ShearGates` is attached to the Hugging Face model as the child ``shear_gates``. A
forward pre-hook on the model calls it once per forward pass: in training it *samples* every
gate (so activation checkpointing, which re-runs layer hooks, reuses the same sample) and
computes the Lagrangian penalty inside the forward, where FSDP has the gate parameters
unsharded; in eval it builds the deterministic masks. Small hooks on the model's own modules
then multiply the current masks in:

=======================  ===================================================================
where                    what
=======================  ===================================================================
embedding output         hidden gates (times ``sqrt(kept / D)`` where the family's embedding
                         scale follows the hidden size, as the compact model's does)
``o_proj`` input         per-head gates (kv-group gate x query-head-in-group gate), applied by
                         :func:`~composer_shear.pruning.mask_ops.mask_input`, which saves no copy of
                         the activations for the backward pass
``o_proj`` output        layer gate x hidden gates (the attention residual branch)
``down_proj`` input      intermediate gates (:func:`~composer_shear.pruning.mask_ops.mask_input`)
``down_proj`` output     layer gate x hidden gates (the MLP residual branch)
every hidden RMSNorm     statistics over the kept hidden dims only (pre-scale, post-unscale)
=======================  ===================================================================

Families whose branches end in a norm before the residual add (the family's
``branch_norms``) get the hidden gates alone on ``o_proj`` / ``down_proj`` output, so that
the branch norm's statistics are over the kept dims, and layer gate x hidden gates on the
branch norm's output; a scale before a norm would be normalised away.

With the deterministic masks the masked model computes exactly what the sliced model of
:mod:`composer_shear.export.surgery` computes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from composer_shear.families import DecoderFamily, LayerModules, get_family
from composer_shear.pruning.gates import (
    LOG_ALPHA_MAX,
    LOG_ALPHA_MIN,
    HardConcreteGate,
    descending_ranks,
)
from composer_shear.pruning.mask_ops import mask_input
from composer_shear.shape import ModelShape, count_params

__all__ = [
    "DIMENSIONS",
    "EVAL_MODES",
    "ForwardMasks",
    "NonFiniteGateError",
    "ShearGates",
    "attach_gates",
    "find_gated_hf_model",
    "find_gates",
    "gate_specs",
]

# Half width of the log-alpha bands that importance initialisation spreads units over.
INIT_BAND_HALF_WIDTH = 0.5
# Prunable dimensions, in the order they are reported.
DIMENSIONS = ("layers", "kv_heads", "heads", "intermediate", "hidden")
EVAL_MODES = ("target", "expected")
GATES_ATTR = "shear_gates"


class NonFiniteGateError(FloatingPointError):
    """A gate quantity became NaN or infinite in training; the message names which and where."""


def _where(name: str, bad: torch.Tensor) -> str:
    """The layers (or hidden units) a boolean ``bad`` mask of gate ``name`` points at."""
    if name == "hidden":
        units = bad.nonzero().flatten().tolist()
        more = f" and {len(units) - 8} more" if len(units) > 8 else ""
        return f"hidden unit(s) {units[:8]}{more} (shared by every layer)"
    rows = bad if bad.dim() == 1 else bad.reshape(bad.shape[0], -1).any(-1)
    return f"layer(s) {rows.nonzero().flatten().tolist()}"


@dataclass
class ForwardMasks:
    """The gate values of one forward pass, laid out for the hooks.

    Attributes:
        hidden: ``(D,)`` hidden gates (embedding output), or None.
        norm_scale: ``sqrt(D / kept)``: makes RMSNorm average over kept dims only, or None.
        head: ``(L, H * head_dim)`` per-head gates expanded over head_dim, or None.
        intermediate: ``(L, I)`` intermediate gates, or None.
        branch: ``(L, 1)`` or ``(L, D)`` residual-branch scale (layer x hidden), or None.
    """

    hidden: torch.Tensor | None = None
    norm_scale: torch.Tensor | None = None
    head: torch.Tensor | None = None
    intermediate: torch.Tensor | None = None
    branch: torch.Tensor | None = None


def gate_specs(source: ModelShape, target: ModelShape) -> dict[str, tuple[tuple[int, ...], int]]:
    """The gates a target needs: ``name -> (gate shape, units kept per row)``.

    A dimension gets gates only when the target shrinks it. Under GQA, ``kv_heads`` prunes
    whole kv groups and ``heads`` prunes query heads inside every group (the same number per
    group); a target may need either or both.
    """
    n_layers, n_kv = source.num_hidden_layers, source.num_key_value_heads
    specs = {
        "layers": ((n_layers,), target.num_hidden_layers),
        "kv_heads": ((n_layers, n_kv), target.num_key_value_heads),
        "heads": ((n_layers, n_kv, source.heads_per_group), target.heads_per_group),
        "intermediate": ((n_layers, source.intermediate_size), target.intermediate_size),
        "hidden": ((source.hidden_size,), target.hidden_size),
    }
    return {name: spec for name, spec in specs.items() if spec[1] < spec[0][-1]}


class ShearGates(nn.Module):
    """All gates of a model pruned from ``source`` toward ``target``.

    A gate exists only for a dimension the target shrinks. Under GQA, ``kv_heads`` gates
    prune whole kv groups and ``heads`` gates prune query heads inside every group (the same
    number per group); a target may need either or both.

    Args:
        source: Shape of the model being pruned.
        target: Validated target shape (:meth:`ModelShape.resolve_target`).
        init_log_alpha: Initial log-alpha of every gate.
        seed: Seed of the initial symmetry-breaking noise.
        device: Allocation device (``meta`` under FSDP deferred init).
        log_alpha_range: Clamp range of every gate's log-alpha (default: the paper's).
        binary: Deterministic gates (evaluation, hardening, export) are 0/1 in every
            dimension, so the exported model is the source weights cut at the kept units
            with no gate value folded in: mask-only pruning, where the weights are frozen and
            never adapt to fractional gates. Default False: only hidden gates are binary.
    """

    def __init__(
        self,
        source: ModelShape,
        target: ModelShape,
        init_log_alpha: float = 4.0,
        seed: int = 0,
        device: torch.device | str | None = None,
        log_alpha_range: tuple[float, float] = (LOG_ALPHA_MIN, LOG_ALPHA_MAX),
        binary: bool = False,
    ):
        super().__init__()
        self.source, self.target = source, target
        # The target the gates were built for; `target` may move (retarget) within it.
        self.built_for = target
        self.binary = bool(binary)
        self.gates = nn.ModuleDict()
        for name, (shape, keep) in gate_specs(source, target).items():
            self.gates[name] = HardConcreteGate(
                shape,
                keep,
                init_log_alpha,
                seed=seed + DIMENSIONS.index(name),
                device=device,
                log_alpha_range=log_alpha_range,
            )
        # Progress of the Lagrangian warm-up in [0, 1]: the penalty's target sparsity of each
        # dimension moves from its start value to the final target; set before every batch.
        self.target_progress = 1.0
        # Sparsity each dimension's ramp starts from (0 for gates that start all kept; the
        # initial expected sparsity for gates initialised from importance).
        self.start_sparsity: dict[str, float] = {name: 0.0 for name in self.gates}
        self.eval_at = "target"
        self.masks: ForwardMasks | None = None
        self.bypass = False  # True: every hook is a no-op (the unpruned model runs)
        self._noise_seed: int | None = None
        self._eval_cache: tuple | None = None
        self._forward_in_step = 0
        self.penalty: torch.Tensor | None = None
        self.metrics: dict[str, torch.Tensor] = {}
        # Non-finite flags of the last training forward, read by check_finite() (one host sync
        # per step, outside the forward, where FSDP has the parameters gathered).
        self.nonfinite: dict[str, dict[str, torch.Tensor]] = {}

    # -- gate values ------------------------------------------------------------------------

    def gate_values(self) -> dict[str, torch.Tensor]:
        """Gate values for this forward: sampled in training, deterministic in eval."""
        if self.training:
            generator = self._noise_generator()
            return {name: gate.sample(generator) for name, gate in self.gates.items()}
        return self.deterministic_values(self.eval_at)

    def start_step(self, seed: int, step: int, rank: int) -> None:
        """Seeds this step's gate noise from (seed, step, rank).

        Noise that depends only on the training position makes a resumed run sample exactly
        what the uninterrupted run sampled (Composer does not restore the global RNG on a
        mid-epoch resume), whatever else consumed random numbers.
        """
        self._noise_seed = ((seed * 1_000_003 + step) * 8_191 + rank) % (2**62)
        self._forward_in_step = 0

    def _noise_generator(self) -> torch.Generator | None:
        if self._noise_seed is None:
            return None
        generator = torch.Generator(device=self.gates_device())
        # Several forwards per step with gradient accumulation: one stream each.
        generator.manual_seed((self._noise_seed * 64 + self._forward_in_step) % (2**63))
        self._forward_in_step += 1
        return generator

    @torch.no_grad()
    def deterministic_values(self, eval_at: str = "target") -> dict[str, torch.Tensor]:
        """Deterministic gates keeping exactly the target (or expected) count per row."""
        values = {}
        for name, gate in self.gates.items():
            # At the expected shape every row keeps what it currently expects to keep (rows
            # may differ); at the target every row keeps exactly the target count.
            keep = gate.expected_keep_counts() if eval_at == "expected" else None
            if self.binary or name == "hidden":
                # Binary: the residual stream feeds RMSNorms and, with tied embeddings, the
                # embedding matrix doubles as lm_head, so no scale can be folded in here
                # (and with `binary`, nothing is folded anywhere).
                values[name] = gate.deterministic_keep_mask(keep).to(gate.log_alpha.dtype)
            else:
                values[name] = gate.deterministic(keep)
        return values

    def head_values(self, values: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Per query head gate ``(L, H)``: kv-group gate times head-in-group gate."""
        kv, heads = values.get("kv_heads"), values.get("heads")
        if kv is None and heads is None:
            return None
        n_layers, n_kv = self.source.num_hidden_layers, self.source.num_key_value_heads
        per_head = torch.ones(
            (n_layers, n_kv, self.source.heads_per_group),
            device=(kv if kv is not None else heads).device,
            dtype=(kv if kv is not None else heads).dtype,
        )
        if kv is not None:
            per_head = per_head * kv.unsqueeze(-1)
        if heads is not None:
            per_head = per_head * heads
        # Query head i belongs to kv group i // heads_per_group: group-major flattening.
        return per_head.reshape(n_layers, -1)

    def build_masks(self, values: dict[str, torch.Tensor]) -> ForwardMasks:
        """Lays the gate values out the way the hooks consume them."""
        masks = ForwardMasks()
        head = self.head_values(values)
        if head is not None:
            masks.head = head.repeat_interleave(self.source.head_dim, dim=-1)
        masks.intermediate = values.get("intermediate")
        layer, hidden = values.get("layers"), values.get("hidden")
        if hidden is not None:
            masks.hidden = hidden
            kept = torch.count_nonzero(hidden).clamp(min=1).to(hidden.dtype)
            masks.norm_scale = torch.sqrt(hidden.numel() / kept)
        if layer is not None and hidden is not None:
            masks.branch = layer.unsqueeze(-1) * hidden.unsqueeze(0)
        elif layer is not None:
            masks.branch = layer.unsqueeze(-1)
        elif hidden is not None:
            masks.branch = hidden.unsqueeze(0).expand(self.source.num_hidden_layers, -1)
        return masks

    # -- penalty ----------------------------------------------------------------------------

    def expected_num_params(self) -> torch.Tensor:
        """Expected parameter count under the current gate distributions."""
        src = self.source
        probs = {name: gate.prob_nonzero() for name, gate in self.gates.items()}
        n_layers = src.num_hidden_layers
        ref = next(iter(probs.values()))
        ones = torch.ones(n_layers, device=ref.device, dtype=ref.dtype)
        p_kv = probs.get("kv_heads")
        p_kv = p_kv if p_kv is not None else ones.new_ones((n_layers, src.num_key_value_heads))
        kv_heads = p_kv.sum(-1)
        if "heads" in probs:
            q_heads = (p_kv.unsqueeze(-1) * probs["heads"]).sum((-1, -2))
        else:
            q_heads = kv_heads * src.heads_per_group
        inter = (
            probs["intermediate"].sum(-1)
            if "intermediate" in probs
            else ones * (src.intermediate_size)
        )
        return count_params(
            vocab_size=src.vocab_size,
            hidden=probs["hidden"].sum() if "hidden" in probs else src.hidden_size,
            layer_keep=probs.get("layers", ones),
            q_heads=q_heads,
            kv_heads=kv_heads,
            intermediate=inter,
            head_dim=src.head_dim,
            tie_word_embeddings=src.tie_word_embeddings,
            qkv_bias=src.qkv_bias,
            o_bias=src.o_bias,
            mlp_bias=src.mlp_bias,
            norms_per_layer=src.norms_per_layer,
            head_norms_per_layer=src.head_norms_per_layer,
        )

    def ramped_target(self, name: str) -> float:
        """The sparsity the penalty asks of dimension ``name`` at the current warm-up point."""
        start, final = self.start_sparsity.get(name, 0.0), self.gates[name].target_sparsity
        return start + self.target_progress * (final - start)

    @property
    def hardened(self) -> bool:
        """True once :meth:`harden_` froze every gate at its target values."""
        return all(gate.hardened for gate in self.gates.values())

    @torch.no_grad()
    def harden_(self) -> None:
        """Freezes every gate at its deterministic target values (the hardening phase).

        From then on the training forward multiplies exactly the values export folds in (no
        noise, exactly the target count per row), the Lagrangian is gone and the log-alphas
        and multipliers get no gradient: the rest of pruning trains the model that ships.
        """
        for name, gate in self.gates.items():
            # Hidden gates are binary at eval and export (see deterministic_values).
            gate.harden_(binary=self.binary or name == "hidden")
        self._eval_cache = None

    def lagrangian_penalty(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Sum of the per-dimension Lagrangian terms, and the values worth logging.

        Once the gates are hardened the penalty is an exact zero that still depends on every
        gate parameter: under DDP every parameter must receive a gradient in every step (the
        penalty reaches the loss outside the model's outputs, so DDP's unused-parameter
        search cannot be used), and a zero gradient does that without changing anything.
        """
        hardened = self.hardened
        penalty = torch.zeros((), device=self.gates_device())
        metrics: dict[str, torch.Tensor] = {}
        for name, gate in self.gates.items():
            target = gate.target_sparsity if hardened else self.ramped_target(name)
            expected = gate.expected_sparsity()
            lambda_1, lambda_2 = gate.multipliers()
            if hardened:
                tie = gate.log_alpha.sum() + lambda_1 + lambda_2
                term = 0.0 * tie.float()
            else:
                term = gate.lagrangian(target)
            penalty = penalty + term
            metrics[f"pruning/{name}/expected_sparsity"] = expected.detach()
            # The row furthest from its own budget (0 for one-row dimensions: layers, hidden).
            row_gap = (gate.row_sparsity().detach() - target).abs().max()
            metrics[f"pruning/{name}/max_row_deviation"] = row_gap
            # The same in units, against the *final* target: how far from landing.
            landing = (gate.expected_keep().detach() - gate.keep).abs().max()
            metrics[f"pruning/{name}/max_row_deviation_units"] = landing
            metrics[f"pruning/{name}/target_sparsity"] = torch.tensor(target)
            # Copies, not views: under FSDP these parameters are views of gathered storage
            # that is freed after the pass, and the metrics are read at BATCH_END.
            metrics[f"pruning/{name}/lambda_1"] = lambda_1.detach().clone()
            metrics[f"pruning/{name}/lambda_2"] = lambda_2.detach().clone()
            metrics[f"pruning/{name}/lagrangian"] = term.detach()
        metrics["pruning/expected_num_params"] = self.expected_num_params().detach()
        metrics["pruning/target_num_params"] = torch.tensor(float(self.target.num_params()))
        metrics["pruning/penalty"] = penalty.detach()
        metrics["pruning/hardened"] = torch.tensor(float(hardened))
        return penalty, metrics

    def gates_device(self) -> torch.device:
        """Device of the gate parameters."""
        return next(self.parameters()).device

    # -- the forward pass -------------------------------------------------------------------

    def forward(self) -> ForwardMasks:
        """Computes this forward pass's masks (and, in training, the penalty)."""
        if self.bypass:
            self.masks = None
            return ForwardMasks()
        if self.training:
            values = self.gate_values()
            self.masks = self.build_masks(values)
            self.penalty, self.metrics = self.lagrangian_penalty()
            self.nonfinite = self._nonfinite_flags(values)
            return self.masks
        # Eval forwards (e.g. every token of generate()) reuse the masks until a gate changes:
        # any in-place update (optimizer step, clamp, load) bumps the parameter's version.
        key = (
            self.eval_at,
            *((g.log_alpha.data_ptr(), g.log_alpha._version) for g in self.gates.values()),
        )
        if self._eval_cache is None or self._eval_cache[0] != key:
            self._eval_cache = (key, self.build_masks(self.gate_values()))
        self.masks = self._eval_cache[1]
        return self.masks

    @torch.no_grad()
    def _nonfinite_flags(
        self, values: dict[str, torch.Tensor]
    ) -> dict[str, dict[str, torch.Tensor]]:
        """Per gate: where its log-alphas, sampled values and multipliers are not finite."""
        flags = {}
        for name, gate in self.gates.items():
            lambda_1, lambda_2 = gate.multipliers()
            flags[name] = {
                "log_alpha": ~torch.isfinite(gate.log_alpha.detach()),
                "gate values": ~torch.isfinite(values[name].detach()),
                "multipliers": ~torch.isfinite(torch.stack([lambda_1, lambda_2]).detach()),
            }
        return flags

    def check_finite(self, step: int) -> None:
        """Raises :class:`NonFiniteGateError` if the last training forward saw a NaN or inf.

        Checks the log-alphas, the sampled gate values and the multipliers of every gate, and
        the penalty, as the last training forward computed them (one host sync).

        Args:
            step: The training step, for the message.
        """
        flags = self.nonfinite
        if not flags:
            return
        checks = [bad.any() for per_gate in flags.values() for bad in per_gate.values()]
        penalty = self.penalty
        if penalty is not None:
            checks.append(~torch.isfinite(penalty.detach()).all())
        if not bool(torch.stack(checks).any()):
            return
        problems = []
        for name, per_gate in flags.items():
            for what, bad in per_gate.items():
                if not bool(bad.any()):
                    continue
                where = "" if what == "multipliers" else f", {_where(name, bad.cpu())}"
                problems.append(f"{what} of dimension {name!r}{where}")
        if penalty is not None and not bool(torch.isfinite(penalty.detach()).all()):
            problems.append("the Lagrangian penalty")
        raise NonFiniteGateError(
            f"targeted_pruning: non-finite values (NaN or inf) at training step {step}: "
            + "; ".join(problems)
            + ". Training stopped before the step's update; lower gate_lr / lambda_lr or the "
            "learning rate, or resume from an earlier checkpoint."
        )

    @contextlib.contextmanager
    def bypassed(self) -> Iterator[None]:
        """Runs the model unpruned inside the block (e.g. to measure importance)."""
        previous, self.bypass = self.bypass, True
        try:
            yield
        finally:
            self.bypass = previous

    @torch.no_grad()
    def init_from_scores(
        self,
        scores: dict[str, torch.Tensor],
        kept_log_alpha: float,
        pruned_log_alpha: float,
    ) -> None:
        """Sets every gate from unit scores, so its target top-k is the scores' top-k.

        In every row the ``keep`` best-scored units get log-alphas spread linearly by rank
        from the top of the gate's clamp range (the best unit) down to ``kept_log_alpha - 0.5``
        (the worst kept one); the others from ``pruned_log_alpha + 0.5`` down to the bottom
        of the range. The deterministic masks at the target therefore keep exactly the units
        one-shot pruning keeps, and how sure a gate starts follows the scores: with a wide
        clamp range the clearly important units (a first layer, a massive-activation
        channel: removing either costs SmolLM2 7-8 nats) start almost deterministic, and the
        noise and the learning act on the units near the cut.

        Args:
            scores: Per dimension, scores shaped like the gate (:func:`unit_scores`).
            kept_log_alpha: Log-alpha of the worst kept unit is ``kept_log_alpha - 0.5``.
            pruned_log_alpha: Log-alpha of the best pruned unit is ``pruned_log_alpha + 0.5``;
                at most ``kept_log_alpha - 1`` so that the two bands do not overlap.
        """
        if pruned_log_alpha > kept_log_alpha - 2 * INIT_BAND_HALF_WIDTH:
            raise ValueError(
                f"pruned log-alpha {pruned_log_alpha} must be at least "
                f"{2 * INIT_BAND_HALF_WIDTH} below the kept log-alpha {kept_log_alpha}."
            )
        for name, gate in self.gates.items():
            score = scores[name].to(gate.log_alpha.device, torch.float32)
            if tuple(score.shape) != gate.shape:
                raise ValueError(f"{name}: scores of shape {tuple(score.shape)}, gate {gate.shape}")
            n, keep = gate.num_units, gate.keep
            rank = descending_ranks(score).float()
            kept = rank < keep
            # Position in [0, 1] inside the unit's band: 0 = best of the band.
            pos_kept = rank / max(keep - 1, 1)
            pos_pruned = (rank - keep) / max(n - keep - 1, 1)
            kept_top = max(gate.log_alpha_max, kept_log_alpha + INIT_BAND_HALF_WIDTH)
            kept_bottom = kept_log_alpha - INIT_BAND_HALF_WIDTH
            pruned_top = pruned_log_alpha + INIT_BAND_HALF_WIDTH
            pruned_bottom = min(gate.log_alpha_min, pruned_log_alpha - INIT_BAND_HALF_WIDTH)
            value = torch.where(
                kept,
                kept_top - (kept_top - kept_bottom) * pos_kept,
                pruned_top - (pruned_top - pruned_bottom) * pos_pruned,
            )
            gate.set_log_alpha(value)
        self._eval_cache = None

    @torch.no_grad()
    def clamp_(self) -> None:
        """Clamps every log-alpha into range (after the optimizer step)."""
        for gate in self.gates.values():
            gate.clamp_()
        # The step changed the gates. Under FSDP the version counters of the parameters the
        # eval forward sees (views of freshly gathered storage) need not tell.
        self._eval_cache = None

    def retarget(self, target: ModelShape) -> None:
        """Points the gates at another target of the same source: the units each row keeps.

        The gates stay as built (for a target that shrinks every dimension ``target`` may
        shrink); a gate whose dimension ``target`` keeps whole keeps every unit. A search over
        shapes scores each candidate this way on the one model, then keeps the winner.

        Raises:
            ValueError: ``target`` shrinks a dimension that has no gates.
        """
        specs = gate_specs(self.source, target)
        missing = sorted(set(specs) - set(self.gates))
        if missing:
            raise ValueError(
                f"target {target.describe()} shrinks {missing}, which these gates (built for "
                f"{self.target.describe()}) cannot prune"
            )
        for name, gate in self.gates.items():
            gate.keep = specs[name][1] if name in specs else gate.num_units
        self.target = target
        self._eval_cache = None

    def keep_masks(self) -> dict[str, torch.Tensor]:
        """Boolean keep masks of the deterministic gates at the target, per dimension."""
        return {name: gate.deterministic_keep_mask() for name, gate in self.gates.items()}


# -- hooks ------------------------------------------------------------------------------------


def _scale(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # Match the activation dtype so that a bf16 stream stays bf16.
    return x * scale.to(x.dtype)


def _install_layer_hooks(
    gates: ShearGates, index: int, modules: LayerModules, handles: list[RemovableHandle]
) -> None:
    def head_pre(module, args):
        masks = gates.masks
        if masks is None or masks.head is None:
            return None
        return (mask_input(args[0], masks.head[index]), *args[1:])

    def intermediate_pre(module, args):
        masks = gates.masks
        if masks is None or masks.intermediate is None:
            return None
        return (mask_input(args[0], masks.intermediate[index]), *args[1:])

    def branch_post(module, args, output):
        masks = gates.masks
        if masks is None or masks.branch is None:
            return None
        return _scale(output, masks.branch[index])

    def hidden_post(module, args, output):
        masks = gates.masks
        if masks is None or masks.hidden is None:
            return None
        return _scale(output, masks.hidden)

    if "kv_heads" in gates.gates or "heads" in gates.gates:
        handles.append(modules.o_proj.register_forward_pre_hook(head_pre))
    if "intermediate" in gates.gates:
        handles.append(modules.down_proj.register_forward_pre_hook(intermediate_pre))
    if "hidden" in gates.gates:
        for norm in modules.hidden_norms:
            _install_norm_hooks(gates, norm, handles)
    if "layers" in gates.gates or "hidden" in gates.gates:
        if modules.branch_norms:
            # Mask the branch before its norm (statistics over the kept dims), then scale the
            # norm's output: the norm hooks above run first, being registered first.
            if "hidden" in gates.gates:
                for proj in modules.branch_outputs:
                    handles.append(proj.register_forward_hook(hidden_post))
            for norm in modules.branch_norms:
                handles.append(norm.register_forward_hook(branch_post))
        else:
            for proj in modules.branch_outputs:
                handles.append(proj.register_forward_hook(branch_post))


def _install_norm_hooks(gates: ShearGates, norm: nn.Module, handles: list) -> None:
    # RMSNorm(c x) / c with c = sqrt(D / kept) equals RMSNorm over the kept dims only, because
    # pruned dims of the input are exactly zero: mean(c^2 x^2) = sum(x^2) / kept. Pruned dims
    # stay zero whatever the norm's weight (w * 0 and (1 + w) * 0 alike).
    def pre(module, args):
        masks = gates.masks
        if masks is None or masks.norm_scale is None:
            return None
        return (_scale(args[0], masks.norm_scale), *args[1:])

    def post(module, args, output):
        masks = gates.masks
        if masks is None or masks.norm_scale is None:
            return None
        return _scale(output, 1.0 / masks.norm_scale)

    handles.append(norm.register_forward_pre_hook(pre))
    handles.append(norm.register_forward_hook(post))


def install_hooks(model: nn.Module, gates: ShearGates, family: DecoderFamily) -> list:
    """Registers the root pre-hook and the per-module hooks; returns their handles."""
    handles: list[RemovableHandle] = []

    def root_pre(module, args, kwargs):
        gates()  # a module call, so FSDP unshards the gates if they are wrapped separately
        return None

    handles.append(model.register_forward_pre_hook(root_pre, with_kwargs=True))
    if "hidden" in gates.gates:

        def embed_post(module, args, output):
            masks = gates.masks
            if masks is None:
                return None
            if family.embed_scale_follows_hidden:
                # The model scales by sqrt(D); the compact one by sqrt(kept) (its buffer comes
                # from its config): sqrt(kept / D) = 1 / norm_scale turns one into the other.
                return _scale(output, masks.hidden / masks.norm_scale)
            return _scale(output, masks.hidden)

        handles.append(family.embedding(model).register_forward_hook(embed_post))
        _install_norm_hooks(gates, family.final_norm_module(model), handles)
    for index, layer in enumerate(family.layer_list(model)):
        _install_layer_hooks(gates, index, family.layer_modules(layer), handles)
    return handles


def attach_gates(
    model: nn.Module,
    target_shape: dict,
    init_log_alpha: float = 4.0,
    seed: int = 0,
    eval_at: str = "target",
    log_alpha_range: tuple[float, float] = (LOG_ALPHA_MIN, LOG_ALPHA_MAX),
    binary: bool = False,
) -> ShearGates:
    """Adds gates for ``target_shape`` to a Hugging Face causal LM, in place.

    The model's own modules and parameters are untouched; the gates become the child module
    ``shear_gates`` (so they are saved, loaded and sharded with the model) and hooks apply them.

    Args:
        model: A ``transformers`` causal LM of a supported family.
        target_shape: Partial target, see :meth:`ModelShape.resolve_target`.
        init_log_alpha: Initial log-alpha of every gate.
        seed: Seed of the initial noise (identical on every rank).
        eval_at: ``"target"`` (deterministic masks at exactly the target shape: the masked
            model in eval mode equals the exported one) or ``"expected"`` (at the current
            expected shape, per row: what is being trained; the released recipes'
            ``eval_target_model: false``, and the algorithm's default during pruning).
        log_alpha_range: Clamp range of the gates' log-alpha (default: the paper's).
        binary: 0/1 deterministic gates in every dimension (see :class:`ShearGates`).

    Returns:
        The attached :class:`ShearGates`.
    """
    if eval_at not in EVAL_MODES:
        raise ValueError(f"eval_at must be one of {EVAL_MODES}, got {eval_at!r}")
    if find_gates(model) is not None:
        raise ValueError("This model already carries pruning gates.")
    family = get_family(model)
    source = family.shape(model.config)
    target = source.resolve_target(target_shape)
    device = family.embedding(model).weight.device
    gates = ShearGates(
        source,
        target,
        init_log_alpha=init_log_alpha,
        seed=seed,
        device=device,
        log_alpha_range=log_alpha_range,
        binary=binary,
    )
    gates.eval_at = eval_at
    gates.train(model.training)
    model.add_module(GATES_ATTR, gates)
    gates._hook_handles = install_hooks(model, gates, family)
    return gates


def find_gates(model: nn.Module) -> ShearGates | None:
    """Returns the :class:`ShearGates` inside ``model`` (any wrapper depth), if any."""
    for module in model.modules():
        if isinstance(module, ShearGates):
            return module
    return None


def find_gated_hf_model(module: nn.Module) -> nn.Module | None:
    """The Hugging Face model that carries the gates, inside any Composer / DDP wrapper."""
    for candidate in module.modules():
        if isinstance(getattr(candidate, GATES_ATTR, None), ShearGates):
            return candidate
    return None
