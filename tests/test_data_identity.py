"""Shards record the tokenizer that wrote them; every reader refuses another tokenizer."""

from __future__ import annotations

import argparse
import shutil

import pytest
from transformers import AutoTokenizer

from composer_shear.data.builder import build_multi_domain_dataloader
from composer_shear.data.calibration import calibration_batches
from composer_shear.data.identity import TokenizerMismatchError, tokenizer_identity
from composer_shear.data.prep import prepare_domains, read_split_meta
from composer_shear.data.reference_loss import register_cli
from tests.mds_helpers import synthetic_domains, write_raw_corpus
from tests.tiny_models import save_tiny_checkpoint, tiny_model

DOMAINS = ["alpha", "beta"]


@pytest.fixture(scope="module")
def shards(tiny_tokenizer_dir, tmp_path_factory):
    """Two domains tokenized with the tiny tokenizer."""
    root = tmp_path_factory.mktemp("identity")
    raw = write_raw_corpus(root / "raw", synthetic_domains(tuple(DOMAINS), docs_per_domain=20))
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    prepare_domains(raw, root / "data", tok, max_seq_len=16, verbose=False)
    return root / "data"


@pytest.fixture(scope="module")
def other_tokenizer_dir(tiny_tokenizer_dir, tmp_path_factory):
    """The tiny tokenizer with one more token: the same size class, another vocabulary."""
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tok.add_tokens(["<other>"])
    out = tmp_path_factory.mktemp("other_tokenizer")
    tok.save_pretrained(out)
    return out


def test_tokenize_records_the_tokenizer(shards, tiny_tokenizer_dir):
    mine = tokenizer_identity(AutoTokenizer.from_pretrained(tiny_tokenizer_dir))
    for domain in DOMAINS:
        for split in ("train", "eval"):
            meta = read_split_meta(shards / domain / split)
            assert meta["tokenizer_vocab_sha256"] == mine["tokenizer_vocab_sha256"]
            assert meta["tokenizer"] == str(tiny_tokenizer_dir)


def _loader(tokenizer, local, remote=None):
    dataset = {"local": str(local), "domains": DOMAINS, "max_seq_len": 16}
    if remote is not None:
        dataset["remote"] = str(remote)
    return build_multi_domain_dataloader(tokenizer, 2, dataset)


def test_loader_refuses_another_tokenizer_local_and_remote(
    shards, tiny_tokenizer_dir, other_tokenizer_dir, tmp_path
):
    other = AutoTokenizer.from_pretrained(other_tokenizer_dir)
    with pytest.raises(TokenizerMismatchError) as error:
        _loader(other, shards)
    message = str(error.value)
    assert str(tiny_tokenizer_dir) in message and str(other_tokenizer_dir) in message
    assert "domain 'alpha'" in message
    # A remote copy is checked from its own record, before the (empty) local cache fills.
    with pytest.raises(TokenizerMismatchError, match=str(other_tokenizer_dir)):
        _loader(other, tmp_path / "cache", remote=shards)
    # The same vocabulary saved under another path passes: the hash decides, not the name.
    copy = tmp_path / "same_tokenizer"
    shutil.copytree(tiny_tokenizer_dir, copy)
    spec = _loader(AutoTokenizer.from_pretrained(copy), shards)
    assert next(iter(spec.dataloader))["input_ids"].shape == (2, 16)


def test_calibration_refuses_another_tokenizer(shards, tiny_tokenizer_dir, other_tokenizer_dir):
    other = AutoTokenizer.from_pretrained(other_tokenizer_dir)
    with pytest.raises(TokenizerMismatchError, match="calibration data"):
        calibration_batches(shards, 64, 16, batch_size=2, tokenizer=other)
    mine = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    assert len(calibration_batches(shards, 64, 16, batch_size=2, tokenizer=mine)) == 2


def test_reference_loss_refuses_another_tokenizer(shards, other_tokenizer_dir, tmp_path, capsys):
    model_dir = tmp_path / "model"
    save_tiny_checkpoint(tiny_model("llama_gqa"), other_tokenizer_dir, model_dir)
    parser = argparse.ArgumentParser(prog="composer-shear")
    register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["reference-loss", "--model", str(model_dir), "--data", str(shards)])
    assert args.func(args) == 1  # a failed command, not a usage error
    err = capsys.readouterr().err
    # The model directory's tokenizer (the other vocabulary, saved with the model).
    assert "eval split" in err and f"this run's tokenizer is '{model_dir}'" in err
