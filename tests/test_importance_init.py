"""``targeted_pruning: {init: activation}``: gates start at the one-shot choice, in real runs."""

from __future__ import annotations

import pytest
import torch
from composer import Callback
from llmfoundry.registry import callbacks
from transformers import AutoModelForCausalLM

from composer_shear.data.calibration import calibration_batches
from composer_shear.export.oneshot import keep_masks_from_scores
from composer_shear.pruning.importance import collect_importance, unit_scores
from composer_shear.pruning.masking import find_gates
from tests.pruning_helpers import (
    FAMILY_TARGETS,
    gate_state,
    gates_of,
    make_tiny_run_inputs,
    run_prune,
    target_overrides,
)

pytestmark = pytest.mark.slow

INIT = [
    "algorithms.targeted_pruning.init=activation",
    "algorithms.targeted_pruning.init_tokens=512",
]


class StartRecorder(Callback):
    """Records the gates' keep masks at FIT_START (after the algorithm ran) and the batches."""

    last = None

    def __init__(self):
        self.masks, self.start_sparsity, self.batches = None, None, []
        StartRecorder.last = self

    def fit_start(self, state, logger):
        gates = find_gates(state.model)
        self.masks = {k: v.clone() for k, v in gates.keep_masks().items()}
        self.start_sparsity = dict(gates.start_sparsity)

    def before_forward(self, state, logger):
        self.batches.append(state.batch["input_ids"].clone())


callbacks.register("start_recorder", func=StartRecorder)


def run(model_dir, data_dir, *overrides):
    trainer = run_prune(
        model_dir, data_dir, "callbacks.start_recorder={}", "python_log_level=warning", *overrides
    )
    return trainer, StartRecorder.last


@pytest.mark.parametrize(
    "family, dims",
    [
        ("llama_gqa", {"layers", "kv_heads", "intermediate", "hidden"}),
        # Gemma 3 keeps its layers; its single-query-head target prunes heads in a group.
        ("gemma3", {"heads", "kv_heads", "intermediate", "hidden"}),
    ],
)
def test_step0_masks_are_the_oneshot_choice(family, dims, tiny_tokenizer_dir, tmp_path):
    model_dir, data_dir = make_tiny_run_inputs(tmp_path, tiny_tokenizer_dir, family)
    trainer, rec = run(
        model_dir,
        data_dir,
        "max_duration=2ba",
        *INIT,
        f"algorithms.targeted_pruning.init_data={data_dir}",
        *(target_overrides(FAMILY_TARGETS[family]) if family != "llama_gqa" else []),
    )
    gates = gates_of(trainer)
    trainer.close()

    # The one-shot choice, computed independently on the same calibration batches
    # (prune_tiny.yaml: max_seq_len 32, microbatch 4; the algorithm's seed is 0).
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    batches = calibration_batches(data_dir, 512, 32, 4, seed=0)
    importance = collect_importance(model, batches)
    expected = keep_masks_from_scores(
        unit_scores(importance, gates.source), gates.source, gates.target
    )
    assert set(rec.masks) == set(expected) == dims
    for name, mask in expected.items():
        assert torch.equal(rec.masks[name], mask), name
    # The choice is not the index-order default (the comparison is not vacuous).
    assert any(not torch.equal(m, m.sort(-1, descending=True).values) for m in expected.values())
    # The warm-up starts where the gates start, not at 0.
    for name, gate in gates.gates.items():
        assert 0.5 * gate.target_sparsity < rec.start_sparsity[name] <= gate.target_sparsity


def test_init_leaves_training_data_unchanged(tiny_tokenizer_dir, tmp_path):
    model_dir, data_dir = make_tiny_run_inputs(tmp_path, tiny_tokenizer_dir, "llama_gqa")
    plain, rec_plain = run(model_dir, data_dir, "max_duration=3ba")
    plain.close()
    init, rec_init = run(
        model_dir,
        data_dir,
        "max_duration=3ba",
        *INIT,
        f"algorithms.targeted_pruning.init_data={data_dir}",
    )
    init.close()
    assert len(rec_plain.batches) == len(rec_init.batches) == 3
    for a, b in zip(rec_plain.batches, rec_init.batches, strict=True):
        assert torch.equal(a, b)
    # ... while the gates did start elsewhere.
    assert any(not torch.equal(rec_plain.masks[k], rec_init.masks[k]) for k in rec_plain.masks)


def test_resume_does_not_reinitialise(tiny_tokenizer_dir, tmp_path):
    model_dir, data_dir = make_tiny_run_inputs(tmp_path, tiny_tokenizer_dir, "llama_gqa")
    save = tmp_path / "ckpt"
    common = [*INIT, f"algorithms.targeted_pruning.init_data={data_dir}", "max_duration=8ba"]
    straight, _ = run(
        model_dir, data_dir, *common, f"save_folder={save}", "save_interval=4ba",
        "save_num_checkpoints_to_keep=-1", "save_filename=ba{batch}.pt",
    )  # fmt: skip
    expected, start = gate_state(gates_of(straight)), dict(gates_of(straight).start_sparsity)
    loss = float(straight.state.loss["lm"])
    straight.close()
    resumed, _ = run(model_dir, data_dir, *common, f"load_path={save}/ba4.pt")
    got = gate_state(gates_of(resumed))
    assert dict(gates_of(resumed).start_sparsity) == start
    for key, value in expected.items():
        assert torch.equal(value, got[key]), key
    assert float(resumed.state.loss["lm"]) == loss
    resumed.close()


def test_init_activation_needs_data(tiny_tokenizer_dir, tmp_path):
    model_dir, data_dir = make_tiny_run_inputs(tmp_path, tiny_tokenizer_dir, "llama_gqa")
    with pytest.raises(ValueError, match="init_data"):
        run_prune(model_dir, data_dir, "max_duration=1ba", *INIT)


def test_multi_domain_loader_supplies_the_calibration_data(tiny_tokenizer_dir, tmp_path):
    """With the multi_domain train loader, init_data defaults to its folder and domains."""
    from llmfoundry.command_utils import train_from_yaml

    from tests.pruning_helpers import REPO

    model_dir, data_dir = make_tiny_run_inputs(tmp_path, tiny_tokenizer_dir, "llama_gqa")
    trainer = train_from_yaml(
        str(REPO / "yamls" / "tests" / "dynamic_batch_loading_tiny.yaml"),
        [
            f"variables.data_local={data_dir}",
            f"variables.model_dir={model_dir}",
            "max_duration=1ba",
            "callbacks.start_recorder={}",
            "algorithms.targeted_pruning.target_shape.intermediate_size=48",
            "algorithms.targeted_pruning.target_shape.num_key_value_heads=1",
            *INIT,
        ],
    )
    gates = gates_of(trainer)
    trainer.close()
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    # The YAML's train domains, max_seq_len 32, microbatch 2, seed 0.
    batches = calibration_batches(data_dir, 512, 32, 2, domains=["code", "books", "docs"], seed=0)
    scores = unit_scores(collect_importance(model, batches), gates.source)
    expected = keep_masks_from_scores(scores, gates.source, gates.target)
    rec = StartRecorder.last
    assert set(rec.masks) == {"kv_heads", "intermediate"}
    for name, mask in expected.items():
        assert torch.equal(rec.masks[name], mask), name
