"""Activation importance of every prunable unit, from a few calibration batches.

The scores follow NVIDIA's Minitron (Muralidharan et al., 2024) for width and ShortGPT's
block influence (Men et al., 2024) for depth, measured in one set of forward passes of the
*unpruned* model:

=====================  ================================================================
unit                   score (mean over calibration tokens)
=====================  ================================================================
query head             L2 norm of the head's output after ``o_proj`` (its own columns)
kv group               sum of its query heads' scores
MLP intermediate unit  ``|act(gate) * up|`` (``down_proj``'s input)
hidden channel         ``|x|`` of every hidden-sized RMSNorm output (every norm of every
                       layer the family declares, and the final norm), summed over the norms
layer                  block influence ``1 - cos(layer input, layer output)``
=====================  ================================================================

:func:`collect_taylor_importance` scores the same units by first-order Taylor expansion of the
calibration loss instead (LLM-Pruner, Ma et al., 2023, scores structures this way): a unit
whose output ``a`` is scaled by a gate ``z`` (1 in the unpruned model) changes the loss by
about ``-dL/dz = -sum(a * dL/da)`` when it is removed, so its score is
``|sum over calibration tokens of a * dL/da|``: of the head's slice of ``o_proj``'s input, of
the unit's ``down_proj`` input, of the channel in every hidden-sized norm output, and for a
layer of its residual update ``out - in``. Unlike activation magnitude it sees what the rest
of the network does with a unit's output (a unit with a modest activation whose output
projection is large and load-bearing scores high). It needs one backward pass per batch
through the frozen model (no weight gradients).

Scores are laid out like the gates of :class:`~composer_shear.pruning.masking.ShearGates` (see
:func:`unit_scores`), so one-shot pruning keeps the top units of every row and gate
initialisation ranks the same units the same way. Sums are all-reduced across ranks, so
every rank of a distributed job ends with the same scores.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from composer_shear.families import get_family
from composer_shear.interface import progress
from composer_shear.shape import ModelShape

__all__ = [
    "Importance",
    "collect_importance",
    "collect_taylor_importance",
    "random_importance",
    "unit_scores",
]

log = logging.getLogger(__name__)


@dataclass
class Importance:
    """Mean activation statistics of one model over calibration tokens.

    Attributes:
        layers: ``(L,)`` block influence ``1 - cos(in, out)`` of each decoder layer.
        heads: ``(L, H)`` mean L2 norm of each query head's output through ``o_proj``.
        intermediate: ``(L, I)`` mean ``|activation|`` entering ``down_proj``.
        hidden: ``(D,)`` mean ``|RMSNorm output|`` per channel, summed over every norm.
        tokens: Calibration tokens the means are over (all ranks).
    """

    layers: torch.Tensor
    heads: torch.Tensor
    intermediate: torch.Tensor
    hidden: torch.Tensor
    tokens: int

    # The per-unit fields, in order.
    UNITS = ("layers", "heads", "intermediate", "hidden")


def _all_reduce_sum(tensors: list[torch.Tensor]) -> None:
    """Sums ``tensors`` in place across ranks (no-op in a single process)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if torch.distributed.get_world_size() == 1:
        return
    flat = torch.cat([t.flatten() for t in tensors])
    torch.distributed.all_reduce(flat)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def _first(value: Any) -> torch.Tensor:
    # Decoder layers return a tensor or a tuple whose first item is the hidden states.
    return value[0] if isinstance(value, tuple | list) else value


@torch.no_grad()
def _accumulators(hf_model: nn.Module) -> tuple[Any, ModelShape, dict[str, torch.Tensor]]:
    """The family, the shape and zeroed float64 per-unit sums on the model's device."""
    family = get_family(hf_model)
    source = family.shape(hf_model.config)
    n_layers = source.num_hidden_layers
    device = family.embedding(hf_model).weight.device

    def zeros(*shape: int) -> torch.Tensor:
        return torch.zeros(shape, dtype=torch.float64, device=device)

    acc = {
        "layers": zeros(n_layers),
        "heads": zeros(n_layers, source.num_attention_heads),
        "intermediate": zeros(n_layers, source.intermediate_size),
        "hidden": zeros(source.hidden_size),
        "tokens": zeros(1),
    }
    return family, source, acc


