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
import logging
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
from pathlib import Path

from composer.utils import ObjectStore, get_file, maybe_create_object_store_from_uri, parse_uri

log = logging.getLogger(__name__)

__all__ = [
    "EXPORT_RECORD",
    "OWNERSHIP_FILES",
    "PUBLISHING_MARKER",
    "RUN_MARKER",
    "STAGED_MANIFEST",
    "OutputPathError",
    "check_output_dir",
    "check_output_file",
    "check_remote_output",
    "check_replaceable",
    "delete_remote",
    "discard_staged",
    "download_dir",
    "download_file",
    "is_inside",
    "is_ours",
    "is_remote",
    "list_remote",
    "not_ours_message",
    "object_store_of",
    "publish_staged",
    "recover_interrupted",
    "recover_remote",
    "remote_stage",
    "replace_dir",
    "run_marker_text",
    "staging_dir",
    "upload_dir",
    "write_run_marker",
    "write_text_output",
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
# In an object-store folder while a new version is being copied in (see upload_dir): the
# folder is ours, and not complete until the marker is gone.
PUBLISHING_MARKER = ".composer_shear_publishing.json"
OWNERSHIP_FILES = (EXPORT_RECORD, RUN_MARKER, PUBLISHING_MARKER)
# Last object of a staged upload: the staging prefix holds every file it lists.
STAGED_MANIFEST = ".composer_shear_staged.json"


def is_ours(path: str | os.PathLike) -> bool:
    """Whether folder ``path`` holds an export record or a run marker of composer_shear."""
    path = Path(path)
    return path.is_dir() and any((path / name).is_file() for name in OWNERSHIP_FILES)


def run_marker_text(what: str) -> str:
    """The content of a run marker (``what``: the command that wrote the folder)."""
    record = {"written_by": "composer_shear", "what": what, "pid": os.getpid()}
    return json.dumps(record) + "\n"


def write_run_marker(folder: str | os.PathLike, what: str) -> None:
    """Marks ``folder`` as written by composer_shear (``what``: the command).

    A later ``--overwrite`` may then replace it; see :func:`check_replaceable`.
    """
    (Path(folder) / RUN_MARKER).write_text(run_marker_text(what))


def not_ours_message(path: str | os.PathLike, key: str) -> str:
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


def _staging_name(name: str) -> str:
    """Name of a staging sibling of the folder ``name``: ``.NAME.tmp-HOST-PID-HEX``."""
    return f".{name}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def staging_dir(out_dir: str | os.PathLike) -> Path:
    """Creates an empty staging folder beside ``out_dir`` for :func:`replace_dir`."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / _staging_name(out_dir.name)
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


# -- object stores: the same paths as s3://, gs://, oci://... URIs --------------------------------
#
# Every path a user gives may be an object-store URI, served by Composer's own object stores
# (``maybe_create_object_store_from_uri``; ``S3_ENDPOINT_URL`` etc. as for a Composer
# ``save_folder``). Writers stage locally and upload; readers download into a scratch folder.
# A URI is never turned into a local ``Path`` (that is how a folder named ``s3:`` came about).


def is_remote(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an object-store URI (``s3://...``) rather than a local path."""
    backend, _, _ = parse_uri(str(path))
    return backend != ""


def object_store_of(uri: str, key: str) -> tuple[ObjectStore, str]:
    """Composer's object store for ``uri`` and the object prefix inside it.

    Raises:
        OutputPathError: The scheme is not one Composer serves (message names ``key``).
    """
    try:
        store = maybe_create_object_store_from_uri(uri)
    except (NotImplementedError, ValueError, ImportError) as error:
        raise OutputPathError(
            f"{key}: {uri}: this object store cannot be used ({error}). Use a local path or "
            "one of the schemes Composer serves (s3://, gs://, oci://, dbfs:/Volumes, ...). "
            "Nothing was written."
        ) from error
    if store is None:  # a local path after all
        raise OutputPathError(f"{key}: {uri} is not an object-store URI.")
    _, _, prefix = parse_uri(uri)
    return store, prefix.strip("/")


def list_remote(uri: str, key: str) -> list[str]:
    """Object names under the folder ``uri`` (relative to it), sorted.

    Raises:
        OutputPathError: The store cannot list (or cannot be reached).
    """
    store, prefix = object_store_of(uri, key)
    lister = getattr(store, "list_objects", None)
    if lister is None:
        raise OutputPathError(f"{key}: {uri}: this object store cannot list a folder.")
    try:
        names = lister(f"{prefix}/")
    except Exception as error:  # botocore / cloud SDK errors: report them with the key
        raise OutputPathError(f"{key}: cannot reach {uri}: {error}") from error
    store_prefix = getattr(store, "prefix", "") or ""
    return sorted(name[len(store_prefix) + len(prefix) + 1 :] for name in names)


def check_remote_output(uri: str, key: str, overwrite: bool) -> None:
    """The ownership rule of :func:`check_replaceable` for an object-store folder.

    Also proves early that the store is reachable (it lists the folder), and first repairs
    what a killed upload to ``uri`` left (:func:`recover_remote`, logged).
    """
    for line in recover_remote(uri, key):
        log.warning("%s", line)
    names = list_remote(uri, key)
    if not names:
        return
    if not any(name in OWNERSHIP_FILES for name in names):
        raise OutputPathError(not_ours_message(uri, key))
    if not overwrite:
        raise OutputPathError(
            f"{key}: {uri} already holds an export; choose another folder or set overwrite "
            "(--overwrite). Nothing was written."
        )


def _deleting_client(store: ObjectStore) -> tuple[object, str] | tuple[None, None]:
    """The boto3 client and bucket of an S3 store (the stores we can delete and copy in)."""
    client, bucket = getattr(store, "client", None), getattr(store, "bucket", None)
    if client is None or not hasattr(client, "delete_object") or not hasattr(client, "copy"):
        return None, None
    return client, bucket


def _sibling_uri(uri: str, name: str) -> str:
    """The URI of the folder ``name`` beside the folder ``uri``."""
    return f"{uri.rstrip('/').rsplit('/', 1)[0]}/{name}"


def _ownership_last(names: list[str]) -> list[str]:
    """``names`` sorted, ownership files last and the export record the very last."""
    return sorted(names, key=lambda n: (n in OWNERSHIP_FILES, n == EXPORT_RECORD, n))


def upload_dir(local_dir: str | os.PathLike, uri: str, key: str) -> None:
    """Publishes every file of ``local_dir`` under the folder ``uri``, replacing ours there.

    On S3 the new version is uploaded whole to a staging sibling (:func:`remote_stage`) and
    then copied into ``uri`` server-side (:func:`publish_staged`): the folder's export record
    and run marker are removed before any of its objects changes and written after all of
    them, so a folder holding the record is always complete, and a kill leaves either the
    previous version untouched (killed while staging) or a complete staged copy that
    :func:`recover_remote` publishes (killed while copying). Objects of the previous version
    that the new one lacks are deleted at the end (the folder was checked to be ours).
    Stores we cannot copy and delete in get the files directly, ownership files last.
    """
    local_dir = Path(local_dir)
    files = {p.relative_to(local_dir).as_posix(): p for p in local_dir.rglob("*") if p.is_file()}
    staged = remote_stage(uri, key)
    store, staged_prefix = object_store_of(staged, key)
    try:
        for name in _ownership_last(list(files)):
            store.upload_object(f"{staged_prefix}/{name}", str(files[name]))
    except Exception as error:  # cloud SDK errors, reported with the key
        raise OutputPathError(f"{key}: cannot upload to {uri}: {error}") from error
    publish_staged(staged, uri, key)


def remote_stage(uri: str, key: str) -> str:
    """Where to upload a new version of the object-store folder ``uri``.

    A fresh staging sibling ``.NAME.tmp-HOST-PID-*`` on S3, to be published with
    :func:`publish_staged`; ``uri`` itself on stores we cannot copy and delete in (upload
    the ownership files last there).
    """
    store, prefix = object_store_of(uri, key)
    if _deleting_client(store)[0] is None:
        return uri
    if not prefix:
        raise OutputPathError(f"{key}: {uri}: give a folder inside the bucket, not its root.")
    return _sibling_uri(uri, _staging_name(prefix.rsplit("/", 1)[-1]))


def publish_staged(staged: str, uri: str, key: str) -> None:
    """Publishes the folder ``staged`` (from :func:`remote_stage`, fully uploaded) to ``uri``.

    Writes the staged manifest (the staged copy is complete), then :func:`_publish`. Nothing
    to do when ``staged`` is ``uri`` (a store without copy and delete).
    """
    if staged == uri:
        return
    store, staged_prefix = object_store_of(staged, key)
    names = _ownership_last(list_remote(staged, key))
    try:
        manifest = {"files": names, "target": uri, "time": time.time()}
        _put_text(store, f"{staged_prefix}/{STAGED_MANIFEST}", json.dumps(manifest))
    except Exception as error:  # cloud SDK errors, reported with the key
        raise OutputPathError(f"{key}: cannot upload to {uri}: {error}") from error
    _publish(staged, uri, names, key)


def discard_staged(staged: str, uri: str, key: str) -> None:
    """Deletes the staged copy of a failed upload to ``uri``.

    Best effort: a copy left behind is removed by the next :func:`recover_remote`.
    """
    if staged == uri:
        return
    try:
        delete_remote(staged, list_remote(staged, key), key)
    except OutputPathError as error:
        log.warning("could not remove %s: %s", staged, error)


def _put_text(store: ObjectStore, name: str, text: str) -> None:
    with tempfile.TemporaryDirectory(prefix="composer_shear_upload_") as scratch:
        local = Path(scratch) / "object"
        local.write_text(text)
        store.upload_object(name, str(local))


def _publish(staged: str, uri: str, names: list[str], key: str) -> None:
    """Copies the staged folder's ``names`` into ``uri`` (S3, server-side), then drops it.

    Order: publishing marker in; record and run marker out (the folder is no longer a
    complete export); every file copied, ownership files last; objects of the previous
    version that the new one lacks deleted; publishing marker out; staging deleted, its
    manifest first. Repeating it after a kill at any point gives the same folder.
    """
    store, prefix = object_store_of(uri, key)
    _, staged_prefix = object_store_of(staged, key)
    client, bucket = _deleting_client(store)
    try:
        before = set(list_remote(uri, key))
        _put_text(store, f"{prefix}/{PUBLISHING_MARKER}", json.dumps({"from": staged}))
        for name in (EXPORT_RECORD, RUN_MARKER):
            if name in before:
                client.delete_object(Bucket=bucket, Key=store.get_key(f"{prefix}/{name}"))
        for name in names:
            source = {"Bucket": bucket, "Key": store.get_key(f"{staged_prefix}/{name}")}
            client.copy(source, bucket, store.get_key(f"{prefix}/{name}"))
        stale = before - set(names) - {PUBLISHING_MARKER}
        delete_remote(uri, sorted(stale), key)
        if PUBLISHING_MARKER not in names:
            delete_remote(uri, [PUBLISHING_MARKER], key)
        delete_remote(staged, [STAGED_MANIFEST, *names], key)
    except OutputPathError:
        raise
    except Exception as error:  # cloud SDK errors, reported with the key
        raise OutputPathError(f"{key}: cannot publish {staged} to {uri}: {error}") from error


def _remote_stagings(uri: str, key: str) -> dict[str, list[str]]:
    """Staging siblings of the folder ``uri`` (``.NAME.tmp-*``) and the objects in each."""
    store, prefix = object_store_of(uri, key)
    parent, _, name = prefix.rpartition("/")
    start = f"{parent}/" if parent else ""
    try:
        keys = store.list_objects(f"{start}.{name}.tmp-")
    except Exception as error:  # cloud SDK errors, reported with the key
        raise OutputPathError(f"{key}: cannot reach {uri}: {error}") from error
    store_prefix = getattr(store, "prefix", "") or ""
    stagings: dict[str, list[str]] = {}
    for full in keys:
        folder, _, rest = full[len(store_prefix) + len(start) :].partition("/")
        if rest:
            stagings.setdefault(folder, []).append(rest)
    return stagings


def recover_remote(uri: str, key: str) -> list[str]:
    """Repairs what a killed :func:`upload_dir` to ``uri`` left; returns what it did.

    A publish cut short (``uri`` holds the publishing marker) is finished from the newest
    complete staged copy; staged copies of dead uploads are deleted otherwise (the folder
    kept its previous version). Only on S3 stores (the ones :func:`upload_dir` stages on).
    """
    store, _ = object_store_of(uri, key)
    if _deleting_client(store)[0] is None:
        return []
    stagings = {
        folder: names
        for folder, names in _remote_stagings(uri, key).items()
        if not _sibling_pid_alive(folder)
    }
    done: list[str] = []
    complete = {}
    for folder, names in stagings.items():
        if STAGED_MANIFEST in names:
            with tempfile.TemporaryDirectory(prefix="composer_shear_download_") as scratch:
                local = download_file(
                    f"{_sibling_uri(uri, folder)}/{STAGED_MANIFEST}", Path(scratch) / "m", key
                )
                complete[folder] = json.loads(local.read_text())
    if PUBLISHING_MARKER in list_remote(uri, key) and complete:
        newest = max(complete, key=lambda folder: complete[folder].get("time", 0))
        _publish(_sibling_uri(uri, newest), uri, complete[newest]["files"], key)
        done.append(f"finished publishing {uri} from {newest} (an upload was killed mid-copy)")
        del stagings[newest]
    for folder, names in stagings.items():
        delete_remote(_sibling_uri(uri, folder), sorted(names), key)
        done.append(f"removed {_sibling_uri(uri, folder)}, left by an interrupted upload to {uri}")
    return done


def delete_remote(uri: str, names: list[str], key: str) -> None:
    """Deletes the objects ``names`` (relative to the folder ``uri``).

    A staged manifest and the export record go first, the run and publishing markers last:
    a folder whose deletion is cut short never looks complete, and still looks ours.
    """
    if not names:
        return
    store, prefix = object_store_of(uri, key)
    client, bucket = _deleting_client(store)
    if client is None:
        raise OutputPathError(f"{key}: {uri}: deleting objects is only supported on S3 stores.")
    first, last = (STAGED_MANIFEST, EXPORT_RECORD), (RUN_MARKER, PUBLISHING_MARKER)
    for name in sorted(names, key=lambda n: (0 if n in first else 2 if n in last else 1, n)):
        client.delete_object(Bucket=bucket, Key=store.get_key(f"{prefix}/{name}"))


def download_dir(uri: str, local_dir: str | os.PathLike, key: str) -> Path:
    """Downloads every object under the folder ``uri`` into ``local_dir``; returns it.

    Raises:
        OutputPathError: Nothing under ``uri``, or the store cannot be read.
    """
    names = list_remote(uri, key)
    if not names:
        raise OutputPathError(f"{key}: nothing under {uri}.")
    local_dir = Path(local_dir)
    for name in names:
        destination = local_dir / name
        if not is_inside(destination, local_dir):
            raise OutputPathError(f"{key}: {uri}: object name {name!r} leaves the folder.")
        destination.parent.mkdir(parents=True, exist_ok=True)
        get_file(f"{uri.rstrip('/')}/{name}", str(destination), overwrite=True)
    return local_dir


def download_file(uri: str, destination: str | os.PathLike, key: str) -> Path:
    """Downloads the object ``uri`` (or the target of ``uri.symlink``) to ``destination``.

    Raises:
        OutputPathError: The object does not exist or cannot be read.
    """
    object_store_of(uri, key)  # an unsupported scheme fails with the key named
    try:
        get_file(uri, str(destination), overwrite=True)
    except FileNotFoundError as error:
        raise OutputPathError(f"{key}: {uri} does not exist.") from error
    return Path(destination)


def is_inside(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """Whether ``path`` resolves to a location inside ``folder`` (no ``..`` or absolute escape)."""
    return Path(os.path.abspath(path)).is_relative_to(os.path.abspath(folder))


def write_text_output(target: str | os.PathLike, text: str, key: str) -> str | Path:
    """Writes ``text`` to the file ``target``, a local path or an object-store URI.

    Raises:
        OutputPathError: An unsupported scheme, or the file cannot be written.
    """
    if not is_remote(target):
        path = check_output_file(target, key)
        path.write_text(text)
        return path
    store, name = object_store_of(str(target), key)
    try:
        _put_text(store, name, text)
    except Exception as error:  # cloud SDK errors, reported with the key
        raise OutputPathError(f"{key}: cannot write {target}: {error}") from error
    return str(target)
