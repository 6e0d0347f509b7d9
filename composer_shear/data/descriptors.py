"""Keeping the open file descriptors of Streaming datasets bounded.

Every ``StreamingDataset`` holds 6 shared-memory segments (2 descriptors each: the segment and
its mapping) for the life of the process: Streaming registers an ``atexit`` cleanup for each,
which keeps them alive even after the dataset is gone. Two things made a 7-domain job run out
of descriptors under the common soft limit of 1,024 (LLM Foundry builds the train loader and
7 eval loaders, 14 datasets, before iterating any):

1. **The prefix probe** (Streaming 0.12.0, ``streaming/base/shared/prefix.py``,
   ``_check_and_find``): a new dataset picks its shared-memory prefix by attaching to every
   segment of every existing prefix in turn, and never closes those attachments. The N-th
   dataset therefore leaves 12·(N-1) more descriptors open, 6·N·(N+1) in all: 1,260 for 14
   datasets. :func:`patch_streaming_prefix_probe` replaces that function with one that walks
   the prefixes the same way and closes each attachment at once (14 datasets: 168).
2. **Nothing is released before exit.** :func:`release_on_collect` closes a dataset's own
   attachments when the dataset is garbage-collected (the segment names are still removed at
   exit, as Streaming does), so a process that builds and drops many jobs (a test suite, a
   notebook) does not accumulate descriptors.

As a safety net, :func:`raise_open_file_limit` raises the soft ``RLIMIT_NOFILE`` towards the
hard limit when our components are built, and says so in the log.

The patch is version-guarded: it is applied only to the Streaming releases whose
``_check_and_find`` it was written against (:data:`PATCHED_STREAMING_VERSIONS`); set
``COMPOSER_SHEAR_PATCH_STREAMING=0`` to leave Streaming untouched.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import logging
import os
import threading
import weakref
from collections.abc import Iterable
from tempfile import gettempdir
from typing import Any

__all__ = [
    "PATCHED_STREAMING_VERSIONS",
    "bound_open_files",
    "count_open_fds",
    "patch_streaming_prefix_probe",
    "raise_open_file_limit",
    "release_on_collect",
]

log = logging.getLogger(__name__)

# Releases whose `_check_and_find` leaks its probe attachments exactly as described above.
PATCHED_STREAMING_VERSIONS = ("0.12.0",)
ENV_SWITCH = "COMPOSER_SHEAR_PATCH_STREAMING"
# Soft limit we ask for: enough for hundreds of datasets plus the usual files and sockets.
WANTED_OPEN_FILES = 65_536

_lock = threading.Lock()
_patched = False
_limit_checked = False


def count_open_fds() -> int | None:
    """Open descriptors of this process (``None`` where ``/proc/self/fd`` does not exist)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return None


def _close_attachment(shm: Any) -> None:
    """Closes one attachment of Streaming's ``SharedMemory`` wrapper and drops its ``atexit``."""
    atexit.unregister(shm.cleanup)
    for builtin in shm.opened_shms:
        with contextlib.suppress(OSError, BufferError):
            builtin.close()


def _closing_check_and_find(
    streams_local: list[str], streams_remote: list[str | None], shm_name: str
) -> int:
    """Streaming's prefix search, closing every segment it attaches to.

    Walks prefix 0, 1, 2 ...: a prefix whose file locks exist in the temp folder is in use by
    an iterated dataset and skipped; otherwise the segment ``<prefix>_<shm_name>`` is
    attached to; the first prefix where it does not exist is free. For the ``locals``
    segment, a dataset with a remote must not share a local folder with a live one.
    """
    from streaming.base.constant import BARRIER_FILELOCK, CACHE_FILELOCK, LOCALS
    from streaming.base.shared import SharedMemory
    from streaming.base.shared.prefix import _get_path, _unpack_locals

    for prefix_int in itertools.count():
        try:
            if any(
                os.path.exists(os.path.join(gettempdir(), _get_path(prefix_int, lock)))
                for lock in (BARRIER_FILELOCK, CACHE_FILELOCK)
            ):
                continue
        except PermissionError:
            continue
        try:
            shm = SharedMemory(_get_path(prefix_int, shm_name), False)
        except PermissionError:
            continue
        except FileNotFoundError:
            return prefix_int
        try:
            if shm_name != LOCALS or not any(streams_remote):
                continue
            their_locals, _ = _unpack_locals(bytes(shm.buf))
            for local, remote in zip(streams_local, streams_remote, strict=True):
                if remote is not None and local in their_locals:
                    raise ValueError(
                        f"Reused local directory: {streams_local} vs {their_locals}. Provide a "
                        "different one, or delete the local directory and call "
                        "`streaming.base.util.clean_stale_shared_memory()` once before building "
                        "the dataset."
                    )
        finally:
            _close_attachment(shm)
    raise AssertionError("unreachable")  # itertools.count() never ends


