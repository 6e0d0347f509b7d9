#!/usr/bin/env python3
"""Throughput of the ``multi_domain`` loader vs a stock ``StreamingDataset`` with fixed proportions.

Both read the same per-domain MDS shards (``ndarray:uint16`` ``tokens`` columns, as
``composer-shear tokenize`` writes them) and produce the same batches (``input_ids``,
``attention_mask``, ``labels``) through a torch DataLoader in the main process. The stock
loader mixes the domains with ``Stream(proportion=...)``, fixed for its lifetime; ours draws
the domain of every sample from live weights. Each measurement runs in its own process
(Streaming's background threads of one loader would otherwise slow the other down), and
rounds alternate between the two so that machine noise hits both alike; the best and the
median round of each are reported. A round times ``--batches`` batches after a 10-batch
warm-up; the default of 500 batches (4,000 samples) keeps a round well above the 7 ms polling
tick of Streaming's helper threads and the scheduling noise of a small machine.

With ``num_workers: 0`` ``multi_domain`` reads each rank's part of a domain's pass in the
training thread (``_DomainDataset.rank_pass`` + ``get_item``: Streaming's own partition and
shuffle, minus its download/ready threads); the stock dataset keeps its threads, as users run
it.

Usage::

    python benchmarks/bench_multi_domain.py [--seq-len 2048] [--batch-size 8] [--batches 500]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import machine_line
from streaming import MDSWriter, Stream, StreamingDataset
from torch.utils.data import DataLoader

from composer_shear.data.builder import build_multi_domain_dataloader
from composer_shear.data.prep import META_FILE

DOMAINS = ("code", "books", "docs")
PROPORTION = (0.5, 0.3, 0.2)


def write_shards(root: Path, seq_len: int, samples: int, vocab: int = 49_152) -> None:
    """Random-token shards per domain and split (content does not matter for throughput)."""
    rng = np.random.default_rng(0)
    for domain in DOMAINS:
        for split, n in (("train", samples), ("eval", 8)):
            out = root / domain / split
            columns = {"tokens": f"ndarray:uint16:{seq_len}"}
            with MDSWriter(out=str(out), columns=columns, compression=None) as writer:
                for _ in range(n):
                    writer.write({"tokens": rng.integers(0, vocab, seq_len, dtype=np.uint16)})
            meta = {"dtype": "uint16", "max_seq_len": seq_len, "vocab_size": vocab}
            (out / META_FILE).write_text(json.dumps(meta))


def stock_collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    input_ids = torch.stack([torch.from_numpy(s["tokens"].astype(np.int64)) for s in samples])
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": input_ids.clone(),
    }


def stock_loader(root: Path, batch_size: int) -> DataLoader:
    streams = [
        Stream(local=str(root / d / "train"), proportion=p)
        for d, p in zip(DOMAINS, PROPORTION, strict=True)
    ]
    ds = StreamingDataset(streams=streams, shuffle=True, shuffle_seed=17, batch_size=batch_size)
    return DataLoader(ds, batch_size=batch_size, collate_fn=stock_collate, num_workers=0)


class _Vocab:
    def __len__(self) -> int:
        return 49_152


def ours_loader(root: Path, batch_size: int, seq_len: int) -> DataLoader:
    cfg = dict(
        local=str(root),
        split="train",
        domains=list(DOMAINS),
        proportion=list(PROPORTION),
        max_seq_len=seq_len,
        shuffle=True,
        shuffle_seed=17,
    )
    return build_multi_domain_dataloader(_Vocab(), batch_size, cfg).dataloader


def rate(it, batches: int, batch_size: int) -> float:
    """Samples per second over ``batches`` batches of a live iterator."""
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(it)
        assert batch["input_ids"].shape[0] == batch_size
    return batches * batch_size / (time.perf_counter() - start)


def measure(root: Path, which: str, seq_len: int, batch_size: int, batches: int) -> float:
    """Samples/s of one loader after a short warm-up (run in a fresh process)."""
    if which == "stock":
        loader = stock_loader(root, batch_size)
    else:
        loader = ours_loader(root, batch_size, seq_len)
    it = iter(loader)
    rate(it, 10, batch_size)  # first epoch partition, page cache
    return rate(it, batches, batch_size)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=500, help="batches per timed round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--samples", type=int, default=3000, help="train samples per domain")
    parser.add_argument("--child", nargs=2, metavar=("ROOT", "WHICH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        value = measure(
            Path(args.child[0]), args.child[1], args.seq_len, args.batch_size, args.batches
        )
        print(json.dumps({"samples_per_s": value}), flush=True)
        # Streaming's background threads may still read the shards; do not wait for them.
        import os

        os._exit(0)

    names = {"stock": "stock StreamingDataset", "ours": "multi_domain"}
    results: dict[str, list[float]] = {k: [] for k in names}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_shards(root, args.seq_len, args.samples)
        common = ["--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size)]
        common += ["--batches", str(args.batches)]
        for _ in range(args.rounds):
            for which in names:
                cmd = [sys.executable, __file__, *common, "--child", str(root), which]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                results[which].append(json.loads(out.strip().splitlines()[-1])["samples_per_s"])

    print(machine_line())
    print(
        f"seq_len={args.seq_len} batch_size={args.batch_size} num_workers=0, "
        f"{args.rounds} rounds x {args.batches} batches, one process per round"
    )
    for which, name in names.items():
        values = results[which]
        print(
            f"  {name:<24} best {max(values):8.0f} samples/s   "
            f"median {np.median(values):8.0f} samples/s"
        )
    best = max(results["ours"]) / max(results["stock"])
    median = np.median(results["ours"]) / np.median(results["stock"])
    print(f"  ratio multi_domain / stock: best {best:.3f}, median {median:.3f} (goal >= 0.95)")


if __name__ == "__main__":
    main()
