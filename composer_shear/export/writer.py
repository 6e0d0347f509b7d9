"""Writing a compact model as a Hugging Face directory: the one writer every export goes through.

The learned route's export (``composer-shear export``, the ``pruned_hf_export`` callback) and the
one-shot cut (``composer-shear prune-oneshot``) all end here, so every pruned model on disk has
the same layout: config, safetensors, tokenizer, ``composer_shear_export.json`` (what was cut)
and the kept-units record (:mod:`composer_shear.export.units`).
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from torch import nn

from composer_shear.export.units import write_kept_units
from composer_shear.interface import progress

__all__ = ["DTYPES", "EXPORT_INFO", "ExportError", "check_out_dir", "write_hf_directory"]


EXPORT_INFO = "composer_shear_export.json"


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ExportError(RuntimeError):
    """The checkpoint or the output directory cannot be used; nothing was written."""


def check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Raises ExportError unless ``out_dir`` is absent, empty, or may be overwritten."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir} exists and is not a directory.")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ExportError(
            f"Output directory {out_dir} is not empty; pass --overwrite to replace it."
        )


def write_hf_directory(
    model: nn.Module,
    out_dir: str | Path,
    tokenizer: Any = None,
    overwrite: bool = False,
    info: dict[str, Any] | None = None,
    kept_units: dict[str, Any] | None = None,
) -> Path:
    """Writes ``model`` (+ tokenizer) as a Hugging Face directory, atomically.

    Everything goes to a temporary sibling first and is renamed into place at the end, so a
    failure never leaves a half-written ``out_dir`` (and an existing one survives it).

    Args:
        model: The model to write.
        out_dir: Output directory.
        tokenizer: Tokenizer to save beside the weights.
        overwrite: Replace a non-empty ``out_dir``.
        info: Written as ``composer_shear_export.json``.
        kept_units: A :func:`~composer_shear.export.units.kept_units_record`, written as
            ``composer_shear_kept_units.json``.
    """
    out_dir = Path(out_dir)
    check_out_dir(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    backup = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
    # Steps: weights (most of the time), tokenizer, records, publication.
    bar = progress(desc=f"writing {out_dir.name}", total=4, unit="step")
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        bar.update()
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        bar.update()
        if info is not None:
            (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
        if kept_units is not None:
            write_kept_units(tmp, kept_units)
        bar.update()
        if out_dir.exists():
            out_dir.rename(backup)
        tmp.rename(out_dir)
        bar.update()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if backup.exists() and not out_dir.exists():
            backup.rename(out_dir)
        raise
    finally:
        bar.close()
    shutil.rmtree(backup, ignore_errors=True)
    return out_dir
