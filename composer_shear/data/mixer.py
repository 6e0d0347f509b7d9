"""A live mixture of per-domain Streaming datasets (dynamic batch loading's data side).

Why not one ``StreamingDataset`` with ``streams``: its stream proportions decide the epoch
partition when the epoch starts and cannot change afterwards. Dynamic batch loading changes
the mixture every few hundred steps, so this module keeps one ``StreamingDataset`` per domain
and decides the domain of every sample itself, from the *current* weights.

Independent draws on every rank: the domain of sample position ``j`` on a rank is the
inverse CDF of the current weights at a uniform number that depends on ``(mix_seed, rank,
j)``. Every sequence of a global batch is therefore an independent draw from the weights (with
the same draw on every rank, 32 sequences on 8 GPUs would be only 4 independent draws). Every
rank holds the same weights (the callback broadcasts rank 0's), applied at the same position,
since every rank draws the same number of samples per batch.

Passes: each rank reads its own part of every domain's epoch partition (Streaming's partition
and shuffle for pass ``e``, computed in the rank without cross-rank barriers), in order; a rank
that has used up its part starts its next pass of that domain on its own. Within a pass no
sample repeats on a rank, and no two ranks share a sample.

Resumption: Composer saves the train dataset state of rank 0 only, but ranks consume domains
at different rates. Rather than gathering every rank's counters at save time (a collective
inside ``state_dict``, which Composer may call on one rank only), the state records the
weight history (the weights in force from each position on): with it, every rank *replays*
its own draws from its own ``(seed, rank)`` stream up to the saved position and recovers its
per-domain pass and offset exactly (vectorised: a million draws take well under a second).
Rank 0's own counters are saved as well and checked against its replay on load. The replay
starts from a *base* (position 0, or the point where a state of another world size or an older
state version was loaded), so it never needs draws that were made under other rules.

Exactness: the draw happens in the process that consumes the samples (the main process; the
outer DataLoader must not use workers), so a weight change takes effect at the next draw and
the state saved in a checkpoint is the state of the last sample trained on. The order of
samples *within* a domain does not depend on the weights, so each domain may be read by its
own DataLoader with worker processes (``num_workers``): they fetch the same sample ids, in
the same order, as the in-process reader.

Shards are read with ``StreamingDataset.get_item``, which downloads a missing shard from the
``remote`` when it is first needed; Streaming's own per-epoch download and ready threads are
not used for training (with a remote, ``num_workers > 0`` overlaps downloads with training).
Evaluation splits are single passes read through Streaming's usual epoch machinery.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from streaming import StreamingDataset
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from composer_shear.data.descriptors import (
    bound_open_files,
    patch_streaming_prefix_probe,
    release_on_collect,
)
from composer_shear.data.verify import verify_split

__all__ = ["MultiDomainDataset", "ShardReadError", "find_multi_domain_dataset", "split_path"]

log = logging.getLogger(__name__)

STATE_VERSION = 2
_BLOCK = 4096  # uniforms generated per RNG call; draw j uses block j // _BLOCK
# Streaming settings that fix a domain's epoch partition and shuffle (saved, restored).
_PARTITION_KEYS = ("num_canonical_nodes", "shuffle_seed", "shuffle_block_size")


class ShardReadError(RuntimeError):
    """A sample could not be read from a domain's shards (the message names the file)."""


def split_path(root: str | None, domain: str, split: str) -> str | None:
    """``root/<domain>/<split>`` for a local folder or a remote URL (``None`` stays ``None``)."""
    if root is None:
        return None
    if "://" in root:
        return f"{root.rstrip('/')}/{domain}/{split}"
    return os.path.join(root, domain, split)


