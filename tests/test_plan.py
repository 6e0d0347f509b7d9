"""`composer-shear plan`: parameter counts, the activation model against autograd, the CLI."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

from composer_shear.families import get_family
from composer_shear.plan import (
    GPUS,
    PlanError,
    activation_bytes_per_token,
    flops_per_token,
    implied_mfu,
    load_yaml,
    plan_job,
    read_config,
    render,
    size_warnings,
)
from composer_shear.pruning.masking import attach_gates
from tests.pruning_helpers import REPO, VENV_BIN

FIXTURES = REPO / "tests" / "fixtures" / "configs"
LLAMA2 = FIXTURES / "Llama-2-7b-hf.json"


def _saved_bytes(config, batch: int, seq: int, autocast: bool, target=None) -> int:
    """Distinct storages autograd saves in one training forward + backward."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").train()
    if target is not None:
        attach_gates(model, target)
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
        return tensor

    cast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), cast:
        model(input_ids=ids, labels=ids).loss.backward()
    return sum(storages.values())


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("gated", [False, True])
def test_activation_model_matches_autograd_on_a_held_out_shape(autocast, gated):
    # A shape outside the fit's set (other widths, GQA ratio, vocabulary, depth).
    config = LlamaConfig(
        num_hidden_layers=3,
        hidden_size=160,
        intermediate_size=448,
        num_attention_heads=10,
        num_key_value_heads=5,
        head_dim=16,
        vocab_size=768,
    )
    target = {"hidden_size": 128, "intermediate_size": 256} if gated else None
    # Two batch sizes: the weights (saved too) cancel in the difference.
    per_token = (
        _saved_bytes(config, 4, 48, autocast, target)
        - _saved_bytes(config, 2, 48, autocast, target)
    ) / 96
    shape = get_family(config).shape(config)
    precision = "amp_bf16" if autocast else "fp32"
    predicted = activation_bytes_per_token(shape, precision, gated, checkpointing=False)
    predicted -= 4 * config.vocab_size  # the logits' gradient is not a saved tensor
    assert predicted == pytest.approx(per_token, rel=0.02)


def test_llama2_prune_recipe_plan():
    cfg = load_yaml(REPO / "yamls" / "llama2-7b" / "prune_2.7b.yaml")
    plan = plan_job(cfg, read_config(LLAMA2), gpus=8, gpu="a100-80gb", mfu=0.4)
    # The recipe header's counts (tests/test_recipes.py checks them against ModelShape).
    assert plan.model["params"] == 6_738_415_616
    assert plan.target["params"] == 2_701_560_320
    assert plan.steps == 3200 and plan.tokens_per_step == 32 * 4096
    lines = {line.what: line.gib for line in plan.memory}
    # 16 bytes per parameter (fp32 weights, grads, two Adam moments) over 8 GPUs.
    states = sum(v for k, v in lines.items() if k.startswith(("master", "gradients", "optimizer")))
    assert states == pytest.approx(16 * 6_738_415_616 / 8 / 2**30)
    assert 15 < plan.memory_total_gib < 80
    # Checkpointing off would not fit: the report says by how much it grows.
    assert plan.memory_other_checkpointing > 40
    n = 6_738_415_616 - 32_000 * 4096  # matmul params: no embedding lookup, with the head
    attention = 2 * 32 * 32 * 128 * 4096
    assert plan.flops_per_token == pytest.approx(3 * (2 * n + attention))
    hours = plan.flops_per_step * 3200 / (8 * 312e12 * 0.4) / 3600
    assert plan.hours == pytest.approx(hours)


def test_cpt_recipe_plans_the_pruned_shape():
    cfg = load_yaml(REPO / "yamls" / "llama2-7b" / "cpt_2.7b.yaml")
    plan = plan_job(cfg, read_config(LLAMA2), gpus=16)
    assert plan.kind == "cpt" and plan.target is None
    assert plan.model["params"] == 2_701_560_320
    assert not any("gates" in line.what for line in plan.memory)


def test_oneshot_recipe_plans_the_frozen_source():
    cfg = load_yaml(REPO / "yamls" / "llama3.1-8b" / "oneshot_3b.yaml")
    plan = plan_job(cfg, read_config(FIXTURES / "Llama-3.1-8B.json"), gpus=8)
    assert plan.kind == "oneshot" and plan.steps == 1
    assert plan.model["params"] == 8_030_261_248 and plan.target["params"] == 3_606_752_256
    lines = {line.what: line for line in plan.memory}
    assert lines["gradients (fp32)"].gib == 0 and "frozen" in lines["gradients (fp32)"].note
    assert lines["optimizer state (decoupled_adamw)"].gib == 0
    assert lines["master weights (fp32)"].gib == pytest.approx(4 * 8_030_261_248 / 8 / 2**30)


