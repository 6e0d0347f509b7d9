"""Landing on the target: hardening (``harden_at``), landing metrics, ``schedule_gates``."""

from __future__ import annotations

import json
import math

import pytest
import torch
from llmfoundry.command_utils import train_from_yaml
from omegaconf import OmegaConf

from composer_shear.export.surgery import prune_model
from composer_shear.pruning.gates import NOT_HARDENED, HardConcreteGate
from composer_shear.report.metrics import read_metrics
from tests.pruning_helpers import (
    PRUNE_YAML,
    composer_launch,
    gate_state,
    gates_of,
    make_tiny_run_inputs,
)
from tests.pruning_helpers import run_prune as _run_prune

HARDEN = "algorithms.targeted_pruning.harden_at"


def _gate(seed: int = 0) -> HardConcreteGate:
    gate = HardConcreteGate((3, 8), keep=5)
    with torch.no_grad():
        gate.log_alpha.copy_(torch.randn((3, 8), generator=torch.Generator().manual_seed(seed)))
    return gate


def test_hardened_gate_is_its_deterministic_target():
    gate = _gate()
    before = gate.deterministic()
    assert not gate.hardened
    gate.harden_()
    assert gate.hardened
    # No noise left: every sample is the export value, exactly the target count per row.
    for _ in range(3):
        assert torch.equal(gate.sample(), before)
    assert torch.equal(gate.deterministic(), before)
    assert torch.equal(gate.deterministic_keep_mask(), before > 0)
    assert torch.equal(gate.expected_keep(), torch.full((3,), 5.0))
    assert gate.row_sparsity().tolist() == pytest.approx([3 / 8] * 3)
    # The values survive later changes of log-alpha (e.g. Adam momentum).
    with torch.no_grad():
        gate.log_alpha.mul_(-1)
    assert torch.equal(gate.sample(), before)


