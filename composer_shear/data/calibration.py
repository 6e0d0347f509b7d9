"""Token samples straight from MDS shards: calibration batches and held-out evaluation samples.

One-shot importance, ``init: activation`` of ``targeted_pruning`` and ``reference-loss`` read
tokens from the per-domain MDS folders that ``composer-shear tokenize`` writes, without a
Streaming dataset (no shared memory, no local cache): a bounded number of samples per domain,
read shard by shard.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np
import torch
from streaming.base.compression import decompress
from streaming.base.format import reader_from_json
from streaming.base.storage import CloudDownloader

from composer_shear.data.identity import check_split_tokenizer, read_split_meta, remote_split_meta
from composer_shear.interface import progress
from composer_shear.output_paths import is_remote, list_remote

__all__ = ["calibration_batches", "read_mds_token_samples"]


def calibration_batches(
    data_dir: str | Path,
    tokens: int,
    max_seq_len: int,
    batch_size: int = 8,
    domains: Sequence[str] | None = None,
    seed: int = 0,
    split: str = "train",
    tokenizer: Any | None = None,
) -> list[torch.Tensor]:
    """Calibration batches drawn evenly from every domain's ``split`` of an MDS data folder.

    Each domain contributes the same number of sequences, picked at random (seeded) among the
    first ``8x`` that many of its samples (the reading cost stays bounded on large corpora).

    Args:
        data_dir: ``DATA/<domain>/<split>`` MDS folders (``composer-shear tokenize``), local
            or remote (``s3://bucket/data``: shards are downloaded by Streaming's
            downloader, one at a time, only as far as they are read).
        tokens: Calibration tokens wanted (rounded up to whole batches).
        max_seq_len: Tokens per sequence (samples are truncated; shorter ones skipped).
        batch_size: Sequences per batch.
        domains: Domains to use (default: every folder with a ``split``).
        seed: Seed of the pick.
        split: Which split (the train split: eval data stays held out).
        tokenizer: The model's tokenizer: shards recorded as written by another one are
            refused (:func:`~composer_shear.data.identity.check_split_tokenizer`).
    """
    remote = is_remote(data_dir)
    if domains is None:
        if remote:
            # Remote data (s3://...): the domains are the folders holding <split>/index.json.
            names = list_remote(str(data_dir), "calibration data")
            suffix = f"/{split}/index.json"
            domains = sorted(
                {n.split("/")[0] for n in names if n.count("/") == 2 and n.endswith(suffix)}
            )
        else:
            domains = sorted(
                p.name for p in Path(data_dir).iterdir() if (p / split / "index.json").is_file()
            )
    if not domains:
        raise FileNotFoundError(f"No <domain>/{split} MDS folders under {data_dir}.")
    n_batches = max(1, math.ceil(tokens / (batch_size * max_seq_len)))
    per_domain = math.ceil(n_batches * batch_size / len(domains))
    rng = np.random.default_rng(seed)
    rows: list[np.ndarray] = []
    for domain in progress(domains, desc="reading calibration samples", unit="domain"):
        split_dir = (
            f"{str(data_dir).rstrip('/')}/{domain}/{split}"
            if remote
            else Path(data_dir) / domain / split
        )
        meta = remote_split_meta(str(split_dir)) if remote else read_split_meta(split_dir)
        check_split_tokenizer(meta, tokenizer, f"calibration data {split_dir}")
        pool = [
            t[:max_seq_len]
            for t in read_mds_token_samples(split_dir, max_samples=8 * per_domain)
            if len(t) >= max_seq_len
        ]
        if not pool:
            raise ValueError(f"domain {domain!r}: no sample of {max_seq_len} tokens in {split_dir}")
        picks = rng.choice(len(pool), size=per_domain, replace=len(pool) < per_domain)
        rows.extend(pool[i] for i in picks)
    order = rng.permutation(len(rows))[: n_batches * batch_size]
    ids = torch.from_numpy(np.stack([rows[i] for i in order]).astype(np.int64))
    return list(ids.split(batch_size))


def _sample_tokens(sample: dict[str, Any], tokenizer: Any | None) -> np.ndarray:
    """Token ids of one MDS sample, whichever of the usual column layouts it uses."""
    for key in ("input_ids", "tokens"):
        if key in sample:
            value = sample[key]
            if isinstance(value, bytes):
                # llm-foundry's legacy layout: raw int64 bytes.
                return np.frombuffer(value, dtype=np.int64).copy()
            return np.asarray(value, dtype=np.int64).reshape(-1)
    if "text" in sample:
        if tokenizer is None:
            raise ValueError("Text MDS samples need a tokenizer to evaluate.")
        return np.asarray(tokenizer(sample["text"])["input_ids"], dtype=np.int64)
    raise ValueError(f"MDS sample has no token column (input_ids/tokens/text): {list(sample)}.")


def _shard_name(basename: Any, index_path: Path) -> str:
    """A shard file name from ``index.json``, refused unless it is a plain name in the folder.

    The name directs a write (a decompressed shard goes to our scratch folder under it), so a
    crafted index with ``../`` or an absolute path must not reach anywhere else.
    """
    if (
        not isinstance(basename, str)
        or not basename
        or basename in (".", "..")
        or PurePosixPath(basename).name != basename
        or PureWindowsPath(basename).name != basename
    ):
        raise ValueError(
            f"{index_path}: shard name {basename!r} is not a plain file name in the folder; "
            "the index is damaged or crafted (re-run `composer-shear tokenize`)."
        )
    return basename


def read_mds_token_samples(
    split_dir: str | Path,
    tokenizer: Any | None = None,
    max_samples: int | None = None,
) -> Iterator[np.ndarray]:
    """Yields the token ids of every sample of an MDS directory, in shard order.

    Reads the shards directly (no shared memory, no cache directory), so it is safe to call from
    a plain script or a test next to a running trainer. A remote ``split_dir``
    (``s3://bucket/data/<domain>/train``) is read through Streaming's downloader: the index,
    then each shard when it is reached, into a scratch folder removed afterwards.

    Args:
        split_dir: directory holding ``index.json`` and the shards (e.g. ``DATA/<domain>/eval``).
        tokenizer: only needed when samples store ``text`` instead of token ids.
        max_samples: stop after this many samples.
    """
    remote = str(split_dir).rstrip("/") if is_remote(split_dir) else None
    count = 0
    # Compressed shards are decompressed into a scratch directory, never next to the data.
    with tempfile.TemporaryDirectory(prefix="mds_raw_") as scratch:
        if remote is not None:
            split_dir = Path(scratch) / "downloaded"
            split_dir.mkdir()
            _download(remote, "index.json", split_dir)
        split_dir = Path(split_dir)
        index_path = split_dir / "index.json"
        if not index_path.exists():
            raise FileNotFoundError(f"No MDS index at {index_path}.")
        index = json.loads(index_path.read_text())
        raw_dir = Path(scratch) / "raw"
        raw_dir.mkdir()
        for info in index["shards"]:
            raw_name = _shard_name(info["raw_data"]["basename"], index_path)
            zip_info = info.get("zip_data")
            if remote is not None:
                stored = zip_info["basename"] if zip_info else raw_name
                _download(remote, _shard_name(stored, index_path), split_dir)
            dirname = split_dir
            if not (split_dir / raw_name).exists():
                if not zip_info:
                    raise FileNotFoundError(f"MDS shard {raw_name} missing.")
                data = (split_dir / _shard_name(zip_info["basename"], index_path)).read_bytes()
                dirname = raw_dir
                (dirname / raw_name).write_bytes(decompress(info["compression"], data))
            shard = reader_from_json(str(dirname), None, info)
            for i in range(shard.samples):
                if max_samples is not None and count >= max_samples:
                    return
                yield _sample_tokens(shard[i], tokenizer)
                count += 1
            if remote is not None:  # one shard on local disk at a time
                for name in {raw_name, zip_info["basename"] if zip_info else raw_name}:
                    (split_dir / name).unlink(missing_ok=True)
                (raw_dir / raw_name).unlink(missing_ok=True)


def _download(remote_dir: str, name: str, local_dir: Path) -> None:
    """Downloads ``remote_dir/name`` into ``local_dir`` with Streaming's own downloader."""
    CloudDownloader.direct_download(f"{remote_dir}/{name}", str(local_dir / name))