def test_oneshot_job_with_a_budget_plans_its_largest_candidate():
    cfg = load_yaml(
        REPO / "yamls" / "llama3.1-8b" / "oneshot_3b.yaml",
        [
            "algorithms.oneshot_pruning.target_shape=null",
            "algorithms.oneshot_pruning.target_params=3.6e9",
        ],
    )
    plan = plan_job(cfg, read_config(FIXTURES / "Llama-3.1-8B.json"), gpus=8)
    assert plan.kind == "oneshot"
    assert 0.97 * 3.6e9 <= plan.target["params"] <= 3.6e9
    assert any("target_params 3,600,000,000" in note for note in plan.notes)
    assert "note   : target_params" in render(plan)


def test_kd_recipe_counts_the_teacher():
    cfg = load_yaml(REPO / "yamls" / "llama2-7b" / "prune_2.7b_kd.yaml")
    with_kd = plan_job(cfg, read_config(LLAMA2))
    without = plan_job(
        load_yaml(REPO / "yamls" / "llama2-7b" / "prune_2.7b.yaml"), read_config(LLAMA2)
    )
    teacher = [line for line in with_kd.memory if line.what.startswith("KD teacher")]
    assert teacher and teacher[0].gib == pytest.approx(2 * 6_738_415_616 / 8 / 2**30)
    assert with_kd.flops_per_token > without.flops_per_token


def test_overrides_and_warnings():
    cfg = load_yaml(
        REPO / "yamls" / "llama2-7b" / "prune_2.7b.yaml",
        [
            "algorithms.targeted_pruning.target_shape.hidden_size=3001",
            "algorithms.targeted_pruning.target_shape.intermediate_size=8191",
            "device_train_microbatch_size=4",
            "fsdp_config.activation_checkpointing=false",
        ],
    )
    plan = plan_job(cfg, read_config(LLAMA2))
    text = " ".join(plan.warnings)
    assert "hidden_size=3001" in text and "intermediate_size=8191" in text
    assert "exceeds" in text  # microbatch 4 without checkpointing does not fit 80 GB


def test_bad_input():
    cfg = load_yaml(
        REPO / "yamls" / "llama2-7b" / "prune_2.7b.yaml",
        ["algorithms.targeted_pruning.target_shape.hidden_size=8192"],
    )
    with pytest.raises(PlanError, match="larger than the source"):
        plan_job(cfg, read_config(LLAMA2))
    with pytest.raises(PlanError, match="unknown GPU"):
        plan_job(
            load_yaml(REPO / "yamls" / "llama2-7b" / "prune_2.7b.yaml"),
            read_config(LLAMA2),
            gpu="v100",
        )
    with pytest.raises(PlanError, match="--source-config"):
        read_config(REPO / "no-such-model-dir")


def test_published_throughputs_imply_plausible_mfu():
    """LLM-Shearing: 7B pruning at 1,844 tokens/s per A100, plain 7B training at 3,684."""
    config = AutoConfig.for_model(**json.loads(LLAMA2.read_text()))
    shape = get_family(config).shape(config)
    flops = flops_per_token(shape, 4096)
    assert implied_mfu(1844, flops, GPUS["a100-80gb"]) == pytest.approx(0.253, abs=0.005)
    assert implied_mfu(3684, flops, GPUS["a100-80gb"]) == pytest.approx(0.506, abs=0.005)


def test_size_warnings_name_the_dimension():
    config = AutoConfig.for_model(**json.loads(LLAMA2.read_text()))
    assert size_warnings(get_family(config).shape(config), "source") == []


def test_cli(tmp_path):
    out = tmp_path / "plan.json"
    run = subprocess.run(
        [
            str(VENV_BIN / "composer-shear"),
            "plan",
            "yamls/llama2-7b/prune_2.7b.yaml",
            "--source-config",
            str(LLAMA2),
            "--gpus",
            "16",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert run.returncode == 0, run.stderr
    assert "memory per GPU" in run.stdout and "GPU-hours" in run.stdout
    assert json.loads(out.read_text())["gpus"] == 16
    bad = subprocess.run(
        [
            str(VENV_BIN / "composer-shear"),
            "plan",
            "yamls/llama2-7b/prune_2.7b.yaml",
            "--source-config",
            str(tmp_path / "missing.json"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert bad.returncode == 2 and "error:" in bad.stderr and not bad.stdout
