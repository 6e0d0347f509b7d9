"""The product-saving mask multiply: same gradients as ``x * mask``, no copy of ``x`` saved."""

from __future__ import annotations

import pytest
import torch

from composer_shear.pruning.gates import HardConcreteGate
from composer_shear.pruning.mask_ops import mask_input
from composer_shear.pruning.masking import attach_gates
from tests.tiny_models import tiny_model


def test_gradients_match_a_plain_multiply_where_the_mask_is_nonzero():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(16, dtype=torch.float64)
    mask[[2, 7]] = 0.0
    mask.requires_grad_(True)
    weight = torch.randn(16, 4, dtype=torch.float64)

    (mask_input(x, mask) @ weight).square().sum().backward()
    ours_x, ours_mask = x.grad.clone(), mask.grad.clone()
    x.grad, mask.grad = None, None
    ((x * mask) @ weight).square().sum().backward()

    torch.testing.assert_close(ours_x, x.grad)
    nonzero = mask.detach() != 0
    torch.testing.assert_close(ours_mask[nonzero], mask.grad[nonzero])
    assert mask.grad[~nonzero].abs().min() > 0  # the plain multiply does report a gradient...
    assert torch.all(ours_mask[~nonzero] == 0)  # ...that reaches no gate parameter (below)


def test_gate_parameter_gradients_are_identical_with_saturated_gates():
    # Log-alphas low enough that many samples clamp to exactly zero.
    gate = HardConcreteGate((2, 32), keep=8, init_log_alpha=0.0)
    with torch.no_grad():
        gate.log_alpha.copy_(torch.linspace(-3.0, 3.0, 64).reshape(2, 32))
    x = torch.randn(4, 2, 32)
    grads = []
    for multiply in (mask_input, lambda a, m: a * m):
        gate.log_alpha.grad = None
        z = gate.sample(torch.Generator().manual_seed(3))
        assert (z == 0).any() and (z > 0).any()
        multiply(x, z).sin().sum().backward()
        grads.append(gate.log_alpha.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=1e-7)


def test_a_mask_without_gradient_is_a_plain_multiply():
    x = torch.randn(2, 8, requires_grad=True)
    mask = torch.rand(8)
    out = mask_input(x, mask)
    assert out.grad_fn.name() == "MulBackward0"
    torch.testing.assert_close(out, x * mask)


def test_bf16_stream_stays_bf16():
    x = torch.randn(2, 8, dtype=torch.bfloat16, requires_grad=True)
    mask = torch.rand(8, requires_grad=True)
    out = mask_input(x, mask)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert mask.grad.dtype == torch.float32 and torch.isfinite(mask.grad).all()


def _saved_bytes(model: torch.nn.Module, ids: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves for one training forward."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=ids, labels=ids).loss.backward()
    return sum(storages.values())


@pytest.mark.parametrize("family", ["llama_gqa", "qwen2"])
def test_gated_forward_saves_little_more_than_plain_training(family):
    batch, seq = 4, 64
    ids = torch.randint(0, 512, (batch, seq))
    plain = _saved_bytes(tiny_model(family).train(), ids)
    model = tiny_model(family).train()
    target = dict(num_hidden_layers=3, hidden_size=48, num_key_value_heads=1, intermediate_size=64)
    attach_gates(model, target)
    gated = _saved_bytes(model, ids)
    config = model.config
    # What may be added: the two residual-branch outputs per layer (their layer x hidden
    # gates need them), plus O(units) gate tensors. Saving the o_proj and down_proj inputs
    # a second time would add batch * seq * (H * head_dim + intermediate) floats per layer.
    branch_outputs = 2 * config.num_hidden_layers * batch * seq * config.hidden_size * 4
    second_inputs = (
        config.num_hidden_layers
        * batch
        * seq
        * (config.num_attention_heads * config.head_dim + config.intermediate_size)
        * 4
    )
    assert gated - plain <= branch_outputs + second_inputs // 4, (plain, gated)
