"""Outputs are never lost or silently wrong: ownership rule, crash recovery, finite or refuse,
and the export callback's hf_checkpointer-style keys."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from composer import Callback
from llmfoundry import registry
from safetensors.torch import load_file
from streaming import MDSWriter
from transformers import AutoConfig, AutoModelForCausalLM

from composer_shear.callbacks.pruned_hf_export import PrunedHFExport
from composer_shear.data.calibration import read_mds_token_samples
from composer_shear.data.prep import DataPrepError, prepare_domains
from composer_shear.demo import DemoError, DemoSettings, run_demo
from composer_shear.downstream.data import build_eval_data
from composer_shear.export.checkpoint import export_checkpoint
from composer_shear.export.oneshot import prune_oneshot_to_dir
from composer_shear.export.writer import EXPORT_INFO, ExportError, config_hash, write_hf_directory
from composer_shear.output_paths import (
    RUN_MARKER,
    OutputPathError,
    check_output_dir,
    recover_interrupted,
)
from composer_shear.pruning.masking import NonFiniteGateError, find_gates
from tests.pruning_helpers import FAMILY_TARGETS, REPO, gates_of, make_tiny_run_inputs, run_prune
from tests.tiny_models import save_tiny_checkpoint, tiny_model


def _foreign_folder(path):
    """A folder of someone else's files: a Composer checkpoint folder, as in the bug report."""
    (path / "ckpts").mkdir(parents=True)
    (path / "ckpts" / "ep0-ba400-rank0.pt").write_bytes(b"not ours")
    return path


def _siblings(path):
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}."))


def test_a_folder_we_did_not_write_is_never_replaced(tmp_path, tiny_tokenizer_dir):
    foreign = _foreign_folder(tmp_path / "save_folder")
    model = tiny_model("llama_gqa")
    with pytest.raises(ExportError, match=r"save_folder is not empty and was not written by"):
        write_hf_directory(model, foreign, overwrite=True)
    with pytest.raises(OutputPathError, match=r"cb\.save_folder: .*save_folder is not empty and"):
        check_output_dir(foreign, "cb.save_folder", overwrite=True)
    with pytest.raises(DataPrepError, match="was not written by composer_shear"):
        prepare_domains(tmp_path, foreign, tiny_tokenizer_dir, 32, overwrite=True)
    with pytest.raises(FileExistsError, match="was not written by composer_shear"):
        build_eval_data(foreign, overwrite=True, verbose=False)
    with pytest.raises(DemoError, match="was not written by composer_shear"):
        run_demo(foreign, tmp_path / "no_corpus", DemoSettings(), overwrite=True)
    assert (foreign / "ckpts" / "ep0-ba400-rank0.pt").read_bytes() == b"not ours"
    assert sorted(p.name for p in foreign.iterdir()) == ["ckpts"]
    assert _siblings(foreign) == []  # no staging folder left either

    # A folder we wrote is replaced with overwrite, and refused without it.
    ours = tmp_path / "export"
    write_hf_directory(model, ours)
    assert (ours / EXPORT_INFO).is_file()
    with pytest.raises(ExportError, match="not empty; choose another folder or set overwrite"):
        write_hf_directory(model, ours)
    write_hf_directory(model, ours, overwrite=True)
    loaded = AutoModelForCausalLM.from_pretrained(ours)
    assert loaded.config.hidden_size == model.config.hidden_size
    assert _siblings(ours) == []

    # A run marker counts too (tokenize, eval-data and demo folders carry one).
    marked = tmp_path / "marked"
    marked.mkdir()
    (marked / RUN_MARKER).write_text("{}")
    (marked / "old.txt").write_text("x")
    assert check_output_dir(marked, "k", overwrite=True) == marked


KILL_SCRIPT = """
import os, signal, sys
from pathlib import Path
from composer_shear.output_paths import replace_dir, staging_dir, write_run_marker

out = Path(sys.argv[1])
staged = staging_dir(out)
(staged / "version.txt").write_text("new")
write_run_marker(staged, "test")
renames = []
original = Path.rename


def rename_then_die(self, target):
    renames.append(target)
    result = original(self, target)
    if len(renames) == 1:  # the old output moved aside, the new one not yet in place
        os.kill(os.getpid(), signal.SIGKILL)
    return result


Path.rename = rename_then_die
replace_dir(staged, out)
"""


