"""``benchmarks/gpu_check.py --gpus N``: its command line, job and figures, without a GPU.

The multi-GPU mode cannot run here; what can be checked is that it stops with a clear message
without CUDA, that the job it would launch is the SmolLM2 recipe in bf16 under FSDP with the
gates in fp32 and the export in bf16 (overrides applied to the recipe as LLM Foundry would),
and that its figures are read from what that job writes.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from composer.distributed.mosaic_parallelism import get_mixed_precision
from omegaconf import OmegaConf

from composer_shear.launch import llmfoundry_train_command

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_check():
    # The script imports its sibling `common` as `python benchmarks/gpu_check.py` would.
    sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks/gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_modes_have_their_own_defaults(gpu_check):
    multi = gpu_check.parse_args(["--gpus", "4"])
    assert (multi.gpus, multi.batch, multi.seq_len, multi.steps) == (4, 8, 512, 30)
    one = gpu_check.parse_args([])
    assert (one.gpus, one.batch, one.seq_len, one.steps) == (None, 8, 1024, 20)
    assert gpu_check.parse_args(["--gpus", "2", "--steps", "12"]).steps == 12
    for bad in (["--gpus", "0"], ["--gpus", "2", "--smoke"]):
        with pytest.raises(SystemExit) as exit_info:
            gpu_check.parse_args(bad)
        assert exit_info.value.code == 2


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="this machine has the GPUs")
def test_without_gpus_it_stops_with_a_clear_message(gpu_check):
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(["--gpus", "2"])
    message = str(exit_info.value.code)
    assert "gpu_check needs 2 CUDA GPU(s); this machine has" in message
    assert "--smoke" in message


def test_the_job_is_the_smollm2_recipe_in_bf16_under_fsdp(gpu_check, tmp_path):
    args = gpu_check.parse_args(["--gpus", "8", "--batch", "4"])
    losses = {domain: 2.0 + i / 10 for i, domain in enumerate(gpu_check.DOMAINS)}
    overrides = gpu_check.multi_gpu_overrides(
        args, tmp_path / "model", tmp_path / "data", tmp_path / "run", losses
    )
    recipe = gpu_check.SMOLLM2_PRUNE_YAML
    command = llmfoundry_train_command(recipe, overrides, processes=args.gpus)
    assert [Path(command[0]).name, *command[1:3]] == ["composer", "-n", "8"]
    assert [Path(command[3]).name, command[4], command[5]] == ["llmfoundry", "train", str(recipe)]
    assert Path(llmfoundry_train_command(recipe, [], processes=1)[0]).name == "llmfoundry"

    # The overrides applied to the recipe as LLM Foundry's command line applies them.
    cfg = OmegaConf.merge(OmegaConf.load(recipe), OmegaConf.from_dotlist(overrides))
    assert cfg.precision == "amp_bf16"
    assert cfg.model.init_device == "mixed" and cfg.fsdp_config.sync_module_states
    assert cfg.fsdp_config.mixed_precision == "FULL" and cfg.fsdp_config.use_orig_params
    # FULL under amp_bf16: parameters (the gates included) stay fp32, which INIT requires.
    _, param_dtype, _, _ = get_mixed_precision("amp_bf16", cfg.fsdp_config.mixed_precision)
    assert param_dtype is None
    assert cfg.global_train_batch_size == 32 and cfg.device_train_microbatch_size == 4
    assert cfg.max_seq_len == 512 and cfg.max_duration == "30ba"
    assert cfg.callbacks.pruned_hf_export.precision == "bfloat16"
    assert cfg.callbacks.memory_monitor.dist_aggregate_batch_interval == 1
    assert cfg.callbacks.speed_monitor.window_size == 10
    target_loss = OmegaConf.to_container(cfg.callbacks.dynamic_batch_loading.target_loss)
    assert target_loss == pytest.approx(losses, abs=1e-4)
    # Where the script reads the export and the metrics is where the recipe writes them.
    assert cfg.callbacks.pruned_hf_export.save_folder == str(tmp_path / "run/models/pruned")
    assert cfg.loggers.jsonl_metrics.path == str(tmp_path / "run/metrics/prune.jsonl")


def test_figures_come_from_the_metrics_and_rank_0_log(gpu_check, tmp_path):
    metrics = tmp_path / "prune.jsonl"
    records = [
        {"step": 20, "metrics": {"throughput/tokens_per_sec": 1000.0}},
        {
            "step": 30,
            "metrics": {
                "throughput/tokens_per_sec": 2000.0,
                "throughput/device/tokens_per_sec": 250.0,
                "memory/peak_allocated_mem_max": 3.5,
                "memory/peak_allocated_mem_min": 3.25,
                "memory/peak_reserved_mem_max": 4.0,
            },
        },
    ]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    log = tmp_path / "prune.log"
    log.write_text("... pruned_hf_export:\n  written: /runs/x/models/pruned (12.5s)\n")
    figures = gpu_check.multi_gpu_figures(metrics, log)
    assert figures == {
        "tokens_per_s": 2000.0,
        "tokens_per_s_per_gpu": 250.0,
        "peak_allocated_gb_max": 3.5,
        "peak_allocated_gb_min": 3.25,
        "peak_reserved_gb_max": 4.0,
        "export_s": 12.5,
    }
    missing = gpu_check.multi_gpu_figures(tmp_path / "none.jsonl", tmp_path / "none.log")
    assert set(missing.values()) == {None}
