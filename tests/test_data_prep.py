"""Raw text per domain -> MDS shards: layouts, summary, LLM Foundry compatibility, errors."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from streaming import StreamingDataset
from transformers import AutoTokenizer

from composer_shear.data.prep import (
    DataPrepError,
    choose_token_dtype,
    prepare_domains,
    read_split_meta,
    register_cli,
)
from tests.mds_helpers import synthetic_domains, write_raw_corpus

SAMPLE_CORPUS = Path(__file__).resolve().parents[1] / "data" / "sample_corpus"


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def _no_leftovers(parent: Path, name: str) -> bool:
    return not [p for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def test_presplit_jsonl_layout_summary_and_tokens(tmp_path, tok):
    domains = synthetic_domains(docs_per_domain=20)
    raw = write_raw_corpus(tmp_path / "raw", domains)
    summary = prepare_domains(raw, tmp_path / "out", tok, max_seq_len=24, verbose=False)

    assert set(summary["domains"]) == set(domains)
    assert summary["dtype"] == "uint16"
    for domain, docs in domains.items():
        for split in ("train", "eval"):
            # write_raw_corpus puts every 5th document into eval.
            expected_docs = [d for i, d in enumerate(docs) if (i % 5 == 4) == (split == "eval")]
            counts = summary["domains"][domain][split]
            assert counts["documents"] == len(expected_docs)
            # Every document plus its EOS, concatenated, cut into 24-token samples.
            total = sum(
                len(tok(d, add_special_tokens=False)["input_ids"]) + 1 for d in expected_docs
            )
            assert counts["samples"] == total // 24
            assert counts["tokens"] == counts["samples"] * 24
            assert counts["dropped_tokens"] == total % 24
            meta = read_split_meta(tmp_path / "out" / domain / split)
            assert meta["dtype"] == "uint16" and meta["max_seq_len"] == 24
            assert meta["vocab_size"] == len(tok)

    # The stored stream is the concatenation of documents separated by EOS.
    ds = StreamingDataset(
        local=str(tmp_path / "out" / "code" / "train"), shuffle=False, batch_size=1
    )
    stream = np.concatenate([ds[i]["tokens"] for i in range(len(ds))])
    assert stream.dtype == np.uint16
    first = tok(domains["code"][0], add_special_tokens=False)["input_ids"]
    assert stream[: len(first)].tolist() == first
    assert stream[len(first)] == tok.eos_token_id
    assert (
        json.loads((tmp_path / "out" / "summary.json").read_text())["domains"] == summary["domains"]
    )


def test_output_is_readable_by_llmfoundry_text_dataset(tmp_path, tok):
    from llmfoundry.data.text_data import StreamingTextDataset

    raw = write_raw_corpus(tmp_path / "raw", synthetic_domains(("code",), docs_per_domain=10))
    prepare_domains(raw, tmp_path / "out", tok, max_seq_len=16, verbose=False)
    local = str(tmp_path / "out" / "code" / "train")
    ours = StreamingDataset(local=local, shuffle=False, batch_size=1)
    text_ds = StreamingTextDataset(
        tokenizer=tok, max_seq_len=16, local=local, shuffle=False, batch_size=1
    )
    sample = text_ds[0]
    assert sample.dtype.is_floating_point is False and sample.shape == (16,)
    assert sample.tolist() == ours[0]["tokens"].tolist()


def test_folder_of_txt_files_split_by_document_seeded(tmp_path, tok):
    raw = tmp_path / "raw"
    for domain in ("alpha", "beta"):
        (raw / domain / "sub").mkdir(parents=True)
        for i in range(20):
            folder = raw / domain / ("sub" if i % 2 else "")
            (folder / f"doc{i}.txt").write_text(f"{domain} text number {i} " * 10, encoding="utf-8")
    a = prepare_domains(raw, tmp_path / "a", tok, 16, eval_fraction=0.2, seed=3, verbose=False)
    prepare_domains(raw, tmp_path / "b", tok, 16, eval_fraction=0.2, seed=3, verbose=False)
    prepare_domains(raw, tmp_path / "c", tok, 16, eval_fraction=0.2, seed=4, verbose=False)
    for domain in ("alpha", "beta"):
        assert a["domains"][domain]["eval"]["documents"] == 4
        assert a["domains"][domain]["train"]["documents"] == 16
    # Same seed, same split (byte-identical shards); another seed, another split.
    shard = Path("alpha/eval/shard.00000.mds")
    assert (tmp_path / "a" / shard).read_bytes() == (tmp_path / "b" / shard).read_bytes()
    assert (tmp_path / "a" / shard).read_bytes() != (tmp_path / "c" / shard).read_bytes()


def test_single_jsonl_with_domain_field(tmp_path, tok, capsys):
    path = tmp_path / "all.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i in range(30):
            domain = ["web", "math"][i % 2]
            f.write(json.dumps({"text": f"{domain} sample {i} " * 8, "domain": domain}) + "\n")
    summary = prepare_domains(path, tmp_path / "out", tok, 16, eval_fraction=0.1, verbose=True)
    assert sorted(summary["domains"]) == ["math", "web"]
    assert summary["domains"]["web"]["eval"]["documents"] == 2
    out = capsys.readouterr().out
    assert "samples" in out and "web" in out and "math" in out  # the summary table


@pytest.mark.skipif(not SAMPLE_CORPUS.is_dir(), reason="shipped sample corpus not present")
def test_shipped_sample_corpus_layout(tmp_path, tok):
    # Two of its domains keep the test quick; the layout is the same for all.
    raw = tmp_path / "raw"
    domains = sorted(p.name for p in SAMPLE_CORPUS.iterdir() if (p / "train.jsonl").is_file())[:2]
    for domain in domains:
        (raw / domain).mkdir(parents=True)
        for split in ("train", "eval"):
            lines = (SAMPLE_CORPUS / domain / f"{split}.jsonl").read_text().splitlines()[:20]
            (raw / domain / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    (raw / "LICENSES").mkdir()
    (raw / "LICENSES" / "x.LICENSE.txt").write_text("licence text " * 50)
    summary = prepare_domains(raw, tmp_path / "out", tok, 64, verbose=False)
    assert sorted(summary["domains"]) == domains  # side folders are not domains
    only = prepare_domains(raw, tmp_path / "one", tok, 64, verbose=False, domains=domains[:1])
    assert sorted(only["domains"]) == domains[:1]
    for domain in domains:
        assert summary["domains"][domain]["train"]["samples"] > 0
        assert summary["domains"][domain]["eval"]["samples"] > 0


# ----------------------------------------------------------------------------- errors


def _assert_nothing_written(tmp_path: Path, name: str = "out"):
    assert not (tmp_path / name).exists()
    assert _no_leftovers(tmp_path, name)


def test_empty_domain_is_an_error(tmp_path, tok):
    raw = write_raw_corpus(tmp_path / "raw", synthetic_domains(("code",), docs_per_domain=10))
    (raw / "empty").mkdir()
    with pytest.raises(DataPrepError, match=r"'empty'.*no \.txt or \.jsonl"):
        prepare_domains(raw, tmp_path / "out", tok, 16, verbose=False)
    _assert_nothing_written(tmp_path)
    (raw / "empty" / "a.txt").write_text("   \n")
    (raw / "empty" / "b.txt").write_text("")
    with pytest.raises(DataPrepError, match=r"'empty'.*no text"):
        prepare_domains(raw, tmp_path / "out", tok, 16, verbose=False)
    _assert_nothing_written(tmp_path)


def test_too_little_text_for_one_sample_fails_without_output(tmp_path, tok):
    raw = write_raw_corpus(tmp_path / "raw", {"tiny": ["a b", "c", "d", "e", "f"]})
    with pytest.raises(DataPrepError, match="fewer than one 512-token sample"):
        prepare_domains(raw, tmp_path / "out", tok, 512, verbose=False)
    _assert_nothing_written(tmp_path)


@pytest.mark.parametrize(
    "content", [b"{not json\n", b'{"nottext": 1}\n', b'{"text": "\xff\xfe"}\n']
)
def test_unreadable_files_are_errors(tmp_path, tok, content):
    raw = write_raw_corpus(tmp_path / "raw", synthetic_domains(("code",), docs_per_domain=10))
    (raw / "bad").mkdir()
    (raw / "bad" / "part.jsonl").write_bytes(content)
    with pytest.raises(DataPrepError, match=r"part\.jsonl"):
        prepare_domains(raw, tmp_path / "out", tok, 16, verbose=False)
    _assert_nothing_written(tmp_path)


def test_missing_tokenizer_and_input(tmp_path, tok):
    raw = write_raw_corpus(tmp_path / "raw", synthetic_domains(("code",), docs_per_domain=10))
    with pytest.raises(DataPrepError, match="cannot load a tokenizer"):
        prepare_domains(
            raw, tmp_path / "out", str(tmp_path / "no_such_tokenizer"), 16, verbose=False
        )
    with pytest.raises(DataPrepError, match="does not exist"):
        prepare_domains(tmp_path / "nope", tmp_path / "out", tok, 16, verbose=False)
    _assert_nothing_written(tmp_path)


class _BigVocab:
    """The tiny tokenizer pretending to have a 100k vocabulary."""

    def __init__(self, tok):
        self._tok = tok
        self.eos_token_id = tok.eos_token_id
        self.name_or_path = "big"

    def __len__(self):
        return 100_000

    def __call__(self, *args, **kwargs):
        return self._tok(*args, **kwargs)

    def get_vocab(self):
        return self._tok.get_vocab()


def test_vocabulary_and_dtype(tmp_path, tok):
    assert choose_token_dtype(512) == "uint16"
    assert choose_token_dtype(65_536) == "uint16"
    assert choose_token_dtype(65_537) == "uint32"
    assert choose_token_dtype(128_256) == "uint32"
    with pytest.raises(DataPrepError, match="does not fit uint16"):
        choose_token_dtype(100_000, "uint16")
    raw = write_raw_corpus(tmp_path / "raw", synthetic_domains(("code",), docs_per_domain=10))
    with pytest.raises(DataPrepError, match="does not fit uint16"):
        prepare_domains(
            raw, tmp_path / "out", _BigVocab(tok), 16, token_dtype="uint16", verbose=False
        )
    _assert_nothing_written(tmp_path)
    summary = prepare_domains(raw, tmp_path / "out", _BigVocab(tok), 16, verbose=False)
    assert summary["dtype"] == "uint32"
    assert read_split_meta(tmp_path / "out" / "code" / "train")["dtype"] == "uint32"


def test_existing_output_needs_overwrite(tmp_path, tok):
    raw = write_raw_corpus(tmp_path / "raw", synthetic_domains(("code",), docs_per_domain=10))
    prepare_domains(raw, tmp_path / "out", tok, 16, verbose=False)
    with pytest.raises(DataPrepError, match="exists"):
        prepare_domains(raw, tmp_path / "out", tok, 16, verbose=False)
    (tmp_path / "out" / "stale.txt").write_text("old")
    prepare_domains(raw, tmp_path / "out", tok, 8, overwrite=True, verbose=False)
    assert not (tmp_path / "out" / "stale.txt").exists()
    assert read_split_meta(tmp_path / "out" / "code" / "train")["max_seq_len"] == 8
    assert _no_leftovers(tmp_path, "out")


def test_cli_subcommand_and_exit_codes(tmp_path, tiny_tokenizer_dir, capsys):
    raw = write_raw_corpus(
        tmp_path / "raw", synthetic_domains(("code", "docs"), docs_per_domain=10)
    )
    parser = argparse.ArgumentParser(prog="composer-shear")
    register_cli(parser.add_subparsers(dest="command"))
    common = ["--tokenizer", str(tiny_tokenizer_dir), "--max-seq-len", "16"]
    args = parser.parse_args(["tokenize", str(raw), str(tmp_path / "out"), *common])
    assert args.func(args) == 0
    assert "code" in capsys.readouterr().out
    assert (tmp_path / "out" / "docs" / "eval" / "index.json").is_file()
    # An error: a message on stderr and a non-zero exit code, no traceback.
    args = parser.parse_args(["tokenize", str(raw), str(tmp_path / "out"), *common])
    assert args.func(args) != 0
    assert "error:" in capsys.readouterr().err

    from data_prep.tokenize_corpus import main

    assert main([str(raw), str(tmp_path / "out2"), *common, "--quiet"]) == 0
