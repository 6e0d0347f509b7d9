"""Knowledge distillation: the loss and its gradient, the teacher, and real LLM Foundry runs."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch
from composer import Callback
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from composer_shear.distillation.algorithm import (
    KnowledgeDistillation,
    add_distillation_loss,
    forward_kl,
    predicted_positions,
)
from composer_shear.distillation.teacher import (
    build_teacher_skeleton,
    load_teacher_weights,
    place_teacher,
    source_weights,
    teacher_forward,
)
from composer_shear.pruning.masking import ShearGates, attach_gates, find_gates
from composer_shear.report import read_metrics
from tests.pruning_helpers import (
    PRUNE_YAML,
    REPO,
    composer_launch,
    make_tiny_run_inputs,
    run_prune,
)
from tests.tiny_models import save_tiny_checkpoint, tiny_model

KD = "algorithms.knowledge_distillation"
CPT_YAML = REPO / "yamls" / "tests" / "cpt_tiny.yaml"
TARGET = dict(
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=1,
    intermediate_size=48,
    hidden_size=48,
)

# ------------------------------------------------------------------------------ the loss


def reference_kl(student, teacher, mask, temperature, top_k=None):
    """Forward KL by plain autograd ops (what the hand-written gradient must equal)."""
    log_q = torch.log_softmax(student / temperature, -1)
    if top_k is None:
        log_p = torch.log_softmax(teacher / temperature, -1)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    else:
        values, ids = teacher.topk(top_k, -1)
        log_p = torch.log_softmax(values / temperature, -1)
        kl = (log_p.exp() * (log_p - log_q.gather(-1, ids))).sum(-1)
    return temperature**2 * kl[mask].mean()


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("top_k", [None, 5])
def test_forward_kl_value_and_gradient_match_autograd(temperature, top_k, monkeypatch):
    import composer_shear.distillation.algorithm as kd_module

    # Small chunks: several chunks per call, so the chunk loop is exercised.
    monkeypatch.setattr(kd_module, "CHUNK_ELEMENTS", 64)
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(3, 7, 29, dtype=torch.float64, generator=generator)
    teacher = torch.randn(3, 7, 29, dtype=torch.float64, generator=generator) * 2
    mask = torch.rand(3, 7, generator=generator) > 0.3
    mine = student.clone().requires_grad_()
    ref = student.clone().requires_grad_()
    ours = forward_kl(mine, teacher, mask, temperature, top_k)
    theirs = reference_kl(ref, teacher, mask, temperature, top_k)
    (0.37 * ours).backward()
    (0.37 * theirs).backward()
    assert ours.item() > 0
    assert torch.allclose(ours, theirs, rtol=1e-12, atol=1e-14)
    assert torch.allclose(mine.grad, ref.grad, rtol=1e-10, atol=1e-14)
    # Masked-out positions get no gradient.
    assert torch.all(mine.grad[~mask] == 0)


def test_forward_kl_of_identical_logits_is_zero():
    logits = torch.randn(2, 9, 50)
    mask = torch.rand(2, 9) > 0.2
    assert forward_kl(logits, logits.clone(), mask).item() == 0.0
    assert forward_kl(logits.bfloat16(), logits.bfloat16(), mask, temperature=2.0).item() == 0.0
    # top-k keeps the teacher's top tokens only: the value is -log(their mass), not 0.
    top = forward_kl(logits.double(), logits.double(), None, top_k=5)
    mass = torch.softmax(logits.double(), -1).topk(5, -1).values.sum(-1)
    assert torch.allclose(top, -mass.log().mean())


def test_forward_kl_low_precision_gradient():
    generator = torch.Generator().manual_seed(1)
    student = torch.randn(2, 16, 300, generator=generator)
    teacher = torch.randn(2, 16, 300, generator=generator)
    low = student.bfloat16().requires_grad_()
    full = student.bfloat16().float().requires_grad_()
    (0.3 * forward_kl(low, teacher.bfloat16())).backward()
    everywhere = torch.ones(2, 16, dtype=torch.bool)
    (0.3 * reference_kl(full, teacher.bfloat16().float(), everywhere, 1.0)).backward()
    assert low.grad.dtype == torch.bfloat16
    # Within bf16 rounding of the gradient itself (the scale factor is applied in fp32).
    assert torch.allclose(low.grad.float(), full.grad, rtol=1e-2, atol=1e-7)


def test_forward_kl_errors():
    with pytest.raises(ValueError, match="same tokenizer"):
        forward_kl(torch.zeros(1, 2, 5), torch.zeros(1, 2, 6))
    with pytest.raises(ValueError, match="top_k"):
        forward_kl(torch.zeros(1, 2, 5), torch.zeros(1, 2, 5), top_k=6)
    logits = torch.randn(1, 3, 5, requires_grad=True)
    loss = forward_kl(logits, torch.randn(1, 3, 5))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="differentiated twice"):
        loss.backward()


def test_predicted_positions_follow_the_hf_loss():
    from transformers.loss.loss_utils import ForCausalLMLoss

    labels = torch.tensor([[5, 6, 7, -100, -100], [-100, 8, 9, 10, 11]])
    mask = predicted_positions({"labels": labels}, 5)
    assert mask.tolist() == [
        [True, True, False, False, False],
        [True, True, True, True, False],
    ]
    # Same positions as the HF loss: per-position CE averaged over the mask == HF's mean.
    logits = torch.randn(2, 5, 20)
    hf_mean = ForCausalLMLoss(logits, labels, vocab_size=20)
    targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    per_position = torch.nn.functional.cross_entropy(
        logits.reshape(-1, 20), targets.reshape(-1).clamp(min=0), reduction="none"
    ).view(2, 5)
    assert torch.allclose(per_position[mask].mean(), hf_mean)
    attention = torch.tensor([[1, 1, 1, 0]])
    assert predicted_positions({"attention_mask": attention}, 4).tolist() == [
        [True, True, False, False]
    ]


def test_loss_combination():
    lm, kd = torch.tensor(3.0), torch.tensor(0.25)
    out = add_distillation_loss(lm, kd, 0.0)
    assert out["total"] is lm and out["kd"] is kd and out["lm"] is lm
    assert add_distillation_loss(lm, kd, 1.0)["total"].item() == 0.25
    assert add_distillation_loss(lm, kd, 0.5)["total"].item() == pytest.approx(1.625)
    lag = torch.tensor(-0.5)
    pruned = {"lm": lm, "lagrangian": lag, "total": lm + lag}
    assert add_distillation_loss(pruned, kd, 0.0)["total"] is pruned["total"]
    combined = add_distillation_loss(pruned, kd, 0.5)
    assert combined["total"].item() == pytest.approx(0.5 * 3.0 + 0.5 * 0.25 - 0.5)
    assert combined["lagrangian"] is lag
    with pytest.raises(TypeError, match="'lm'"):
        add_distillation_loss({"ce": lm}, kd, 0.5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha": 1.5}, "alpha"),
        ({"temperature": 0}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"teacher_dtype": "int8"}, "teacher_dtype"),
        ({"teacher_sharding": "hybrid"}, "teacher_sharding"),
        ({"teacher": ""}, "teacher"),
    ],
)
def test_bad_options_name_their_yaml_key(kwargs, message):
    with pytest.raises(ValueError, match=rf"algorithms\.knowledge_distillation\.{message}"):
        KnowledgeDistillation(**kwargs)


# --------------------------------------------------------------------------- the teacher


def _teacher_from(model, dtype=torch.float32):
    config, weights = source_weights(model, dtype)
    return place_teacher(build_teacher_skeleton(config, dtype), weights, torch.device("cpu"), False)


@pytest.mark.parametrize("tied", [False, True])
def test_source_teacher_is_the_model_without_gates(tied):
    model = tiny_model("llama_gqa", tie_word_embeddings=tied)
    ids = torch.randint(3, 500, (2, 12))
    with torch.no_grad():
        before = model(ids).logits
    gates = attach_gates(model, TARGET)
    teacher = _teacher_from(model)
    assert find_gates(teacher) is None
    assert not any(isinstance(m, ShearGates) for m in teacher.modules())
    assert all(not p.requires_grad for p in teacher.parameters())
    assert not teacher.training
    if tied:
        assert teacher.lm_head.weight is teacher.model.embed_tokens.weight
    # Its weights are copies, not the student's tensors.
    student_ptrs = {p.data_ptr() for p in model.parameters()}
    assert not student_ptrs & {p.data_ptr() for p in teacher.parameters()}
    # The teacher computes the source model, and calling it leaves the student's gates alone.
    model.train()
    gates.start_step(seed=0, step=0, rank=0)
    model(ids)
    masks, step = gates.masks, gates._forward_in_step
    logits = teacher_forward(teacher, {"input_ids": ids})
    assert torch.equal(logits, before)
    assert gates.masks is masks and gates._forward_in_step == step


def test_teacher_dtype_and_strict_directory_loading(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model("qwen2")
    model.save_pretrained(tmp_path / "good")
    config, weights = load_teacher_weights(str(tmp_path / "good"), torch.bfloat16)
    assert {w.dtype for w in weights.values()} == {torch.bfloat16}
    teacher = place_teacher(
        build_teacher_skeleton(config, torch.bfloat16), weights, torch.device("cpu"), False
    )
    ids = torch.randint(3, 500, (1, 8))
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "good", torch_dtype=torch.bfloat16)
    with torch.no_grad():
        expected = reference(ids).logits
    assert torch.equal(teacher_forward(teacher, {"input_ids": ids}), expected)

    # A checkpoint missing a tensor would give a partly random teacher: refused.
    (tmp_path / "bad").mkdir()
    state = load_file(tmp_path / "good" / "model.safetensors")
    state.pop("model.layers.1.mlp.down_proj.weight")
    save_file(state, tmp_path / "bad" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "bad" / "config.json").write_text((tmp_path / "good" / "config.json").read_text())
    with pytest.raises(ValueError, match=r"did not load cleanly.*down_proj"):
        load_teacher_weights(str(tmp_path / "bad"), torch.float32)
    with pytest.raises(ValueError, match=r"algorithms\.knowledge_distillation\.teacher"):
        load_teacher_weights(str(tmp_path / "nowhere"), torch.float32)


def _grads_of_kd_step(student, gates, teacher_fn, ids):
    student.zero_grad(set_to_none=True)
    gates.start_step(seed=3, step=0, rank=0)
    out = student(input_ids=ids, labels=ids)
    kd = forward_kl(out.logits, teacher_fn(ids), predicted_positions({"labels": ids}, ids.shape[1]))
    loss = add_distillation_loss(out.loss + gates.penalty, kd, 0.5)["total"]
    loss.backward()
    return {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}


def test_teacher_composes_with_gates_and_activation_checkpointing():
    """The teacher runs between the student's forward and its (recomputing) backward."""
    source = tiny_model("llama_gqa")
    student = copy.deepcopy(source)
    gates = attach_gates(student, TARGET)
    # Control teacher: a deepcopy of the gated model. Its hooks are the student's closures,
    # bound to the student's gates.
    dirty_teacher = copy.deepcopy(student).eval()
    student.train()
    teacher = _teacher_from(student)
    ids = torch.randint(3, 500, (2, 16))

    def clean(batch):
        return teacher_forward(teacher, {"input_ids": batch})

    plain = _grads_of_kd_step(student, gates, clean, ids)
    student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = _grads_of_kd_step(student, gates, clean, ids)
    assert plain.keys() == checkpointed.keys() and any("log_alpha" in n for n in plain)
    for name, grad in plain.items():
        assert torch.allclose(grad, checkpointed[name], rtol=1e-5, atol=1e-7), name

    # With the control teacher, its forward re-samples the student's gates (under no_grad)
    # between the student's forward and the recompute in backward: the recompute then sees
    # other masks, which torch's checkpoint detects.
    def dirty(batch):
        with torch.no_grad():
            return dirty_teacher(input_ids=batch).logits

    from torch.utils.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="different number of tensors"):
        _grads_of_kd_step(student, gates, dirty, ids)


