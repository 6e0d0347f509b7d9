"""The multiply that applies a gate mask to a projection's input, at no activation memory.

A plain ``x * mask`` with a mask that needs a gradient saves ``x`` for the backward pass
(``d loss / d mask = sum(grad * x)``), while the projection that consumes the product saves the
product as well: two activation-sized tensors where plain training keeps one. Over the
``o_proj`` and ``down_proj`` inputs of every layer that was most of a pruning step's extra
memory (``benchmarks/bench_memory.py``).

:func:`mask_input` saves the *product* instead, which the next projection saves anyway (the
same storage, so nothing is added), and recovers ``x = product / mask`` in the backward pass.
Where the mask is exactly zero, ``x`` cannot be recovered, and is not needed: a hard-concrete
gate is exactly zero only where its clamp to [0, 1] saturates, so no gradient flows back
through such a value into any gate parameter, and a product of gates that is zero has a
saturated factor (the other factors' gradients are multiplied by it). The gradient reported
for a zero mask entry is therefore 0 instead of ``sum(grad * x)``, with identical gradients of
every gate parameter.
"""

from __future__ import annotations

import torch

__all__ = ["mask_input"]


class _MaskKeepingProduct(torch.autograd.Function):
    """``x * mask`` that saves the product, not ``x`` (see the module docstring)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        product = x * mask
        ctx.save_for_backward(product, mask)
        return product

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        product, mask = ctx.saved_tensors
        grad_x = grad * mask if ctx.needs_input_grad[0] else None
        grad_mask = None
        if ctx.needs_input_grad[1]:
            # At least fp32 for the division and the sum: bf16 would lose the reduction.
            dtype = torch.promote_types(product.dtype, torch.float32)
            nonzero = mask != 0
            divisor = torch.where(nonzero, mask, torch.ones_like(mask)).to(dtype)
            x = product.to(dtype) / divisor
            grad_mask = (grad.to(dtype) * x).sum_to_size(mask.shape)
            grad_mask = torch.where(nonzero, grad_mask, torch.zeros_like(grad_mask))
            grad_mask = grad_mask.to(mask.dtype)
        return grad_x, grad_mask


def mask_input(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x * mask`` (mask cast to ``x``'s dtype, broadcast from the right) for a gated input.

    Use it where the product feeds a module that saves its input (a linear layer): the
    backward pass then needs no copy of ``x``. A mask that needs no gradient (eval, hardened
    gates) is a plain multiply.

    Args:
        x: Activations, e.g. ``(batch, seq, units)``.
        mask: Gate values broadcastable to ``x`` from the right, e.g. ``(units,)``.
    """
    mask = mask.to(x.dtype)
    if not (mask.requires_grad and torch.is_grad_enabled()):
        return x * mask
    return _MaskKeepingProduct.apply(x, mask)
