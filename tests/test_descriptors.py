"""File descriptors of Streaming datasets stay bounded: the patched prefix probe, release on
garbage collection, segment names removed at exit, and the RLIMIT_NOFILE safety net.

Each measurement runs in a fresh subprocess, so that the datasets of other tests (and their
shared memory) do not count.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.mds_helpers import synthetic_domains, write_domain_shards

REPO = Path(__file__).resolve().parents[1]
DOMAINS = ("code", "books", "docs", "wiki", "mail", "latex", "arxiv")

pytestmark = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")

PROBE = """
import atexit, gc, json, os, sys
from composer_shear.data.descriptors import _segments, count_open_fds
from composer_shear.data.mixer import MultiDomainDataset

shards, out = sys.argv[1], sys.argv[2]
result = {}


def at_exit():  # registered first, so it runs after every other exit hook
    result["left_at_exit"] = [name for name in result["names"] if os.path.exists(name)]
    json.dump(result, open(out, "w"))


atexit.register(at_exit)
domains = sys.argv[3].split(",")
fds = [count_open_fds()]
datasets = []
for split in ("train", "eval"):  # a train mixture, then one eval dataset per domain
    if split == "train":
        datasets.append(MultiDomainDataset(domains, shards, max_seq_len=16))
        fds.append(count_open_fds())
    for d in domains if split == "eval" else []:
        datasets.append(MultiDomainDataset([d], shards, split="eval", max_seq_len=16))
        fds.append(count_open_fds())
names = sorted(
    f"/dev/shm/{seg.name}" for m in datasets for ds in m.datasets
    for wrapper in _segments(ds) for seg in wrapper.created_shms
)
del datasets
gc.collect()
fds.append(count_open_fds())
result.update(fds=fds, names=names, alive_after_gc=sum(os.path.exists(n) for n in names))
"""


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tiny_tokenizer_dir):
    out = tmp_path_factory.mktemp("fds") / "mds"
    return write_domain_shards(out, tiny_tokenizer_dir, synthetic_domains(DOMAINS, 15), 16)


def probe(shards, tmp_path, patch: bool, domains=DOMAINS) -> dict:
    out = tmp_path / f"probe_{int(patch)}.json"
    env = dict(os.environ, PYTHONPATH=str(REPO), COMPOSER_SHEAR_PATCH_STREAMING=str(int(patch)))
    cmd = [sys.executable, "-c", PROBE, str(shards), str(out), ",".join(domains)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_fds_grow_linearly_and_are_released(shards, tmp_path):
    patched = probe(shards, tmp_path, True)
    # Streaming's own probe, on 3 domains: 6 datasets, so that it fits under `ulimit -n 1024`.
    stock = probe(shards, tmp_path, False, DOMAINS[:3])
    # 1 train mixture over 7 domains + 7 single-domain eval mixtures: 14 StreamingDatasets.
    n = 2 * len(DOMAINS)
    grown = patched["fds"][-2] - patched["fds"][0]
    assert grown <= 12 * n + 8, patched["fds"]  # 6 segments x 2 descriptors per dataset
    steps = [b - a for a, b in zip(patched["fds"][1:-2], patched["fds"][2:-1], strict=True)]
    assert max(steps) <= 12, steps  # each eval dataset adds its own 12, nothing more
    # Streaming's own probe leaves every earlier dataset's segments open: 6 n (n + 1) in all.
    m = 6
    stock_grown = stock["fds"][-2] - stock["fds"][0]
    assert stock_grown >= 6 * m * (m + 1) * 0.9, stock["fds"]
    # Dropped datasets give their descriptors back (Streaming's atexit hooks kept them all).
    assert patched["fds"][-1] - patched["fds"][0] <= 8, patched["fds"]
    # ... while their segment names stay until the process exits, and are removed then.
    assert len(patched["names"]) == patched["alive_after_gc"] == 6 * n
    assert patched["left_at_exit"] == []


RLIMIT = """
import logging, resource, sys
logging.basicConfig(level=logging.INFO, format="%(message)s")
from composer_shear.data.descriptors import raise_open_file_limit
print("before", *resource.getrlimit(resource.RLIMIT_NOFILE))
raise_open_file_limit()
print("after", *resource.getrlimit(resource.RLIMIT_NOFILE))
"""


def test_soft_open_file_limit_is_raised_toward_the_hard_limit():
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.skip("hard limit too low to lower the soft one below it")

    def lower_soft_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))

    proc = subprocess.run(
        [sys.executable, "-c", RLIMIT],
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=lower_soft_limit,
    )
    assert proc.returncode == 0, proc.stderr
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
    assert lines["before"].split()[0] == "256"
    expected = 65536 if hard == resource.RLIM_INFINITY else min(65536, hard)
    assert int(lines["after"].split()[0]) == expected
    assert f"raised the soft open-file limit (RLIMIT_NOFILE) from 256 to {expected}" in proc.stderr
