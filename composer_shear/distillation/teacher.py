"""The frozen teacher of ``knowledge_distillation``: taking its weights, building, placing it.

Global rank 0 takes the weights (a copy of the model being trained, pruning gates excluded, or
a Hugging Face checkpoint loaded strictly); every rank builds a skeleton with parameters on
``meta``; :func:`place_teacher` then materialises it on the device, broadcast from rank 0, as
one full copy per rank or sharded with FSDP2 across all ranks. The teacher is never a
submodule of the trained model, so no optimizer, checkpoint or pruning hook sees it.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from composer.utils import dist
from torch import nn
from torch.distributed.fsdp import FSDPModule

from composer_shear.pruning.masking import ShearGates
from composer_shear.wrappers import hf_causal_lm

__all__ = [
    "YAML_KEY",
    "build_teacher_skeleton",
    "load_teacher_weights",
    "local_weight_bytes",
    "place_teacher",
    "source_weights",
    "teacher_forward",
]

YAML_KEY = "algorithms.knowledge_distillation"


def _cast_copy(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Detached copies in ``dtype`` (floating tensors only), shared storage copied once."""
    out: dict[str, torch.Tensor] = {}
    seen: dict[tuple, torch.Tensor] = {}
    for key, value in tensors.items():
        ident = (value.data_ptr(), value.dtype, tuple(value.shape), value.stride())
        if ident not in seen:
            target = dtype if value.is_floating_point() else value.dtype
            seen[ident] = value.detach().to(dtype=target, copy=True)
        out[key] = seen[ident]
    return out


def source_weights(model: nn.Module, dtype: torch.dtype) -> tuple[Any, dict[str, torch.Tensor]]:
    """The config and a frozen copy of the weights of ``model`` as it is now, gates excluded.

    Args:
        model: A Hugging Face causal LM, or a Composer model wrapping one. Pruning gates
            (the ``shear_gates`` child) and their hooks are left out: the teacher is the
            plain source model.
        dtype: Floating dtype of the copy.

    Raises:
        RuntimeError: if the weights are not materialised here (``meta``).
    """
    hf_model = hf_causal_lm(model, "knowledge_distillation")
    gates = tuple(f"{n}." for n, m in hf_model.named_modules() if isinstance(m, ShearGates))
    state = {k: v for k, v in hf_model.state_dict().items() if not k.startswith(gates)}
    meta = [k for k, v in state.items() if v.is_meta]
    if meta:
        raise RuntimeError(
            f"{YAML_KEY}.teacher=source: the model's weights are not loaded on this rank "
            f"({len(meta)} tensors on 'meta', e.g. {meta[0]}); the source copy is taken on a "
            "rank that holds them."
        )
    return copy.deepcopy(hf_model.config), _cast_copy(state, dtype)


def load_teacher_weights(
    name_or_path: str, dtype: torch.dtype, attn_implementation: str | None = None
) -> tuple[Any, dict[str, torch.Tensor]]:
    """The config and weights of a Hugging Face model, loaded strictly.

    Args:
        name_or_path: A ``from_pretrained`` directory or name.
        dtype: Floating dtype of the weights.
        attn_implementation: Attention kernel (``eager``, ``sdpa``, ...), e.g. the student's.

    Raises:
        ValueError: if any tensor is missing, unexpected or of the wrong shape (a teacher
            with random weights would silently teach noise).
    """
    from transformers import AutoModelForCausalLM

    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            name_or_path,
            torch_dtype=dtype,
            attn_implementation=attn_implementation,
            low_cpu_mem_usage=True,
            output_loading_info=True,
        )
    except (OSError, ValueError) as error:
        raise ValueError(
            f"{YAML_KEY}.teacher={name_or_path!r} could not be loaded as a Hugging Face causal "
            f"LM ({error}). Give 'source' or a model directory / name."
        ) from error
    problems = {key: info.get(key) for key in ("missing_keys", "unexpected_keys")}
    problems["mismatched_keys"] = info.get("mismatched_keys")
    problems["error_msgs"] = info.get("error_msgs")
    problems = {key: value for key, value in problems.items() if value}
    if problems:
        raise ValueError(
            f"{YAML_KEY}.teacher={name_or_path!r} did not load cleanly: {problems}. The "
            "teacher must be a complete checkpoint of a model with the student's vocabulary."
        )
    return model.config, dict(model.state_dict())


