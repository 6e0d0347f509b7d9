"""Export: a ``targeted_pruning`` Composer checkpoint (or live model) -> a Hugging Face directory.

Everything needed is inside the checkpoint: Composer's ``HuggingFaceModel`` stores the source
config and tokenizer, the model state holds the weights and the gates, and the algorithm's
state holds the target. Loading is always strict: a checkpoint that does not match the model
it claims to come from is an error, never a silent random init.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import itertools
import json
import mmap
import os
import pickle
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from composer.utils import parse_uri
from numpy._core import multiarray as np_multiarray
from torch import nn
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.torch_version import TorchVersion

from composer_shear.export.surgery import PruningPlan, plan_pruning, pruned_skeleton
from composer_shear.export.units import (
    KeptUnitsError,
    compare_kept_units,
    kept_units_record,
    read_kept_units,
)
from composer_shear.export.writer import (
    DTYPES,
    ExportError,
    StreamedModel,
    check_out_dir,
    provenance,
    write_hf_directory,
)
from composer_shear.families import get_family
from composer_shear.interface import ModelPathError, model_path
from composer_shear.output_paths import (
    OutputPathError,
    download_dir,
    download_file,
    is_remote,
    list_remote,
)
from composer_shear.pruning.masking import GATES_ATTR, attach_gates, find_gates
from composer_shear.shape import ModelShape

__all__ = [
    "ExportError",
    "ExportSummary",
    "ShardedTensor",
    "TensorReader",
    "checkpoint_tensors",
    "export_checkpoint",
    "export_model",
    "fetch_checkpoint",
    "gated_model_from_checkpoint",
    "gated_model_from_weights",
    "load_composer_checkpoint",
    "register_cli",
]

MODEL_PREFIX = "model."  # Composer's HuggingFaceModel keeps the HF model as `.model`


@dataclass
class ExportSummary:
    """What an export produced."""

    out_dir: str | Path
    source: ModelShape
    target: ModelShape
    kept_layers: list[int]
    seconds: float

    def describe(self) -> str:
        """Human-readable lines for the CLI."""
        src, tgt = self.source, self.target
        ratio = tgt.num_params() / src.num_params()
        return "\n".join(
            [
                f"source : {src.describe()}",
                f"pruned : {tgt.describe()}",
                f"params : {src.num_params():,} -> {tgt.num_params():,} ({ratio:.1%}); "
                f"non-embedding {src.num_non_embedding_params():,} -> "
                f"{tgt.num_non_embedding_params():,}",
                f"layers kept: {self.kept_layers}",
                f"written: {self.out_dir} ({self.seconds:.1f}s)",
            ]
        )


def _export_info(plan: PruningPlan, source: ModelShape) -> dict[str, Any]:
    return {
        "source_shape": source.config_updates(),
        "source_num_params": source.num_params(),
        "target_shape": plan.target.config_updates(),
        "target_num_params": plan.target.num_params(),
        "kept_layers": plan.kept_layers,
        "kept_hidden": len(plan.kept_hidden),
        "method": "learned (targeted_pruning)",
    }


# Reads one source tensor by its state-dict key; what it read is released on exit.
TensorReader = Callable[[str], AbstractContextManager[torch.Tensor]]


def export_model(
    hf_model: nn.Module,
    out_dir: str | Path,
    tokenizer: Any = None,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
    source: str | Path | None = None,
    weights: TensorReader | None = None,
    info: dict[str, Any] | None = None,
) -> ExportSummary:
    """Slices a gated Hugging Face model and writes the compact model to ``out_dir``.

    The compact model is never built whole: each of its tensors is cut from the source
    tensor (:class:`~composer_shear.export.surgery.TensorCut`), cast, checked and written
    on its own, so the memory held beyond the source is a few tensors.

    Args:
        hf_model: A HF causal LM carrying gates (not FSDP-sharded: gather first). With
            ``weights``, only its config, module names and gates are used (its parameters may
            live on ``meta``).
        out_dir: Output directory.
        tokenizer: Tokenizer to save beside the weights.
        overwrite: Replace a non-empty ``out_dir``.
        dtype: Dtype of the written weights (default: the model's).
        source: What the model came from (a checkpoint path or URI), for the export record;
            default: the source model the config names.
        weights: Reads a source tensor by its key in ``hf_model.state_dict()`` (a
            checkpoint's, memory-mapped or read on demand); default: ``hf_model``'s own.
        info: Entries that replace or extend the export info (e.g. how the units were
            chosen, from the algorithm that chose them).
    """
    start = time.perf_counter()
    check_out_dir(out_dir, overwrite)
    gates = find_gates(hf_model)
    if gates is None:
        raise ExportError("The model carries no pruning gates.")
    plan = plan_pruning(gates)
    info = {**_export_info(plan, gates.source), **(info or {})}
    # The config of the gated model is the source's: hash it before slicing changes nothing.
    name = getattr(hf_model.config, "_name_or_path", None) or None
    info["provenance"] = provenance(source or name, hf_model.config)
    compact, cuts = pruned_skeleton(hf_model, plan)
    dtype = dtype or compact.config.torch_dtype
    compact = compact.to(dtype)  # parameters on meta: only the dtype to write changes
    compact.config.torch_dtype = dtype
    if weights is None:
        state = hf_model.state_dict()

        def weights(key: str) -> AbstractContextManager[torch.Tensor]:
            return contextlib.nullcontext(state[key])

    def tensor(key: str) -> torch.Tensor:
        cut = cuts[key]
        with weights(cut.source) as source_tensor:
            return cut.apply(source_tensor)

    written = write_hf_directory(
        StreamedModel(compact, tensor),
        out_dir,
        tokenizer,
        overwrite,
        info=info,
        kept_units=kept_units_record(plan, gates.source),
        # The source model's folder, when it is on this machine: its licence files travel.
        source_dir=getattr(hf_model.config, "_name_or_path", None) or None,
    )
    return ExportSummary(
        written, gates.source, gates.target, plan.kept_layers, time.perf_counter() - start
    )


# -- reading checkpoints ------------------------------------------------------------------------


def _resolve_checkpoint_file(path: Path) -> Path:
    if path.is_file():
        return path
    if not path.exists():
        raise ExportError(f"Checkpoint {path} does not exist.")
    if (path / ".metadata").exists():
        return path  # a sharded (torch.distributed.checkpoint) folder
    latest = path / "latest-rank0.pt"
    if latest.exists():
        return latest.resolve()
    candidates = sorted(path.glob("*.pt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise ExportError(f"No Composer checkpoint (*.pt) in {path}.")
    return candidates[-1]


def fetch_checkpoint(uri: str, scratch: str | Path) -> Path:
    """Downloads the checkpoint at object-store ``uri`` into ``scratch``; returns its local path.

    ``uri`` is a checkpoint object (``s3://b/run/ep0-ba6-rank0.pt``) or a save folder: its
    sharded checkpoint (a ``.metadata`` object: every shard is downloaded), else the file
    ``latest-rank0.pt`` points to (Composer uploads it as a ``.symlink`` object), else the
    last ``*.pt`` by name.

    Raises:
        ExportError: Nothing usable at ``uri``, an unsupported scheme, an unreachable store.
    """
    key = "checkpoint"
    scratch = Path(scratch)
    try:
        names = list_remote(uri, key)
        if not names:
            return download_file(uri, scratch / Path(parse_uri(uri)[2]).name, key)
        if ".metadata" in names:
            return download_dir(uri, scratch / "sharded", key)
        if "latest-rank0.pt.symlink" in names:
            return download_file(
                f"{uri.rstrip('/')}/latest-rank0.pt.symlink", scratch / "latest.pt", key
            )
        checkpoints = [n for n in names if n.endswith(".pt") and "/" not in n]
        if not checkpoints:
            raise ExportError(f"No Composer checkpoint (*.pt) under {uri}.")
        return download_file(f"{uri.rstrip('/')}/{checkpoints[-1]}", scratch / checkpoints[-1], key)
    except OutputPathError as error:
        raise ExportError(str(error)) from error


def _safe_checkpoint_globals() -> list[Any]:
    """The non-tensor types a Composer checkpoint holds, for ``torch.load(weights_only=True)``.

    Composer pickles numpy arrays and dtypes (RNG state), ``TorchVersion`` and
    ``datetime.timedelta`` (timestamps) besides tensors and plain containers; none of these
    runs code when unpickled.
    """
    return [
        np.ndarray,
        np.dtype,
        np_multiarray._reconstruct,
        *(getattr(np.dtypes, name) for name in np.dtypes.__all__),
        TorchVersion,
        datetime.timedelta,
    ]


def _torch_load(path: Path, trust: bool) -> Any:
    """``torch.load`` restricted to the allow-listed types unless ``trust``; memory-mapped."""
    if trust:
        # The user vouched for the file: arbitrary pickles (and the code they run) allowed.
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    with torch.serialization.safe_globals(_safe_checkpoint_globals()):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as error:
            try:
                unsafe = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
            except Exception:  # the listing is only for the message
                unsafe = []
            raise ExportError(
                f"{path} holds objects beyond tensors and the types Composer checkpoints "
                f"use ({', '.join(unsafe) or error}); loading it could run code from the file. "
                "If you trust where it came from, pass --trust-checkpoint "
                "(trust_checkpoint=True)."
            ) from error


# The parts of a Composer checkpoint an export reads; the optimizer state is never read.
EXPORT_KEYS = (("state", "model"), ("state", "integrations"), ("state", "algorithms"))


class _SafeBytesLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner, but non-tensor entries are unpickled ``weights_only``."""

    def __init__(self, trust: bool) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.trust = trust

    def load_bytes(self, read_item: Any, value: Any) -> None:
        """Unpickles one non-tensor entry with the allow-list (DCP's own allows any)."""
        if self.trust:
            obj = torch.load(value, weights_only=False)
        else:
            with torch.serialization.safe_globals(_safe_checkpoint_globals()):
                try:
                    obj = torch.load(value, weights_only=True)
                except pickle.UnpicklingError as error:
                    raise ExportError(
                        f"entry {read_item.dest_index.fqn} of the sharded checkpoint holds "
                        f"objects beyond the allow-list ({error}); pass --trust-checkpoint "
                        "if you trust the checkpoint."
                    ) from error
        self.state_dict[read_item.dest_index.fqn] = obj


@dataclass
class ShardedTensor:
    """A tensor of a sharded (DCP) checkpoint, read from its shards only when asked for.

    Attributes:
        reader: The checkpoint folder's DCP reader.
        fqn: The tensor's key in the checkpoint.
        shape: Its shape.
        dtype: Its dtype.
        trust: Whether the checkpoint's pickles are trusted.
    """

    reader: FileSystemReader
    fqn: str
    shape: torch.Size
    dtype: torch.dtype
    trust: bool = False

    # One DCP read at a time: the export's worker threads share the reader.
    lock = threading.Lock()

    def load(self) -> torch.Tensor:
        """Reads the tensor into fresh memory, straight from the shards that hold it."""
        with self.lock:
            wanted = {self.fqn: torch.empty(self.shape, dtype=self.dtype)}
            dcp_load(
                wanted,
                storage_reader=self.reader,
                planner=_SafeBytesLoadPlanner(self.trust),
                no_dist=True,
            )
        return wanted[self.fqn]


def _load_sharded(path: Path, trust: bool) -> dict[str, Any]:
    """Reads the model, HF and algorithm entries of a sharded (DCP) checkpoint folder.

    The model's tensors become :class:`ShardedTensor` entries, read one at a time from the
    shards by the export (no consolidated temporary file, never the whole model in memory);
    the optimizer state is never read.
    """
    reader = FileSystemReader(str(path))
    metadata = reader.read_metadata()
    paths = metadata.planner_data or {}
    wanted: dict[str, Any] = {}
    lazy: dict[str, ShardedTensor] = {}
    for fqn, entry in metadata.state_dict_metadata.items():
        where = tuple(paths.get(fqn, tuple(fqn.split("."))))
        if not any(where[: len(key)] == key for key in EXPORT_KEYS):
            continue
        if isinstance(entry, TensorStorageMetadata):
            if where[:2] == ("state", "model"):
                lazy[fqn] = ShardedTensor(reader, fqn, entry.size, entry.properties.dtype, trust)
            else:
                wanted[fqn] = torch.empty(entry.size, dtype=entry.properties.dtype)
        else:
            wanted[fqn] = None  # an object, filled in by the planner
    dcp_load(wanted, storage_reader=reader, planner=_SafeBytesLoadPlanner(trust), no_dist=True)
    checkpoint: dict[str, Any] = {}
    for fqn, value in [*wanted.items(), *lazy.items()]:
        _set_nested(checkpoint, tuple(paths.get(fqn, tuple(fqn.split(".")))), value)
    return checkpoint


def _set_nested(root: dict[str, Any], where: tuple, value: Any) -> None:
    """Sets ``root[where[0]][where[1]]... = value``, creating dicts and lists on the way."""
    node: Any = root
    for step, following in itertools.pairwise(where):
        empty: Any = [] if isinstance(following, int) else {}
        if isinstance(node, list):
            while len(node) <= step:
                node.append(None)
            if node[step] is None:
                node[step] = empty
        else:
            node.setdefault(step, empty)
        node = node[step]
    last = where[-1]
    if isinstance(node, list):
        while len(node) <= last:
            node.append(None)
    node[last] = value


def load_composer_checkpoint(path: str | Path, trust_checkpoint: bool = False) -> dict[str, Any]:
    """Reads a Composer checkpoint file, checkpoint folder, or sharded checkpoint folder.

    The file is memory-mapped, so tensors that are never used (optimizer state) are never
    read (a sharded checkpoint's model tensors are :class:`ShardedTensor` entries, read on
    demand), and unpickled with ``weights_only=True`` plus an allow-list of the types Composer
    checkpoints hold, so a crafted file cannot run code, unless ``trust_checkpoint``.

    Args:
        path: A local checkpoint file or folder (see :func:`fetch_checkpoint` for URIs).
        trust_checkpoint: Allow arbitrary pickled objects (runs code from the file).
    """
    path = _resolve_checkpoint_file(Path(path))
    if path.is_dir():
        try:
            checkpoint = _load_sharded(path, trust_checkpoint)
        except ExportError:
            raise
        except Exception as error:
            raise ExportError(
                f"Could not read the sharded checkpoint {path}: {error}. Save with "
                "`fsdp_config.state_dict_type: full` or consolidate it with "
                "torch.distributed.checkpoint.format_utils.dcp_to_torch_save."
            ) from error
    else:
        try:
            checkpoint = _torch_load(path, trust_checkpoint)
        except ExportError:
            raise
        except Exception as error:
            raise ExportError(f"Cannot read checkpoint {path}: {error}") from error
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state"), dict):
        raise ExportError(f"{path} is not a Composer checkpoint (no 'state' dict).")
    checkpoint["_path"] = str(path)
    if path.is_file():
        checkpoint["_mapped"] = _mapped_ranges(path)
    return checkpoint


def _mapped_ranges(path: Path) -> list[tuple[int, int]]:
    """Address ranges where this process maps the file ``path`` (Linux; else none)."""
    try:
        maps = Path("/proc/self/maps").read_text()
        inode = os.stat(path).st_ino
    except OSError:
        return []
    ranges = []
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[4] == str(inode) and Path(fields[5]) == path.resolve():
            low, high = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((low, high))
    return ranges


MADV_DONTNEED = 4  # Linux <sys/mman.h>


def _release_mapped(tensor: torch.Tensor, ranges: list[tuple[int, int]]) -> None:
    """Drops the resident pages of a memory-mapped checkpoint tensor from this process.

    Pages of a read-only file mapping that were read count in the resident set until the
    process lets go of them; reading the whole source would otherwise hold it all. The
    data stays in the file (a later read faults it in again). Only pages wholly inside the
    tensor and inside a mapping of the checkpoint file are released, never anonymous memory.
    """
    storage = tensor.untyped_storage()
    start, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
    if not any(low <= start and end <= high for low, high in ranges):
        return
    page = mmap.PAGESIZE
    low, high = -(-start // page) * page, end // page * page
    if high > low:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(low), ctypes.c_size_t(high - low), MADV_DONTNEED)


def checkpoint_tensors(checkpoint: dict[str, Any]) -> TensorReader:
    """Reads the checkpoint's model tensors one at a time, by their key in the HF model.

    A memory-mapped tensor's pages are released once the reader's context exits; a sharded
    checkpoint's tensor is read from its shards into memory that is dropped on exit.
    """
    weights = _model_weights(checkpoint)
    ranges = checkpoint.get("_mapped") or []

    @contextlib.contextmanager
    def read(key: str) -> Iterator[torch.Tensor]:
        value = weights[key]
        tensor = value.load() if isinstance(value, ShardedTensor) else value
        try:
            yield tensor
        finally:
            if ranges:
                _release_mapped(tensor, ranges)

    return read


def _pruning_state(checkpoint: dict[str, Any]) -> dict[str, Any]:
    for name, value in checkpoint["state"].get("algorithms", []) or []:
        # oneshot_pruning is targeted_pruning with its gates chosen at FIT_START.
        if name in ("TargetedPruning", "OneshotPruning"):
            return value
    raise ExportError(
        f"{checkpoint['_path']} has no targeted_pruning state: it was not written by a run "
        "with `algorithms: targeted_pruning`."
    )


def _hf_state(checkpoint: dict[str, Any]) -> dict[str, Any]:
    hf_state = checkpoint["state"].get("integrations", {}).get("huggingface")
    if not hf_state or "config" not in hf_state.get("model", {}):
        raise ExportError(
            f"{checkpoint['_path']} does not hold a Hugging Face config (expected a Composer "
            "HuggingFaceModel, e.g. llm-foundry's hf_causal_lm)."
        )
    return hf_state


def _strict_load(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    try:
        # strict=False only to collect *all* mismatches into one message; any is an error.
        result = module.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as error:  # shape mismatches
        raise ExportError(
            f"The checkpoint's {what} does not match the model it claims to come from: {error}"
        ) from error
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if missing or unexpected:
        raise ExportError(
            f"The checkpoint's {what} does not match the model it claims to come from: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}."
        )


def _model_weights(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's model tensors keyed as the HF model's state dict (gates included)."""
    model_state = checkpoint["state"].get("model") or {}
    if not all(key.startswith(MODEL_PREFIX) for key in model_state):
        raise ExportError("Unexpected model state layout (keys without the 'model.' prefix).")
    weights = {k[len(MODEL_PREFIX) :]: v for k, v in model_state.items()}
    if not any(k.startswith(f"{GATES_ATTR}.") for k in weights):
        raise ExportError(f"{checkpoint['_path']} holds no gate parameters.")
    return weights


def gated_model_from_checkpoint(checkpoint: dict[str, Any], load: bool = True) -> nn.Module:
    """Rebuilds the gated Hugging Face model of a checkpoint, every tensor checked strictly.

    Args:
        checkpoint: A :func:`load_composer_checkpoint` result.
        load: Load the model's weights; False leaves them on ``meta`` (checked against the
            checkpoint's names and shapes, not read: :func:`checkpoint_tensors` reads them)
            and loads the gates only.
    """
    from composer.models.huggingface import get_hf_config_from_composer_state_dict

    pruning = _pruning_state(checkpoint)
    _hf_state(checkpoint)
    config = get_hf_config_from_composer_state_dict(checkpoint)
    weights = _model_weights(checkpoint)
    # Mask-only runs (freeze_weights) export the source weights cut at the learned units,
    # with no gate value folded in: the gates are rebuilt binary, as they were in the run.
    return gated_model_from_weights(
        config,
        weights,
        pruning["target_shape"],
        seed=pruning.get("seed", 0),
        binary=bool(pruning.get("freeze_weights", False)),
        load=load,
        resolved_target=pruning.get("resolved_target"),
    )


def _check_weights(model: nn.Module, weights: dict[str, Any], what: str) -> None:
    """The checks of :func:`_strict_load` on names and shapes only (nothing is read)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    wrong = [
        f"size mismatch for {k}: {tuple(weights[k].shape)} in the checkpoint, "
        f"{tuple(v.shape)} in the model"
        for k, v in expected.items()
        if k in weights and tuple(weights[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or wrong:
        raise ExportError(
            f"The checkpoint's {what} does not match the model it claims to come from: "
            + "; ".join(wrong[:5])
            + (" " if wrong else "")
            + f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}."
        )


def gated_model_from_weights(
    config: Any,
    weights: dict[str, torch.Tensor],
    target_shape: dict[str, int],
    seed: int = 0,
    binary: bool = False,
    load: bool = True,
    resolved_target: dict[str, int] | None = None,
) -> nn.Module:
    """Builds the gated Hugging Face model of ``config`` from a full state dict, strictly.

    Args:
        config: The source model's ``transformers`` config.
        weights: Every tensor of the gated HF model, keyed as its ``state_dict()`` (the gates
            under ``shear_gates.``); used in place (``assign``), not copied.
        target_shape: The pruning target the gates were built for.
        seed: Seed of the gates' initial noise (irrelevant: every gate tensor is loaded).
        binary: 0/1 deterministic gates, nothing folded at export (a mask-only run's gates,
            ``targeted_pruning`` ``freeze_weights``).
        load: Load the weights; False checks their names and shapes and leaves the model's
            parameters on ``meta`` in the weights' dtype (the gates are loaded either way).
            Values may then be :class:`ShardedTensor` entries.
        resolved_target: The shape the gates keep when it is not ``target_shape`` (a searched
            target, ``oneshot_pruning``'s ``target_params``: the gates were built to cover
            every candidate and keep the winner's units).

    Raises:
        ExportError: A tensor is missing, unexpected or of the wrong shape.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    gate_prefix = f"{GATES_ATTR}."
    gate_state = {
        k[len(gate_prefix) :]: v.load() if isinstance(v, ShardedTensor) else v
        for k, v in weights.items()
        if k.startswith(gate_prefix)
    }
    weights = {k: v for k, v in weights.items() if not k.startswith(gate_prefix)}
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    if config.tie_word_embeddings:
        # Some state-dict writers keep only one name of a tied pair.
        family = get_family(config)
        names = {module: name for name, module in model.named_modules()}
        embed_key = f"{names[family.embedding(model)]}.weight"
        head_key = f"{names[family.lm_head_module(model)]}.weight"
        if head_key not in weights and embed_key in weights:
            weights[head_key] = weights[embed_key]
    if load:
        weights = {k: v.load() if isinstance(v, ShardedTensor) else v for k, v in weights.items()}
        _strict_load(model, weights, "model weights")
    else:
        _check_weights(model, weights, "model weights")
        some = next(iter(weights.values()), None)
        if some is not None:
            model = model.to(some.dtype)  # on meta: only the dtype the export starts from
    if config.tie_word_embeddings:
        model.tie_weights()
    # The initial values do not matter: every gate tensor is overwritten by the strict load.
    gates = attach_gates(model, dict(target_shape), seed=seed, binary=binary)
    _strict_load(gates, gate_state, "gate state")
    if resolved_target is not None:
        gates.retarget(gates.source.resolve_target(dict(resolved_target)))
    return model.eval()


def export_checkpoint(
    checkpoint_path: str | Path,
    out_dir: str | Path,
    overwrite: bool = False,
    tokenizer_path: str | Path | None = None,
    dtype: str = "auto",
    trust_checkpoint: bool = False,
) -> ExportSummary:
    """``composer-shear export``: Composer checkpoint -> compact Hugging Face directory.

    Args:
        checkpoint_path: A checkpoint file, a save folder, or a sharded checkpoint folder;
            local or an object-store URI (``s3://bucket/run/checkpoints``).
        out_dir: Output directory, local or an object-store URI (must be empty unless
            ``overwrite``, and only an earlier export is ever replaced).
        overwrite: Replace an earlier export in ``out_dir``.
        tokenizer_path: Tokenizer to use when the checkpoint carries none.
        dtype: ``auto`` (the source config's dtype, else float32), or an explicit dtype.
        trust_checkpoint: Unpickle arbitrary objects from the checkpoint (runs its code).

    Raises:
        ExportError: Bad checkpoint, no pruning state, no tokenizer, non-empty output.
    """
    start = time.perf_counter()
    check_out_dir(out_dir, overwrite)
    # Downloads and the tokenizer's files live here (never in the working directory); the
    # tokenizer must outlive the export, which saves it next to the weights.
    with tempfile.TemporaryDirectory(prefix="composer_shear_export_") as scratch:
        local = checkpoint_path
        if is_remote(checkpoint_path):
            print(f"downloading {checkpoint_path}", flush=True)
            local = fetch_checkpoint(str(checkpoint_path), Path(scratch) / "checkpoint")
        checkpoint = load_composer_checkpoint(local, trust_checkpoint)
        tokenizer_dir = Path(scratch) / "tokenizer"
        tokenizer_dir.mkdir()
        tokenizer = _tokenizer(checkpoint, tokenizer_path, str(tokenizer_dir))
        # The weights stay in the file (or the shards): the model is a meta skeleton with its
        # gates, and the export cuts one tensor at a time from the checkpoint.
        model = gated_model_from_checkpoint(checkpoint, load=False)
        weights = checkpoint_tensors(checkpoint)
        del checkpoint
        if dtype == "auto":
            torch_dtype = getattr(model.config, "torch_dtype", None)
            if isinstance(torch_dtype, str):
                torch_dtype = DTYPES.get(torch_dtype)
            torch_dtype = torch_dtype or torch.float32
        else:
            torch_dtype = DTYPES[dtype]
        summary = export_model(
            model,
            out_dir,
            tokenizer,
            overwrite,
            dtype=torch_dtype,
            source=str(checkpoint_path),
            weights=weights,
        )
    summary.seconds = time.perf_counter() - start
    return summary


def _tokenizer(checkpoint: dict[str, Any], tokenizer_path: str | Path | None, save_dir: str) -> Any:
    from transformers import AutoTokenizer

    if tokenizer_path is not None:
        try:
            return AutoTokenizer.from_pretrained(str(tokenizer_path))
        except Exception as error:
            raise ExportError(f"Cannot load tokenizer {tokenizer_path}: {error}") from error
    from composer.models import HuggingFaceModel

    hf_state = _hf_state(checkpoint)
    tokenizer = None
    if hf_state.get("tokenizer"):
        tokenizer = HuggingFaceModel.load_huggingface_tokenizer_from_saved_state(
            hf_state, tokenizer_save_dir=save_dir
        )
    if tokenizer is None:
        raise ExportError(
            f"{checkpoint['_path']} carries no tokenizer; pass --tokenizer PATH (the source "
            "model's directory)."
        )
    return tokenizer


# -- CLI --------------------------------------------------------------------------------------


def _run_cli(args: argparse.Namespace) -> int:
    try:
        tokenizer = None if args.tokenizer is None else model_path(args.tokenizer, "tokenizer")
        summary = export_checkpoint(
            args.checkpoint,
            args.out_dir,
            args.overwrite,
            tokenizer,
            args.dtype,
            trust_checkpoint=args.trust_checkpoint,
        )
    except (ExportError, ModelPathError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(summary.describe())
    return 0


def register_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Adds ``composer-shear export`` and ``composer-shear compare-units``."""
    parser = subparsers.add_parser(
        "export",
        help="write the pruned model of a targeted_pruning checkpoint as a HF directory",
        description=(
            "Apply the deterministic masks of a targeted_pruning Composer checkpoint, fold the "
            "gate values into the weights (not for a mask-only run, freeze_weights: its source "
            "weights are cut as they are), slice, and write a standard Hugging Face directory "
            "(config, safetensors, tokenizer, generation config)."
        ),
    )
    parser.add_argument(
        "checkpoint",
        help="checkpoint file, save folder, or sharded checkpoint folder (local or s3://...)",
    )
    parser.add_argument(
        "out_dir", help="output directory, local or s3://... (must be empty or absent)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty out_dir")
    parser.add_argument(
        "--tokenizer",
        help="tokenizer directory (the source model's) if the checkpoint has none "
        "(default: the checkpoint's own)",
    )
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="unpickle any object in the checkpoint (runs code from the file; default: "
        "tensors and the types Composer checkpoints hold only)",
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", *DTYPES],
        help="dtype of the written weights (auto: the source config's torch_dtype)",
    )
    parser.set_defaults(func=_run_cli)

    compare = subparsers.add_parser(
        "compare-units",
        help="how many source units two pruned models of the same source keep in common",
        description=(
            "Read the kept-units records of two pruned model directories (written by "
            "`export` and `prune-oneshot`) and print, per dimension, the share of the first "
            "model's units the second keeps too, beside the share a random cut would keep."
        ),
    )
    compare.add_argument("model_a", help="pruned model directory")
    compare.add_argument("model_b", help="pruned model directory of the same source")
    compare.add_argument("--json", dest="json_out", help="also write the figures to this file")
    compare.set_defaults(func=_run_compare_cli)
    return parser


def _run_compare_cli(args: argparse.Namespace) -> int:
    try:
        result = compare_kept_units(read_kept_units(args.model_a), read_kept_units(args.model_b))
    except (ExportError, KeptUnitsError, OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"{'dimension':<14}{'kept (a / b)':>18}{'in both':>10}{'shared':>9}{'chance':>9}")
    for dim, row in result.items():
        counts = f"{row['kept_a']:,} / {row['kept_b']:,}"
        print(f"{dim:<14}{counts:>18}{row['both']:>10,}{row['shared']:>9.3f}{row['chance']:>9.3f}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
    return 0