def test_a_kill_between_the_renames_is_recovered_by_the_next_run(tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    (out / "version.txt").write_text("old")
    (out / RUN_MARKER).write_text("{}")
    proc = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, str(out)],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -9, proc.stderr
    # What the kill left: no output, the previous one aside, the new one staged.
    assert not out.exists()
    left = _siblings(out)
    assert len(left) == 2 and any(".old-" in n for n in left) and any(".tmp-" in n for n in left)

    done = recover_interrupted(out)
    assert (out / "version.txt").read_text() == "old"  # the previous output is back
    assert _siblings(out) == []
    assert any("restored" in line for line in done) and any("removed" in line for line in done)


def test_leftovers_of_a_killed_export_are_cleaned_by_the_next_export(tmp_path, caplog):
    out = tmp_path / "export"
    stale = tmp_path / ".export.tmp-somehost-123-abcdef12"  # a dead export's staging folder
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half written")
    write_hf_directory(tiny_model("llama_gqa"), out)
    assert not stale.exists() and _siblings(out) == []
    assert any("interrupted write" in r.getMessage() for r in caplog.records)


def test_non_finite_weights_are_never_written(tmp_path):
    model = tiny_model("llama_gqa")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 3] = float("nan")
        model.model.norm.weight[2] = float("inf")
    out = tmp_path / "export"
    with pytest.raises(ExportError, match=r"2 tensor\(s\): model\.layers\.1\.mlp\.down_proj"):
        write_hf_directory(model, out)
    assert not out.exists() and _siblings(out) == []


@pytest.mark.slow
def test_a_nan_log_alpha_stops_training_at_its_step_naming_dimension_and_layer(
    tmp_path, tiny_tokenizer_dir
):

    class InjectNaN(Callback):
        # After step 2's update, one log-alpha of layer 1's intermediate gates becomes NaN.
        def batch_end(self, state, logger):
            if int(state.timestamp.batch) == 2:
                with torch.no_grad():
                    find_gates(state.model).gates["intermediate"].log_alpha[1, 5] = float("nan")

    registry.callbacks.register("inject_nan_log_alpha", func=InjectNaN)
    model_dir, data_dir = make_tiny_run_inputs(tmp_path, tiny_tokenizer_dir, "llama_gqa")
    export = tmp_path / "export"
    with pytest.raises(NonFiniteGateError) as caught:
        run_prune(
            model_dir,
            data_dir,
            "max_duration=5ba",
            f"callbacks.pruned_hf_export.save_folder={export}",
            "callbacks.inject_nan_log_alpha={}",
        )
    message = str(caught.value)
    assert "training step 3" in message  # the first forward after the NaN appeared
    assert "log_alpha of dimension 'intermediate', layer(s) [1]" in message
    assert "the Lagrangian penalty" in message
    assert not export.exists()


@pytest.mark.slow
def test_callback_takes_hf_checkpointer_keys_and_keeps_the_newest_periodic_exports(
    tmp_path, tiny_tokenizer_dir
):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = PrunedHFExport(save_folder="x", interval="5ba", dtype="bfloat16")
    assert old.save_interval.value == 5 and old.dtype == torch.bfloat16
    assert sum(issubclass(w.category, DeprecationWarning) for w in caught) == 2
    with pytest.raises(ValueError, match="give save_interval only"):
        PrunedHFExport(save_folder="x", interval="5ba", save_interval="5ba")
    with pytest.raises(ValueError, match="save_num_checkpoints_to_keep"):
        PrunedHFExport(save_folder="x", save_num_checkpoints_to_keep=-2)
    for timeout in (0, -1.0, "2h", True):
        with pytest.raises(ValueError, match="export_timeout must be a number of seconds"):
            PrunedHFExport(save_folder="x", export_timeout=timeout)
    assert PrunedHFExport(save_folder="x", export_timeout=60).export_timeout == 60.0

    model_dir, data_dir = make_tiny_run_inputs(tmp_path, tiny_tokenizer_dir, "llama_gqa")
    export = tmp_path / "pruned"
    trainer = run_prune(
        model_dir,
        data_dir,
        "max_duration=6ba",
        f"callbacks.pruned_hf_export.save_folder={export}",
        "callbacks.pruned_hf_export.save_interval=2ba",
        "callbacks.pruned_hf_export.save_num_checkpoints_to_keep=1",
        "callbacks.pruned_hf_export.precision=float32",
        f"save_folder={tmp_path / 'ckpt'}",
        "save_interval=6ba",
        "save_filename=ba{batch}.pt",
    )
    assert gates_of(trainer) is not None
    trainer.close()

    # The checkpoint as a sharded (DCP) folder exports, read shard by shard, to the same
    # tensors as the checkpoint file and as the callback's own final export.

    ckpt = tmp_path / "ckpt" / "ba6.pt"
    dcp.save(torch.load(ckpt, weights_only=False), checkpoint_id=tmp_path / "sharded", no_dist=True)
    from_file = export_checkpoint(ckpt, tmp_path / "from_file").out_dir
    from_shards = export_checkpoint(tmp_path / "sharded", tmp_path / "from_shards").out_dir
    expected = load_file(export / "model.safetensors")
    for folder in (from_file, from_shards):
        got = load_file(folder / "model.safetensors")
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in expected), folder
    periodic = sorted(p.name for p in tmp_path.glob("pruned_ba*"))
    assert periodic == ["pruned_ba6"]  # ba2 and ba4 were dropped once newer ones existed
    for folder in (export, tmp_path / "pruned_ba6"):
        assert (folder / EXPORT_INFO).is_file() and (folder / "README.md").is_file()
        AutoModelForCausalLM.from_pretrained(folder)


