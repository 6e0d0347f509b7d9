"""The ``multi_domain`` LLM Foundry dataloader: per-domain MDS shards mixed by live weights.

YAML (``train_loader`` or each entry of an ``eval_loader`` list)::

    train_loader:
      name: multi_domain
      dataset:
        local: DATA_DIR              # DATA_DIR/<domain>/train and DATA_DIR/<domain>/eval
        remote: null                 # optional, same layout
        split: train                 # 'eval': a finite single pass over the listed domains
        domains: [code, books, docs]
        proportion: [0.5, 0.3, 0.2]  # initial weights (train only; default uniform)
        max_seq_len: 2048
        shuffle: true
        shuffle_seed: 17
        mix_seed: 17                 # optional: seed of the per-rank domain draws
        verify_hashes: false         # optional: also check shard content hashes at build
      drop_last: true
      num_workers: 0                 # workers per *domain* reader; mixing stays in-process
                                     # (0 with local shards: read in the training thread)

At build time every local domain split is checked: shards listed in ``index.json`` exist, have
the recorded sizes and consistent headers (``verify_hashes`` also compares the content hashes
``composer-shear tokenize`` records, reading every byte); a bad shard is an error naming the
domain, the file and the fix.

Batches hold ``input_ids``, ``attention_mask``, ``labels`` (= ``input_ids``; Hugging Face
models shift them) and ``domain_idx`` (Composer's ``HuggingFaceModel`` passes only the
arguments the model's ``forward`` accepts, so the extra key never reaches the model).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from composer.core import DataSpec
from torch.utils.data import DataLoader

from composer_shear.data.descriptors import bound_open_files
from composer_shear.data.identity import check_split_tokenizer, read_split_meta, remote_split_meta
from composer_shear.data.mixer import MultiDomainDataset, split_path

__all__ = ["build_multi_domain_dataloader", "collate_multi_domain", "read_shard_format"]

log = logging.getLogger(__name__)

REQUIRED_KEYS = ("local", "domains", "max_seq_len")
DATASET_KEYS = {"local", "remote", "split", "domains", "proportion", "max_seq_len"}
DATASET_KEYS |= {"shuffle", "shuffle_seed"}
# Optional extras, passed through to the mixer or to each domain's StreamingDataset.
EXTRA_KEYS = {"mix_seed", "domain_batch_size", "verify_hashes"}
STREAMING_KEYS = {
    "predownload",
    "cache_limit",
    "download_retry",
    "download_timeout",
    "num_canonical_nodes",
    "shuffle_algo",
    "shuffle_block_size",
    "partition_algo",
}


def read_shard_format(split_dir: str | os.PathLike) -> dict[str, Any]:
    """Token dtype and sample length of one domain split, from its metadata or MDS index.

    Returns:
        ``{"dtype": str | None, "sample_len": int | None, "vocab_size": int | None,
        "num_samples": int}``.

    Raises:
        ValueError: No ``index.json`` (no shards) or no ``tokens`` column.
    """
    split_dir = Path(split_dir)
    index_path = split_dir / "index.json"
    if not index_path.is_file():
        raise ValueError(
            f"{split_dir} holds no MDS shards (no index.json); write them with "
            f"`composer-shear tokenize` or data_prep/tokenize_corpus.py"
        )
    with open(index_path, encoding="utf-8") as f:
        shards = json.load(f)["shards"]
    info: dict[str, Any] = {"dtype": None, "sample_len": None, "vocab_size": None}
    info["num_samples"] = sum(int(s.get("samples", 0)) for s in shards)
    if shards:
        names, encodings = shards[0]["column_names"], shards[0]["column_encodings"]
        if "tokens" not in names:
            raise ValueError(f"{split_dir}: shards have no 'tokens' column (columns: {names})")
        encoding = encodings[names.index("tokens")]
        # 'ndarray:<dtype>[:<shape>]' carries its dtype (and length when static).
        match = re.fullmatch(r"ndarray:(\w+)(?::(\d+))?", encoding)
        if match:
            info["dtype"] = match.group(1)
            info["sample_len"] = int(match.group(2)) if match.group(2) else None
    meta = read_split_meta(split_dir)
    if meta:
        info["dtype"] = info["dtype"] or meta.get("dtype")
        info["sample_len"] = info["sample_len"] or meta.get("max_seq_len")
        info["vocab_size"] = meta.get("vocab_size")
    return info


def _check_domain_split(
    split_dir: str, domain: str, max_seq_len: int, tokenizer: Any
) -> str | None:
    """Validates one local domain split against the config; returns its token dtype."""
    info = read_shard_format(split_dir)
    if info["num_samples"] == 0:
        raise ValueError(f"domain {domain!r}: {split_dir} has no samples")
    if info["sample_len"] is not None and max_seq_len > info["sample_len"]:
        raise ValueError(
            f"domain {domain!r}: max_seq_len={max_seq_len} is longer than the "
            f"{info['sample_len']}-token samples in {split_dir}; re-tokenize with a larger "
            f"--max-seq-len or lower max_seq_len"
        )
    dtype = info["dtype"]
    if tokenizer is not None:
        vocab = len(tokenizer)
        if dtype is not None and vocab - 1 > np.iinfo(np.dtype(dtype)).max:
            raise ValueError(
                f"domain {domain!r}: shards store tokens as {dtype}, too small for the "
                f"tokenizer's {vocab:,} tokens; re-tokenize with this tokenizer"
            )
        if info["vocab_size"] is not None and info["vocab_size"] > vocab:
            raise ValueError(
                f"domain {domain!r}: shards were tokenized with a {info['vocab_size']:,}-token "
                f"vocabulary but the tokenizer has {vocab:,}; re-tokenize with this tokenizer"
            )
    return dtype


def _validate_proportion(proportion: Any, domains: Sequence[str]) -> list[float]:
    if isinstance(proportion, (str, bytes)) or not isinstance(proportion, Sequence):
        raise ValueError(f"proportion must be a list of numbers, got {proportion!r}")
    values = [float(p) for p in proportion]
    if len(values) != len(domains):
        raise ValueError(
            f"proportion has {len(values)} entries but there are {len(domains)} domains "
            f"{list(domains)}"
        )
    if any(p < 0 or not np.isfinite(p) for p in values):
        raise ValueError(f"proportion must be non-negative, got {values}")
    if abs(sum(values) - 1.0) > 1e-6:
        raise ValueError(f"proportion must sum to 1 (within 1e-6), got {sum(values):.8f}")
    return values


def collate_multi_domain(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stacks mixer samples into a causal-LM batch with ``domain_idx``."""
    input_ids = torch.stack([s["input_ids"] for s in samples])
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": input_ids.clone(),
        "domain_idx": torch.tensor([s["domain_idx"] for s in samples], dtype=torch.long),
    }