# --------------------------------------------------------------- real LLM Foundry runs

slow = pytest.mark.slow


def _kd(teacher="source", alpha=0.5, **extra) -> list[str]:
    options = {"teacher": teacher, "alpha": alpha, **extra}
    return [f"{KD}.{key}={value}" for key, value in options.items()]


def _metrics(path: Path, name: str) -> list[float]:
    log = read_metrics(path)
    assert log is not None and log.has(name), name
    return log.get(name)[1]


def _snapshot(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.state.model.state_dict().items()}


def _kd_algorithm(trainer) -> KnowledgeDistillation:
    return next(a for a in trainer.state.algorithms if isinstance(a, KnowledgeDistillation))


@pytest.fixture(scope="module")
def pruning_runs(tiny_tokenizer_dir, tmp_path_factory):
    """Pruning runs of 6 batches: without KD, with KD at alpha 0, and with KD at alpha 0.5."""
    root = tmp_path_factory.mktemp("kd_runs")
    model_dir, data_dir = make_tiny_run_inputs(root, tiny_tokenizer_dir, "llama_gqa")
    runs = {"model_dir": model_dir, "data_dir": data_dir, "root": root}
    for name, extra in (("plain", []), ("alpha0", _kd(alpha=0.0)), ("kd", _kd(alpha=0.5))):
        folder = root / name
        trainer = run_prune(
            model_dir,
            data_dir,
            "max_duration=6ba",
            f"save_folder={folder}/ckpt",
            "save_interval=6ba",
            "save_filename=ba{batch}.pt",
            f"loggers.jsonl_metrics.path={folder}/metrics.jsonl",
            *extra,
        )
        run = {"state": _snapshot(trainer), "metrics": folder / "metrics.jsonl"}
        run["ckpt"] = folder / "ckpt" / "ba6.pt"
        run["loss"] = {k: v.detach().clone() for k, v in trainer.state.loss.items()}
        if extra:
            algorithm = _kd_algorithm(trainer)
            run["teacher"] = {k: v.clone() for k, v in algorithm.teacher.state_dict().items()}
            run["teacher_params"] = list(algorithm.teacher.parameters())
            run["optimized"] = {
                id(p) for group in trainer.state.optimizers[0].param_groups for p in group["params"]
            }
        trainer.close()
        runs[name] = run
    return runs


