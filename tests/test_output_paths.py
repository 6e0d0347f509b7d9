"""Output paths are checked at INIT (naming the YAML key); a failed final export keeps the model."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from composer_shear.output_paths import (
    RUN_MARKER,
    OutputPathError,
    check_output_dir,
    check_output_file,
)
from tests.pruning_helpers import PRUNE_YAML, REPO, VENV_BIN, make_tiny_run_inputs


def test_check_output_dir_and_file(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(OutputPathError, match=r"some\.key: .*a_file is a file"):
        check_output_dir(blocker / "export", "some.key", overwrite=True)
    with pytest.raises(OutputPathError, match=r"some\.key"):
        check_output_file(blocker / "metrics.jsonl", "some.key")
    with pytest.raises(OutputPathError, match="is a directory"):
        check_output_file(tmp_path, "some.key")
    full = tmp_path / "full"
    (full / "x").mkdir(parents=True)
    with pytest.raises(OutputPathError, match=r"is not empty and was not written by"):
        check_output_dir(full, "some.key", overwrite=False)
    # With overwrite, only a folder composer_shear wrote may be replaced (test_output_safety).
    with pytest.raises(OutputPathError, match="was not written by composer_shear"):
        check_output_dir(full, "some.key", overwrite=True)
    (full / RUN_MARKER).write_text("{}")
    with pytest.raises(OutputPathError, match=r"exists and is not empty.*overwrite"):
        check_output_dir(full, "some.key", overwrite=False)
    assert check_output_dir(full, "some.key", overwrite=True) == full
    fresh = tmp_path / "new" / "deeper" / "export"
    assert check_output_dir(fresh, "some.key", overwrite=False) == fresh
    assert fresh.parent.is_dir() and not fresh.exists()  # the folder itself is left to the run
    assert list(fresh.parent.iterdir()) == []  # no scratch file left behind


def test_jsonl_metrics_path_is_checked_when_the_trainer_is_built(tmp_path):
    from composer import Trainer
    from composer.models import ComposerClassifier
    from torch.utils.data import DataLoader, TensorDataset

    from composer_shear.report.metrics import JSONLMetricsLogger

    (tmp_path / "blocker").write_text("not a folder")
    logger = JSONLMetricsLogger(str(tmp_path / "blocker" / "{run_name}.jsonl"))
    data = TensorDataset(torch.randn(8, 4), torch.randint(0, 2, (8,)))
    model = ComposerClassifier(torch.nn.Linear(4, 2), num_classes=2)
    with pytest.raises(OutputPathError, match=r"loggers\.jsonl_metrics\.path: .*blocker is a file"):
        Trainer(
            model=model,
            train_dataloader=DataLoader(data, batch_size=4),
            max_duration="2ba",
            loggers=[logger],
            device="cpu",
            progress_bar=False,
        )


@pytest.fixture(scope="module")
def tiny_inputs(tmp_path_factory, tiny_tokenizer_dir):
    return make_tiny_run_inputs(tmp_path_factory.mktemp("paths"), tiny_tokenizer_dir, "llama_gqa")


@pytest.mark.slow
def test_bad_export_folder_stops_llmfoundry_train_before_training(tiny_inputs, tmp_path):
    model_dir, data_dir = tiny_inputs
    (tmp_path / "blocker").write_text("not a folder")
    start = time.perf_counter()
    proc = subprocess.run(
        [
            str(VENV_BIN / "llmfoundry"),
            "train",
            str(PRUNE_YAML),
            f"variables.model_dir={model_dir}",
            f"variables.data_dir={data_dir}",
            f"callbacks.pruned_hf_export.save_folder={tmp_path / 'blocker' / 'pruned'}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = proc.stdout + proc.stderr
    # torch's elastic error handler prefixes "[rank0]: " and may wrap long lines; undo both.
    flat = " ".join(re.sub(r"\[rank\d+\]:", " ", output).split())
    assert proc.returncode != 0
    assert "callbacks.pruned_hf_export.save_folder" in flat, output[-3000:]
    assert "blocker is a file" in flat, output[-3000:]
    assert "[batch=1/" not in output  # not a single training step ran
    print(f"failed after {time.perf_counter() - start:.1f}s")


RESCUE_SCRIPT = """
import shutil, sys
from pathlib import Path
from composer import Callback
from llmfoundry import registry
from llmfoundry.command_utils import train_from_yaml

yaml, model_dir, data_dir, export = sys.argv[1:]


class BreakExportFolder(Callback):
    # After the last step, something takes the export's place (a full disk, a stray file...).
    def batch_end(self, state, logger):
        if int(state.timestamp.batch) == 4:
            Path(export).write_text("in the way")


registry.callbacks.register("break_export_folder", func=BreakExportFolder)
train_from_yaml(yaml, [
    f"variables.model_dir={model_dir}", f"variables.data_dir={data_dir}", "max_duration=4ba",
    f"callbacks.pruned_hf_export.save_folder={export}", "callbacks.break_export_folder={}",
])
"""


@pytest.mark.slow
def test_failed_final_export_saves_a_checkpoint_that_exports(tiny_inputs, tmp_path):
    model_dir, data_dir = tiny_inputs
    script = tmp_path / "rescue.py"
    script.write_text(RESCUE_SCRIPT)
    export = tmp_path / "out" / "pruned"
    proc = subprocess.run(
        [sys.executable, str(script), str(PRUNE_YAML), str(model_dir), str(data_dir), str(export)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    (ckpt,) = (tmp_path / "out").glob("pruned-rescue-*/ep0-ba4-rank0.pt")
    assert f"writing {export} failed" in output, output[-3000:]
    assert f"composer-shear export {ckpt} {export}" in output

    # What the message says to do works: the checkpoint exports to a loadable model.
    redo = tmp_path / "redo"
    cli = subprocess.run(
        [str(VENV_BIN / "composer-shear"), "export", str(ckpt), str(redo)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert cli.returncode == 0, cli.stdout[-2000:] + cli.stderr[-2000:]
    model, info = AutoModelForCausalLM.from_pretrained(redo, output_loading_info=True)
    assert not any(info.values()), info
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 48
