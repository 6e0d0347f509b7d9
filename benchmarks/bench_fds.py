#!/usr/bin/env python3
"""Open file descriptors of a 7-domain ``llmfoundry train`` job: build, 3 evals, save, resume.

The job is what a RedPajama-style recipe builds: a ``multi_domain`` train loader over 7
domains plus one ``multi_domain`` eval loader per domain (14 Streaming datasets), dynamic
batch loading, evaluation every 2 batches. A small callback records the process's open
descriptors (``/proc/self/fd``) at these points:

* ``build``: ``FIT_START`` of the first run (every loader built, nothing iterated yet);
* ``eval 1..3``: after each evaluation round (``EVAL_AFTER_ALL``);
* ``saved``: after the final checkpoint was written (``FIT_END``);
* ``resume build``: ``FIT_START`` of a second run that loads that checkpoint;
* ``resume eval 1..3``: after each of its evaluation rounds.

Two layouts, each measured with and without composer_shear's patch of Streaming's shared
memory prefix probe (``COMPOSER_SHEAR_PATCH_STREAMING=0`` turns it off):

* ``same process``: both runs in one Python process, as a test suite or a notebook runs
  them (what is not released accumulates);
* ``two processes``: the resume in a fresh process, as an autoresumed job restarts.

Every measurement runs in its own subprocess, so nothing carries over between them.
Linux only (``/proc/self/fd``). Usage::

    python benchmarks/bench_fds.py [--domains 7]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOMAINS = ("cc", "github", "book", "stackexchange", "wiki", "arxiv", "c4")
POINTS = ("build", "eval 1", "eval 2", "eval 3", "saved")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def prepare(root: Path, domains: list[str]) -> tuple[Path, Path]:
    """A tiny Llama checkpoint and per-domain shards (train and eval) under ``root``."""
    sys.path.insert(0, str(REPO))
    from tests.mds_helpers import synthetic_domains, write_domain_shards
    from tests.tiny_models import build_tiny_tokenizer, save_tiny_checkpoint, tiny_model

    tokenizer_dir = root / "tokenizer"
    build_tiny_tokenizer(tokenizer_dir)
    model_dir = save_tiny_checkpoint(
        tiny_model("llama_gqa", num_hidden_layers=2), tokenizer_dir, root / "model"
    )
    data = write_domain_shards(
        root / "data", tokenizer_dir, synthetic_domains(tuple(domains), 20), max_seq_len=32
    )
    return model_dir, data


def write_yaml(root: Path, model_dir: Path, data: Path, domains: list[str]) -> Path:
    evals = "".join(
        f"""  - label: {d}
    name: multi_domain
    dataset: {{local: {data}, split: eval, domains: [{d}], max_seq_len: 32, shuffle: false}}
    drop_last: false
    num_workers: 0
    prefetch_factor: null
    persistent_workers: false
"""
        for d in domains
    )
    text = f"""
max_seq_len: 32
seed: 17
precision: fp32
model:
  name: hf_causal_lm
  pretrained_model_name_or_path: {model_dir}
  pretrained: true
tokenizer:
  name: {model_dir}
  kwargs: {{model_max_length: 32}}
train_loader:
  name: multi_domain
  dataset: {{local: {data}, split: train, domains: [{", ".join(domains)}], max_seq_len: 32}}
  drop_last: true
  num_workers: 0
  prefetch_factor: null
  persistent_workers: false
eval_loader:
{evals}
callbacks:
  dynamic_batch_loading:
    target_loss: [{", ".join(["0.0"] * len(domains))}]
  fd_probe: {{}}
optimizer: {{name: decoupled_adamw, lr: 1.0e-3, betas: [0.9, 0.95], eps: 1.0e-8}}
scheduler: {{name: constant_with_warmup, t_warmup: 0ba}}
eval_interval: 2ba
eval_first: false
global_train_batch_size: 4
device_train_microbatch_size: 4
device_eval_batch_size: 4
progress_bar: false
log_to_console: false
python_log_level: null
save_interval: 6ba
save_overwrite: true
"""
    path = root / "fds.yaml"
    path.write_text(text)
    return path


def run_job(yaml: str, out: str, runs: str) -> None:
    """One measurement (in a subprocess): ``runs`` is 'both' or 'first' / 'resume'."""
    from composer import Callback
    from llmfoundry import registry
    from llmfoundry.command_utils import train_from_yaml

    record: dict[str, int] = {}

    class FdProbe(Callback):
        prefix = ""

        def _mark(self, name: str) -> None:
            record[self.prefix + name] = open_fds()

        def fit_start(self, state, logger):
            self._mark("build")

        def eval_after_all(self, state, logger):
            n = sum(1 for k in record if k.startswith(self.prefix + "eval"))
            self._mark(f"eval {n + 1}")

        def fit_end(self, state, logger):
            self._mark("saved")

    registry.callbacks.register("fd_probe", func=FdProbe)
    root = Path(yaml).parent
    first = ["max_duration=6ba", f"save_folder={root / 'ckpt'}"]
    resume = [
        "max_duration=12ba",
        f"save_folder={root / 'ckpt_resumed'}",
        f"load_path={root / 'ckpt' / 'ep0-ba6-rank0.pt'}",
    ]
    if runs in ("both", "first"):
        record["start"] = open_fds()
        train_from_yaml(yaml, first).close()
    if runs in ("both", "resume"):
        FdProbe.prefix = "resume "
        train_from_yaml(yaml, resume).close()
    Path(out).write_text(json.dumps(record))


def measure(yaml: Path, layout: str, patch: bool) -> dict[str, int]:
    env = dict(os.environ, COMPOSER_SHEAR_PATCH_STREAMING="1" if patch else "0")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    record: dict[str, int] = {}
    steps = ["both"] if layout == "same process" else ["first", "resume"]
    for step in steps:
        out = yaml.parent / f"fds_{step}.json"
        cmd = [sys.executable, __file__, "--job", str(yaml), str(out), step]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"measurement failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        record.update(json.loads(out.read_text()))
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--domains", type=int, default=7, help="number of domains (<= 7)")
    parser.add_argument("--job", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        run_job(*args.job)
        return
    domains = list(DOMAINS[: args.domains])
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir, data = prepare(root, domains)
        yaml = write_yaml(root, model_dir, data, domains)
        columns = [
            (layout, patch) for layout in ("same process", "two processes") for patch in (0, 1)
        ]
        results = {col: measure(yaml, *col) for col in columns}
    points = ["start", *POINTS, *(f"resume {p}" for p in POINTS)]
    print(f"open file descriptors, {len(domains)} domains: 1 train + {len(domains)} eval loaders")
    header = f"{'point':<20}" + "".join(
        f"{layout + (' patched' if patch else ' stock'):>26}" for layout, patch in columns
    )
    print(header)
    print("-" * len(header))
    for point in points:
        row = [results[col].get(point) for col in columns]
        if all(v is None for v in row):
            continue
        print(f"{point:<20}" + "".join(f"{'' if v is None else v:>26}" for v in row))


if __name__ == "__main__":
    main()