@slow
def test_alpha_zero_is_bit_for_bit_the_run_without_kd(pruning_runs):
    plain, alpha0 = pruning_runs["plain"], pruning_runs["alpha0"]
    assert plain["state"].keys() == alpha0["state"].keys()
    for key, value in plain["state"].items():
        assert torch.equal(value, alpha0["state"][key]), key
    for name in ("loss/train/total", "loss/train/lm", "loss/train/lagrangian"):
        assert _metrics(plain["metrics"], name) == _metrics(alpha0["metrics"], name), name
    # The teacher did run: KD was computed and logged at every step, and it grew as the
    # student moved away from the teacher.
    kd = _metrics(alpha0["metrics"], "loss/train/kd")
    assert len(kd) == 6 and kd[-1] > kd[0] >= 0 and kd[-1] > 1e-3


@slow
def test_teacher_is_frozen_and_not_checkpointed(pruning_runs):
    from transformers import AutoModelForCausalLM

    kd_run, plain = pruning_runs["kd"], pruning_runs["plain"]
    source = AutoModelForCausalLM.from_pretrained(pruning_runs["model_dir"]).state_dict()
    # The teacher is exactly the source model after 6 training steps of the student ...
    assert kd_run["teacher"].keys() == source.keys()
    for key, value in source.items():
        assert torch.equal(kd_run["teacher"][key], value), key
    # ... which did move away from it.
    student = kd_run["state"]
    assert not torch.equal(student["model.lm_head.weight"], source["lm_head.weight"])
    assert all(not p.requires_grad and p.grad is None for p in kd_run["teacher_params"])
    assert not {id(p) for p in kd_run["teacher_params"]} & kd_run["optimized"]

    # The checkpoint holds the same tensors as a run without KD, and about the same bytes.
    saved = torch.load(kd_run["ckpt"], map_location="cpu", weights_only=False)
    baseline = torch.load(plain["ckpt"], map_location="cpu", weights_only=False)
    assert saved["state"]["model"].keys() == baseline["state"]["model"].keys()
    assert len(saved["state"]["optimizers"]["DecoupledAdamW"]["state"]) == len(
        baseline["state"]["optimizers"]["DecoupledAdamW"]["state"]
    )
    ratio = os.path.getsize(kd_run["ckpt"]) / os.path.getsize(plain["ckpt"])
    assert 0.99 < ratio < 1.01, ratio
    algorithms = dict(saved["state"]["algorithms"])
    assert algorithms["KnowledgeDistillation"] == {
        "teacher": "source",
        "alpha": 0.5,
        "temperature": 1.0,
        "top_k": None,
    }


