"""Corrupt shards are caught when a domain is opened (or read), with the domain, file and fix."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from composer_shear.data.builder import build_multi_domain_dataloader
from composer_shear.data.mixer import MultiDomainDataset, ShardReadError
from composer_shear.data.verify import CorruptShardError, verify_split
from tests.mds_helpers import synthetic_domains, write_domain_shards

DOMAINS = ["code", "books", "docs"]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, tiny_tokenizer_dir):
    out = tmp_path_factory.mktemp("verify") / "mds"
    return write_domain_shards(out, tiny_tokenizer_dir, synthetic_domains(tuple(DOMAINS)), 16)


@pytest.fixture
def shards(pristine, tmp_path):
    return Path(shutil.copytree(pristine, tmp_path / "mds"))


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def build(shards, tok, **extra):
    cfg = dict(local=str(shards), split="train", domains=DOMAINS, max_seq_len=16, **extra)
    return build_multi_domain_dataloader(tok, 4, cfg)


def first_shard(shards, domain="books", split="train") -> Path:
    index = json.loads((shards / domain / split / "index.json").read_text())
    return shards / domain / split / index["shards"][0]["raw_data"]["basename"]


def assert_names_domain_file_and_fix(error, shard):
    message = str(error.value)
    assert "domain 'books'" in message
    assert str(shard) in message
    assert "composer-shear tokenize" in message


def test_tokenize_records_hashes_and_good_shards_pass(shards, tok):
    index = json.loads((shards / "books" / "train" / "index.json").read_text())
    assert all(s["raw_data"]["hashes"].get("xxh3_64") for s in index["shards"])
    for domain in DOMAINS:
        assert verify_split(shards / domain / "train", domain, hashes=True) >= 1
    build(shards, tok, verify_hashes=True)


def test_truncated_shard_fails_the_build(shards, tok):
    shard = first_shard(shards)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptShardError, match="bytes, the index says") as error:
        build(shards, tok)
    assert_names_domain_file_and_fix(error, shard)


def test_missing_shard_fails_the_build(shards, tok):
    shard = first_shard(shards)
    shard.unlink()
    with pytest.raises(CorruptShardError, match="is missing") as error:
        build(shards, tok)
    assert_names_domain_file_and_fix(error, shard)


def test_overwritten_header_fails_the_build(shards, tok):
    shard = first_shard(shards)
    data = bytearray(shard.read_bytes())
    data[:4] = (7).to_bytes(4, "little")  # same size, another sample count
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptShardError, match="says it holds 7 samples") as error:
        build(shards, tok)
    assert_names_domain_file_and_fix(error, shard)


def test_overwritten_content_is_caught_by_hashes(shards, tok):
    shard = first_shard(shards)
    data = bytearray(shard.read_bytes())
    data[-8:] = bytes(8)  # same size, same header, other tokens
    shard.write_bytes(bytes(data))
    build(shards, tok)  # sizes and header agree: only the hash can tell
    with pytest.raises(CorruptShardError, match="xxh3_64 mismatch") as error:
        build(shards, tok, verify_hashes=True)
    assert_names_domain_file_and_fix(error, shard)


def test_shard_damaged_after_the_build_fails_the_read_with_the_file(shards):
    ds = MultiDomainDataset(DOMAINS, str(shards), proportion=[0, 1, 0], max_seq_len=16)
    shard = first_shard(shards)
    shard.write_bytes(shard.read_bytes()[:64])  # cut inside the sample data
    with pytest.raises(ShardReadError) as error:
        for _ in range(10_000):
            next(iter(ds))
    assert_names_domain_file_and_fix(error, shard)