@pytest.mark.parametrize("crafted", ["../../escaped.mds", "/tmp/escaped-abs.mds", ".."])
def test_a_crafted_shard_name_in_index_json_cannot_direct_a_write(tmp_path, crafted):

    split = tmp_path / "data" / "code" / "train"
    with MDSWriter(out=str(split), columns={"tokens": "ndarray:int64"}, compression="zstd") as w:
        for i in range(4):
            w.write({"tokens": np.arange(i, i + 8, dtype=np.int64)})
    assert [t[0] for t in read_mds_token_samples(split)] == [0, 1, 2, 3]  # the honest index

    index = json.loads((split / "index.json").read_text())
    index["shards"][0]["raw_data"]["basename"] = crafted
    (split / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="not a plain file name"):
        list(read_mds_token_samples(split))
    assert (
        not (tmp_path / "escaped.mds").exists() and not (tmp_path / "data" / "escaped.mds").exists()
    )
    assert not os.path.exists("/tmp/escaped-abs.mds")


class _RunsCode:
    """Unpickling this calls ``pathlib.Path.touch`` on a marker file: code from the file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_a_checkpoint_that_would_run_code_is_refused_without_trust(tmp_path):

    marker = tmp_path / "code_ran"
    ckpt = tmp_path / "downloaded.pt"
    torch.save({"state": {"model": {}}, "payload": _RunsCode(str(marker))}, ckpt)
    refusal = r"\(builtins\.getattr, pathlib\.Path, .*--trust-checkpoint"
    with pytest.raises(ExportError, match=refusal):
        export_checkpoint(ckpt, tmp_path / "out")
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_an_export_records_its_provenance_and_carries_a_card_and_the_licence(
    tmp_path, tiny_tokenizer_dir
):

    source = save_tiny_checkpoint(tiny_model("llama_gqa"), tiny_tokenizer_dir, tmp_path / "src")
    (source / "LICENSE").write_text("Example licence terms\n")
    (source / "USE_POLICY.md").write_text("Acceptable use\n")
    out = tmp_path / "pruned"
    prune_oneshot_to_dir(source, out, FAMILY_TARGETS["llama_gqa"], method="random")

    record = json.loads((out / EXPORT_INFO).read_text())
    prov = record["provenance"]
    assert prov["source"] == str(source)
    assert prov["source_config_sha256"] == config_hash(AutoConfig.from_pretrained(source))
    assert torch.__version__.startswith(prov["versions"]["torch"])
    assert prov["versions"]["transformers"] and prov["command"]
    assert sorted(record["licence_files"]) == ["LICENSE", "USE_POLICY.md"]
    assert (out / "LICENSE").read_text() == "Example licence terms\n"
    card = (out / "README.md").read_text()
    assert "library_name: transformers" in card and "## How it was made" in card
    assert (
        f"| parameters | {record['source_num_params']:,} | {record['target_num_params']:,} |"
        in card
    )
    assert "oneshot-random" in card


@pytest.mark.slow
def test_the_callback_refuses_a_foreign_save_folder_before_training(tmp_path, tiny_tokenizer_dir):
    """The reported bug: a save_folder holding a Composer checkpoint was deleted by the export."""
    model_dir, data_dir = make_tiny_run_inputs(tmp_path, tiny_tokenizer_dir, "llama_gqa")
    foreign = _foreign_folder(tmp_path / "save_folder")
    with pytest.raises(OutputPathError, match=r"pruned_hf_export\.save_folder: .*not written by"):
        run_prune(
            model_dir,
            data_dir,
            "max_duration=2ba",
            f"callbacks.pruned_hf_export.save_folder={foreign}",
            "callbacks.pruned_hf_export.overwrite=true",
        )
    assert (foreign / "ckpts" / "ep0-ba400-rank0.pt").read_bytes() == b"not ours"
