"""Checks on the shipped multi-domain sample corpus in ``data/sample_corpus`` (no network)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

CORPUS = Path(__file__).resolve().parents[1] / "data" / "sample_corpus"
SPLITS = ("train", "eval")
MAX_DOC_BYTES = 8000
MAX_TOTAL_BYTES = 5_000_000


def _manifest() -> dict:
    return json.loads((CORPUS / "manifest.json").read_text(encoding="utf-8"))


def _domains() -> list[str]:
    return sorted(_manifest()["domains"])


def _read(domain: str, split: str) -> list[dict]:
    path = CORPUS / domain / f"{split}.jsonl"
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def test_manifest_lists_at_least_five_domains():
    domains = _domains()
    assert len(domains) >= 5
    on_disk = sorted(p.name for p in CORPUS.iterdir() if (p / "train.jsonl").is_file())
    assert on_disk == domains


@pytest.mark.parametrize("domain", _domains())
def test_splits_parse_and_have_the_expected_shape(domain):
    for split in SPLITS:
        records = _read(domain, split)
        assert records, f"{domain}/{split}.jsonl is empty"
        for record in records:
            assert set(record) == {"text", "source"}
            assert isinstance(record["text"], str) and record["text"].strip()
            assert isinstance(record["source"], str) and "/" in record["source"]
            assert len(record["text"].encode("utf-8")) <= MAX_DOC_BYTES


@pytest.mark.parametrize("domain", _domains())
def test_eval_is_disjoint_from_train(domain):
    train, evaluation = _read(domain, "train"), _read(domain, "eval")
    train_texts = [r["text"] for r in train]
    eval_texts = [r["text"] for r in evaluation]
    assert len(set(train_texts)) == len(train_texts)
    assert len(set(eval_texts)) == len(eval_texts)
    assert not set(train_texts) & set(eval_texts)
    # The split is by source file: no file contributes to both.
    assert not {r["source"] for r in train} & {r["source"] for r in evaluation}


@pytest.mark.parametrize("domain", _domains())
def test_sizes_within_bounds(domain):
    train, evaluation = _read(domain, "train"), _read(domain, "eval")
    train_bytes = sum(len(r["text"].encode("utf-8")) for r in train)
    eval_bytes = sum(len(r["text"].encode("utf-8")) for r in evaluation)
    assert 300_000 <= train_bytes <= 600_000
    assert 40_000 <= eval_bytes <= 80_000
    assert 0.04 <= len(evaluation) / (len(train) + len(evaluation)) <= 0.15
    splits = _manifest()["domains"][domain]["splits"]
    assert splits["train"]["docs"] == len(train)
    assert splits["eval"]["docs"] == len(evaluation)
    assert splits["train"]["text_bytes"] == train_bytes
    assert splits["eval"]["text_bytes"] == eval_bytes


def test_total_size_is_small():
    total = sum(p.stat().st_size for p in CORPUS.rglob("*") if p.is_file())
    assert total < MAX_TOTAL_BYTES


def test_manifest_hashes_match_the_files():
    manifest = _manifest()
    listed = manifest["files"]
    on_disk = sorted(
        p.relative_to(CORPUS).as_posix()
        for p in CORPUS.rglob("*")
        if p.is_file() and p.name != "manifest.json"
    )
    assert sorted(listed) == on_disk
    for name, digest in listed.items():
        assert hashlib.sha256((CORPUS / name).read_bytes()).hexdigest() == digest, name
    for domain, info in manifest["domains"].items():
        for split in SPLITS:
            path = CORPUS / domain / f"{split}.jsonl"
            assert hashlib.sha256(path.read_bytes()).hexdigest() == info["splits"][split]["sha256"]


def test_sources_and_licences_are_documented():
    sources = (CORPUS / "SOURCES.md").read_text(encoding="utf-8")
    manifest = _manifest()
    for domain in manifest["domains"]:
        assert f"## {domain}" in sources
    for package, info in manifest["packages"].items():
        assert package in sources
        assert info["version"] in sources
    licences = sorted((CORPUS / "LICENSES").iterdir())
    assert licences
    assert all(p.stat().st_size > 0 for p in licences)
