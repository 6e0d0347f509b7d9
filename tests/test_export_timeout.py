"""A slow export on rank 0 trips no collective timeout: fit-end, periodic and rescue exports.

One ``composer -n 2`` launch (CPU, gloo, DDP) with ``dist_timeout: 3`` runs two tiny pruning
jobs. In both, rank 0's write sleeps 8 s (the test script wraps the export writer, as a slow
shared filesystem would stretch it) while rank 1 waits for it:

- a run with a periodic export (``save_interval``) and the fit-end export: both ranks finish
  cleanly and both exports are complete;
- a run whose final export fails after its slow write, then writes the rescue checkpoint just
  as slowly: every rank raises the export error naming the rescue checkpoint, none a timeout;
- the same under FSDP2 with ``state_dict_type: sharded`` (every rank writes its shard of the
  rescue checkpoint, rank 0 slowly).

Before the callback waited on its own long-timeout group, rank 1 failed in the first
export's status broadcast ("Timed out waiting 3000ms for recv operation to complete").
"""

from __future__ import annotations

import json
import time

import pytest

from composer_shear.export.checkpoint import export_checkpoint
from tests.pruning_helpers import composer_launch, make_tiny_run_inputs

SLOW_S = 6  # rank 0's write; twice dist_timeout
DIST_TIMEOUT_S = 3

SCRIPT = r"""
import json, os, sys, time
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemWriter

import composer_shear.callbacks.pruned_hf_export as export_callback
from tests.pruning_helpers import run_prune

model_dir, data_dir, out, slow, timeout = sys.argv[1:6]
slow = float(slow)
out = Path(out)
rank = int(os.environ["RANK"])  # set by the composer launcher
export_model, save = export_callback.export_model, torch.save
writes, rescue_writes = [], []


def slow_export(*args, **kwargs):
    # TEST ONLY: rank 0's write is slow (a shared filesystem), then succeeds.
    start = time.time()
    time.sleep(slow)
    summary = export_model(*args, **kwargs)
    writes.append(time.time() - start)
    return summary


def failing_export(*args, **kwargs):
    # TEST ONLY: rank 0's write is slow, then fails (a full disk).
    time.sleep(slow)
    raise OSError("injected: no space left on device")


def slow_save(obj, f, *args, **kwargs):
    # TEST ONLY: the rescue checkpoint's file is as slow to write (other saves are not).
    if str(getattr(f, "name", f)).endswith("-rank0.pt"):
        time.sleep(slow)
        rescue_writes.append(str(getattr(f, "name", f)))
    return save(obj, f, *args, **kwargs)


common = [f"dist_timeout={timeout}", "max_duration=3ba"]
result = {}
export_callback.export_model = slow_export
start = time.time()
trainer = run_prune(
    model_dir, data_dir, *common,
    f"callbacks.pruned_hf_export.save_folder={out}/pruned",
    "callbacks.pruned_hf_export.save_interval=2ba",
)
trainer.close()
result["clean_run_s"] = time.time() - start
result["writes_s"] = writes

export_callback.export_model = failing_export
if rank == 0:
    torch.save = slow_save
start = time.time()
try:
    run_prune(
        model_dir, data_dir, *common, f"callbacks.pruned_hf_export.save_folder={out}/failed"
    )
    result["rescue"] = "no error"
except Exception as error:
    result["rescue"] = f"{type(error).__name__}: {error}"
result["rescue_run_s"] = time.time() - start
result["rescue_writes"] = rescue_writes
torch.save = save

# The same under FSDP2 with a sharded rescue checkpoint: every rank writes its shard, rank 0
# slowly, coordinated by torch.distributed.checkpoint over the long-timeout group.
os.environ["FSDP_VERSION"] = "2"
write_data = FileSystemWriter.write_data


def slow_write_data(self, *args, **kwargs):
    # TEST ONLY: rank 0's shard of the sharded checkpoint is slow to write.
    time.sleep(slow)
    rescue_writes.append("sharded")
    return write_data(self, *args, **kwargs)


if rank == 0:
    FileSystemWriter.write_data = slow_write_data
start = time.time()
try:
    run_prune(
        model_dir, data_dir, *common,
        f"callbacks.pruned_hf_export.save_folder={out}/failed_fsdp",
        "fsdp_config.sharding_strategy=FULL_SHARD",
        "fsdp_config.mixed_precision=FULL",
        "fsdp_config.use_orig_params=true",
        "fsdp_config.state_dict_type=sharded",
    )
    result["rescue_fsdp"] = "no error"
except Exception as error:
    result["rescue_fsdp"] = f"{type(error).__name__}: {error}"
result["rescue_fsdp_run_s"] = time.time() - start
FileSystemWriter.write_data = write_data
(out / f"rank{rank}.json").write_text(json.dumps(result))
"""


@pytest.mark.slow
@pytest.mark.multiprocess
def test_slow_exports_trip_no_collective_timeout(tiny_tokenizer_dir, tmp_path):
    model_dir, data_dir = make_tiny_run_inputs(tmp_path, tiny_tokenizer_dir, "llama_gqa")
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    out = tmp_path / "out"
    out.mkdir()
    start = time.perf_counter()
    proc = composer_launch(
        2, script, str(model_dir), str(data_dir), str(out), str(SLOW_S), str(DIST_TIMEOUT_S)
    )
    output = proc.stdout + proc.stderr
    print(f"launch took {time.perf_counter() - start:.1f} s")
    assert proc.returncode == 0, output[-4000:]
    assert "Timed out" not in output, output[-4000:]
    results = [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    # The periodic export (batch 2) and the fit-end export are complete.
    for folder in ("pruned_ba2", "pruned"):
        assert (out / folder / "composer_shear_export.json").is_file(), folder
        assert (out / folder / "config.json").is_file(), folder
    writes = results[0]["writes_s"]
    assert len(writes) == 2 and min(writes) >= SLOW_S, writes
    for rank, result in enumerate(results):
        print(
            f"rank {rank}: clean run {result['clean_run_s']:.1f} s (rank 0's writes "
            f"{', '.join(f'{s:.1f}' for s in writes)} s), rescue runs "
            f"{result['rescue_run_s']:.1f} s (DDP), {result['rescue_fsdp_run_s']:.1f} s (FSDP2)"
        )
        for key in ("rescue", "rescue_fsdp"):
            message = result[key]
            # Every rank gets the export's error and the rescue checkpoint's name, no timeout.
            assert message.startswith("RuntimeError: pruned_hf_export: writing"), (key, message)
            assert "OSError: injected: no space left on device" in message, (key, message)
            assert "saved as the checkpoint" in message, (key, message)
    (checkpoint,) = out.glob("failed-rescue-*/ep0-ba3-rank0.pt")
    (sharded,) = out.glob("failed_fsdp-rescue-*/ep0-ba3")
    assert {p.name for p in sharded.iterdir()} >= {".metadata", "__0_0.distcp", "__1_0.distcp"}
    for result in results:
        assert f"the checkpoint {checkpoint}." in result["rescue"]
        assert f"the checkpoint {sharded}." in result["rescue_fsdp"]
    # The slow writes were these (the rescue file, then rank 0's shard).
    assert results[0]["rescue_writes"] == [str(checkpoint), "sharded"]
    # What the message says to do works for the sharded one too (the file: test_output_paths).
    summary = export_checkpoint(sharded, tmp_path / "redo")
    assert summary.target.num_hidden_layers == 2 and summary.target.hidden_size == 48
