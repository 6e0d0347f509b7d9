"""Mask-only pruning (``freeze_weights``): frozen source weights, gates-only training, source cut.

Real LLM Foundry runs on a tiny model: the weights stay bit-identical (with weight decay on,
which would move any weight the optimizer touched), no weight gradient is ever allocated, the
optimizer holds state for the gates and multipliers only, and both exports (the in-run
``pruned_hf_export`` and ``composer-shear export`` of the checkpoint) equal
``prune-oneshot --units`` of the source at the learned units, tensor for tensor. The 2-rank
FSDP runs are at the end.
"""

from __future__ import annotations

import json

import pytest
import torch
from composer import Callback
from llmfoundry.registry import callbacks
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from composer_shear.export.checkpoint import export_checkpoint
from composer_shear.export.oneshot import prune_oneshot_to_dir
from composer_shear.export.units import read_kept_units
from composer_shear.pruning.algorithm import TargetedPruning
from composer_shear.pruning.masking import GATES_ATTR, ShearGates, attach_gates, find_gates
from tests.pruning_helpers import composer_launch, gates_of, make_tiny_run_inputs, run_prune
from tests.tiny_models import tiny_model

pytestmark = pytest.mark.slow

KEY = "algorithms.targeted_pruning"
STEPS = 6


class GradProbe(Callback):
    """After every backward: which parameters hold a ``.grad`` (weights vs gates)."""

    def __init__(self):
        self.weight_grads: list[list[str]] = []
        self.gate_grads: list[int] = []

    def after_backward(self, state, logger):
        weights, gates = [], 0
        for name, param in state.model.named_parameters():
            if f".{GATES_ATTR}." in name:
                gates += int(param.grad is not None and bool(param.grad.abs().sum() > 0))
            elif param.grad is not None:
                weights.append(name)
        self.weight_grads.append(weights)
        self.gate_grads.append(gates)


callbacks.register("grad_probe", func=GradProbe)


def probe_of(trainer) -> GradProbe:
    return next(c for c in trainer.state.callbacks if isinstance(c, GradProbe))


