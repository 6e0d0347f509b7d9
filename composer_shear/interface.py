"""The user-facing conventions every command and library entry point shares.

* **Exit codes.** ``composer-shear`` exits 2 when the command line itself is wrong: what
  argparse rejects, and :class:`UsageError` (a malformed value, an option that needs another),
  both found without reading any file. It exits 1 when a well-formed command fails (a missing
  file or model, data that does not fit, a failed load). Either way the message goes to stderr
  as ``error: ...``.
* **Model paths.** :func:`model_path` turns a missing local model directory into a clear
  error ("model directory ./x does not exist") instead of transformers' "Repo id must be in
  the form 'repo_name'...", and passes a hub id through.
* **Progress bars.** :func:`progress` is tqdm on stderr, drawn only on rank 0 and only when
  stderr is a terminal: in a log file tqdm's carriage-return updates pile up into one long
  line (ten redraws a second) of block characters, so logs keep the plain lines instead.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tqdm import tqdm

__all__ = [
    "DTYPE_NAMES",
    "ModelPathError",
    "UsageError",
    "device_name",
    "fraction",
    "model_path",
    "positive_int",
    "progress",
]

# The hub's repo id form: ``name`` or ``owner/name`` of word characters, dots and dashes.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?")
# The weight dtypes commands load and write (`--dtype`, export `precision`), by torch's names.
DTYPE_NAMES = ("float32", "bfloat16", "float16")
# What `--device` accepts: the torch devices a command can load a model onto.
_DEVICE = re.compile(r"cpu|mps|(cuda|xpu)(:\d+)?")


class UsageError(ValueError):
    """The command line is wrong (a malformed value, an option that needs another): exit 2."""


class ModelPathError(FileNotFoundError):
    """A model (or tokenizer) named as a local directory is not there."""


def positive_int(text: str) -> int:
    """An argparse ``type``: an integer of at least 1 (anything else is a usage error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def device_name(text: str) -> str:
    """An argparse ``type``: a device to run a model on (``cpu``, ``cuda``, ``cuda:1``, ``mps``).

    Checked by form only (no torch import: the CLI starts fast); whether the machine has it
    is the command's business.
    """
    if not _DEVICE.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"not a device: {text!r} (cpu, cuda, cuda:N, mps, xpu, xpu:N)"
        )
    return text


def fraction(text: str) -> float:
    """An argparse ``type``: a float in ``[0, 1)`` (anything else is a usage error)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("TRANSFORMERS_OFFLINE", "").upper() in {
        "1",
        "ON",
        "YES",
        "TRUE",
    }


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str) or isinstance(
        try_to_load_from_cache(repo_id, "tokenizer_config.json"), str
    )


def model_path(name_or_path: str | os.PathLike[str], what: str = "model") -> str:
    """The ``from_pretrained`` argument for a model the user named, or a clear error.

    An existing directory is returned as it is. A name that does not exist is a hub id only
    when it has the hub's form (``name`` or ``owner/name``, not starting with ``.``, ``/`` or
    ``~``) and, with the hub offline (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``), is in the
    local hub cache; then it is passed through for ``from_pretrained`` to fetch or read.
    Anything else is a local directory that is missing.

    Args:
        name_or_path: What the user gave: a directory or a hub id.
        what: What it is, for the message (``model``, ``tokenizer``, ``teacher model``).

    Raises:
        ModelPathError: The directory does not exist, or it is a file.
    """
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists():
        raise ModelPathError(f"{what} directory {text} is a file, not a directory")
    if _HUB_ID.fullmatch(text) and ".." not in text and "--" not in text:
        if not _hub_offline() or _in_hub_cache(text):
            return text
        raise ModelPathError(
            f"{what} directory {text} does not exist (and the hub is offline, with no "
            f"{text!r} in the local hub cache)"
        )
    raise ModelPathError(f"{what} directory {text} does not exist")


def _rank() -> int:
    # Launchers (composer -n, torchrun) set RANK; reading it needs no process group, so bars
    # are off on non-zero ranks even before torch.distributed is initialised.
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def progress(
    iterable: Iterable[Any] | None = None,
    *,
    desc: str,
    total: int | None = None,
    unit: str = "it",
    enabled: bool = True,
) -> tqdm:
    """A progress bar on stderr: drawn on rank 0 when stderr is a terminal, else silent.

    Args:
        iterable: What to iterate over (``None`` for a bar advanced with ``update``).
        desc: What is progressing, shown before the bar.
        total: Number of steps (default: ``len(iterable)`` where it has one).
        unit: What one step is (``doc``, ``batch``, ``domain``).
        enabled: ``False`` turns the bar off (a caller's ``verbose=False``).

    Returns:
        A tqdm bar; iterate over it, or call ``update`` / ``close``. A disabled one does
        nothing and costs nothing.
    """
    return tqdm(
        iterable,
        desc=desc,
        total=total,
        unit=unit,
        file=sys.stderr,
        leave=False,
        dynamic_ncols=True,
        # None is tqdm's own "off unless the stream is a terminal".
        disable=None if enabled and _rank() == 0 else True,
    )