def build_teacher_skeleton(
    config: Any, dtype: torch.dtype, attn_implementation: str | None = None
) -> nn.Module:
    """A frozen, eval-mode Hugging Face model for ``config`` with parameters on ``meta``.

    Non-persistent buffers (rotary frequencies) are real; tied embeddings stay tied.
    ``attn_implementation`` defaults to the one ``config`` carries.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    attn_implementation = attn_implementation or getattr(config, "_attn_implementation", None)
    with init_empty_weights(include_buffers=False):
        teacher = AutoModelForCausalLM.from_config(
            config, torch_dtype=dtype, attn_implementation=attn_implementation
        )
    teacher.tie_weights()  # init_empty_weights re-creates each parameter, which unties them
    teacher.requires_grad_(False)
    return teacher.eval()


def _layer_classes(model: nn.Module) -> set[type]:
    names = set(getattr(model, "_no_split_modules", None) or ())
    return {type(m) for m in model.modules() if type(m).__name__ in names}


def place_teacher(
    teacher: nn.Module,
    weights: dict[str, torch.Tensor] | None,
    device: torch.device,
    shard: bool,
) -> nn.Module:
    """Materialises a skeleton from :func:`build_teacher_skeleton` on ``device``.

    With several ranks, global rank 0 passes the weights and the others ``None``; they are
    broadcast from rank 0, tensor by tensor. With ``shard`` every decoder layer and the root
    are sharded over all ranks with FSDP2 (``fully_shard``, i.e. FULL_SHARD): each rank keeps
    ``1 / world`` of the teacher and gathers one layer at a time in its forward. Without it
    each rank keeps a full copy.

    Returns:
        The teacher, loaded strictly (every parameter and persistent buffer assigned).
    """
    world = dist.get_world_size()
    if world == 1:
        if weights is None:
            raise RuntimeError("place_teacher: a single rank needs the weights.")
        # assign: the copied tensors become the parameters (no second copy of the teacher).
        result = teacher.load_state_dict(weights, strict=True, assign=True)
        teacher.tie_weights()  # assign gives each key its own Parameter
        teacher.to(device)
    else:
        if (dist.get_global_rank() == 0) != (weights is not None):
            raise RuntimeError("place_teacher: exactly global rank 0 passes the weights.")
        if shard:
            _shard(teacher, device, world)
        # to_empty would also wipe the (real) non-persistent buffers, e.g. rotary frequencies.
        buffers = {name: b.detach().clone() for name, b in teacher.named_buffers()}
        teacher.to_empty(device=device)
        with torch.no_grad():
            for name, buffer in teacher.named_buffers():
                buffer.copy_(buffers[name])
        if not shard:
            teacher.tie_weights()  # to_empty re-creates meta parameters one by one
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True)
        result = set_model_state_dict(teacher, weights or {}, options=options)
    local = [p.to_local() if hasattr(p, "to_local") else p for p in teacher.parameters()]
    if result.missing_keys or result.unexpected_keys or any(p.is_meta for p in local):
        raise RuntimeError(f"{YAML_KEY}: the teacher's weights did not load: {result}")
    teacher.requires_grad_(False)
    return teacher.eval()


def _shard(teacher: nn.Module, device: torch.device, world: int) -> None:
    """FSDP2 (FULL_SHARD) over all ranks: each decoder layer, then the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    classes = _layer_classes(teacher)
    if not classes:
        raise ValueError(
            f"{YAML_KEY}.teacher_sharding=full_shard: {type(teacher).__name__} names no "
            "decoder layer class (_no_split_modules); use teacher_sharding: none."
        )
    mesh = init_device_mesh(device.type, (world,))
    for module in list(teacher.modules()):
        if type(module) in classes:
            fully_shard(module, mesh=mesh)
    fully_shard(teacher, mesh=mesh)


def local_weight_bytes(teacher: nn.Module) -> int:
    """Bytes of the teacher's parameters held by this rank (its shards under FSDP2)."""
    return sum(
        (p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size()
        for p in teacher.parameters()
    )


def teacher_forward(teacher: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    """The teacher's logits for ``batch`` (no gradients, no KV cache)."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    with torch.no_grad():
        logits = teacher(**inputs, use_cache=False).logits
    if isinstance(teacher, FSDPModule):
        # FSDP2 keeps the root's parameters (embeddings, lm_head) gathered after a forward,
        # expecting a backward; the teacher has none.
        teacher.reshard()
    return logits