@slow
def test_kd_composes_with_the_lagrangian_in_either_order(pruning_runs, tmp_path):
    kd_after = pruning_runs["kd"]["metrics"]  # YAML order: targeted_pruning, then KD
    cfg = OmegaConf.load(PRUNE_YAML)
    cfg.algorithms = {
        "knowledge_distillation": {"teacher": "source", "alpha": 0.5},
        **OmegaConf.to_container(cfg.algorithms),
    }
    yaml = tmp_path / "kd_first.yaml"
    OmegaConf.save(cfg, yaml)
    from llmfoundry.command_utils import train_from_yaml

    trainer = train_from_yaml(
        str(yaml),
        [
            f"variables.model_dir={pruning_runs['model_dir']}",
            f"variables.data_dir={pruning_runs['data_dir']}",
            "max_duration=6ba",
            f"loggers.jsonl_metrics.path={tmp_path}/metrics.jsonl",
        ],
    )
    names = [type(a).__name__ for a in trainer.state.algorithms]
    assert names.index("KnowledgeDistillation") < names.index("TargetedPruning")
    trainer.close()
    for metrics in (kd_after, tmp_path / "metrics.jsonl"):
        lm, kd, lag, total = (
            _metrics(metrics, f"loss/train/{key}") for key in ("lm", "kd", "lagrangian", "total")
        )
        assert any(abs(x) > 1e-3 for x in lag) and all(x > 0 for x in kd[1:])
        for step in range(6):
            expected = 0.5 * lm[step] + 0.5 * kd[step] + lag[step]
            assert total[step] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    # Same run up to float rounding of the total.
    for key in ("lm", "kd", "lagrangian", "total"):
        a = _metrics(kd_after, f"loss/train/{key}")
        b = _metrics(tmp_path / "metrics.jsonl", f"loss/train/{key}")
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5), key


