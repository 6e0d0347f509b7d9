"""Early checks of the paths a run will write, so that a bad setting fails before training.

A run writes its export folder and metrics file at the end or along the way; a path that
cannot be written (a parent that is a regular file, a read-only folder, an existing non-empty
export) should stop the run at ``Event.INIT`` with a message naming the YAML key, not after
hours of training with a bare ``FileExistsError``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["OutputPathError", "check_output_dir", "check_output_file"]


class OutputPathError(ValueError):
    """An output path of the run cannot be written (the message names the YAML key)."""


def _blocking_file(path: Path) -> Path | None:
    """The first component of ``path`` that exists but is not a directory, if any."""
    for parent in reversed([path, *path.parents]):
        if parent.exists() and not parent.is_dir():
            return parent
    return None


def _prove_writable(folder: Path, key: str, target: Path) -> None:
    """Creates ``folder`` (and parents) and a scratch file in it, then removes the file."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as e:
        raise OutputPathError(
            f"{key}: cannot write {target}: {e.strerror or e} ({folder}); choose a writable "
            "location. Nothing was trained yet."
        ) from e


def check_output_dir(path: str | os.PathLike, key: str, overwrite: bool) -> Path:
    """Checks that directory ``path`` can be (re)written; creates its parent folder.

    Args:
        path: The directory the run will write.
        key: The YAML key that set it, for the message.
        overwrite: Whether an existing non-empty directory may be replaced.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        OutputPathError: A component of the path is a file, the directory exists and is not
            empty (without ``overwrite``), or the parent folder cannot be written.
    """
    path = Path(path)
    blocker = _blocking_file(path)
    if blocker is not None:
        raise OutputPathError(
            f"{key}: {path} cannot be created because {blocker} is a file; choose another "
            "folder. Nothing was trained yet."
        )
    if path.is_dir() and not overwrite and any(path.iterdir()):
        raise OutputPathError(
            f"{key}: {path} exists and is not empty; choose another folder or set overwrite: "
            "true. Nothing was trained yet."
        )
    _prove_writable(path.parent, key, path)
    if path.is_dir():
        _prove_writable(path, key, path)
    return path


def check_output_file(path: str | os.PathLike, key: str) -> Path:
    """Checks that file ``path`` can be written; creates its parent folder.

    Raises:
        OutputPathError: A component of the path is a file, ``path`` is a directory, or the
            folder cannot be written.
    """
    path = Path(path)
    blocker = _blocking_file(path.parent)
    if blocker is not None:
        raise OutputPathError(
            f"{key}: {path} cannot be created because {blocker} is a file; choose another "
            "path. Nothing was trained yet."
        )
    if path.is_dir():
        raise OutputPathError(f"{key}: {path} is a directory; give a file path.")
    _prove_writable(path.parent, key, path)
    return path
