"""Hard-concrete gate math: sampling, expected L0, deterministic top-k."""

import math

import pytest
import torch

from composer_shear.pruning.gates import (
    LIMIT_LEFT,
    LIMIT_RIGHT,
    LOG_ALPHA_MAX,
    LOG_ALPHA_MIN,
    MULTIPLIER_SHAPE,
    TEMPERATURE,
    HardConcreteGate,
)
from composer_shear.pruning.masking import attach_gates
from tests.tiny_models import tiny_model


def test_prob_nonzero_matches_monte_carlo():
    torch.manual_seed(0)
    gate = HardConcreteGate((1, 7), keep=3)
    with torch.no_grad():
        gate.log_alpha.copy_(torch.linspace(-3, 3, 7).view(1, 7))
    draws = torch.stack([gate.sample() for _ in range(20000)])
    empirical = (draws > 0).float().mean(0)
    assert torch.allclose(empirical, gate.prob_nonzero().detach(), atol=0.015)


def test_prob_nonzero_closed_form():
    gate = HardConcreteGate((3,), keep=1)
    with torch.no_grad():
        gate.log_alpha.fill_(0.0)
    expected = 1 / (1 + math.exp(TEMPERATURE * math.log(-LIMIT_LEFT / LIMIT_RIGHT)))
    assert gate.prob_nonzero()[0].item() == pytest.approx(expected, rel=1e-6)


def test_samples_in_unit_interval_with_exact_zeros_and_ones():
    gate = HardConcreteGate((1000,), keep=10)
    with torch.no_grad():
        gate.log_alpha.fill_(0.0)
    z = gate.sample()
    assert z.min() >= 0 and z.max() <= 1
    assert (z == 0).any() and (z == 1).any()


def test_high_init_keeps_everything():
    gate = HardConcreteGate((4, 16), keep=8)
    assert gate.expected_sparsity().item() < 0.01
    kept = gate.deterministic()
    assert torch.all((kept > 0).sum(-1) == 8)
    # Confidently kept units take the value 1 (nothing to fold).
    assert torch.all(kept[kept > 0] == 1.0)


def test_deterministic_count_is_exact_and_uniform():
    torch.manual_seed(1)
    gate = HardConcreteGate((5, 3, 4), keep=2)
    with torch.no_grad():
        gate.log_alpha.copy_(torch.randn(5, 3, 4) * 3)
    det = gate.deterministic()
    mask = gate.deterministic_keep_mask()
    assert torch.all(mask.sum(-1) == 2)
    # Kept units are the top-2 log-alphas of each row.
    top = gate.log_alpha.detach().topk(2, dim=-1).indices
    assert torch.all(mask.gather(-1, top))
    assert torch.all(det[~mask] == 0)
    # Kept units: max(Louizos test-time value, mean of the gate).
    value = (torch.sigmoid(gate.log_alpha) * (LIMIT_RIGHT - LIMIT_LEFT) + LIMIT_LEFT).clamp(0, 1)
    value = torch.maximum(value.detach(), gate.expected_value())
    assert torch.allclose(det[mask], value[mask])


def test_expected_value_matches_monte_carlo():
    torch.manual_seed(2)
    gate = HardConcreteGate((9,), keep=3, log_alpha_range=(-10.0, 10.0))
    with torch.no_grad():
        gate.log_alpha.copy_(torch.linspace(LOG_ALPHA_MIN, LOG_ALPHA_MAX, 9))
    draws = torch.stack([gate.sample() for _ in range(40000)])
    assert torch.allclose(gate.expected_value(), draws.mean(0).detach(), atol=0.01)
    # Deep in the tail, against the closed form of the probability it integrates over.
    with torch.no_grad():
        gate.log_alpha.copy_(torch.linspace(-10.0, -6.0, 9))
    value, p_nonzero = gate.expected_value(), gate.prob_nonzero().detach()
    assert torch.all(value > 0) and torch.all(value < p_nonzero)
    draws = torch.stack([gate.sample() for _ in range(200000)])
    assert torch.allclose(value, draws.mean(0), rtol=0.5, atol=2e-5)


