"""Early checks of the paths a run will write, so that a bad setting fails before training.

A run writes its export folder and metrics file at the end or along the way; a path that
cannot be written (a parent that is a regular file, a read-only folder, an existing non-empty
export) should stop the run at ``Event.INIT`` with a message naming the YAML key, not after
hours of training with a bare ``FileExistsError``.

Folders are replaced by one rule everywhere (exports, ``tokenize``, ``eval-data``, ``demo``):
only a folder that holds our export record or run marker is ever replaced, through a staging
sibling and two renames (:func:`replace_dir`), and the leftovers of a killed write are cleaned
or restored by the next run (:func:`recover_interrupted`).
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import socket
import tempfile
import uuid
from pathlib import Path

__all__ = [
    "EXPORT_RECORD",
    "OWNERSHIP_FILES",
    "RUN_MARKER",
    "OutputPathError",
    "check_output_dir",
    "check_output_file",
    "check_replaceable",
    "is_ours",
    "not_ours_message",
    "recover_interrupted",
    "replace_dir",
    "staging_dir",
    "write_run_marker",
]


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


def check_output_dir(
    path: str | os.PathLike, key: str, overwrite: bool, in_place: bool = False
) -> Path:
    """Checks that directory ``path`` can be (re)written; creates its parent folder.

    Args:
        path: The directory the run will write.
        key: The YAML key that set it, for the message.
        overwrite: Whether an existing non-empty directory may be replaced (only one that
            composer_shear wrote: see :func:`check_replaceable`).
        in_place: The run adds files to the folder and replaces none of it (e.g. a report
            folder): existing content is fine.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        OutputPathError: A component of the path is a file, the directory exists and is not
            empty (without ``overwrite``, or not written by composer_shear), or the parent
            folder cannot be written.
    """
    path = Path(path)
    blocker = _blocking_file(path)
    if blocker is not None:
        raise OutputPathError(
            f"{key}: {path} cannot be created because {blocker} is a file; choose another "
            "folder. Nothing was trained yet."
        )
    if not in_place:
        check_replaceable(path, key, overwrite)
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


# -- folders we own: replacing, staging, crash recovery ------------------------------------------

# A folder holding one of these files was written by composer_shear and may be replaced by a
# later run given ``overwrite``; any other non-empty folder is never deleted.
EXPORT_RECORD = "composer_shear_export.json"
RUN_MARKER = ".composer_shear_output.json"
OWNERSHIP_FILES = (EXPORT_RECORD, RUN_MARKER)


def is_ours(path: str | os.PathLike) -> bool:
    """Whether folder ``path`` holds an export record or a run marker of composer_shear."""
    path = Path(path)
    return path.is_dir() and any((path / name).is_file() for name in OWNERSHIP_FILES)


def write_run_marker(folder: str | os.PathLike, what: str) -> None:
    """Marks ``folder`` as written by composer_shear (``what``: the command).

    A later ``--overwrite`` may then replace it; see :func:`check_replaceable`.
    """
    record = {"written_by": "composer_shear", "what": what, "pid": os.getpid()}
    (Path(folder) / RUN_MARKER).write_text(json.dumps(record) + "\n")


def not_ours_message(path: Path, key: str) -> str:
    """The refusal for a non-empty folder composer_shear did not write."""
    return (
        f"{key}: {path} is not empty and was not written by composer_shear (it holds neither "
        f"{EXPORT_RECORD} nor {RUN_MARKER}); refusing to replace it. Choose another folder, "
        "or move its contents away yourself. Nothing was written."
    )


def check_replaceable(path: str | os.PathLike, key: str, overwrite: bool) -> Path:
    """Checks that folder ``path`` may be (re)placed by a run's output.

    Absent or empty: fine. Non-empty: needs ``overwrite`` *and* an ownership file; a folder
    that holds anything else is refused whatever ``overwrite`` says.

    Raises:
        OutputPathError: ``path`` is a file, or a non-empty folder that may not be replaced.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{key}: {path} exists and is not a directory.")
    if path.is_dir() and any(path.iterdir()):
        if not is_ours(path):
            raise OutputPathError(not_ours_message(path, key))
        if not overwrite:
            raise OutputPathError(
                f"{key}: {path} exists and is not empty; choose another folder or set "
                "overwrite (--overwrite). Nothing was written."
            )
    return path


def _sibling_pid_alive(name: str) -> bool:
    """Whether the staging folder ``name`` (``.X.tmp-HOST-PID-HEX``) belongs to a live process."""
    match = re.search(r"\.tmp-(.+)-(\d+)-[0-9a-f]+$", name)
    if match is None or match.group(1) != socket.gethostname():
        return False
    try:
        os.kill(int(match.group(2)), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return int(match.group(2)) != os.getpid()


def recover_interrupted(out_dir: str | os.PathLike) -> list[str]:
    """Cleans what a killed write of ``out_dir`` left behind; returns what it did, one line each.

    A write stages into ``.NAME.tmp-*`` and swaps it in through ``.NAME.old-*``
    (:func:`replace_dir`). After a kill: staging folders of dead processes are removed; an
    ``.old-*`` folder is restored when ``out_dir`` is missing (the kill fell between the two
    renames) and removed when ``out_dir`` is there (the kill fell after the swap).
    """
    out_dir = Path(out_dir)
    parent = out_dir.parent
    if not parent.is_dir():
        return []
    done: list[str] = []
    for tmp in sorted(parent.glob(f".{glob.escape(out_dir.name)}.tmp-*")):
        if tmp.is_dir() and not _sibling_pid_alive(tmp.name):
            shutil.rmtree(tmp, ignore_errors=True)
            done.append(f"removed {tmp}, left by an interrupted write of {out_dir}")
    olds = sorted(
        parent.glob(f".{glob.escape(out_dir.name)}.old-*"), key=lambda p: p.stat().st_mtime
    )
    if olds and not out_dir.exists():
        olds[-1].rename(out_dir)
        done.append(f"restored {out_dir} from {olds[-1].name} (a write was killed mid-swap)")
        olds = olds[:-1]
    for old in olds:
        shutil.rmtree(old, ignore_errors=True)
        done.append(f"removed {old}, the previous {out_dir.name} of a finished swap")
    return done


def staging_dir(out_dir: str | os.PathLike) -> Path:
    """Creates an empty staging folder beside ``out_dir`` for :func:`replace_dir`."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    name = f".{out_dir.name}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = out_dir.parent / name
    tmp.mkdir()
    return tmp


def replace_dir(staged: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Moves the finished ``staged`` folder to ``out_dir``, replacing an earlier one of ours.

    Two renames (``out_dir`` -> ``.NAME.old-*``, ``staged`` -> ``out_dir``), then the old copy is
    removed. A failure between them puts the old folder back; a kill is repaired by
    :func:`recover_interrupted` on the next run. The ownership rule is checked again here, so
    a folder someone filled since the early check is still never deleted.

    Raises:
        OutputPathError: ``out_dir`` became a non-empty folder composer_shear did not write.
    """
    staged, out_dir = Path(staged), Path(out_dir)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not is_ours(out_dir):
        raise OutputPathError(not_ours_message(out_dir, "output"))
    backup = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
    if out_dir.exists():
        out_dir.rename(backup)
    try:
        staged.rename(out_dir)
    except BaseException:
        if backup.exists() and not out_dir.exists():
            backup.rename(out_dir)
        raise
    shutil.rmtree(backup, ignore_errors=True)
    return out_dir