@slow
def test_resume_halfway_gives_the_straight_run(tiny_tokenizer_dir, tmp_path):
    model_dir, data_dir = make_tiny_run_inputs(tmp_path, tiny_tokenizer_dir, "llama_gqa")
    save = tmp_path / "ckpt"
    kd = _kd(alpha=0.7, temperature=2.0)
    straight = run_prune(
        model_dir,
        data_dir,
        "max_duration=8ba",
        f"save_folder={save}",
        "save_interval=4ba",
        "save_num_checkpoints_to_keep=-1",
        "save_filename=ba{batch}.pt",
        *kd,
    )
    expected_loss = {k: v.item() for k, v in straight.state.loss.items()}
    expected_state = _snapshot(straight)
    straight.close()

    resumed = run_prune(model_dir, data_dir, "max_duration=8ba", f"load_path={save}/ba4.pt", *kd)
    assert int(resumed.state.timestamp.batch) == 8
    assert _kd_algorithm(resumed).teacher is not None
    assert {k: v.item() for k, v in resumed.state.loss.items()} == expected_loss
    assert expected_loss["kd"] > 0 and set(expected_loss) == {"lm", "kd", "lagrangian", "total"}
    state = _snapshot(resumed)
    for key, value in expected_state.items():
        assert torch.equal(value, state[key]), key
    resumed.close()