def test_kept_units_are_never_exported_as_zero():
    # Adversarial: the target keeps 4 of 8 units per row, but one row has every unit far
    # below the point where the Louizos value is 0 (log-alpha < -2.4).
    gate = HardConcreteGate((3, 8), keep=4)
    with torch.no_grad():
        gate.log_alpha.copy_(torch.randn(3, 8))
        gate.log_alpha[1].fill_(LOG_ALPHA_MIN)
        gate.log_alpha[2, :4] = -3.0
    det = gate.deterministic()
    mask = gate.deterministic_keep_mask()
    assert torch.all(mask.sum(-1) == 4)
    assert torch.all(det[mask] > 0), det
    assert torch.all(det[~mask] == 0)
    # Far below the paper's clamp (log_alpha_range [-10, 10], the SmolLM2 recipes): P(z > 0)
    # is 2e-4 there, less than one quadrature cell of (0, 1); E[z] must still be positive.
    with torch.no_grad():
        gate.log_alpha[1].fill_(-10.0)
    det = gate.deterministic()
    assert torch.all(det[gate.deterministic_keep_mask()] > 0), det
    gate.harden_()
    assert torch.equal(gate.expected_keep(), torch.full((3,), 4.0))
    gate.hard_value.fill_(-1.0)
    # Confidently kept units are not rescaled.
    with torch.no_grad():
        gate.log_alpha.fill_(LOG_ALPHA_MAX)
    assert torch.all(gate.deterministic()[gate.deterministic_keep_mask()] == 1.0)


def test_init_noise_survives_the_clamp():
    gate = HardConcreteGate((4, 16), keep=8)
    assert gate.log_alpha.max() <= LOG_ALPHA_MAX
    # No ties: the first masks are decided by the noise, not by index order.
    assert torch.unique(gate.log_alpha.detach()).numel() == 4 * 16
    with pytest.raises(ValueError, match="clamp range"):
        HardConcreteGate((4, 16), keep=8, init_log_alpha=5.0)


def test_per_row_keep_counts():
    gate = HardConcreteGate((2, 10), keep=5)
    with torch.no_grad():
        gate.log_alpha[0].fill_(LOG_ALPHA_MAX)  # every unit on
        gate.log_alpha[1, :3] = LOG_ALPHA_MAX
        gate.log_alpha[1, 3:] = LOG_ALPHA_MIN
    counts = gate.expected_keep_counts()
    assert counts.tolist() == [10, round(3 * 0.998 + 7 * 0.047)]
    mask = gate.deterministic_keep_mask(counts)
    assert mask.sum(-1).tolist() == counts.tolist()
    assert mask[1, :3].all()


def test_per_row_constraint_holds_every_row_to_its_budget():
    """A fake LM gradient pushes row 0 to keep everything and row 1 to drop everything.

    A constraint on the mean over rows is satisfied by 8-on / 2-on rows; the per-row
    Lagrangian must hold every row near its own target (5 of 10).
    """
    gate = HardConcreteGate((2, 10), keep=5)
    gates_opt = torch.optim.Adam([gate.log_alpha], lr=0.1)
    lambdas_opt = torch.optim.Adam([gate.lambda_1, gate.lambda_2], lr=0.1, maximize=True)
    push = torch.tensor([[-1.0], [1.0]])  # d(LM loss)/d(prob): row 0 wants units, row 1 not
    for _ in range(600):
        gates_opt.zero_grad()
        lambdas_opt.zero_grad()
        lm = (push * gate.prob_nonzero()).sum() * 0.05
        (lm + gate.lagrangian(gate.target_sparsity)).backward()
        gates_opt.step()
        lambdas_opt.step()
        gate.clamp_()
    keep = gate.expected_keep().detach()
    assert torch.all((keep - 5).abs() < 0.5), keep
    # The rows really were pushed apart: the mean alone would be satisfied at 8 / 2.
    assert keep[0] > keep[1]


def test_deterministic_is_stable_on_ties():
    gate = HardConcreteGate((2, 6), keep=3, init_std=0.0)
    assert gate.deterministic_keep_mask()[:, :3].all()
    assert not gate.deterministic_keep_mask()[:, 3:].any()


