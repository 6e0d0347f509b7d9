"""An error on one rank stops every rank within seconds, with that rank's message."""

from __future__ import annotations

import time

import pytest

from tests.pruning_helpers import composer_launch, make_tiny_run_inputs

# The failure is injected on rank 1 only, between two steps, as a data error would surface
# (the mixer raises ShardReadError while drawing the batch): rank 0 goes on into the step and
# waits in DDP's gradient all-reduce for a rank that will never come.
SCRIPT = r"""
import sys, time
from composer import Callback
from composer.utils import dist
from llmfoundry.registry import callbacks
from composer_shear.data.mixer import ShardReadError
from tests.pruning_helpers import run_prune


class FailOnRank1(Callback):
    def before_forward(self, state, logger):
        if dist.get_global_rank() == 1 and int(state.timestamp.batch) == 2:
            with open(sys.argv[3], "w") as f:
                f.write(str(time.time()))
            raise ShardReadError("injected: shard.00007.mds of domain 'code' is unreadable")


callbacks.register("fail_on_rank1", func=FailOnRank1)
model_dir, data_dir = sys.argv[1:3]
run_prune(model_dir, data_dir, "max_duration=6ba", "callbacks.fail_on_rank1={}")
"""


@pytest.mark.slow
@pytest.mark.multiprocess
def test_data_error_on_rank_1_stops_both_ranks(tiny_tokenizer_dir, tmp_path):
    model_dir, data_dir = make_tiny_run_inputs(tmp_path, tiny_tokenizer_dir, "llama_gqa")
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    failed_at = tmp_path / "failed_at"
    proc = composer_launch(2, script, str(model_dir), str(data_dir), str(failed_at), timeout=600)
    stopped = time.time()
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert "ShardReadError: injected: shard.00007.mds of domain 'code'" in output
    seconds = stopped - float(failed_at.read_text())
    print(f"rank 1 failed -> every rank stopped in {seconds:.1f} s")
    # Measured 22.7 s on 2 CPU cores shared with other jobs: Composer's launcher sees rank 1
    # exit and ends the job (no code of ours does it; other launchers are untested).
    assert seconds < 60, seconds
