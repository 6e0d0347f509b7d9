"""The ``oneshot_pruning`` job: the one-shot cut inside ``llmfoundry train``, one or two ranks.

Real LLM Foundry runs of ``yamls/tests/oneshot_tiny.yaml`` on a tiny GQA Llama: the job keeps
exactly the units ``prune-oneshot`` keeps on the same calibration tokens, its export equals the
CLI's tensor for tensor, and the one training batch changes no weight. The 2-rank FSDP runs
(``composer -n 2``, gloo on CPU) are at the end.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from llmfoundry.registry import algorithms
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from composer_shear.export.checkpoint import export_checkpoint
from composer_shear.export.oneshot import prune_oneshot_to_dir
from composer_shear.export.oneshot_job import OneshotPruning
from composer_shear.export.units import read_kept_units
from composer_shear.pruning.masking import GATES_ATTR
from tests.pruning_helpers import (
    FAMILY_TARGETS,
    REPO,
    composer_launch,
    gates_of,
    make_tiny_run_inputs,
)

ONESHOT_YAML = REPO / "yamls" / "tests" / "oneshot_tiny.yaml"
KEY = "algorithms.oneshot_pruning"
# What yamls/tests/oneshot_tiny.yaml sets (the tiny GQA Llama's target): the CLI gets the same.
TARGET = dict(FAMILY_TARGETS["llama_gqa"])
SEQ_LEN, BATCH, TOKENS, SEED = 32, 4, 1024, 3


def run_oneshot(model_dir: Path, data_dir: Path, *overrides: str):
    """Runs ``yamls/tests/oneshot_tiny.yaml`` in-process (``llmfoundry train``'s function)."""
    from llmfoundry.command_utils import train_from_yaml

    args = [f"variables.model_dir={model_dir}", f"variables.data_dir={data_dir}", *overrides]
    return train_from_yaml(str(ONESHOT_YAML), args)


def cli_cut(
    model_dir: Path, data_dir: Path, out: Path, method: str, budget: int | None = None
) -> Path:
    """``prune-oneshot`` on the job's calibration tokens (a shape, or :data:`SEARCH`)."""
    search = {} if budget is None else {"target_params": budget, **SEARCH_CLI}
    summary = prune_oneshot_to_dir(
        model_dir,
        out,
        None if budget is not None else TARGET,
        data=data_dir,
        method=method,
        calibration_tokens=TOKENS,
        max_seq_len=SEQ_LEN,
        batch_size=BATCH,
        seed=SEED,
        **search,
    )
    return Path(summary.out_dir)


# A budget of 70% of the tiny GQA Llama; widths in multiples of 8 (the default 64 is the
# tiny model's whole hidden size) and 10% slack, so that several depths and widths compete.
BUDGET_FRACTION = 0.7
SEARCH_CLI = {"width_multiple": 8, "budget_slack": 0.1}
SEARCH_OVERRIDES = [
    f"{KEY}.target_shape=null",
    f"{KEY}.width_multiple=8",
    f"{KEY}.budget_slack=0.1",
]


def tiny_budget(model_dir: Path) -> int:
    source = AutoModelForCausalLM.from_pretrained(model_dir)
    return int(sum(p.numel() for p in source.parameters()) * BUDGET_FRACTION)


def assert_same_search(job: Path, cli: Path) -> None:
    """The job scored the CLI's candidates, in its order, to the same losses; same winner."""
    a = json.loads((job / "composer_shear_export.json").read_text())["search"]
    b = json.loads((cli / "composer_shear_export.json").read_text())["search"]
    assert len(b) > 3  # several shapes competed
    assert [row["shape"] for row in a] == [row["shape"] for row in b]
    for row_a, row_b in zip(a, b, strict=True):
        # The job scores the masked source, the CLI the cut model: equal up to rounding.
        assert row_a["loss"] == pytest.approx(row_b["loss"], rel=1e-4, abs=1e-5)
    losses = [row["loss"] for row in a]
    assert losses == sorted(losses) and losses[0] < losses[-1]


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def assert_same_cut(job: Path, cli: Path) -> None:
    """Same kept units, same tensors (both are the source weights sliced, nothing folded)."""
    kept_job, kept_cli = read_kept_units(job), read_kept_units(cli)
    assert kept_job["kept"] == kept_cli["kept"]
    # Not vacuous: the scores decided something (not the first units of every layer).
    assert any(row != list(range(len(row))) for row in kept_cli["kept"]["intermediate"])
    a, b = tensors(job), tensors(cli)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def test_registered_and_options_checked():
    assert algorithms.get("oneshot_pruning") is OneshotPruning
    with pytest.raises(ValueError, match="oneshot_pruning: method must be one of"):
        OneshotPruning(TARGET, method="magnitude")
    with pytest.raises(ValueError, match="not random"):
        OneshotPruning(TARGET, method="random", layer_score="taylor")
    with pytest.raises(ValueError, match="calibration_tokens must be positive"):
        OneshotPruning(TARGET, calibration_tokens=0)
    algorithm = OneshotPruning(TARGET)
    assert algorithm.freeze_weights and algorithm.eval_at == "target"
    with pytest.raises(ValueError, match="exactly one of them"):
        OneshotPruning(TARGET, target_params=1e6)
    with pytest.raises(ValueError, match="exactly one of them"):
        OneshotPruning()
    with pytest.raises(ValueError, match="has none"):
        OneshotPruning(target_params=1e6, method="random")
    with pytest.raises(ValueError, match="positive whole number"):
        OneshotPruning(target_params=-5)
    assert OneshotPruning(target_params="3.0e9").target_params == 3_000_000_000


@pytest.mark.slow
@pytest.mark.parametrize("method", ["activation", "taylor"])
def test_one_process_job_cuts_what_the_cli_cuts(method, tiny_tokenizer_dir, tmp_path):
    model_dir, data_dir = make_tiny_run_inputs(tmp_path, tiny_tokenizer_dir, "llama_gqa")
    export = tmp_path / "job"
    trainer = run_oneshot(
        model_dir,
        data_dir,
        f"{KEY}.method={method}",
        f"{KEY}.calibration_tokens={TOKENS}",
        f"{KEY}.seed={SEED}",
        f"callbacks.pruned_hf_export.save_folder={export}",
        # Decoupled weight decay would shrink every weight the optimizer stepped.
        "optimizer.weight_decay=0.1",
        f"save_folder={tmp_path}/ckpt",
        "save_interval=1ba",
        "save_filename=final.pt",
    )
    try:
        state = trainer.state
        assert int(state.timestamp.batch) == 1
        gates = gates_of(trainer)
        assert gates.hardened and gates.binary
        # The batch changed nothing: every weight is the source's, bit for bit, and the
        # optimizer holds no state for any weight.
        source = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
        hf_model = state.model.model
        after = {k: v for k, v in hf_model.state_dict().items() if not k.startswith(GATES_ATTR)}
        expected = source.state_dict()
        assert sorted(after) == sorted(expected)
        for name, value in expected.items():
            assert torch.equal(after[name], value), name
        gate_ids = {id(p) for p in gates.parameters()}
        assert all(id(p) in gate_ids for p in state.optimizers[0].state)
        algorithm = next(a for a in state.algorithms if isinstance(a, OneshotPruning))
        assert algorithm.calibration_tokens_used == TOKENS
    finally:
        trainer.close()
    info = json.loads((export / "composer_shear_export.json").read_text())
    assert info["method"] == f"oneshot-{method} (oneshot_pruning)"
    assert info["calibration_tokens"] == TOKENS
    assert_same_cut(export, cli_cut(model_dir, data_dir, tmp_path / "cli", method))
    # The job's checkpoint exports to the same model (`composer-shear export`).
    export_checkpoint(tmp_path / "ckpt" / "final.pt", tmp_path / "from_ckpt")
    assert_same_cut(tmp_path / "from_ckpt", export)


@pytest.mark.slow
def test_one_process_job_searches_the_shape_as_the_cli(tiny_tokenizer_dir, tmp_path):
    """target_params: the CLI's candidates, losses and winner; its export and checkpoint."""
    model_dir, data_dir = make_tiny_run_inputs(tmp_path, tiny_tokenizer_dir, "llama_gqa")
    budget = tiny_budget(model_dir)
    export = tmp_path / "job"
    trainer = run_oneshot(
        model_dir,
        data_dir,
        *SEARCH_OVERRIDES,
        f"{KEY}.target_params={budget}",
        f"{KEY}.calibration_tokens={TOKENS}",
        f"{KEY}.seed={SEED}",
        f"callbacks.pruned_hf_export.save_folder={export}",
        f"save_folder={tmp_path}/ckpt",
        "save_interval=1ba",
        "save_filename=final.pt",
    )
    try:
        gates = gates_of(trainer)
        assert gates.hardened and gates.target.num_params() <= budget
    finally:
        trainer.close()
    cli = cli_cut(model_dir, data_dir, tmp_path / "cli", "activation", budget)
    assert_same_search(export, cli)
    assert_same_cut(export, cli)
    info = json.loads((export / "composer_shear_export.json").read_text())
    assert info["target_params"] == budget
    assert info["target_shape"] == info["search"][0]["shape"]
    # The checkpoint keeps the searched shape: `composer-shear export` writes the same cut.
    export_checkpoint(tmp_path / "ckpt" / "final.pt", tmp_path / "from_ckpt")
    assert_same_cut(tmp_path / "from_ckpt", export)


def test_retarget_refuses_a_dimension_without_gates():
    from composer_shear.pruning.masking import attach_gates
    from tests.tiny_models import tiny_model

    model = tiny_model("llama_gqa")
    gates = attach_gates(model, {"intermediate_size": 48}, binary=True)
    source = gates.source
    gates.retarget(source.resolve_target({"intermediate_size": 64}))
    assert gates.gates["intermediate"].keep == 64
    with pytest.raises(ValueError, match="cannot prune"):
        gates.retarget(source.resolve_target({"hidden_size": 32}))


FSDP_SCRIPT = r"""
import os, sys
from unittest import mock

import torch

plan, method, model_dir, data_dir, out = sys.argv[1:6]
extra = sys.argv[6:]  # more overrides (the shape search)
if plan == "fsdp2":
    os.environ["FSDP_VERSION"] = "2"
else:
    # TEST ONLY, as in tests/test_fsdp.py: let Composer's FSDP1 start without CUDA.
    import composer.distributed

    prepare_fsdp_module = composer.distributed.prepare_fsdp_module

    def prepare_fsdp_module_on_cpu(*args, **kwargs):
        with mock.patch.object(torch.cuda, "current_device", lambda: torch.device("cpu")):
            return prepare_fsdp_module(*args, **kwargs)

    composer.distributed.prepare_fsdp_module = prepare_fsdp_module_on_cpu

from llmfoundry.command_utils import train_from_yaml

# FSDP1's sync_module_states needs CUDA; FSDP2 broadcasts rank 0's weights on CPU too.
mixed = ["model.init_device=mixed", "fsdp_config.sync_module_states=true"]
train_from_yaml(
    os.path.join("yamls", "tests", "oneshot_tiny.yaml"),
    [
        f"variables.model_dir={model_dir}",
        f"variables.data_dir={data_dir}",
        f"algorithms.oneshot_pruning.method={method}",
        f"callbacks.pruned_hf_export.save_folder={out}/export",
        # Two ranks of 4 sequences: calibration batches of 4, as the CLI's --batch-size 4.
        "global_train_batch_size=8",
        "device_train_microbatch_size=4",
        "fsdp_config.sharding_strategy=FULL_SHARD",
        "fsdp_config.mixed_precision=FULL",
        "fsdp_config.use_orig_params=true",
        "fsdp_config.activation_checkpointing=true",
        "fsdp_config.activation_checkpointing_reentrant=false",
        *(mixed if plan == "fsdp2" else []),
        *extra,
    ],
).close()
"""


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize(("plan", "method"), [("fsdp2", "activation"), ("fsdp1", "taylor")])
def test_two_rank_fsdp_job_cuts_what_the_cli_cuts(plan, method, tiny_tokenizer_dir, tmp_path):
    """2 CPU ranks, FULL_SHARD (FSDP2: init_device mixed): the units and tensors of the CLI."""
    model_dir, data_dir = make_tiny_run_inputs(tmp_path, tiny_tokenizer_dir, "llama_gqa")
    script = tmp_path / "oneshot_fsdp.py"
    script.write_text(FSDP_SCRIPT)
    out = tmp_path / plan
    out.mkdir()
    proc = composer_launch(2, script, plan, method, str(model_dir), str(data_dir), str(out))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    # Each rank scored its half of the 8 batches of 4 x 32 tokens; the all-reduced sums (and
    # the token count rank 0 records) cover all of them.
    info = json.loads((out / "export" / "composer_shear_export.json").read_text())
    assert info["calibration_tokens"] == TOKENS
    assert_same_cut(out / "export", cli_cut(model_dir, data_dir, tmp_path / "cli", method))


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_rank_fsdp_job_searches_the_shape_as_the_cli(tiny_tokenizer_dir, tmp_path):
    """target_params on 2 CPU ranks (FSDP2 FULL_SHARD): held-out batches split over the ranks,
    losses all-reduced, rank 0's winner on every rank: the CLI's search table and cut."""
    model_dir, data_dir = make_tiny_run_inputs(tmp_path, tiny_tokenizer_dir, "llama_gqa")
    budget = tiny_budget(model_dir)
    script = tmp_path / "oneshot_fsdp.py"
    script.write_text(FSDP_SCRIPT)
    out = tmp_path / "search"
    out.mkdir()
    args = [*SEARCH_OVERRIDES, f"{KEY}.target_params={budget}"]
    proc = composer_launch(
        2, script, "fsdp2", "activation", str(model_dir), str(data_dir), str(out), *args
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    cli = cli_cut(model_dir, data_dir, tmp_path / "cli", "activation", budget)
    assert_same_search(out / "export", cli)
    assert_same_cut(out / "export", cli)