def _run_cpt(model_dir: Path, data_dir: Path, metrics: Path, *overrides: str):
    from llmfoundry.command_utils import train_from_yaml

    return train_from_yaml(
        str(CPT_YAML),
        [
            f"variables.model_dir={model_dir}",
            f"variables.data_dir={data_dir}",
            f"loggers.jsonl_metrics.path={metrics}",
            *overrides,
        ],
    )


@slow
@pytest.mark.parametrize("teacher", ["source", "directory"])
def test_kd_of_a_student_equal_to_its_teacher_is_zero(teacher, tiny_tokenizer_dir, tmp_path):
    """A plain (CPT-style) run: at the first step the student is its teacher."""
    model_dir, data_dir = make_tiny_run_inputs(tmp_path, tiny_tokenizer_dir, "mistral")
    spec = "source" if teacher == "source" else str(model_dir)
    trainer = _run_cpt(
        model_dir, data_dir, tmp_path / "m.jsonl", "max_duration=3ba", *_kd(spec, alpha=0.5)
    )
    trainer.close()
    kd = _metrics(tmp_path / "m.jsonl", "loss/train/kd")
    assert kd[0] == 0.0
    assert kd[1] > 0 and kd[2] > 0  # then the student moves


def _perturbed_copy(model_dir: Path, tokenizer_dir: Path, out: Path) -> Path:
    """The model of ``model_dir`` with seeded noise on every weight, as a HF directory."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    return save_tiny_checkpoint(model, tokenizer_dir, out)


class FirstStepGrads(Callback):
    """Saves every parameter's gradient of the first step to ``out`` (all microbatches in)."""

    def __init__(self, out: str):
        self.out = out

    def after_train_batch(self, state, logger):
        # After the last microbatch's backward, before the optimizer step.
        if int(state.timestamp.batch) == 0:
            grads = {n: p.grad.detach().clone() for n, p in state.model.named_parameters()}
            torch.save(grads, self.out)


@slow
def test_microbatches_give_the_full_batch_loss(tiny_tokenizer_dir, tmp_path):
    """Microbatch 2 and 4: the same losses and the same gradient of the first step.

    Compared where float rounding stays small: one step's losses and its accumulated
    gradients (recorded before the optimizer step). Weights after several AdamW
    steps are not comparable: Adam scales a near-zero gradient by its own running size, so
    rounding differences in such gradients become steps of about the learning rate. The
    teacher is a perturbed copy of the student, so KD and its gradient are not zero at the
    first step.
    """
    from llmfoundry.registry import callbacks

    callbacks.register("first_step_grads", func=FirstStepGrads)
    model_dir, data_dir = make_tiny_run_inputs(tmp_path, tiny_tokenizer_dir, "llama_gqa")
    teacher = _perturbed_copy(model_dir, tiny_tokenizer_dir, tmp_path / "teacher")
    results = {}
    for micro in (4, 2):
        metrics, grads = tmp_path / f"m{micro}.jsonl", tmp_path / f"g{micro}.pt"
        trainer = _run_cpt(
            model_dir,
            data_dir,
            metrics,
            "max_duration=1ba",
            f"device_train_microbatch_size={micro}",
            f"callbacks.first_step_grads.out={grads}",
            *_kd(str(teacher), alpha=0.5, temperature=1.5),
        )
        num_params = sum(1 for _ in trainer.state.model.parameters())
        trainer.close()
        results[micro] = (torch.load(grads), metrics)
    for key in ("kd", "lm", "total"):
        a = _metrics(results[4][1], f"loss/train/{key}")
        b = _metrics(results[2][1], f"loss/train/{key}")
        assert len(a) == len(b) == 1
        assert a == pytest.approx(b, rel=1e-5), key
    assert _metrics(results[4][1], "loss/train/kd")[0] > 1e-3  # KD is on at step 1
    full, half = results[4][0], results[2][0]
    assert sorted(full) == sorted(half)
    assert len(full) == num_params
    for name, grad in full.items():
        scale = grad.abs().max().item()
        assert scale > 0, name
        assert torch.allclose(half[name], grad, rtol=1e-4, atol=1e-5 * scale), name


