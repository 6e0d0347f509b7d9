"""Where FSDP's shards meet code that runs outside the forward pass (FSDP1 and FSDP2).

Inside a forward pass FSDP has gathered the parameters of the unit that runs, so the gate
hooks of :mod:`composer_shear.pruning.masking` see whole tensors. Everything else sees only this
rank's shard: FSDP1 (``FullyShardedDataParallel``, ``use_orig_params``) leaves each original
parameter as a flat slice of its shard (empty when it lies on another rank), FSDP2
(``fully_shard``) leaves a ``DTensor``. Code that reads or writes the gates between steps
(importance initialisation, hardening) uses :func:`writable_gates`; code that needs the whole
model on one rank (the export callback) uses :func:`full_state_dict`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["full_state_dict", "is_sharded", "writable_gates"]


def is_sharded(model: nn.Module) -> bool:
    """True when ``model`` holds FSDP1 units or FSDP2 (``DTensor``) parameters."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.tensor import DTensor

    return any(isinstance(m, FSDP) for m in model.modules()) or any(
        isinstance(p, DTensor) for p in model.parameters()
    )


def full_state_dict(model: nn.Module) -> dict[str, Any]:
    """The whole model's state dict, on CPU, for global rank 0.

    Every rank must call it (the tensors are gathered one by one, collectively). Keys are
    the model's own, without FSDP1's wrapper prefixes. Works without FSDP too. On an
    accelerator only rank 0 receives the tensors (offloaded to CPU; the other ranks get an
    empty dict). On CPU every rank receives them: FSDP1's offload of CPU parameters to CPU
    frees storage that the state dict still points to (a segfault in torch 2.7).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    options = StateDictOptions(full_state_dict=True, cpu_offload=not on_cpu)
    return get_model_state_dict(model, options=options)


@contextlib.contextmanager
def writable_gates(model: nn.Module, gates: nn.Module) -> Iterator[None]:
    """Makes the gate parameters whole and writable in place (under FSDP1 or FSDP2).

    Outside the forward pass FSDP holds only this rank's shard of each gate parameter.
    Inside the block every rank sees the full tensors (and must enter it: gathering is
    collective); whatever is written to them is written back to the shards at the end.

    FSDP1: only the FSDP unit that directly holds the gates is gathered
    (``summon_full_params(recurse=False)``), not the whole model. FSDP2 (``fully_shard``):
    the unit holding the gates is resharded, then the gates' DTensor parameters are swapped
    for full copies inside the block; at the end each rank copies its own slice back into
    its shard and the DTensors are put back, so the optimizer keeps the very parameter
    objects it holds.
    """
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.tensor import DTensor, distribute_tensor

    owner2 = _innermost_owner(model, gates, FSDPModule)
    if owner2 is not None:
        # FSDP2 leaves the root's parameters gathered after a forward without backward (e.g.
        # the importance forwards, an evaluation): the module then holds plain gathered
        # copies, writes to them would never reach the shards, and the next forward would
        # reuse them without gathering again. Resharding first puts the DTensors back.
        owner2.reshard()
    sharded = [
        (module, name, param)
        for module in gates.modules()
        for name, param in module.named_parameters(recurse=False)
        if isinstance(param, DTensor)
    ]
    if sharded:
        with torch.no_grad():
            for module, name, param in sharded:
                full = nn.Parameter(param.full_tensor(), requires_grad=param.requires_grad)
                setattr(module, name, full)
        try:
            yield
        finally:
            with torch.no_grad():
                for module, name, param in sharded:
                    full = getattr(module, name).detach()
                    # src_data_rank=None: every rank slices its own (identical) full copy,
                    # no communication, so a failure inside the block cannot hang here.
                    mine = distribute_tensor(
                        full, param.device_mesh, param.placements, src_data_rank=None
                    )
                    param.to_local().copy_(mine.to_local())
                    setattr(module, name, param)
        return
    owner = _innermost_owner(model, gates, FSDP)
    if owner is None:
        yield
        return
    with FSDP.summon_full_params(owner, recurse=False, writeback=True):
        yield


def _innermost_owner(model: nn.Module, gates: nn.Module, kind: type) -> nn.Module | None:
    """The innermost module of type ``kind`` (an FSDP unit) in ``model`` that holds ``gates``."""
    owner = None
    for module in model.modules():
        if isinstance(module, kind) and any(m is gates for m in module.modules()):
            owner = module  # modules() walks down, so the innermost unit comes last
    return owner
