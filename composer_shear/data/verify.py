"""Checks that a domain's MDS shards are what their ``index.json`` says, before training reads them.

A truncated or overwritten shard otherwise passes the loader build and fails at the first
read deep inside Streaming (``IndexError: Relative sample index 197 is not present in the
shard.00000.mds file``), naming neither the domain nor the fix. :func:`verify_split` runs when
a domain is opened and checks, for every shard listed in the index:

* the file exists and has the size the index records;
* its header (MDS: the sample count, then the uint32 start offset of every sample and the end
  of the last) agrees with the index's sample count and with the file size;
* optionally its content hash, where the index records one (``composer-shear tokenize``
  writes ``xxh3_64`` hashes): this reads every byte, so it is off by default.

Every failure raises :class:`CorruptShardError` naming the domain, the file and the fix.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["CorruptShardError", "verify_split"]

_HEADER_WORD = np.dtype("<u4")


class CorruptShardError(ValueError):
    """A shard file does not match its index (truncated, overwritten or missing)."""


def _fix(split_dir: Path) -> str:
    return (
        f"re-run `composer-shear tokenize` (with --overwrite) to rewrite the shards under "
        f"{split_dir.parent.parent}, or restore the file from a good copy"
    )


def _check_mds_header(path: Path, samples: int, size: int) -> str | None:
    """What is wrong with an uncompressed MDS shard's header, or ``None``."""
    with open(path, "rb") as f:
        head = f.read(_HEADER_WORD.itemsize)
        if len(head) < _HEADER_WORD.itemsize:
            return "has no header"
        count = int(np.frombuffer(head, _HEADER_WORD)[0])
        if count != samples:
            return f"says it holds {count:,} samples, the index says {samples:,}"
        offsets = np.frombuffer(f.read((count + 1) * _HEADER_WORD.itemsize), _HEADER_WORD)
    if len(offsets) != count + 1:
        return "has a cut-off header"
    # The first sample starts after the header and the writer's config block.
    if offsets[0] < (count + 2) * _HEADER_WORD.itemsize or np.any(np.diff(offsets) < 0):
        return "has a garbled header (sample offsets out of order)"
    if int(offsets[-1]) != size:
        return f"has samples ending at byte {int(offsets[-1]):,} but is {size:,} bytes"
    return None


def verify_split(split_dir: str | os.PathLike, domain: str, hashes: bool = False) -> int:
    """Checks every shard of one local domain split against its ``index.json``.

    Args:
        split_dir: ``<data>/<domain>/<split>``.
        domain: Domain name, for the messages.
        hashes: Also compare content hashes recorded in the index (reads every byte).

    Returns:
        The number of shards checked.

    Raises:
        CorruptShardError: A shard is missing, has the wrong size, a header that disagrees with
            the index, or (``hashes``) the wrong content.
    """
    split_dir = Path(split_dir)
    try:
        with open(split_dir / "index.json", encoding="utf-8") as f:
            shards: list[dict[str, Any]] = json.load(f)["shards"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CorruptShardError(
            f"domain {domain!r}: cannot read {split_dir / 'index.json'} ({e}); {_fix(split_dir)}"
        ) from e
    for shard in shards:
        raw, zipped = shard.get("raw_data"), shard.get("zip_data")
        # Shards we write are uncompressed; a compressed one is checked as its zip file.
        info = zipped if zipped and not (split_dir / raw["basename"]).exists() else raw
        path = split_dir / info["basename"]
        problem = None
        if not path.is_file():
            problem = "is missing"
        else:
            size = path.stat().st_size
            if size != int(info["bytes"]):
                problem = f"is {size:,} bytes, the index says {int(info['bytes']):,}"
            elif info is raw and shard.get("format") == "mds":
                problem = _check_mds_header(path, int(shard.get("samples", 0)), size)
            if problem is None and hashes and info.get("hashes"):
                problem = _check_hashes(path, info["hashes"])
        if problem is not None:
            raise CorruptShardError(
                f"domain {domain!r}: shard {path} {problem} (truncated, overwritten or not "
                f"written to the end); {_fix(split_dir)}"
            )
    return len(shards)


def _check_hashes(path: Path, expected: dict[str, str]) -> str | None:
    from streaming.base.hashing import get_hash, is_hash

    data = path.read_bytes()
    for algo, digest in expected.items():
        if is_hash(algo) and get_hash(algo, data) != digest:
            return f"has different content than when it was written ({algo} mismatch)"
    return None