RANK_SCRIPT = """
import json, sys
import torch
from composer import Callback
from composer.utils import dist
from llmfoundry.registry import callbacks
from composer_shear.distillation.algorithm import KnowledgeDistillation
from composer_shear.pruning.masking import find_gates
from composer_shear.distillation.teacher import teacher_forward


class KDRecorder(Callback):
    def __init__(self, out: str):
        self.out, self.rows = out, []

    def batch_end(self, state, logger):
        gates = find_gates(state.model)
        self.rows.append({
            "gates": {k: v.detach().flatten().tolist() for k, v in gates.state_dict().items()},
            "kd": float(state.loss["kd"]),
        })

    def fit_end(self, state, logger):
        kd = next(a for a in state.algorithms if isinstance(a, KnowledgeDistillation))
        probe = torch.arange(3, 35).view(2, 16)
        params = list(kd.teacher.parameters())
        local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in params)
        weights = [p.detach().double().sum().item() for p in state.model.parameters()]
        with open(f"{self.out}.{dist.get_global_rank()}.json", "w") as f:
            json.dump({
                "world": dist.get_world_size(),
                "rows": self.rows,
                "probe": teacher_forward(kd.teacher, {"input_ids": probe}).tolist(),
                "local_numel": local,
                "param_types": sorted({type(p).__name__ for p in params}),
                "student": weights,
            }, f)


callbacks.register("kd_recorder", func=KDRecorder)
from tests.pruning_helpers import run_prune
model_dir, data_dir, out, sharding = sys.argv[1:5]
run_prune(model_dir, data_dir, "max_duration=3ba", f"callbacks.kd_recorder.out={out}",
          f"callbacks.pruned_hf_export.save_folder={out}_export",
          "algorithms.knowledge_distillation.teacher=source",
          f"algorithms.knowledge_distillation.teacher_sharding={sharding}")
"""


@slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("sharding", ["full_shard", "none"])
def test_two_ranks_agree(sharding, tiny_tokenizer_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model_dir, data_dir = make_tiny_run_inputs(tmp_path, tiny_tokenizer_dir, "llama_gqa")
    script = tmp_path / "rank_script.py"
    script.write_text(RANK_SCRIPT)
    out = tmp_path / "kd"
    proc = composer_launch(2, script, str(model_dir), str(data_dir), str(out), sharding)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = [json.loads((tmp_path / f"kd.{rank}.json").read_text()) for rank in (0, 1)]
    assert runs[0]["world"] == runs[1]["world"] == 2
    # The student (gates and weights) is the same on both ranks after every step.
    for step, (a, b) in enumerate(zip(runs[0]["rows"], runs[1]["rows"], strict=True)):
        assert a["gates"] == b["gates"], f"ranks disagree after step {step + 1}"
    assert runs[0]["student"] == runs[1]["student"]
    # Each rank distilled its own data, and the KD term moved.
    kd = [[row["kd"] for row in run["rows"]] for run in runs]
    assert len(kd[0]) == 3 and kd[0] != kd[1] and kd[0][-1] > 0
    # Both ranks hold the source model as teacher (rank 1 got it from rank 0's broadcast).
    source = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        expected = source(torch.arange(3, 35).view(2, 16)).logits
    for run in runs:
        assert torch.allclose(torch.tensor(run["probe"]), expected, rtol=1e-5, atol=1e-5)
    total = sum(p.numel() for p in source.parameters())
    if sharding == "full_shard":
        assert runs[0]["param_types"] == ["DTensor"]
        assert runs[0]["local_numel"] + runs[1]["local_numel"] == total
        assert runs[0]["local_numel"] < total
    else:
        assert runs[0]["param_types"] == ["Parameter"]
        assert runs[0]["local_numel"] == runs[1]["local_numel"] == total