def test_lagrangian_gradients_ascend_lambdas():
    gate = HardConcreteGate((10,), keep=5)
    with torch.no_grad():
        gate.lambda_1.fill_(0.5)
        gate.lambda_2.fill_(0.25)
    term = gate.lagrangian(0.5)
    gap = gate.expected_sparsity().item() - 0.5
    assert term.item() == pytest.approx(0.5 * gap + 0.25 * gap**2, rel=1e-5)
    term.backward()
    assert gate.lambda_1.grad.item() == pytest.approx(gap, rel=1e-5)
    # Too little sparsity: the penalty's gradient pushes log-alpha down (toward pruning)
    # once lambda_1 has gone negative.
    gate.zero_grad()
    with torch.no_grad():
        gate.lambda_1.fill_(-1.0)
        gate.lambda_2.zero_()
    gate.lagrangian(0.5).backward()
    assert torch.all(gate.log_alpha.grad > 0)


def test_clamp_and_seeded_init():
    a = HardConcreteGate((3, 4), keep=2, seed=7)
    b = HardConcreteGate((3, 4), keep=2, seed=7)
    assert torch.equal(a.log_alpha, b.log_alpha)
    with torch.no_grad():
        a.log_alpha.mul_(100)
    a.clamp_()
    assert a.log_alpha.max() <= LOG_ALPHA_MAX + 1e-6 and a.log_alpha.min() >= LOG_ALPHA_MIN - 1e-6


def test_expected_keep_counts_bounds():
    gate = HardConcreteGate((2, 10), keep=3)
    assert gate.expected_keep_counts().tolist() == [10, 10]
    with torch.no_grad():
        gate.log_alpha.fill_(LOG_ALPHA_MIN)
    assert gate.expected_keep_counts().tolist() == [1, 1]


def test_multipliers_are_one_element_tensors_read_as_scalars():
    # FSDP2's fully_shard rejects 0-dim parameters; everything else sees scalars.
    gate = HardConcreteGate((3, 8), keep=5)
    assert gate.lambda_1.shape == gate.lambda_2.shape == MULTIPLIER_SHAPE
    with torch.no_grad():
        gate.lambda_1.fill_(0.5)
        gate.lambda_2.fill_(2.0)
    lambda_1, lambda_2 = gate.multipliers()
    assert lambda_1.shape == lambda_2.shape == ()
    assert (lambda_1.item(), lambda_2.item()) == (0.5, 2.0)
    term = gate.lagrangian(0.5)
    assert term.shape == ()
    term.backward()
    assert gate.lambda_1.grad.shape == MULTIPLIER_SHAPE


def test_checkpoints_with_zero_dim_multipliers_load():
    gate = HardConcreteGate((3, 8), keep=5, seed=1)
    old = {k: v.clone() for k, v in gate.state_dict().items()}
    old["lambda_1"] = torch.tensor(0.75)  # the layout before the multipliers were (1,)
    old["lambda_2"] = torch.tensor(-1.5)
    fresh = HardConcreteGate((3, 8), keep=5, seed=2)
    fresh.load_state_dict(old)  # strict
    assert fresh.lambda_1.shape == MULTIPLIER_SHAPE
    assert fresh.lambda_1.tolist() == [0.75] and fresh.lambda_2.tolist() == [-1.5]
    assert torch.equal(fresh.log_alpha, gate.log_alpha)
    # A current checkpoint round-trips unchanged.
    again = HardConcreteGate((3, 8), keep=5, seed=3)
    again.load_state_dict(fresh.state_dict())
    assert again.lambda_2.tolist() == [-1.5]


def test_penalty_and_metrics_are_scalars_hardened_or_not():
    # BATCH_END stacks every metric into one tensor: each must be 0-dim.
    gates = attach_gates(tiny_model("llama_gqa"), dict(num_hidden_layers=2, intermediate_size=48))
    for harden in (False, True):
        if harden:
            gates.harden_()
        penalty, metrics = gates.lagrangian_penalty()
        assert penalty.shape == ()
        assert {name: value.shape for name, value in metrics.items()} == {
            name: () for name in metrics
        }
        torch.stack(list(metrics.values()))
