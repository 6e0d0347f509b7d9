"""A live mixture of per-domain Streaming datasets (dynamic batch loading's data side).

Why not one ``StreamingDataset`` with ``streams``: its stream proportions decide the epoch
partition when the epoch starts and cannot change afterwards. Dynamic batch loading changes
the mixture every few hundred steps, so this module keeps one ``StreamingDataset`` per domain
and decides the domain of every sample itself, from the *current* weights.

Determinism across ranks: the domain of per-rank sample position ``j`` is the inverse CDF of
the current weights at a uniform number that depends only on ``(seed, j)``. Every rank holds
the same weights (the callback computes them from all-reduced losses), so every rank draws the
same domain at the same position and consumes the same number of samples from every domain.
That per-domain consumption is exactly what Streaming can resume from:
``sample_in_epoch = world_size * consumed`` drops the first ``consumed`` samples of every
rank's partition of that domain's epoch.

Exactness: the draw happens in the process that consumes the samples (the main process; the
outer DataLoader must not use workers), so a weight change takes effect at the next draw and
the state saved in a checkpoint is the state of the last sample trained on. The order of
samples *within* a domain does not depend on the weights, so each domain may be read by its
own DataLoader with worker processes.

Throughput: with local shards (no ``remote``) and no domain workers, each domain is read in
the training thread in the order Streaming's own ``__iter__`` would give (same partition,
shuffle and resumption), but without the download/ready thread pair that ``__iter__`` starts
per domain. Those threads have nothing to download here; they poll every 7 ms and take a file
lock per sample, and one pair per domain made the mixture 0.55-0.75x as fast as one stock
``StreamingDataset`` on a 2-core machine (``benchmarks/bench_multi_domain.py``). With a
``remote`` the threads stay, since they download ahead.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from streaming import StreamingDataset
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

__all__ = ["MultiDomainDataset", "find_multi_domain_dataset", "split_path"]

log = logging.getLogger(__name__)

STATE_VERSION = 1
_BLOCK = 4096  # uniforms generated per RNG call; draw j uses block j // _BLOCK
_HISTORY = 1 << 16  # draws remembered for rewinding to an earlier sample count


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

    def __init__(self, *, max_seq_len: int, token_dtype: str | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.max_seq_len = max_seq_len
        self.token_dtype = token_dtype

    def __getitem__(self, idx: int) -> torch.Tensor:  # type: ignore[override]
        return self._to_tensor(super().__getitem__(idx))

    def _to_tensor(self, sample: dict[str, Any]) -> torch.Tensor:
        tokens = sample["tokens"]
        if isinstance(tokens, bytes):  # LLM Foundry's older `bytes` encoding
            tokens = np.frombuffer(tokens, dtype=self.token_dtype or "int64")
        return torch.from_numpy(tokens[: self.max_seq_len].astype(np.int64))

    def iter_in_process(self) -> Iterator[torch.Tensor]:
        """This rank's samples of the next epoch, read in the calling thread, no helper threads.

        The same samples in the same order as :meth:`__iter__` without DataLoader workers:
        the same epoch bookkeeping and resumption (``_resume_incr_epoch``), the same partition
        and shuffle (``_get_work``), the same skipping of padding ids. What it leaves out is
        Streaming's per-epoch download and ready threads, which poll every few milliseconds and
        take a file lock per sample; with all shards local they have nothing to do but compete
        with the training process for the GIL (one pair per domain). A shard that is missing
        anyway is still prepared, synchronously, by :meth:`get_item`.
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


def _validate_weights(weights: Sequence[float], k: int) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.shape[0] != k:
        raise ValueError(f"expected {k} weights (one per domain), got {w.shape[0]}")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError(f"weights must be finite and non-negative, got {w.tolist()}")
    if abs(w.sum() - 1.0) > 1e-6:
        raise ValueError(f"weights must sum to 1 (within 1e-6), got sum {w.sum():.8f}")
    return w / w.sum()