def test_binary_hardening_keeps_the_mask_only():
    gate = _gate(1)
    gate.harden_(binary=True)
    values = gate.sample()
    assert set(values.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(values.sum(-1), torch.full((3,), 5.0))


def test_hardened_state_round_trips_and_old_checkpoints_load_unhardened():
    gate = _gate(2)
    gate.harden_()
    fresh = _gate(3)
    fresh.load_state_dict(gate.state_dict())
    assert fresh.hardened and torch.equal(fresh.sample(), gate.sample())
    # A checkpoint from before hardening existed has no hard_value: it loads, unhardened.
    old = {k: v for k, v in _gate(4).state_dict().items() if k != "hard_value"}
    fresh.load_state_dict(old)
    assert not fresh.hardened
    assert fresh.hard_value[0, 0].item() == NOT_HARDENED


def run_prune(model_dir, data_dir, *overrides):
    """The tiny pruning run with one eval loader (for the landing metrics)."""
    eval_loader = [
        "eval_loader.name=multi_domain",
        f"eval_loader.dataset.local={data_dir}",
        "eval_loader.dataset.split=eval",
        "eval_loader.dataset.domains=[code]",
        "eval_loader.dataset.max_seq_len=32",
        "eval_loader.drop_last=false",
        "eval_loader.num_workers=0",
        "eval_loader.prefetch_factor=null",
        "eval_loader.persistent_workers=false",
        "eval_interval=10ba",
        "eval_subset_num_batches=2",
    ]
    return _run_prune(model_dir, data_dir, *eval_loader, *overrides)


@pytest.mark.slow
def test_hardened_run_trains_the_exported_model(tiny_tokenizer_dir, tmp_path):
    model_dir, data_dir = make_tiny_run_inputs(tmp_path, tiny_tokenizer_dir, "llama_gqa")
    metrics = tmp_path / "metrics.jsonl"
    trainer = run_prune(
        model_dir,
        data_dir,
        "max_duration=40ba",
        f"{HARDEN}=25ba",
        f"loggers.jsonl_metrics.path={metrics}",
    )
    gates = gates_of(trainer)
    assert gates.hardened
    for gate in gates.gates.values():
        keep = gate.expected_keep().flatten()
        assert torch.equal(keep, torch.full_like(keep, gate.keep))
    # The training forward (train mode, no noise any more) is the exported model.
    hf_model = trainer.state.model.model
    hf_model.train()
    compact = prune_model(hf_model)
    ids = torch.randint(3, 500, (2, 16))
    with torch.no_grad():
        assert torch.allclose(hf_model(ids).logits, compact(ids).logits, atol=1e-4)

    log = read_metrics(metrics)
    steps, hardened = log.get("pruning/hardened")
    assert next(s for s, h in zip(steps, hardened, strict=True) if h == 1.0) == 26
    # No penalty (and no gradient for the gates) after hardening.
    steps, penalty = log.get("pruning/penalty")
    assert all(p == 0.0 for s, p in zip(steps, penalty, strict=True) if s > 26)
    assert log.has("pruning/hardening/intermediate/max_row_deviation_units")
    # Landing: logged at every eval; before hardening the target cut differs from the
    # expected shape, after it the two are the same model.
    _, expected = log.get("pruning/landing/expected_loss")
    _, target = log.get("pruning/landing/target_loss")
    assert len(expected) == len(target) == 4
    assert all(math.isfinite(v) for v in expected + target)
    assert expected[0] != target[0]
    assert expected[-1] == target[-1]
    trainer.close()


@pytest.mark.slow
def test_resume_after_hardening_is_identical(tiny_tokenizer_dir, tmp_path):
    model_dir, data_dir = make_tiny_run_inputs(tmp_path, tiny_tokenizer_dir, "llama_gqa")
    save = tmp_path / "ckpt"
    common = ["max_duration=30ba", f"{HARDEN}=12ba"]
    straight = run_prune(
        model_dir,
        data_dir,
        *common,
        f"save_folder={save}",
        "save_interval=20ba",
        "save_filename=ba{batch}.pt",
    )
    straight_gates = gate_state(gates_of(straight))
    straight_loss = float(straight.state.loss["lm"])
    straight.close()
    resumed = run_prune(model_dir, data_dir, *common, f"load_path={save}/ba20.pt")
    assert gates_of(resumed).hardened
    for key, value in gate_state(gates_of(resumed)).items():
        assert torch.equal(value, straight_gates[key]), key
    assert float(resumed.state.loss["lm"]) == straight_loss
    resumed.close()


RANK_SCRIPT = """
import json, sys
from composer import Callback
from composer.utils import dist
from llmfoundry.registry import callbacks
from composer_shear.pruning.masking import find_gates


class GateRecorder(Callback):
    def __init__(self, out: str):
        self.out, self.rows = out, []

    def batch_end(self, state, logger):
        gates = find_gates(state.model)
        values = gates.state_dict().items()
        self.rows.append({k: v.detach().flatten().tolist() for k, v in values})

    def fit_end(self, state, logger):
        with open(f"{self.out}.{dist.get_global_rank()}.json", "w") as f:
            json.dump({"rows": self.rows, "hardened": find_gates(state.model).hardened}, f)


callbacks.register("gate_recorder", func=GateRecorder)
from tests.test_landing import run_prune  # with an eval loader: landing evals on 2 ranks
model_dir, data_dir, out = sys.argv[1:4]
run_prune(model_dir, data_dir, "max_duration=8ba", "algorithms.targeted_pruning.harden_at=4ba",
          "eval_interval=3ba", f"callbacks.gate_recorder.out={out}",
          f"loggers.jsonl_metrics.path={out}.metrics.jsonl")
"""


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_ranks_harden_together_under_ddp(tiny_tokenizer_dir, tmp_path):
    """DDP with gates that stop receiving gradients (find_unused_parameters) on 2 ranks."""
    model_dir, data_dir = make_tiny_run_inputs(tmp_path, tiny_tokenizer_dir, "llama_gqa")
    script = tmp_path / "rank_script.py"
    script.write_text(RANK_SCRIPT)
    out = tmp_path / "gates"
    proc = composer_launch(2, script, str(model_dir), str(data_dir), str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = [json.loads((tmp_path / f"gates.{rank}.json").read_text()) for rank in (0, 1)]
    assert runs[0]["hardened"] and runs[1]["hardened"]
    assert runs[0]["rows"] == runs[1]["rows"]
    # After hardening the log-alphas no longer move (no gradient reaches them).
    after = [row["gates.intermediate.log_alpha"] for row in runs[0]["rows"][4:]]
    assert all(a == after[0] for a in after)
    # The landing evaluation ran on both ranks (all-reduced; evals at 3, 6 and the end).
    log = read_metrics(tmp_path / "gates.metrics.jsonl")
    steps, target = log.get("pruning/landing/target_loss")
    assert steps == [3, 6, 8] and all(math.isfinite(v) for v in target)
    _, expected = log.get("pruning/landing/expected_loss")
    assert expected[1:] == target[1:] and expected[0] != target[0]  # hardened at batch 4


@pytest.mark.slow
def test_schedule_gates_false_keeps_the_warmup_off_the_gates(tiny_tokenizer_dir, tmp_path):
    """Under a 10-batch LR warm-up the gates move ~5x less in 3 steps unless exempted."""
    model_dir, data_dir = make_tiny_run_inputs(tmp_path, tiny_tokenizer_dir, "llama_gqa")
    moved = {}
    for schedule in (True, False):
        trainer = _run_prune(
            model_dir,
            data_dir,
            "max_duration=3ba",
            "scheduler.t_warmup=10ba",
            f"algorithms.targeted_pruning.schedule_gates={schedule}",
            # Wide clamp: no unit hits it in 3 steps, so the movement is Adam's alone.
            "algorithms.targeted_pruning.log_alpha_range=[-20.0,20.0]",
        )
        gates = gates_of(trainer)
        start = HardConcreteGate(
            gates.gates["intermediate"].shape, gates.gates["intermediate"].keep, seed=3
        )
        moved[schedule] = (gates.gates["intermediate"].log_alpha - start.log_alpha).abs().mean()
        trainer.close()
    # Adam's step is about lr: the warm-up scales it by 0.1, 0.2, 0.3 in the first 3 steps.
    assert moved[False] > 2.5 * moved[True], moved


@pytest.mark.slow
def test_default_run_lands_with_only_target_shape(tiny_tokenizer_dir, tmp_path):
    """The README's snippet: only ``target_shape`` and a warm-up; the default hardens.

    The same 80-step run on the paper's schedule (``harden_at: never``) ended with 24.0
    expected hidden units for a target of 48, and export then cut units that were on.
    """
    model_dir, data_dir = make_tiny_run_inputs(tmp_path, tiny_tokenizer_dir, "llama_gqa")
    recipe = OmegaConf.load(PRUNE_YAML)
    target = dict(recipe.algorithms.targeted_pruning.target_shape)
    recipe.algorithms.targeted_pruning = {"target_shape": target, "lagrangian_warmup": "0.3dur"}
    recipe.max_duration = "80ba"
    path = tmp_path / "prune_defaults.yaml"
    OmegaConf.save(recipe, path)
    metrics = tmp_path / "metrics.jsonl"
    trainer = train_from_yaml(
        str(path),
        [
            f"variables.model_dir={model_dir}",
            f"variables.data_dir={data_dir}",
            f"loggers.jsonl_metrics.path={metrics}",
        ],
    )
    gates = gates_of(trainer)
    assert gates.hardened
    for name, gate in gates.gates.items():
        keep = gate.expected_keep().flatten()
        tolerance = max(0.1, 0.02 * gate.keep)
        assert (keep - gate.keep).abs().max().item() <= tolerance, (name, keep, gate.keep)
    # Hardened at half of the run (after the 0.3dur warm-up): batch 40 is the first one.
    steps, hardened = read_metrics(metrics).get("pruning/hardened")
    assert next(s for s, h in zip(steps, hardened, strict=True) if h == 1.0) == 41
    # Export gap ~0: the model trained last is the model export writes.
    hf_model = trainer.state.model.model
    hf_model.train()
    compact = prune_model(hf_model)
    ids = torch.randint(3, 500, (2, 16))
    with torch.no_grad():
        assert torch.allclose(hf_model(ids).logits, compact(ids).logits, atol=1e-4)
    trainer.close()