def tensors(folder) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def assert_same_tensors(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module", params=["lm", "distill"])
def mask_only_run(request, tiny_tokenizer_dir, tmp_path_factory):
    """A mask-only run of STEPS batches (hardened at 4), its export and checkpoint."""
    root = tmp_path_factory.mktemp(f"mask_only_{request.param}")
    model_dir, data_dir = make_tiny_run_inputs(root, tiny_tokenizer_dir, "llama_gqa")
    trainer = run_prune(
        model_dir,
        data_dir,
        f"max_duration={STEPS}ba",
        f"{KEY}.freeze_weights=true",
        f"{KEY}.objective={request.param}",
        f"{KEY}.harden_at=4ba",
        # Decoupled weight decay would shrink every weight the optimizer stepped.
        "optimizer.weight_decay=0.1",
        "callbacks.grad_probe={}",
        f"callbacks.pruned_hf_export.save_folder={root}/export",
        f"save_folder={root}/ckpt",
        f"save_interval={STEPS}ba",
        "save_filename=final.pt",
    )
    yield request.param, trainer, model_dir, root
    trainer.close()


def test_weights_stay_bit_identical_and_only_gates_train(mask_only_run):
    objective, trainer, model_dir, _ = mask_only_run
    source = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    hf_model = trainer.state.model.model
    trained = {k: v for k, v in hf_model.state_dict().items() if not k.startswith(GATES_ATTR)}
    expected = source.state_dict()
    assert sorted(trained) == sorted(expected)
    for name, value in expected.items():
        assert torch.equal(trained[name], value), name
    weights = [p for n, p in hf_model.named_parameters() if not n.startswith(GATES_ATTR)]
    assert weights and not any(p.requires_grad for p in weights)

    probe = probe_of(trainer)
    assert len(probe.weight_grads) == STEPS
    assert probe.weight_grads == [[]] * STEPS  # no weight .grad, ever
    # Not vacuous: the gates received gradients until they were hardened at batch 4.
    assert all(count > 0 for count in probe.gate_grads[:4])
    gates = gates_of(trainer)
    trained_ids = {id(p) for p in gates.parameters()}
    optimizer = trainer.state.optimizers[0]
    assert optimizer.state and all(id(p) in trained_ids for p in optimizer.state)
    assert gates.hardened and gates.binary
    for gate in gates.gates.values():
        assert set(gate.hard_value.unique().tolist()) <= {0.0, 1.0}
    loss = trainer.state.loss
    if objective == "distill":
        assert sorted(loss) == ["kd", "lagrangian", "lm", "total"]
        assert float(loss["total"]) == float(loss["kd"] + loss["lagrangian"])
        assert float(loss["kd"]) > 0.0
    else:
        assert "kd" not in loss


def test_export_is_the_source_cut_at_the_learned_units(mask_only_run, tmp_path):
    _, trainer, model_dir, root = mask_only_run
    exported = tensors(root / "export")
    oneshot = prune_oneshot_to_dir(model_dir, tmp_path / "units", units=root / "export")
    assert_same_tensors(exported, tensors(oneshot.out_dir))
    # The checkpoint records the mode, so `composer-shear export` cuts the same tensors.
    export_checkpoint(root / "ckpt" / "final.pt", tmp_path / "from_ckpt")
    assert_same_tensors(exported, tensors(tmp_path / "from_ckpt"))
    # The learned units are what the gates keep (top-k of log-alpha).
    kept = read_kept_units(root / "export")["kept"]
    intermediate = gates_of(trainer).gates["intermediate"].deterministic_keep_mask()
    learned = [row.nonzero().flatten().tolist() for row in intermediate]
    assert [learned[layer] for layer in kept["layers"]] == kept["intermediate"]


def test_mask_only_options_are_checked():
    target = {"num_hidden_layers": 2}
    with pytest.raises(ValueError, match="objective must be one of"):
        TargetedPruning(target, freeze_weights=True, objective="kl")
    with pytest.raises(ValueError, match="needs freeze_weights: true"):
        TargetedPruning(target, objective="distill")
    algorithm = TargetedPruning(target, freeze_weights=True)
    saved = {**algorithm.state_dict(), "freeze_weights": False}
    with pytest.raises(ValueError, match="freeze_weights=False"):
        algorithm.load_state_dict(saved)


FSDP_SCRIPT = r"""
import json, os, sys
from unittest import mock

import torch

plan, model_dir, data_dir, out = sys.argv[1:5]
if plan == "fsdp2":
    os.environ["FSDP_VERSION"] = "2"
elif plan == "fsdp1":
    # TEST ONLY, as in tests/test_fsdp.py: let Composer's FSDP1 start without CUDA.
    import composer.distributed

    prepare_fsdp_module = composer.distributed.prepare_fsdp_module

    def prepare_fsdp_module_on_cpu(*args, **kwargs):
        with mock.patch.object(torch.cuda, "current_device", lambda: torch.device("cpu")):
            return prepare_fsdp_module(*args, **kwargs)

    composer.distributed.prepare_fsdp_module = prepare_fsdp_module_on_cpu

from composer import Callback
from composer.utils import dist
from llmfoundry.registry import callbacks

from composer_shear.sharding import full_state_dict
from tests.pruning_helpers import run_prune


class Recorder(Callback):
    def __init__(self, out: str):
        self.out, self.gates, self.losses = out, [], []

    def after_loss(self, state, logger):
        self.losses.append({k: float(v) for k, v in state.loss.items()})

    def batch_end(self, state, logger):
        weights = full_state_dict(state.model)  # collective: every rank calls it
        self.gates.append({k: v.flatten().tolist() for k, v in weights.items() if "gates" in k})

    def fit_end(self, state, logger):
        weights = full_state_dict(state.model)
        digest = {k: float(v.double().sum()) for k, v in weights.items() if "gates" not in k}
        record = {"world": dist.get_world_size(), "gates": self.gates, "losses": self.losses,
                  "weights": digest}
        with open(f"{self.out}.{dist.get_global_rank()}.json", "w") as f:
            json.dump(record, f)


callbacks.register("mask_only_recorder", func=Recorder)
common = [
    f"variables.data_dir={data_dir}",
    "max_duration=3ba",
    "algorithms.targeted_pruning.freeze_weights=true",
    "algorithms.targeted_pruning.objective=distill",
    "optimizer.weight_decay=0.1",
    f"callbacks.mask_only_recorder.out={out}/run",
    f"callbacks.pruned_hf_export.save_folder={out}/export",
]
if plan != "single":
    common += [
        "device_train_microbatch_size=2",
        "fsdp_config.sharding_strategy=FULL_SHARD",
        "fsdp_config.mixed_precision=FULL",
        "fsdp_config.use_orig_params=true",
        "fsdp_config.activation_checkpointing=true",
        "fsdp_config.activation_checkpointing_reentrant=false",
    ]
run_prune(model_dir, data_dir, *common).close()
"""


@pytest.mark.multiprocess
@pytest.mark.parametrize("plan", ["fsdp1", "fsdp2"])
def test_mask_only_distillation_under_fsdp(plan, tiny_tokenizer_dir, tmp_path):
    """2 CPU ranks (gloo): the weights stay the source's, the ranks agree, the cut is exact."""
    model_dir, data_dir = make_tiny_run_inputs(tmp_path, tiny_tokenizer_dir, "llama_gqa")
    script = tmp_path / "mask_only_fsdp.py"
    script.write_text(FSDP_SCRIPT)
    out = tmp_path / plan
    out.mkdir()
    proc = composer_launch(2, script, plan, str(model_dir), str(data_dir), str(out), timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    runs = [json.loads((out / f"run.{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["world"] for r in runs] == [2, 2]
    assert runs[0]["gates"] == runs[1]["gates"] and len(runs[0]["gates"]) == 3
    # Not vacuous: the gates moved, and every loss is the KD loss plus the Lagrangian.
    first, last = runs[0]["gates"][0], runs[0]["gates"][-1]
    assert any(a != b for k in first for a, b in zip(first[k], last[k], strict=True))
    for rank in runs:
        for loss in rank["losses"]:
            assert loss["kd"] > 0.0
            assert loss["total"] == pytest.approx(loss["kd"] + loss["lagrangian"], rel=1e-6)
    # The gathered weights after training are the source's, exactly (same sums in fp64 of
    # the same fp32 values).
    source = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    expected = {k: float(v.double().sum()) for k, v in source.state_dict().items()}
    digest = {k.removeprefix("model."): v for k, v in runs[0]["weights"].items()}
    assert digest == {k: expected[k] for k in digest} and len(digest) >= len(expected) - 1
    # The export under FSDP is the source cut at the learned units.
    oneshot = prune_oneshot_to_dir(model_dir, tmp_path / "units", units=out / "export")
    assert_same_tensors(tensors(out / "export"), tensors(oneshot.out_dir))


def test_binary_gates_fold_nothing():
    """With ``binary`` every deterministic value is 0/1 (also once hardened)."""
    model = tiny_model("llama_gqa")
    gates = attach_gates(model, {"intermediate_size": 48, "num_hidden_layers": 3}, binary=True)
    assert isinstance(gates, ShearGates) and find_gates(model) is gates
    for values in (gates.deterministic_values("target"), gates.deterministic_values("expected")):
        for value in values.values():
            assert set(value.unique().tolist()) <= {0.0, 1.0}
    gates.harden_()
    for gate in gates.gates.values():
        assert set(gate.hard_value.unique().tolist()) == {0.0, 1.0}