def build_multi_domain_dataloader(
    tokenizer: Any,
    device_batch_size: int | float,
    dataset: Mapping[str, Any],
    drop_last: bool = True,
    num_workers: int = 0,
    pin_memory: bool = False,
    prefetch_factor: int | None = None,
    persistent_workers: bool = False,
    timeout: float = 0,
    **kwargs: Any,
) -> DataSpec:
    """Builds the ``multi_domain`` loader (registered in ``llmfoundry_dataloaders``).

    Args:
        tokenizer: The model's tokenizer (checks that token ids fit the shards' dtype).
        device_batch_size: Samples per batch on this rank.
        dataset: The ``dataset:`` block (see the module docstring for keys).
        drop_last: Drop a last partial batch (eval loaders should set ``false``).
        num_workers: DataLoader workers *per domain reader*; the mixing itself always runs
            in the training process so that weight changes and resumption are exact.
        pin_memory: Pin batches.
        prefetch_factor: Per-domain reader prefetch (only with ``num_workers > 0``).
        persistent_workers: Accepted for compatibility; domain readers restart each pass.
        timeout: Accepted for compatibility (the loader runs in-process).
        **kwargs: Rejected (unknown loader keys are a config error).

    Returns:
        A ``DataSpec`` whose ``dataloader.dataset`` is the :class:`MultiDomainDataset`.

    Raises:
        ValueError: Any config error, with the offending key named.
    """
    if kwargs:
        raise ValueError(
            f"multi_domain: unknown loader key(s) {sorted(kwargs)}; allowed: dataset, "
            "drop_last, num_workers, pin_memory, prefetch_factor, persistent_workers, timeout"
        )
    if isinstance(device_batch_size, float) and not device_batch_size.is_integer():
        raise ValueError(
            f"multi_domain: device_batch_size must be an integer, got {device_batch_size}"
        )
    batch_size = int(device_batch_size)
    cfg = dict(dataset)
    unknown = set(cfg) - DATASET_KEYS - EXTRA_KEYS - STREAMING_KEYS
    if unknown:
        allowed = sorted(DATASET_KEYS | EXTRA_KEYS | STREAMING_KEYS)
        raise ValueError(
            f"multi_domain: unknown dataset key(s) {sorted(unknown)}; allowed: {allowed}"
        )
    missing = [k for k in REQUIRED_KEYS if cfg.get(k) is None]
    if missing:
        raise ValueError(f"multi_domain: dataset needs {missing}")
    domains = cfg["domains"]
    if isinstance(domains, str) or not isinstance(domains, Sequence) or not domains:
        raise ValueError(f"multi_domain: domains must be a non-empty list, got {domains!r}")
    domains = [str(d) for d in domains]
    if len(set(domains)) != len(domains):
        raise ValueError(f"multi_domain: duplicate domains in {domains}")
    split = str(cfg.get("split", "train"))
    max_seq_len = int(cfg["max_seq_len"])
    if max_seq_len < 1:
        raise ValueError(f"multi_domain: max_seq_len must be positive, got {max_seq_len}")
    proportion = cfg.get("proportion")
    if proportion is not None:
        proportion = _validate_proportion(proportion, domains)
        if split != "train":
            log.warning("multi_domain: proportion is ignored for split %r (single pass)", split)
    local, remote = str(cfg["local"]), cfg.get("remote")

    verify_hashes = bool(cfg.get("verify_hashes", False))
    bound_open_files()
    dtypes = set()
    if remote is None:  # with a remote the shards arrive later; Streaming checks them then
        for d in domains:
            dtypes.add(_check_domain_split(split_path(local, d, split), d, max_seq_len, tokenizer))
    for d in domains:
        # The tokenizer that wrote the shards: from the remote's own record when there is one
        # (the local cache may still be empty), fetched before any shard.
        where = split_path(remote if remote is not None else local, d, split)
        meta = remote_split_meta(where) if remote is not None else read_split_meta(where)
        check_split_tokenizer(meta, tokenizer, f"multi_domain: domain {d!r} ({where})")
    token_dtype = next(iter(dtypes)) if len(dtypes) == 1 else None

    mixer = MultiDomainDataset(
        domains=domains,
        local=local,
        remote=remote,
        split=split,
        proportion=proportion,
        max_seq_len=max_seq_len,
        shuffle=bool(cfg.get("shuffle", split == "train")),
        shuffle_seed=int(cfg.get("shuffle_seed", 17)),
        mix_seed=cfg.get("mix_seed"),
        num_workers=num_workers,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        domain_batch_size=int(cfg.get("domain_batch_size", max(batch_size, 1))),
        token_dtype=token_dtype,
        verify_hashes=verify_hashes,
        streaming_kwargs={k: v for k, v in cfg.items() if k in STREAMING_KEYS},
    )
    if persistent_workers and num_workers > 0:
        log.info("multi_domain: domain readers restart their workers at each pass")
    del timeout  # the outer loader runs in-process; domain readers have no blocking waits
    # No workers here: the mixture must be drawn in the process that trains on it.
    loader = DataLoader(
        mixer,
        batch_size=batch_size,
        collate_fn=collate_multi_domain,
        drop_last=drop_last,
        num_workers=0,
        pin_memory=pin_memory,
    )
    from llmfoundry.data.utils import get_tokens_per_batch_func

    return DataSpec(dataloader=loader, get_num_tokens_in_batch=get_tokens_per_batch_func())
