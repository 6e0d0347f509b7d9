"""Writing a compact model as a Hugging Face directory: the one writer every export goes through.

The learned route's export (``composer-shear export``, the ``pruned_hf_export`` callback) and the
one-shot cut (``composer-shear prune-oneshot``) all end here, so every pruned model on disk has
the same layout: config, safetensors, tokenizer, ``composer_shear_export.json`` (what was cut)
and the kept-units record (:mod:`composer_shear.export.units`).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import shlex
import shutil
import sys
import tempfile
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import split_state_dict_into_shards_factory
from torch import nn

from composer_shear.export.surgery import tied_keys
from composer_shear.export.units import write_kept_units
from composer_shear.interface import DTYPE_NAMES, progress
from composer_shear.output_paths import (
    EXPORT_RECORD,
    OutputPathError,
    check_remote_output,
    check_replaceable,
    is_remote,
    recover_interrupted,
    replace_dir,
    staging_dir,
    upload_dir,
)

__all__ = [
    "DTYPES",
    "EXPORT_INFO",
    "ExportError",
    "StreamedModel",
    "check_finite_tensors",
    "check_out_dir",
    "config_hash",
    "model_card",
    "provenance",
    "write_hf_directory",
]

log = logging.getLogger(__name__)

# The export record: what was cut, from what. Its presence also marks the folder as ours, so
# a later ``overwrite`` may replace it (:mod:`composer_shear.output_paths`).
EXPORT_INFO = EXPORT_RECORD


# Files that carry a source model's licence terms; copied beside derived weights.
LICENCE_PATTERNS = ("LICENSE*", "LICENCE*", "NOTICE*", "USE_POLICY*", "COPYING*")
# Packages whose versions an export records.
RECORDED_PACKAGES = ("composer_shear", "torch", "transformers", "mosaicml", "llm-foundry")

MAX_SHARD_SIZE = "2GB"
# What save_pretrained names its weight files ({suffix}: "" or "-00001-of-00003").
WEIGHTS_PATTERN = "model{suffix}.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"

# safetensors' dtype codes, in the order its serializer sorts by (descending: wider first).
SAFETENSORS_DTYPES = {
    torch.bool: "BOOL",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.float8_e5m2: "F8_E5M2",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.int16: "I16",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int32: "I32",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.int64: "I64",
}

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


class ExportError(RuntimeError):
    """The checkpoint or the output directory cannot be used; nothing was written."""


def check_out_dir(out_dir: str | Path, overwrite: bool) -> None:
    """Raises ExportError unless ``out_dir`` is absent, empty, or an export we may replace.

    Leftovers of an interrupted earlier export to ``out_dir`` are cleaned first (and logged).
    A non-empty folder without our export record is refused even with ``overwrite``.
    ``out_dir`` may be an object-store URI (``s3://bucket/folder``): the same rule holds for
    the objects under it, and the store must be reachable.
    """
    try:
        if is_remote(out_dir):
            check_remote_output(str(out_dir), "output directory", overwrite)
            return
        for line in recover_interrupted(out_dir):
            log.warning("%s", line)
        check_replaceable(out_dir, "output directory", overwrite)
    except OutputPathError as error:
        raise ExportError(str(error)) from error


def check_finite_tensors(tensors: dict[str, torch.Tensor], what: str) -> None:
    """Raises ExportError naming every tensor of ``tensors`` that holds a NaN or an infinity.

    Args:
        tensors: Name -> tensor (e.g. a state dict).
        what: What the tensors are, for the message.
    """
    bad = [
        name
        for name, tensor in tensors.items()
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    ]
    if bad:
        raise _non_finite_error(bad, what)


def _non_finite_error(bad: list[str], what: str) -> ExportError:
    shown = ", ".join(bad[:8]) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
    return ExportError(
        f"{what}: non-finite values (NaN or inf) in {len(bad)} tensor(s): {shown}. "
        "Nothing was written; the gates or weights diverged before this point."
    )


# Config keys that say how a model was loaded, not what it is: left out of its hash.
VOLATILE_CONFIG_KEYS = ("torch_dtype", "transformers_version", "use_cache")


@dataclass
class StreamedModel:
    """A model to write one tensor at a time, never whole in memory.

    Attributes:
        skeleton: The model as it is to be written, its parameters on ``meta`` (or real):
            config, generation config, tensor names, shapes and dtypes, tied weights.
        tensor: Makes the tensor of one state-dict key of ``skeleton`` (tied copies are never
            asked for); it is cast to the skeleton's dtype, written, and dropped.
    """

    skeleton: nn.Module
    tensor: Callable[[str], torch.Tensor]


def _safetensors_header(specs: dict[str, torch.Tensor], order: list[str]) -> bytes:
    """The header safetensors' serializer writes for tensors shaped like ``specs``, in ``order``.

    Byte for byte what ``safetensors.torch.save_file(..., metadata={"format": "pt"})``
    writes (compact JSON, offsets in file order, padded with spaces to 8 bytes); the test
    suite compares the two.
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in order:
        spec = specs[name]
        size = spec.numel() * spec.element_size()
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def _file_order(specs: dict[str, torch.Tensor], names: list[str]) -> list[str]:
    """The order safetensors lays tensors out in a file: wider dtypes first, then by name."""
    rank = list(SAFETENSORS_DTYPES)
    return sorted(names, key=lambda name: (-rank.index(specs[name].dtype), name))


def _in_order(
    make: Callable[[str], torch.Tensor], names: list[str], workers: int
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, make(name))`` in order, at most ``workers`` tensors being made at a time.

    Bounded look-ahead: the memory held is a few tensors, whatever the model's size, while
    the gathers (memory-bound, GIL released) still overlap.
    """
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque[tuple[str, Future]] = deque()
        for name in names:
            pending.append((name, pool.submit(make, name)))
            if len(pending) >= workers:
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()


def _write_weights(
    folder: Path, model: StreamedModel, bad: list[str], max_shard_size: int | str
) -> None:
    """Writes the model's tensors as ``save_pretrained`` would, one tensor in memory at a time.

    Same files, same bytes: tied copies left out, shards split by ``split_state_dict_into_
    shards_factory`` at ``max_shard_size`` in state-dict order, the index as
    ``save_pretrained`` writes it. Each tensor is made, checked finite (names of non-finite
    ones are appended to ``bad``), written at its offset and released before the next ones.
    """
    tied = tied_keys(model.skeleton)
    specs = {k: v for k, v in model.skeleton.state_dict().items() if k not in tied}
    split = split_state_dict_into_shards_factory(
        specs,
        get_storage_size=lambda spec: spec.numel() * spec.element_size(),
        filename_pattern=WEIGHTS_PATTERN,
        max_shard_size=max_shard_size,
    )
    if sys.byteorder != "little":  # safetensors stores little-endian
        raise ExportError("Writing safetensors needs a little-endian machine.")

    def make(name: str) -> torch.Tensor:
        spec = specs[name]
        tensor = model.tensor(name).to(spec.dtype).contiguous()
        if tuple(tensor.shape) != tuple(spec.shape):
            raise ExportError(f"{name}: made {tuple(tensor.shape)}, expected {tuple(spec.shape)}.")
        return tensor

    workers = max(1, min(4, torch.get_num_threads()))
    for filename, names in split.filename_to_tensors.items():
        order = _file_order(specs, names)
        with open(folder / filename, "wb") as file:
            file.write(_safetensors_header(specs, order))
            for name, tensor in _in_order(make, order, workers):
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    bad.append(name)
                if tensor.numel():
                    file.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
                del tensor
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (folder / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    position = {name: i for i, name in enumerate(specs)}
    bad.sort(key=position.__getitem__)


def _write_model(folder: Path, model: StreamedModel, max_shard_size: int | str) -> list[str]:
    """Config, generation config and weights of ``model`` into ``folder``; non-finite names.

    ``save_pretrained`` writes the config files (with an empty state dict it writes no
    weights); the weights are streamed by :func:`_write_weights`.
    """
    model.skeleton.save_pretrained(folder, state_dict={}, safe_serialization=True)
    bad: list[str] = []
    _write_weights(folder, model, bad, max_shard_size)
    return bad


def config_hash(config: Any) -> str:
    """SHA-256 of a ``transformers`` config's JSON (sorted keys): which source this was.

    Keys that depend on how the model was loaded (private ``_*`` keys, the load dtype, the
    ``transformers`` version) are left out, so the same source hashes the same.
    """
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    data = {
        k: v for k, v in data.items() if not k.startswith("_") and k not in VOLATILE_CONFIG_KEYS
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def provenance(source: str | Path | None, source_config: Any = None) -> dict[str, Any]:
    """The provenance part of an export record: source, versions, command.

    Args:
        source: The source model or checkpoint (path, URI or hub id).
        source_config: The source model's config (hashed, and its ``_name_or_path`` kept).
    """
    versions = {}
    for package in RECORDED_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    record: dict[str, Any] = {
        "source": None if source is None else str(source),
        "versions": versions,
        "python": sys.version.split()[0],
        # The command line that made it: `composer-shear export ...`, or `llmfoundry train
        # YAML overrides...` for the callback (the YAML path and every override).
        "command": shlex.join(sys.argv),
    }
    if source_config is not None:
        record["source_model"] = getattr(source_config, "_name_or_path", None) or None
        record["source_config_sha256"] = config_hash(source_config)
    return record


def model_card(config: Any, info: dict[str, Any]) -> str:
    """A Hugging Face model card (``README.md``) for an export: base model, shape, recipe."""
    prov = info.get("provenance", {})
    base = prov.get("source_model") or prov.get("source")
    front = ["---", "library_name: transformers", "pipeline_tag: text-generation"]
    if base and "/" in str(base) and not Path(str(base)).exists() and "://" not in str(base):
        front.append(f"base_model: {base}")  # a hub id: HF links the card to it
    front.append("---")
    shape = info.get("target_shape") or {}
    rows = "\n".join(
        f"| `{k}` | {info.get('source_shape', {}).get(k, '')} | {v} |" for k, v in shape.items()
    )
    params = info.get("target_num_params")
    source_params = info.get("source_num_params")
    versions = ", ".join(f"{k} {v}" for k, v in prov.get("versions", {}).items() if v)
    lines = [
        *front,
        "",
        f"# {config.model_type} pruned with composer_shear",
        "",
        f"Structured pruning (Sheared-LLaMA style) of **{base or 'an unrecorded source'}**.",
        "",
        "| | source | pruned |",
        "|---|---|---|",
        rows,
        f"| parameters | {source_params:,} | {params:,} |" if params and source_params else "",
        "",
        "## How it was made",
        "",
        f"- method: {info.get('method', 'learned (targeted_pruning)')}",
        f"- source: `{prov.get('source')}`"
        + (
            f" (config sha256 `{prov['source_config_sha256'][:16]}`)"
            if prov.get("source_config_sha256")
            else ""
        ),
        f"- command: `{prov.get('command', '')}`",
        f"- versions: {versions}",
        "",
        "The kept units of every layer are in `composer_shear_kept_units.json`, the full record in",
        f"`{EXPORT_INFO}`. The source model's licence terms apply to these weights; its licence",
        "files, when it had any, are copied here.",
        "",
    ]
    return "\n".join(line for line in lines if line is not None)


def copy_licences(source_dir: str | Path | None, out_dir: Path) -> list[str]:
    """Copies the source's licence files (``LICENSE*``, ``USE_POLICY*``...) into ``out_dir``."""
    if source_dir is None or is_remote(source_dir) or not Path(source_dir).is_dir():
        return []
    copied = []
    for pattern in LICENCE_PATTERNS:
        for path in sorted(Path(source_dir).glob(pattern)):
            if path.is_file() and not (out_dir / path.name).exists():
                shutil.copy2(path, out_dir / path.name)
                copied.append(path.name)
    return copied


def write_hf_directory(
    model: nn.Module | StreamedModel,
    out_dir: str | Path,
    tokenizer: Any = None,
    overwrite: bool = False,
    info: dict[str, Any] | None = None,
    kept_units: dict[str, Any] | None = None,
    source_dir: str | Path | None = None,
    max_shard_size: int | str = MAX_SHARD_SIZE,
) -> str | Path:
    """Writes ``model`` (+ tokenizer) as a Hugging Face directory, atomically.

    Everything goes to a temporary sibling first and is renamed into place at the end, so a
    failure never leaves a half-written ``out_dir`` (and an existing one survives it). The
    weights are written one tensor at a time (a :class:`StreamedModel` is never whole in
    memory); every tensor is checked to be finite, and one that is not stops the export
    before anything is published. A folder is only replaced if it holds our export record
    (:func:`check_out_dir`).

    Args:
        model: The model to write: a live model, or a :class:`StreamedModel`.
        out_dir: Output directory, or an object-store URI (``s3://bucket/folder``: staged
            locally, then uploaded through Composer's object store).
        tokenizer: Tokenizer to save beside the weights.
        overwrite: Replace a non-empty ``out_dir``.
        info: Written as ``composer_shear_export.json`` (an empty record if ``None``: the
            file marks the folder as ours).
        kept_units: A :func:`~composer_shear.export.units.kept_units_record`, written as
            ``composer_shear_kept_units.json``.
        source_dir: The source model's local folder: its licence files are copied along.
        max_shard_size: Largest safetensors file (bytes, or ``"2GB"``); a larger tensor gets
            a file of its own.

    Besides the weights the folder gets a ``README.md`` model card (:func:`model_card`) and
    the source's licence files (``LICENSE*``, ``USE_POLICY*``, ``NOTICE*``) when it has them.
    """
    if is_remote(out_dir):
        check_out_dir(out_dir, overwrite)
        # Staged whole on local disk, then uploaded (export record last).
        with tempfile.TemporaryDirectory(prefix="composer_shear_upload_") as scratch:
            local = write_hf_directory(
                model,
                Path(scratch) / "export",
                tokenizer,
                info=info,
                kept_units=kept_units,
                source_dir=source_dir,
                max_shard_size=max_shard_size,
            )
            try:
                upload_dir(local, str(out_dir), "output directory")
            except OutputPathError as error:
                raise ExportError(str(error)) from error
        return out_dir
    out_dir = Path(out_dir)
    check_out_dir(out_dir, overwrite)
    if not isinstance(model, StreamedModel):
        state = model.state_dict()
        model = StreamedModel(model, lambda name: state[name].detach())
    tmp = staging_dir(out_dir)
    # Steps: weights (most of the time), tokenizer, records, publication.
    bar = progress(desc=f"writing {out_dir.name}", total=4, unit="step")
    try:
        # Sharded safetensors with an index, one tensor in memory at a time.
        bad = _write_model(tmp, model, max_shard_size)
        if bad:
            raise _non_finite_error(bad, f"export to {out_dir}")
        bar.update()
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        bar.update()
        if kept_units is not None:
            write_kept_units(tmp, kept_units)
        info = dict(info or {})
        info["licence_files"] = copy_licences(source_dir, tmp)
        (tmp / "README.md").write_text(model_card(model.skeleton.config, info))
        # The record goes last: a staged folder with a record is a complete export.
        (tmp / EXPORT_INFO).write_text(json.dumps(info or {}, indent=2) + "\n")
        bar.update()
        replace_dir(tmp, out_dir)
        bar.update()
    except OutputPathError as error:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ExportError(str(error)) from error
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
    return out_dir