class MultiDomainDataset(IterableDataset):
    """Samples from one ``StreamingDataset`` per domain, mixed by live weights.

    ``split='train'`` is an endless stream: each sample's domain is drawn from the current
    :attr:`weights`; a domain that runs out starts a new pass (a new Streaming epoch, newly
    shuffled), so no sample repeats within a pass. Any other split is a finite single pass
    over the domains, one after the other (for per-domain evaluation).

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
            (Streaming's ``batch_size``; it affects how a domain is split across workers).
        token_dtype: Dtype of ``bytes``-encoded token columns (``ndarray`` columns know theirs).
        streaming_kwargs: Extra ``StreamingDataset`` arguments (``predownload``,
            ``cache_limit``, ``num_canonical_nodes``, ``shuffle_algo`` ...).
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
        streaming_kwargs: dict[str, Any] | None = None,
    ):
        super().__init__()
        if not domains:
            raise ValueError("at least one domain is required")
        if len(set(domains)) != len(domains):
            raise ValueError(f"domains must be unique, got {list(domains)}")
        self._domains = list(domains)
        self.split = split
        self.is_train = split == "train"
        self.max_seq_len = int(max_seq_len)
        self.mix_seed = int(shuffle_seed if mix_seed is None else mix_seed)
        self.num_workers = int(num_workers)
        self.prefetch_factor = prefetch_factor
        self.domain_batch_size = int(domain_batch_size)
        k = len(self._domains)
        weights = np.full(k, 1.0 / k) if proportion is None else proportion
        self._initial_weights = _validate_weights(weights, k)
        self._weights = self._initial_weights.copy()
        self._cdf = self._make_cdf(self._weights)

        self.datasets = [
            _DomainDataset(
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
        # The in-process reader uses Streaming's own (private) epoch and partition steps; a
        # Streaming release without them falls back to its iterator and threads.
        self._all_local = remote is None and all(
            hasattr(ds, "_resume_incr_epoch") and hasattr(ds, "_get_work") for ds in self.datasets
        )
        # Mixer state (train). Position j = samples drawn on this rank so far.
        self._position = 0
        # Plain lists: numpy scalar updates would cost more than the rest of a draw.
        self._counts = [0] * k
        self._epochs = [0] * k  # current pass of each domain
        self._consumed = [0] * k  # samples taken in the current pass
        self._iters: list[Iterator[torch.Tensor] | None] = [None] * k
        self._pending: list[tuple[int, np.ndarray]] = []  # weights scheduled by position
        # (domain, epoch, index in pass) of recent draws, to rewind to an earlier position.
        self._history: deque[tuple[int, int, int]] = deque(maxlen=_HISTORY)
        self._weight_log: deque[tuple[int, np.ndarray]] = deque(maxlen=256)
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
        """Index of the current pass over each domain (0 = first pass)."""
        return np.asarray(self._epochs, dtype=np.int64)

    def set_weights(self, weights: Sequence[float]) -> None:
        """Replaces the mixture weights; the next drawn sample uses them.

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

    @staticmethod
    def _make_cdf(w: np.ndarray) -> np.ndarray:
        cdf = np.cumsum(w)
        return cdf / cdf[-1]

    def _apply_weights(self, w: np.ndarray) -> None:
        self._weights = w
        self._cdf = self._make_cdf(w)
        self._block_domains = []  # recomputed from the new weights at the next draw
        self._weight_log.append((self._position, w.copy()))

    def _uniform(self, j: int) -> float:
        """The uniform number of per-rank position ``j``: a function of (mix_seed, j) only."""
        block_id = j // _BLOCK
        if block_id != self._block_id:
            self._block = np.random.default_rng([self.mix_seed, block_id]).random(_BLOCK)
            self._block_id = block_id
            self._block_domains = []
        return float(self._block[j % _BLOCK])

    def draw_domain(self, j: int) -> int:
        """The domain drawn at position ``j`` under the current weights."""
        if j // _BLOCK != self._block_id or not self._block_domains:
            self._uniform(j)
            # Vectorised inverse CDF for the whole block; the per-sample path is a list lookup.
            drawn = np.searchsorted(self._cdf, self._block, side="right")
            self._block_domains = np.minimum(drawn, len(self._domains) - 1).tolist()
        return self._block_domains[j % _BLOCK]

    def _open(self, d: int) -> Iterator[torch.Tensor]:
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
                it = self._iters[d] = self._open(d)
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
        history = self._history
        while True:
            j = self._position
            while self._pending and self._pending[0][0] <= j:
                self._apply_weights(self._pending.pop(0)[1])
            d = self.draw_domain(j)
            sample = self._next_of(d)
            history.append((d, self._epochs[d], self._consumed[d]))
            self._consumed[d] += 1
            self._counts[d] += 1
            self._position = j + 1
            yield {"input_ids": sample, "domain_idx": d}

    def _iter_single_pass(self) -> Iterator[dict[str, Any]]:
        for d in range(len(self._domains)):
            it = self._open(d)
            for sample in it:
                yield {"input_ids": sample, "domain_idx": d}

    # ------------------------------------------------------------------ resumption

    def state_dict(self, num_samples: int | None = None, from_beginning: bool = True) -> dict:
        """The mixer state after ``num_samples`` samples (Composer's global sample count).

        Composer passes ``timestamp.sample_in_epoch``: samples over *all* ranks since the
        start of the (endless) epoch, so the per-rank position is ``num_samples //
        world_size``. When that is behind what this object has drawn (samples fetched but not
        trained on), the state is rewound to it from a short history of draws.

        Args:
            num_samples: Global samples consumed; ``None`` means everything drawn so far.
            from_beginning: ``False`` counts ``num_samples`` from where this run resumed.

        Returns:
            A JSON-friendly dict (weights, position, per-domain pass and offset, counts).
        """
        if not self.is_train:
            return {"version": STATE_VERSION, "split": self.split}
        world = _world_size()
        target = self._position
        if num_samples is not None:
            target = int(num_samples) // world
            if not from_beginning:
                target += getattr(self, "_resumed_position", 0)
        epochs, consumed, counts = list(self._epochs), list(self._consumed), list(self._counts)
        weights = self._weights.copy()
        pending = [(p, w.tolist()) for p, w in self._pending]
        back = self._position - target
        if back < 0 or back > len(self._history):
            if back != 0:
                log.warning(
                    "state_dict(num_samples=%s): position %d is outside the %d draws remembered "
                    "(drawn: %d); saving the current state",
                    num_samples,
                    target,
                    len(self._history),
                    self._position,
                )
            target = self._position
        elif back > 0:
            # Undo the last `back` draws: each domain returns to its earliest undone draw.
            for d, epoch, index in list(self._history)[-back:][::-1]:
                epochs[d], consumed[d] = epoch, index
                counts[d] -= 1
            # Weight changes made after `target` become pending changes at their positions.
            changes = [(p, w) for p, w in self._weight_log if p > target]
            if changes:
                before = [w for p, w in self._weight_log if p <= target]
                weights = before[-1] if before else self._initial_weights
                pending = [(p, w.tolist()) for p, w in changes] + pending
        domain_states = []
        for d, ds in enumerate(self.datasets):
            base = ds.state_dict(0, True)
            base.update(epoch=int(epochs[d]), sample_in_epoch=int(consumed[d]) * world)
            domain_states.append(base)
        return {
            "version": STATE_VERSION,
            "domains": self.domains,
            "mix_seed": self.mix_seed,
            "world_size": world,
            "position": int(target),
            "weights": np.asarray(weights).tolist(),
            "initial_weights": self._initial_weights.tolist(),
            "pending_weights": pending,
            "domain_epochs": [int(e) for e in epochs],
            "domain_consumed": [int(c) for c in consumed],
            "domain_counts": [int(c) for c in counts],
            "streaming": domain_states,
        }

    def load_state_dict(self, obj: dict[str, Any]) -> None:
        """Restores :meth:`state_dict` output; the next draw continues the saved run exactly.

        Raises:
            ValueError: The state belongs to other domains or another world size.
        """
        if not self.is_train or obj is None:
            return
        if obj.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported MultiDomainDataset state version {obj.get('version')}")
        if list(obj["domains"]) != self._domains:
            raise ValueError(
                f"checkpoint domains {obj['domains']} differ from the configured {self._domains}"
            )
        world = _world_size()
        if int(obj["world_size"]) != world:
            # Every rank drew the same per-rank sequence, so per-domain offsets scale with the
            # world size; the mixture itself (position, counts) is unaffected.
            log.warning(
                "resuming a %d-rank data state on %d ranks: per-domain offsets are rescaled",
                obj["world_size"],
                world,
            )
        self.mix_seed = int(obj["mix_seed"])
        self._initial_weights = np.asarray(obj["initial_weights"], dtype=np.float64)
        self._weights = np.asarray(obj["weights"], dtype=np.float64)
        self._cdf = self._make_cdf(self._weights)
        self._pending = [
            (int(p), np.asarray(w, dtype=np.float64)) for p, w in obj["pending_weights"]
        ]
        self._position = int(obj["position"])
        self._resumed_position = self._position
        self._epochs = [int(e) for e in obj["domain_epochs"]]
        self._consumed = [int(c) for c in obj["domain_consumed"]]
        self._counts = [int(c) for c in obj["domain_counts"]]
        self._history.clear()
        self._weight_log.clear()
        self._weight_log.append((self._position, self._weights.copy()))
        self._iters = [None] * len(self._domains)
        for d, ds in enumerate(self.datasets):
            state = dict(obj["streaming"][d])
            state["epoch"] = int(self._epochs[d])
            state["sample_in_epoch"] = int(self._consumed[d]) * world
            # A used object would treat an older epoch as stale: rewind its epoch counter.
            ds.next_epoch = int(self._epochs[d])
            ds.load_state_dict(state)


def find_multi_domain_dataset(dataloader: Any) -> MultiDomainDataset | None:
    """Digs the :class:`MultiDomainDataset` out of a DataSpec, DataLoader or Evaluator."""
    seen = 0
    obj = dataloader
    while obj is not None and seen < 8:
        if isinstance(obj, MultiDomainDataset):
            return obj
        seen += 1
        for attr in ("dataloader", "dataset"):
            inner = getattr(obj, attr, None)
            if inner is not None and inner is not obj:
                obj = inner
                break
        else:
            return None
    return None