def patch_streaming_prefix_probe() -> bool:
    """Makes Streaming's shared-memory prefix probe close what it opens (idempotent).

    Returns:
        Whether the patch is active.
    """
    global _patched
    with _lock:
        if _patched:
            return True
        if os.environ.get(ENV_SWITCH, "1").strip().lower() in {"0", "false", "no", "off"}:
            log.info("%s=0: Streaming's shared-memory prefix probe is left as it is", ENV_SWITCH)
            return False
        import streaming
        from streaming.base.shared import prefix

        version = getattr(streaming, "__version__", "?")
        if version not in PATCHED_STREAMING_VERSIONS or not hasattr(prefix, "_check_and_find"):
            log.info(
                "mosaicml-streaming %s: its shared-memory prefix probe is not patched (written "
                "for %s); each dataset built may keep more file descriptors open",
                version,
                ", ".join(PATCHED_STREAMING_VERSIONS),
            )
            return False
        prefix._check_and_find = _closing_check_and_find
        _patched = True
        log.debug("patched streaming.base.shared.prefix._check_and_find (closes its probes)")
        return True


def _segments(dataset: Any) -> list[Any]:
    """Streaming ``SharedMemory`` wrappers a ``StreamingDataset`` holds for its lifetime."""
    found = [getattr(dataset, "_locals_shm", None), getattr(dataset, "_resume_shm", None)]
    for name in ("_shared_barrier", "_next_epoch", "_cache_usage"):
        holder = getattr(dataset, name, None)
        array = getattr(holder, "_arr", None) or getattr(holder, "arr", None)
        found.append(getattr(array, "shm", None))
    for name in ("_shard_states", "_shard_access_times"):
        found.append(getattr(getattr(dataset, name, None), "shm", None))
    return [shm for shm in found if shm is not None and hasattr(shm, "cleanup")]


def _unlink_names(names: Iterable[str]) -> None:
    """Removes shared-memory segments by name (what Streaming's exit cleanup does)."""
    from multiprocessing import shared_memory

    for name in names:
        try:
            segment = shared_memory.SharedMemory(name)
        except (FileNotFoundError, OSError):
            continue
        segment.close()
        segment.unlink()  # also unregisters it from the resource tracker


def _release(segments: list[Any], locals_shm: Any) -> None:
    created: list[str] = []
    if locals_shm is not None:
        # What StreamingDataset.__del__ does: mark the local folders as free again.
        with contextlib.suppress(Exception):  # already closed
            locals_shm.buf[:4] = b"\0\0\0\0"
    for shm in segments:
        atexit.unregister(shm.cleanup)
        for builtin in [*shm.created_shms, *shm.opened_shms]:
            try:
                builtin.close()
            except (OSError, BufferError):
                continue
        created += [builtin.name for builtin in shm.created_shms]
    if created:
        # The names stay until exit, exactly as with Streaming's own cleanup, so that no other
        # rank sees a prefix freed at a moment that depends on this process's garbage collector.
        atexit.register(_unlink_names, created)


def release_on_collect(dataset: Any) -> None:
    """Closes ``dataset``'s shared-memory attachments when it is garbage-collected.

    Only descriptors and mappings are released early; segment names are removed at exit.
    """
    segments = _segments(dataset)
    if segments:
        finalizer = weakref.finalize(
            dataset, _release, segments, getattr(dataset, "_locals_shm", None)
        )
        # A dataset still alive at exit is left to Streaming's own exit cleanup (close and
        # unlink); ours would run first and could not schedule the unlinking any more.
        finalizer.atexit = False


def raise_open_file_limit(wanted: int = WANTED_OPEN_FILES) -> tuple[int, int] | None:
    """Raises the soft ``RLIMIT_NOFILE`` towards the hard limit (once per process), logging it.

    Args:
        wanted: The soft limit to ask for (capped by the hard limit).

    Returns:
        ``(soft, hard)`` after the call, or ``None`` where ``resource`` does not exist.
    """
    global _limit_checked
    try:
        import resource
    except ImportError:  # not POSIX
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if _limit_checked:
        return soft, hard
    _limit_checked = True
    infinite = resource.RLIM_INFINITY
    target = wanted if hard == infinite else min(wanted, hard)
    if soft != infinite and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as e:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, target, e)
            return soft, hard
        log.info(
            "raised the soft open-file limit (RLIMIT_NOFILE) from %d to %d (hard limit %s)",
            soft,
            target,
            "unlimited" if hard == infinite else hard,
        )
        return target, hard
    return soft, hard


def bound_open_files() -> None:
    """What each composer_shear component calls when it is built (cheap after the first call).

    Patches Streaming's prefix probe before any Streaming dataset of the job is built (LLM
    Foundry builds callbacks and loggers before the data loaders, so stock ``text`` loaders
    in the same job benefit too) and raises the soft open-file limit.
    """
    patch_streaming_prefix_probe()
    raise_open_file_limit()
