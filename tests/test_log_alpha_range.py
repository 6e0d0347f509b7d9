"""``log_alpha_range``: how sure a gate can become, and importance init spread over the range."""

from __future__ import annotations

import pytest
import torch

from composer_shear.pruning.algorithm import TargetedPruning
from composer_shear.pruning.gates import LOG_ALPHA_MAX, LOG_ALPHA_MIN, HardConcreteGate, top_k_mask
from composer_shear.pruning.masking import attach_gates
from tests.tiny_models import tiny_model

WIDE = (-10.0, 10.0)
TARGET = {"num_hidden_layers": 3, "num_key_value_heads": 1, "intermediate_size": 48,
          "hidden_size": 40}  # fmt: skip


def _fraction_below_one(log_alpha: float, log_alpha_range: tuple[float, float]) -> float:
    gate = HardConcreteGate((4000,), keep=1, log_alpha_range=log_alpha_range)
    with torch.no_grad():
        gate.log_alpha.fill_(log_alpha)
    torch.manual_seed(0)
    draws = torch.stack([gate.sample() for _ in range(25)])
    return (draws < 1).float().mean().item()


def test_the_papers_range_leaves_every_kept_unit_noisy_and_a_wide_one_does_not():
    # At the top of [log 1e-2, log 1e2] a gate is still sampled below 1 in ~5% of steps: for
    # SmolLM2's first layer or largest hidden channel that is a multi-nat loss spike.
    paper = _fraction_below_one(LOG_ALPHA_MAX, (LOG_ALPHA_MIN, LOG_ALPHA_MAX))
    wide = _fraction_below_one(WIDE[1], WIDE)
    assert 0.035 < paper < 0.06, paper
    assert wide < 0.002, wide


def test_clamp_follows_the_range():
    gate = HardConcreteGate((5,), keep=2, log_alpha_range=WIDE)
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([-50.0, -7.0, 0.0, 7.0, 50.0]))
    gate.clamp_()
    assert gate.log_alpha.tolist() == [-10.0, -7.0, 0.0, 7.0, 10.0]
    paper = HardConcreteGate((2,), keep=1)
    with torch.no_grad():
        paper.log_alpha.copy_(torch.tensor([-7.0, 7.0]))
    paper.clamp_()
    assert paper.log_alpha.tolist() == pytest.approx([LOG_ALPHA_MIN, LOG_ALPHA_MAX])


def test_importance_init_spreads_units_over_the_range_by_score():
    model = tiny_model("llama_gqa")
    gates = attach_gates(model, TARGET, log_alpha_range=WIDE)
    generator = torch.Generator().manual_seed(3)
    scores = {
        name: torch.rand(gate.shape, generator=generator) for name, gate in gates.gates.items()
    }
    gates.init_from_scores(scores, kept_log_alpha=4.0, pruned_log_alpha=-4.0)
    for name, gate in gates.gates.items():
        log_alpha = gate.log_alpha.detach()
        kept = top_k_mask(scores[name], gate.keep)
        assert torch.equal(gate.deterministic_keep_mask(), kept), name
        # Best kept unit at the top of the range, worst kept at 3.5; pruned from -3.5 to -10.
        assert log_alpha[kept].max().item() == pytest.approx(10.0), name
        if gate.keep > 1:  # a single kept unit sits at the band's top
            assert log_alpha[kept].min().item() == pytest.approx(3.5), name
        assert log_alpha[~kept].max().item() == pytest.approx(-3.5), name
        if gate.num_units - gate.keep > 1:  # a single pruned unit sits at the band's top
            assert log_alpha[~kept].min().item() == pytest.approx(-10.0), name
        # Order within every row follows the scores.
        flat_scores = scores[name].reshape(-1, gate.num_units)
        flat_alpha = log_alpha.reshape(-1, gate.num_units)
        for row_scores, row_alpha in zip(flat_scores, flat_alpha, strict=True):
            assert torch.equal(row_scores.argsort(), row_alpha.argsort()), name


def test_default_range_keeps_the_papers_clamp():
    model = tiny_model("llama_gqa")
    gates = attach_gates(model, TARGET)
    scores = {name: torch.rand(gate.shape) for name, gate in gates.gates.items()}
    gates.init_from_scores(scores, kept_log_alpha=4.0, pruned_log_alpha=-4.0)
    for gate in gates.gates.values():
        assert gate.log_alpha.max().item() == pytest.approx(LOG_ALPHA_MAX)
        if gate.num_units - gate.keep > 1:
            assert gate.log_alpha.min().item() == pytest.approx(LOG_ALPHA_MIN)


def test_bad_ranges_name_the_setting():
    with pytest.raises(ValueError, match=r"targeted_pruning\.log_alpha_range.*min < 0 < max"):
        TargetedPruning(TARGET, log_alpha_range=[1.0, 5.0])
    with pytest.raises(ValueError, match=r"targeted_pruning\.log_alpha_range.*two numbers"):
        TargetedPruning(TARGET, log_alpha_range=[1.0])
    with pytest.raises(ValueError, match=r"targeted_pruning\.log_alpha_range.*two numbers"):
        TargetedPruning(TARGET, log_alpha_range=10)
    with pytest.raises(ValueError, match=r"init_log_alpha=8\.0 is outside the clamp range"):
        TargetedPruning(TARGET, init_log_alpha=8.0)
    algorithm = TargetedPruning(TARGET, init_log_alpha=8.0, log_alpha_range=[-10, 10])
    assert algorithm.log_alpha_range == (-10.0, 10.0)
    assert algorithm.state_dict()["log_alpha_range"] == [-10.0, 10.0]