def collect_importance(
    model: nn.Module,
    batches: Iterable[Any],
    forward: Callable[[Any], Any] | None = None,
    hf_model: nn.Module | None = None,
) -> Importance:
    """Runs ``model`` on ``batches`` and returns the activation importance of every unit.

    Args:
        model: What to call on each batch (a Hugging Face causal LM, or a wrapper of one
            such as Composer's ``HuggingFaceModel`` / FSDP / DDP).
        batches: Calibration batches: ``input_ids`` tensors, or dicts with ``input_ids``.
        forward: ``forward(batch)`` runs the model (default: ``model(input_ids=...)``).
        hf_model: The Hugging Face model inside ``model`` whose modules are hooked
            (default: ``model`` itself).

    Returns:
        Means over every calibration token of every rank.
    """
    hf_model = model if hf_model is None else hf_model
    family, source, acc = _accumulators(hf_model)
    n_heads, head_dim = source.num_attention_heads, source.head_dim
    device = acc["tokens"].device
    layer_inputs: dict[int, torch.Tensor] = {}
    handles = []

    def add_hidden(module, args, output):
        acc["hidden"] += _first(output).detach().abs().double().flatten(0, -2).sum(0)

    for index, layer in enumerate(family.layer_list(hf_model)):
        mods = family.layer_modules(layer)

        def heads_pre(module, args, index=index):
            # Each head's contribution to the residual stream: its slice of o_proj's input
            # times its columns of o_proj (Minitron measures before o_proj; after it, a head
            # whose output o_proj scales away scores low too).
            x = args[0].detach().flatten(0, -2)
            w = module.weight.detach().to(x.dtype)
            for h in range(n_heads):  # one head at a time: (tokens, hidden) stays small
                cols = slice(h * head_dim, (h + 1) * head_dim)
                out = x[:, cols] @ w[:, cols].T
                acc["heads"][index, h] += out.double().norm(dim=-1).sum()

        def inter_pre(module, args, index=index):
            acc["intermediate"][index] += args[0].detach().abs().double().flatten(0, -2).sum(0)

        def layer_pre(module, args, kwargs, index=index):
            layer_inputs[index] = (args[0] if args else kwargs["hidden_states"]).detach()

        def layer_post(module, args, kwargs, output, index=index):
            before, after = layer_inputs.pop(index).double(), _first(output).detach().double()
            cos = torch.nn.functional.cosine_similarity(before, after, dim=-1)
            acc["layers"][index] += (1.0 - cos).sum()

        handles += [
            mods.o_proj.register_forward_pre_hook(heads_pre),
            mods.down_proj.register_forward_pre_hook(inter_pre),
            layer.register_forward_pre_hook(layer_pre, with_kwargs=True),
            layer.register_forward_hook(layer_post, with_kwargs=True),
        ]
        handles += [norm.register_forward_hook(add_hidden) for norm in mods.hidden_norms]
    handles.append(family.final_norm_module(hf_model).register_forward_hook(add_hidden))

    if forward is None:
        # Importance needs no logits: scoring only the last position skips the
        # (tokens x vocabulary) matrix, the largest tensor of a calibration forward.
        skip_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        extra = {"logits_to_keep": 1} if skip_logits else {}

        def forward(batch):
            ids = batch["input_ids"] if isinstance(batch, dict) else batch
            return model(input_ids=ids.to(device), **extra)

    try:
        for batch in progress(batches, desc="scoring units", unit="batch"):
            ids = batch["input_ids"] if isinstance(batch, dict) else batch
            acc["tokens"] += ids.numel()
            forward(batch)
    finally:
        for handle in handles:
            handle.remove()
    _all_reduce_sum(list(acc.values()))
    tokens = int(acc["tokens"].item())
    if tokens == 0:
        raise ValueError("collect_importance: the calibration batches held no tokens.")
    means = {name: (value / tokens).float().cpu() for name, value in acc.items()}
    log.info("importance: %d calibration tokens", tokens)
    return Importance(
        layers=means["layers"],
        heads=means["heads"],
        intermediate=means["intermediate"],
        hidden=means["hidden"],
        tokens=tokens,
    )


