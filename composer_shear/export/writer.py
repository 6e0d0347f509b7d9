"""Writing a compact model as a Hugging Face directory: the one writer every export goes through.

The learned route's export (``composer-shear export``, the ``pruned_hf_export`` callback) and the
one-shot cut (``composer-shear prune-oneshot``) all end here, so every pruned model on disk has
the same layout: config, safetensors, tokenizer, ``composer_shear_export.json`` (what was cut)
and the kept-units record (:mod:`composer_shear.export.units`).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from composer_shear.export.units import write_kept_units
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
    "check_finite_tensors",
    "check_out_dir",
    "write_hf_directory",
]

log = logging.getLogger(__name__)

# The export record: what was cut, from what. Its presence also marks the folder as ours, so
# a later ``overwrite`` may replace it (:mod:`composer_shear.output_paths`).
EXPORT_INFO = EXPORT_RECORD


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
        shown = ", ".join(bad[:8]) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
        raise ExportError(
            f"{what}: non-finite values (NaN or inf) in {len(bad)} tensor(s): {shown}. "
            "Nothing was written; the gates or weights diverged before this point."
        )


def write_hf_directory(
    model: nn.Module,
    out_dir: str | Path,
    tokenizer: Any = None,
    overwrite: bool = False,
    info: dict[str, Any] | None = None,
    kept_units: dict[str, Any] | None = None,
) -> str | Path:
    """Writes ``model`` (+ tokenizer) as a Hugging Face directory, atomically.

    Everything goes to a temporary sibling first and is renamed into place at the end, so a
    failure never leaves a half-written ``out_dir`` (and an existing one survives it). Every
    tensor is checked to be finite before anything is written. A folder is only replaced if
    it holds our export record (:func:`check_out_dir`).

    Args:
        model: The model to write.
        out_dir: Output directory, or an object-store URI (``s3://bucket/folder``: staged
            locally, then uploaded through Composer's object store).
        tokenizer: Tokenizer to save beside the weights.
        overwrite: Replace a non-empty ``out_dir``.
        info: Written as ``composer_shear_export.json`` (an empty record if ``None``: the
            file marks the folder as ours).
        kept_units: A :func:`~composer_shear.export.units.kept_units_record`, written as
            ``composer_shear_kept_units.json``.
    """
    if is_remote(out_dir):
        check_out_dir(out_dir, overwrite)
        # Staged whole on local disk, then uploaded (export record last).
        with tempfile.TemporaryDirectory(prefix="composer_shear_upload_") as scratch:
            local = write_hf_directory(
                model, Path(scratch) / "export", tokenizer, info=info, kept_units=kept_units
            )
            try:
                upload_dir(local, str(out_dir), "output directory")
            except OutputPathError as error:
                raise ExportError(str(error)) from error
        return out_dir
    out_dir = Path(out_dir)
    check_out_dir(out_dir, overwrite)
    check_finite_tensors(model.state_dict(), f"export to {out_dir}")
    tmp = staging_dir(out_dir)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if kept_units is not None:
            write_kept_units(tmp, kept_units)
        # The record goes last: a staged folder with a record is a complete export.
        (tmp / EXPORT_INFO).write_text(json.dumps(info or {}, indent=2) + "\n")
        replace_dir(tmp, out_dir)
    except OutputPathError as error:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ExportError(str(error)) from error
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
