"""FSDP mixed precision that would run the gates in 16 bits is refused at INIT (FSDP1, FSDP2)."""

from __future__ import annotations

import json

import pytest

from tests.pruning_helpers import composer_launch, make_tiny_run_inputs

# Both FSDP versions in one launch: the refusal comes at INIT, before FSDP wraps anything,
# so Composer's FSDP1 needs no CPU shim here (see tests/test_fsdp.py).
SCRIPT = r"""
import json, os, sys
from composer.utils import dist
from tests.pruning_helpers import run_prune

model_dir, data_dir, out = sys.argv[1:4]
settings = {
    "bf16": "{param_dtype: bf16, reduce_dtype: fp32, buffer_dtype: fp32}",
    "fp32_params": "{param_dtype: fp32, reduce_dtype: bf16, buffer_dtype: bf16}",
}
result = {}
for version in ("1", "2"):
    os.environ["FSDP_VERSION"] = version
    for name, setting in settings.items():
        overrides = [
            "max_duration=1ba",
            "model.init_device=mixed",
            "fsdp_config.sharding_strategy=FULL_SHARD",
            "fsdp_config.use_orig_params=true",
            f"fsdp_config.mixed_precision={setting}",
        ]
        if name == "fp32_params" and version == "1":
            continue  # FSDP1 cannot wrap on CPU without the test shim of tests/test_fsdp.py
        try:
            run_prune(model_dir, data_dir, *overrides).close()
            result[f"fsdp{version}/{name}"] = "ran"
        except ValueError as error:
            result[f"fsdp{version}/{name}"] = str(error)
with open(f"{out}.{dist.get_global_rank()}.json", "w") as f:
    json.dump(result, f)
"""


@pytest.mark.slow
@pytest.mark.multiprocess
def test_bf16_gate_params_are_refused_on_every_rank(tiny_tokenizer_dir, tmp_path):
    model_dir, data_dir = make_tiny_run_inputs(tmp_path, tiny_tokenizer_dir, "llama_gqa")
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    out = tmp_path / "result"
    proc = composer_launch(2, script, str(model_dir), str(data_dir), str(out), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for rank in (0, 1):
        result = json.loads((tmp_path / f"result.{rank}.json").read_text())
        for version in ("fsdp1", "fsdp2"):
            message = result[f"{version}/bf16"]
            assert "fsdp_config.mixed_precision=" in message and "torch.bfloat16" in message
            assert "mixed_precision: FULL" in message
        # Parameters (and so the gates) in float32 with bfloat16 reductions: allowed.
        assert result["fsdp2/fp32_params"] == "ran"