def collect_taylor_importance(
    model: nn.Module,
    batches: Iterable[Any],
    loss: Callable[[Any], torch.Tensor] | None = None,
    hf_model: nn.Module | None = None,
) -> Importance:
    """First-order Taylor importance ``|sum a * dL/da|`` of every unit (see the module doc).

    The gradient of the calibration loss (the mean of the per-batch losses) with respect to
    a multiplicative gate on each unit, at the unpruned model, taken with every weight frozen
    for the duration (``requires_grad`` is restored afterwards): the backward pass starts at
    the embedding output and computes activation gradients only. Signed contributions are
    summed over every token and batch (and across ranks) before the absolute value, so the
    score estimates the change of the calibration loss itself.

    Args:
        model: A Hugging Face causal LM (or what ``loss`` calls).
        batches: Calibration batches: ``input_ids`` tensors, or dicts with ``input_ids``.
        loss: ``loss(batch)`` returns the scalar loss to differentiate (default: the causal
            LM loss of the batch against itself, every position).
        hf_model: The Hugging Face model whose modules are hooked (default: ``model``).

    Returns:
        Per-unit scores in the layout of :class:`Importance` (``layers`` is the Taylor score of
        each layer, not block influence); ``tokens`` counts every rank's calibration tokens.
    """
    hf_model = model if hf_model is None else hf_model
    family, source, acc = _accumulators(hf_model)
    n_heads, head_dim = source.num_attention_heads, source.head_dim
    device = acc["tokens"].device
    acc["batches"] = torch.zeros_like(acc["tokens"])
    layer_inputs: dict[int, torch.Tensor] = {}
    handles = []

    def on_grad(x: torch.Tensor, add: Callable[[torch.Tensor], None]) -> None:
        # a * dL/da summed over tokens, once the backward pass reaches a.
        if x.requires_grad:
            saved = x.detach()

            def hook(grad: torch.Tensor) -> None:  # returns None: the gradient is unchanged
                add((saved.double() * grad.double()).flatten(0, -2).sum(0))

            x.register_hook(hook)

    def embed_post(module, args, output):
        # The weights are frozen: the graph (activation gradients only) starts here.
        return output.detach().requires_grad_(True)

    def add_hidden(module, args, output):
        on_grad(_first(output), lambda s: acc["hidden"].add_(s))

    handles.append(family.embedding(hf_model).register_forward_hook(embed_post))
    for index, layer in enumerate(family.layer_list(hf_model)):
        mods = family.layer_modules(layer)

        def heads_pre(module, args, index=index):
            def add(summed: torch.Tensor) -> None:  # (H * head_dim,) -> one score per head
                acc["heads"][index].add_(summed.view(n_heads, head_dim).sum(-1))

            on_grad(args[0], add)

        def inter_pre(module, args, index=index):
            on_grad(args[0], lambda s, i=index: acc["intermediate"][i].add_(s))

        def layer_pre(module, args, kwargs, index=index):
            layer_inputs[index] = (args[0] if args else kwargs["hidden_states"]).detach()

        def layer_post(module, args, kwargs, output, index=index):
            out = _first(output)
            delta = (out.detach() - layer_inputs.pop(index)).double()

            def hook(grad: torch.Tensor) -> None:  # returns None: the gradient is unchanged
                acc["layers"][index].add_((delta * grad.double()).sum())

            if out.requires_grad:
                out.register_hook(hook)

        handles += [
            mods.o_proj.register_forward_pre_hook(heads_pre),
            mods.down_proj.register_forward_pre_hook(inter_pre),
            layer.register_forward_pre_hook(layer_pre, with_kwargs=True),
            layer.register_forward_hook(layer_post, with_kwargs=True),
        ]
        handles += [norm.register_forward_hook(add_hidden) for norm in mods.hidden_norms]
    handles.append(family.final_norm_module(hf_model).register_forward_hook(add_hidden))

    if loss is None:

        def loss(batch):
            ids = (batch["input_ids"] if isinstance(batch, dict) else batch).to(device)
            return model(input_ids=ids, labels=ids, use_cache=False).loss

    frozen = [(p, p.requires_grad) for p in hf_model.parameters()]
    try:
        for param, _ in frozen:
            param.requires_grad_(False)
        for batch in batches:
            ids = batch["input_ids"] if isinstance(batch, dict) else batch
            acc["tokens"] += ids.numel()
            acc["batches"] += 1
            with torch.enable_grad():
                loss(batch).backward()
    finally:
        for handle in handles:
            handle.remove()
        for param, requires_grad in frozen:
            param.requires_grad_(requires_grad)
    _all_reduce_sum(list(acc.values()))
    tokens, n_batches = int(acc["tokens"].item()), acc["batches"].item()
    if tokens == 0:
        raise ValueError("collect_taylor_importance: the calibration batches held no tokens.")
    scores = {name: (acc[name] / n_batches).abs().float().cpu() for name in Importance.UNITS}
    log.info("taylor importance: %d calibration tokens", tokens)
    return Importance(**scores, tokens=tokens)


def random_importance(source: ModelShape, seed: int = 0) -> Importance:
    """Random scores of the same layout: random structured pruning, a baseline."""
    generator = torch.Generator().manual_seed(seed)
    n_layers = source.num_hidden_layers

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=generator)

    return Importance(
        layers=rand(n_layers),
        heads=rand(n_layers, source.num_attention_heads),
        intermediate=rand(n_layers, source.intermediate_size),
        hidden=rand(source.hidden_size),
        tokens=0,
    )


def unit_scores(importance: Importance, source: ModelShape) -> dict[str, torch.Tensor]:
    """Scores laid out like the gates (one entry per prunable dimension, every dimension).

    Returns:
        ``layers`` ``(L,)``, ``kv_heads`` ``(L, n_kv)``, ``heads`` ``(L, n_kv, n_rep)``
        (query head ``i`` is in kv group ``i // n_rep``), ``intermediate`` ``(L, I)``,
        ``hidden`` ``(D,)``.
    """
    n_layers, n_kv = source.num_hidden_layers, source.num_key_value_heads
    heads = importance.heads.reshape(n_layers, n_kv, source.heads_per_group)
    return {
        "layers": importance.layers,
        "kv_heads": heads.sum(-1),
        "heads": heads,
        "intermediate": importance.intermediate,
        "hidden": importance.hidden,
    }