def _world_size() -> int:
    """World size as Streaming sees it (torch.distributed, else the launcher's env vars)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", 1))


class _DomainDataset(StreamingDataset):
    """One domain's shards; yields ``input_ids`` as an int64 tensor of ``max_seq_len``."""

    def __init__(
        self, *, domain: str, max_seq_len: int, token_dtype: str | None = None, **kwargs: Any
    ):
        patch_streaming_prefix_probe()  # before Streaming picks this dataset's prefix
        super().__init__(**kwargs)
        release_on_collect(self)
        self.domain = domain
        self.max_seq_len = max_seq_len
        self.token_dtype = token_dtype
        self._pass: tuple[int, np.ndarray] | None = None  # (epoch, this rank's sample ids)
        self._pass_size: int | None = None

    def __getitem__(self, idx: int) -> torch.Tensor:  # type: ignore[override]
        return self.read(int(idx))

    def read(self, idx: int) -> torch.Tensor:
        """Sample ``idx`` as a tensor; a damaged shard raises :class:`ShardReadError`."""
        try:
            sample = self.get_item(idx)
        except Exception as e:
            raise ShardReadError(self._read_error(idx, e)) from e
        return self._to_tensor(sample)

    def _read_error(self, idx: int, error: Exception) -> str:
        where = "its shards"
        try:
            shard_id, _ = self.spanner[idx]
            shard = self.shards[shard_id]
            raw, zipped = shard.file_pairs[0]
            info = raw or zipped
            where = os.path.join(shard.dirname, shard.split or "", info.basename)
        except Exception:  # the message must not fail on a half-built reader
            pass
        return (
            f"domain {self.domain!r}: cannot read sample {idx} from {where} "
            f"({type(error).__name__}: {error}). The shard is corrupt or was rewritten after "
            "the index; re-run `composer-shear tokenize ... --overwrite` for this corpus."
        )

    def _to_tensor(self, sample: dict[str, Any]) -> torch.Tensor:
        tokens = sample["tokens"]
        if isinstance(tokens, bytes):  # LLM Foundry's older `bytes` encoding
            tokens = np.frombuffer(tokens, dtype=self.token_dtype or "int64")
        return torch.from_numpy(tokens[: self.max_seq_len].astype(np.int64))

    # -------------------------------------------------------------- passes of the train mixture

    def partition_state(self) -> dict[str, Any]:
        """The settings that fix every pass's partition and shuffle (for a checkpoint)."""
        self._settle_partition()
        state = {key: getattr(self, key) for key in _PARTITION_KEYS}
        state["initial_physical_nodes"] = (
            self.initial_physical_nodes or self._parallel_rank_world.num_nodes
        )
        return state

    def load_partition_state(self, state: dict[str, Any]) -> None:
        """Restores :meth:`partition_state` (unknown or missing keys are ignored)."""
        for key in (*_PARTITION_KEYS, "initial_physical_nodes"):
            if state.get(key) is not None:
                setattr(self, key, state[key])
        self._pass = None
        self._pass_size = None

    def _settle_partition(self) -> None:
        # Streaming fills these in at the first iteration; the train passes need them earlier.
        if not self.num_canonical_nodes:
            nodes = self._parallel_rank_world.num_nodes
            per_node = 64 if self.shuffle_algo in ("py1s", "py2s") else 1
            self.num_canonical_nodes = per_node * nodes
        if self.shuffle_block_size is None:
            self.shuffle_block_size = max(4_000_000 // self.num_canonical_nodes, 1 << 18)

    def rank_pass(self, epoch: int) -> np.ndarray:
        """This rank's sample ids of pass ``epoch``, in reading order (padding removed).

        Streaming's own partition and shuffle of that epoch (as ``__iter__`` without workers
        would read it), computed here without the node-wide barrier of ``__iter__``: ranks
        start their passes of a domain at different times.
        """
        if self._pass is not None and self._pass[0] == epoch:
            return self._pass[1]
        from streaming.base.batching import generate_work

        self._settle_partition()
        world = self._parallel_rank_world
        work = generate_work(self.batching_method, self, world, epoch, 0)
        ids = work[world.node, world.rank_of_node].reshape(-1)
        ids = ids[ids != -1]
        if self._pass_size is None:
            self._pass_size = len(ids)
        elif len(ids) != self._pass_size:  # one stream, no resampling: never expected
            raise RuntimeError(
                f"domain {self.domain!r}: pass {epoch} has {len(ids)} samples on this rank, "
                f"earlier passes {self._pass_size}"
            )
        self._pass = (epoch, ids)
        return ids

    def pass_size(self) -> int:
        """Samples per pass on this rank (the same for every pass)."""
        if self._pass_size is None:
            self.rank_pass(0)
        assert self._pass_size is not None
        return self._pass_size

    # -------------------------------------------------------------- single passes (eval)

    def iter_in_process(self) -> Iterator[torch.Tensor]:
        """This rank's samples of the next epoch, read in the calling thread, no helper threads.

        The same samples in the same order as :meth:`__iter__` without DataLoader workers:
        the same epoch bookkeeping (``_resume_incr_epoch``), the same partition and shuffle
        (``_get_work``), the same skipping of padding ids. What it leaves out is Streaming's
        per-epoch download and ready threads, which poll every few milliseconds and take a
        file lock per sample; with all shards local they have nothing to do but compete with
        the training process for the GIL.
        """
        if hasattr(self, "_iterator"):  # threads of an earlier ``__iter__`` epoch
            self._iterator.exit()
        self._unique_worker_world = self._unique_rank_world.detect_workers()
        self._parallel_worker_world = self._parallel_rank_world.detect_workers()
        epoch, sample_in_epoch = self._resume_incr_epoch()
        sample_ids = self._get_work(epoch, sample_in_epoch)
        sample_ids = sample_ids[sample_ids != -1].tolist()
        get_item, to_tensor = self.get_item, self._to_tensor
        for sample_id in sample_ids:
            yield to_tensor(get_item(sample_id))


def _read_in_chunks(read: Any, ids: np.ndarray, chunk: int = 4096) -> Iterator[torch.Tensor]:
    # Python ints in chunks: a whole pass of a large domain as a list would cost gigabytes.
    for start in range(0, len(ids), chunk):
        for idx in ids[start : start + chunk].tolist():
            yield read(idx)


class _ById(Dataset):
    """Map-style view of a domain dataset, for DataLoader workers that fetch given sample ids."""

    def __init__(self, dataset: _DomainDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return self.dataset.num_samples

    def __getitem__(self, idx: int) -> torch.Tensor:
        return self.dataset[int(idx)]


def _validate_weights(weights: Sequence[float], k: int) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.shape[0] != k:
        raise ValueError(f"expected {k} weights (one per domain), got {w.shape[0]}")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError(f"weights must be finite and non-negative, got {w.tolist()}")
    if abs(w.sum() - 1.0) > 1e-6:
        raise ValueError(f"weights must sum to 1 (within 1e-6), got sum {w.sum():.8f}")
    return w / w.sum()


def _make_cdf(w: np.ndarray) -> np.ndarray:
    cdf = np.cumsum(w)
    return cdf / cdf[-1]


@dataclass
class _Base:
    """Where replays start: a position and the per-domain state there (equal on every rank)."""

    position: int
    epochs: list[int]
    consumed: list[int]
    counts: list[int]

    def to_json(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "epochs": list(self.epochs),
            "consumed": list(self.consumed),
            "counts": list(self.counts),
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> _Base:
        return cls(
            int(obj["position"]),
            [int(x) for x in obj["epochs"]],
            [int(x) for x in obj["consumed"]],
            [int(x) for x in obj["counts"]],
        )


class MultiDomainDataset(IterableDataset):
    """Samples from one ``StreamingDataset`` per domain, mixed by live weights.

    ``split='train'`` is an endless stream: each sample's domain is drawn from the current
    :attr:`weights`, independently on every rank; a domain whose part of the current pass is
    used up on this rank starts a new pass (a new Streaming epoch, newly shuffled), so no sample
    repeats within a pass. Any other split is a finite single pass over the domains, one
    after the other (for per-domain evaluation).

    Composer finds this object as ``train_dataloader.dataset`` and calls
    :meth:`state_dict` / :meth:`load_state_dict` itself at checkpoint save / load.

    Args:
        domains: Domain names; the shards of domain ``d`` live in ``local/<d>/<split>``.
        local: Local root (the data, or the cache for ``remote``).
        remote: Optional remote root with the same layout.
        split: ``'train'`` (mixed, endless) or e.g. ``'eval'`` (single pass).
        proportion: Initial weights (train); default uniform.
        max_seq_len: Tokens per sample (a prefix of each stored sample).
        shuffle: Shuffle within each domain.
        shuffle_seed: Seed of Streaming's shuffle.
        mix_seed: Seed of the domain draws; default ``shuffle_seed``.
        num_workers: DataLoader workers per domain (0 reads in the main process).
        prefetch_factor: Per-domain DataLoader prefetch factor (``num_workers > 0`` only).
        domain_batch_size: Chunk size in which domain readers hand samples to the mixer
            (Streaming's ``batch_size``: it also shapes the epoch partition).
        token_dtype: Dtype of ``bytes``-encoded token columns (``ndarray`` columns know theirs).
        verify_hashes: Also compare local shards' content hashes with their index (every
            local shard's size and header are always checked; see
            :func:`~composer_shear.data.verify.verify_split`).
        streaming_kwargs: Extra ``StreamingDataset`` arguments (``cache_limit``,
            ``num_canonical_nodes``, ``shuffle_algo`` ...).
    """

    def __init__(
        self,
        domains: Sequence[str],
        local: str,
        remote: str | None = None,
        split: str = "train",
        proportion: Sequence[float] | None = None,
        max_seq_len: int = 2048,
        shuffle: bool = True,
        shuffle_seed: int = 17,
        mix_seed: int | None = None,
        num_workers: int = 0,
        prefetch_factor: int | None = None,
        domain_batch_size: int = 64,
        token_dtype: str | None = None,
        verify_hashes: bool = False,
        streaming_kwargs: dict[str, Any] | None = None,
    ):
        super().__init__()
        if not domains:
            raise ValueError("at least one domain is required")
        if len(set(domains)) != len(domains):
            raise ValueError(f"domains must be unique, got {list(domains)}")
        self._domains = list(domains)
        # The data folders, as given: each domain reads ``<local>/<domain>/<split>`` (streamed
        # from ``<remote>/<domain>/<split>`` when a remote is set).
        self.local = local
        self.remote = remote
        self.split = split
        self.is_train = split == "train"
        self.max_seq_len = int(max_seq_len)
        self.mix_seed = int(shuffle_seed if mix_seed is None else mix_seed)
        if self.mix_seed < 0:
            raise ValueError(f"mix_seed must be non-negative, got {self.mix_seed}")
        self.num_workers = int(num_workers)
        self.prefetch_factor = prefetch_factor
        self.domain_batch_size = int(domain_batch_size)
        k = len(self._domains)
        weights = np.full(k, 1.0 / k) if proportion is None else proportion
        self._initial_weights = _validate_weights(weights, k)

        bound_open_files()
        if remote is None:  # with a remote the shards arrive later, checked by Streaming
            for d in self._domains:
                verify_split(split_path(local, d, split), d, hashes=verify_hashes)
        self.datasets = [
            _DomainDataset(
                domain=d,
                local=split_path(local, d, split),
                remote=split_path(remote, d, split),
                shuffle=shuffle,
                shuffle_seed=shuffle_seed,
                batch_size=self.domain_batch_size,
                max_seq_len=self.max_seq_len,
                token_dtype=token_dtype,
                **(streaming_kwargs or {}),
            )
            for d in self._domains
        ]
        # Eval passes read local shards in this thread; a remote keeps Streaming's threads.
        self._all_local = remote is None and all(
            hasattr(ds, "_resume_incr_epoch") and hasattr(ds, "_get_work") for ds in self.datasets
        )
        # Replicated ranks (Streaming's `replication`) must draw alike: use Streaming's rank.
        self._draw_rank = int(self.datasets[0]._parallel_rank_world.rank)
        self._reset(_Base(0, [0] * k, [0] * k, [0] * k), [(0, self._initial_weights.copy())])

    def _reset(self, base: _Base, weight_log: list[tuple[int, np.ndarray]]) -> None:
        """Puts the mixer at ``base`` with the weights of ``weight_log`` (no pending changes)."""
        k = len(self._domains)
        self._base = base
        self._position = base.position
        self._resumed_position = base.position
        # Plain lists: numpy scalar updates would cost more than the rest of a draw.
        self._counts = list(base.counts)
        self._epochs = list(base.epochs)  # current pass of each domain, on this rank
        self._consumed = list(base.consumed)  # samples taken from the current pass
        self._iters: list[Iterator[torch.Tensor] | None] = [None] * k
        # (position, weights) in force from that position on; the first entry is the base's.
        self._weight_log = [(int(p), np.asarray(w, dtype=np.float64)) for p, w in weight_log]
        self._pending: list[tuple[int, np.ndarray]] = []  # scheduled by a rewound state
        self._weights = self._weight_log[-1][1]
        self._cdf = _make_cdf(self._weights)
        self._block_id = -1
        self._block = np.empty(0)
        self._block_domains: list[int] = []  # draws of the cached block under current weights

    # ------------------------------------------------------------------ public interface

    @property
    def domains(self) -> list[str]:
        """Domain names, in the order of :attr:`weights`."""
        return list(self._domains)

    @property
    def weights(self) -> np.ndarray:
        """Current mixture weights (sum to 1)."""
        return self._weights.copy()

    @property
    def initial_weights(self) -> np.ndarray:
        """Weights the dataset was built with (``proportion``)."""
        return self._initial_weights.copy()

    @property
    def domain_counts(self) -> np.ndarray:
        """Samples drawn per domain on this rank so far (cumulative over passes and resumes)."""
        return np.asarray(self._counts, dtype=np.int64)

    @property
    def position(self) -> int:
        """Samples drawn on this rank so far."""
        return self._position

    @property
    def domain_epochs(self) -> np.ndarray:
        """Index of this rank's current pass over each domain (0 = first pass)."""
        return np.asarray(self._epochs, dtype=np.int64)

    def set_weights(self, weights: Sequence[float]) -> None:
        """Replaces the mixture weights; the next drawn sample uses them.

        Every rank must call this at the same position with the same weights (the dynamic
        batch loading callback does): a resumed rank replays its draws from that history.

        Args:
            weights: One non-negative weight per domain, summing to 1 within 1e-6
                (renormalised exactly).

        Raises:
            ValueError: Wrong length, negative or non-finite values, or a sum off 1.
        """
        w = _validate_weights(weights, len(self._domains))
        self._pending.clear()
        self._apply_weights(w)

    def __len__(self) -> int:
        """Samples per rank of one pass (eval splits only; the train mixture is endless)."""
        if self.is_train:
            raise TypeError("the train mixture is endless and has no length")
        return sum(len(ds) for ds in self.datasets)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if get_worker_info() is not None:
            raise RuntimeError(
                "MultiDomainDataset must be iterated in the main process (the mixture is "
                "drawn there); give the outer DataLoader num_workers=0 and set num_workers "
                "on the dataset instead"
            )
        if not self.is_train:
            return self._iter_single_pass()
        return self._iter_mixture()

    # ------------------------------------------------------------------ drawing

    def _apply_weights(self, w: np.ndarray) -> None:
        self._weights = w
        self._cdf = _make_cdf(w)
        self._block_domains = []  # recomputed from the new weights at the next draw
        if self._weight_log[-1][0] == self._position:
            self._weight_log[-1] = (self._position, w.copy())
        else:
            self._weight_log.append((self._position, w.copy()))

    def _uniforms(self, block_id: int) -> np.ndarray:
        """The uniforms of positions ``block_id * _BLOCK ...`` on this rank.

        The entropy ``[mix_seed, rank, block]`` differs for every (rank, block), so every block
        of every rank is its own stream. (NumPy's SeedSequence ignores trailing zeros, so rank
        0's first block equals the rank-independent stream of earlier versions; no two
        (rank, block) pairs collide.)
        """
        return np.random.default_rng([self.mix_seed, self._draw_rank, block_id]).random(_BLOCK)

    def draw_domain(self, j: int) -> int:
        """The domain drawn at this rank's position ``j`` under the current weights."""
        block_id = j // _BLOCK
        if block_id != self._block_id:
            self._block = self._uniforms(block_id)
            self._block_id = block_id
            self._block_domains = []
        if not self._block_domains:
            # Vectorised inverse CDF for the whole block; the per-sample path is a list lookup.
            drawn = np.searchsorted(self._cdf, self._block, side="right")
            self._block_domains = np.minimum(drawn, len(self._domains) - 1).tolist()
        return self._block_domains[j % _BLOCK]

    def _draw_counts(
        self, start: int, stop: int, weight_log: list[tuple[int, np.ndarray]]
    ) -> np.ndarray:
        """Per-domain counts of this rank's draws at positions ``start .. stop - 1``.

        ``weight_log[i]`` holds from its position up to the next entry's; the draws are the
        ones :meth:`draw_domain` makes (same uniforms, same inverse CDF).
        """
        k = len(self._domains)
        counts = np.zeros(k, dtype=np.int64)
        if stop <= start:
            return counts
        starts = [p for p, _ in weight_log]
        cdfs = [_make_cdf(w) for _, w in weight_log]
        ends = [*starts[1:], stop]
        for block_id in range(start // _BLOCK, (stop - 1) // _BLOCK + 1):
            lo, hi = max(start, block_id * _BLOCK), min(stop, (block_id + 1) * _BLOCK)
            uniforms = None
            for seg_start, seg_end, cdf in zip(starts, ends, cdfs, strict=True):
                a, b = max(lo, seg_start), min(hi, seg_end)
                if a >= b:
                    continue
                if uniforms is None:
                    uniforms = self._uniforms(block_id)
                offset = block_id * _BLOCK
                drawn = np.searchsorted(cdf, uniforms[a - offset : b - offset], side="right")
                counts += np.bincount(np.minimum(drawn, k - 1), minlength=k)
        return counts

    def _replay(
        self, position: int, weight_log: list[tuple[int, np.ndarray]]
    ) -> tuple[list[int], list[int], list[int]]:
        """This rank's (pass, offset in pass, cumulative count) per domain at ``position``."""
        base = self._base
        drawn = self._draw_counts(base.position, position, weight_log)
        epochs, consumed = list(base.epochs), list(base.consumed)
        counts = [c + int(n) for c, n in zip(base.counts, drawn, strict=True)]
        for d, n in enumerate(drawn.tolist()):
            if n == 0:
                continue
            size = self.datasets[d].pass_size()
            if size == 0:
                raise RuntimeError(f"domain {self._domains[d]!r} yields no samples on this rank")
            taken = consumed[d] + n
            # A pass used up exactly stays "full" until the next draw opens the next pass,
            # as in the live reader.
            skip = (taken - 1) // size
            epochs[d] += skip
            consumed[d] = taken - skip * size
        return epochs, consumed, counts

    # ------------------------------------------------------------------ reading

    def _read_pass(self, d: int) -> Iterator[torch.Tensor]:
        """The rest of this rank's current pass over domain ``d``."""
        ds = self.datasets[d]
        ids = ds.rank_pass(self._epochs[d])[self._consumed[d] :]
        if self.num_workers == 0:
            return _read_in_chunks(ds.read, ids)
        loader = DataLoader(
            _ById(ds),
            batch_size=self.domain_batch_size,
            sampler=ids,
            num_workers=self.num_workers,
            prefetch_factor=self.prefetch_factor,
            persistent_workers=False,
            drop_last=False,
        )
        return (row for batch in loader for row in batch)

    def _open_single_pass(self, d: int) -> Iterator[torch.Tensor]:
        ds = self.datasets[d]
        if self.num_workers == 0:
            # Local shards: read in this thread. Remote: Streaming's threads download ahead.
            return ds.iter_in_process() if self._all_local else iter(ds)
        loader = DataLoader(
            ds,
            batch_size=self.domain_batch_size,
            num_workers=self.num_workers,
            prefetch_factor=self.prefetch_factor,
            persistent_workers=False,
            drop_last=False,
        )
        return (row for batch in loader for row in batch)

    def _next_of(self, d: int) -> torch.Tensor:
        """Next sample of domain ``d``, starting a new pass when the current one is done."""
        for _ in range(2):
            it = self._iters[d]
            if it is None:
                it = self._iters[d] = self._read_pass(d)
            try:
                return next(it)
            except StopIteration:
                if self._consumed[d] == 0:
                    break  # a fresh pass gave nothing: the domain is empty on this rank
                log.info(
                    "domain %r: pass %d finished after %d samples on this rank; starting pass %d",
                    self._domains[d],
                    self._epochs[d],
                    self._consumed[d],
                    self._epochs[d] + 1,
                )
                self._epochs[d] += 1
                self._consumed[d] = 0
                self._iters[d] = None
        raise RuntimeError(f"domain {self._domains[d]!r} yields no samples on this rank")

    def _iter_mixture(self) -> Iterator[dict[str, Any]]:
        # State lives on the object, so a new iterator continues where the last one stopped.
        while True:
            j = self._position
            while self._pending and self._pending[0][0] <= j:
                self._apply_weights(self._pending.pop(0)[1])
            d = self.draw_domain(j)
            sample = self._next_of(d)
            self._consumed[d] += 1
            self._counts[d] += 1
            self._position = j + 1
            yield {"input_ids": sample, "domain_idx": d}

    def _iter_single_pass(self) -> Iterator[dict[str, Any]]:
        for d in range(len(self._domains)):
            for sample in self._open_single_pass(d):
                yield {"input_ids": sample, "domain_idx": d}

    # ------------------------------------------------------------------ resumption

    def state_dict(self, num_samples: int | None = None, from_beginning: bool = True) -> dict:
        """The mixer state after ``num_samples`` samples (Composer's global sample count).

        Composer passes ``timestamp.sample_in_epoch``: samples over *all* ranks since the
        start of the (endless) epoch, so the per-rank position is ``num_samples //
        world_size``. When that is behind what this object has drawn (samples fetched but not
        trained on), the state is the one at that position (weight changes made after it
        become pending changes).

        Args:
            num_samples: Global samples consumed; ``None`` means everything drawn so far.
            from_beginning: ``False`` counts ``num_samples`` from where this run resumed.

        Returns:
            A JSON-friendly dict: position, weight history, replay base, this rank's
            per-domain passes and counts, and each domain's partition settings.
        """
        if not self.is_train:
            return {"version": STATE_VERSION, "split": self.split}
        world = _world_size()
        target = self._position
        if num_samples is not None:
            target = int(num_samples) // world
            if not from_beginning:
                target += self._resumed_position
        if not self._base.position <= target <= self._position:
            log.warning(
                "state_dict(num_samples=%s): position %d is outside this run's draws (%d to "
                "%d); saving the current state",
                num_samples,
                target,
                self._base.position,
                self._position,
            )
            target = self._position
        in_force = [(p, w) for p, w in self._weight_log if p <= target]
        later = [(p, w) for p, w in self._weight_log if p > target] + self._pending
        if target == self._position:
            epochs, consumed, counts = list(self._epochs), list(self._consumed), list(self._counts)
        else:
            epochs, consumed, counts = self._replay(target, in_force)
        return {
            "version": STATE_VERSION,
            "domains": self.domains,
            "mix_seed": self.mix_seed,
            "world_size": world,
            "position": int(target),
            "weights": in_force[-1][1].tolist(),
            "initial_weights": self._initial_weights.tolist(),
            "weight_log": [[int(p), w.tolist()] for p, w in in_force],
            "pending_weights": [[int(p), np.asarray(w).tolist()] for p, w in later],
            "base": self._base.to_json(),
            "saved_by_rank": self._draw_rank,
            "domain_epochs": [int(e) for e in epochs],
            "domain_consumed": [int(c) for c in consumed],
            "domain_counts": [int(c) for c in counts],
            "streaming": [ds.partition_state() for ds in self.datasets],
        }

    def load_state_dict(self, obj: dict[str, Any]) -> None:
        """Restores :meth:`state_dict` output; the next draw continues the saved run exactly.

        Any rank may load the state another rank saved: each replays its own draws.

        Raises:
            ValueError: The state belongs to other domains or an unknown version.
            RuntimeError: Replaying the saving rank's draws does not give its saved counters.
        """
        if not self.is_train or obj is None:
            return
        version = obj.get("version")
        if version == 1:
            obj = _upgrade_v1(obj)
        elif version != STATE_VERSION:
            raise ValueError(f"unsupported MultiDomainDataset state version {version}")
        if list(obj["domains"]) != self._domains:
            raise ValueError(
                f"checkpoint domains {obj['domains']} differ from the configured {self._domains}"
            )
        self.mix_seed = int(obj["mix_seed"])
        self._initial_weights = np.asarray(obj["initial_weights"], dtype=np.float64)
        for ds, state in zip(self.datasets, obj["streaming"], strict=True):
            ds.load_partition_state(state)
        position = int(obj["position"])
        weight_log = [(int(p), np.asarray(w, dtype=np.float64)) for p, w in obj["weight_log"]]
        pending = [(int(p), np.asarray(w, dtype=np.float64)) for p, w in obj["pending_weights"]]
        base = _Base.from_json(obj["base"])
        world, saved_world = _world_size(), int(obj["world_size"])
        if saved_world != world:
            # Other ranks, other partitions: the per-rank passes of the saved run do not map
            # onto this one. Keep the mixture (weights, schedule, global sample count) and let
            # every domain start a fresh pass on every rank.
            log.warning(
                "resuming a %d-rank data state on %d ranks: the mixture and sample count carry "
                "over, every domain starts a new pass",
                saved_world,
                world,
            )
            position = position * saved_world // world
            pending = [(p * saved_world // world, w) for p, w in pending]
            base = _Base(
                position,
                [int(e) + 1 for e in obj["domain_epochs"]],
                [0] * len(self._domains),
                [int(c) for c in obj["domain_counts"]],
            )
            weight_log = [(position, weight_log[-1][1])]
        self._reset(base, weight_log)
        epochs, consumed, counts = self._replay(position, weight_log)
        if saved_world == world and obj.get("saved_by_rank") == self._draw_rank:
            expected = (obj["domain_epochs"], obj["domain_consumed"], obj["domain_counts"])
            if (epochs, consumed, counts) != tuple([int(x) for x in v] for v in expected):
                raise RuntimeError(
                    "MultiDomainDataset: replaying the saved weight history does not give the "
                    f"saved per-domain state (replayed passes {epochs}, offsets {consumed}, "
                    f"counts {counts}; saved {list(expected)}). The checkpoint's data state is "
                    "inconsistent (mix_seed, domains or weights changed?)."
                )
        self._position = self._resumed_position = position
        self._epochs, self._consumed, self._counts = epochs, consumed, counts
        self._pending = pending


def _upgrade_v1(obj: dict[str, Any]) -> dict[str, Any]:
    """A version-1 state (every rank drew alike) as a version-2 state based at its position.

    Version 1 kept one per-domain pass and offset, the same on every rank; that becomes the
    replay base, so the resumed run continues those passes with independent per-rank draws.
    """
    position = int(obj["position"])
    base = {
        "position": position,
        "epochs": obj["domain_epochs"],
        "consumed": obj["domain_consumed"],
        "counts": obj["domain_counts"],
    }
    return {
        **obj,
        "version": STATE_VERSION,
        "weight_log": [[position, obj["weights"]]],
        "base": base,
        "saved_by_rank": None,
    }


def find_multi_domain_dataset(dataloader: Any, max_depth: int = 8) -> Any | None:
    """The multi-domain dataset behind a DataSpec, DataLoader or Evaluator, or ``None``.

    The one finder every component uses (the dynamic-batch-loading callback, ``init:
    activation`` calibration). A :class:`MultiDomainDataset`, or any object with its
    mixture interface (``domains``, ``weights``, ``set_weights``: a user's own mixer, or a
    test fake), is found behind up to ``max_depth`` ``.dataloader`` / ``.dataset`` links.
    """
    obj = dataloader
    for _ in range(max_depth):
        if obj is None:
            return None
        if isinstance(obj, MultiDomainDataset) or all(
            hasattr(obj, name) for name in ("domains", "weights", "set_weights")
        ):
            return obj
        # Explicit None checks: truth-testing a DataLoader would call len() on it.
        inner = getattr(obj, "dataloader", None)
        obj = inner if inner is not None and inner is not obj else getattr(obj, "dataset", None)
    return None
    return None
