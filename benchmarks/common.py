"""What the benchmarks share: the SmolLM2 target, text batches, the pruning step, the machine.

* :func:`recipe_target`: the target shape of a recipe (by default the SmolLM2 demo's,
  ``yamls/smollm2/prune.yaml``), so that a benchmark measures the shape the recipe prunes to
  and a change of the recipe cannot leave a stale copy behind;
* :func:`text_batches`: token batches of real text (Python's own standard library sources,
  present wherever the benchmark runs);
* :func:`pruning_train_step`: one training step as a pruning job takes it (LM loss, the
  Lagrangian, optionally distillation from a frozen teacher; backward, clipping, AdamW, the
  log-alpha clamp), for the step-time, memory and GPU benchmarks;
* :func:`machine_record` / :func:`machine_line`: the machine a figure was measured on (CPU
  model, cores, torch threads, GPU), recorded with every result, since the same code gives
  different figures on different machines.

Benchmark scripts import it as a sibling module (``from common import ...``): they run as
``python benchmarks/<script>.py``, which puts this folder first on the import path.
"""

from __future__ import annotations

import itertools
import os
import platform
import sysconfig
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from composer_shear.distillation.algorithm import (
    add_distillation_loss,
    forward_kl,
    predicted_positions,
)
from composer_shear.distillation.teacher import teacher_forward
from composer_shear.pruning.algorithm import add_gate_param_groups
from composer_shear.pruning.masking import ShearGates

REPO = Path(__file__).resolve().parents[1]
SMOLLM2_PRUNE_YAML = REPO / "yamls" / "smollm2" / "prune.yaml"
# Standard library sources: real code and prose, the same on every machine of one Python.
TEXT_SOURCES = ("argparse.py", "typing.py", "ast.py", "inspect.py", "pathlib.py", "enum.py")


def recipe_target(recipe: Path = SMOLLM2_PRUNE_YAML) -> dict[str, int]:
    """The ``algorithms.targeted_pruning.target_shape`` of a recipe YAML.

    Raises:
        ValueError: The recipe has no ``targeted_pruning`` target shape.
    """
    target = OmegaConf.select(
        OmegaConf.load(recipe), "algorithms.targeted_pruning.target_shape", default=None
    )
    if not target:
        raise ValueError(f"{recipe} has no algorithms.targeted_pruning.target_shape")
    return {str(key): int(value) for key, value in OmegaConf.to_container(target).items()}


def text_batches(
    tokenizer: Any, batch: int, seq_len: int, count: int, vocab: int | None = None
) -> list[torch.Tensor]:
    """``count`` batches of ``batch`` x ``seq_len`` token ids of real text.

    Args:
        tokenizer: A Hugging Face tokenizer.
        batch: Sequences per batch.
        seq_len: Tokens per sequence.
        count: Number of batches.
        vocab: Token ids are taken modulo this (a tiny test model's vocabulary); None keeps
            the tokenizer's ids.

    The text is repeated when it is shorter than ``count`` batches: step times do not depend
    on which tokens a batch holds.
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = "\n".join((stdlib / name).read_text() for name in TEXT_SOURCES)
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if vocab is not None:
        ids = ids % vocab
    need = batch * seq_len
    ids = ids.repeat(-(-need * count // ids.numel()))
    return [ids[i * need : (i + 1) * need].view(batch, seq_len) for i in range(count)]


def pruning_train_step(
    model: nn.Module,
    gates: ShearGates | None = None,
    teacher: nn.Module | None = None,
    alpha: float = 0.5,
    lr: float = 1e-5,
    seed: int = 0,
) -> Callable[[torch.Tensor], float]:
    """A training step of ``model`` as a pruning job takes it; returns ``step(ids) -> loss``.

    Each call: seeds this step's gate noise (as ``targeted_pruning`` does at
    ``BATCH_START``), runs ``model(input_ids=ids, labels=ids)``, adds the Lagrangian penalty
    (with ``gates``) and the distillation loss ``alpha KD + (1 - alpha) LM`` from
    ``teacher``'s logits (with ``teacher``; the algorithm's own functions), backpropagates,
    clips the global gradient norm at 1.0, steps AdamW (weights at ``lr``; gates and
    multipliers in their own groups at lr 1.0, as the algorithm adds them) and clamps the
    log-alphas.

    Args:
        model: The model to train: a Hugging Face causal LM, or a wrapper (e.g. an FSDP2 root)
            whose ``forward(input_ids=..., labels=...)`` returns the HF output.
        gates: The gates attached to ``model`` (None: plain training).
        teacher: A frozen teacher (None: no distillation).
        alpha: Weight of the distillation loss.
        lr: Learning rate of the weights.
        seed: Seed of the gate noise.
    """
    weights = [p for name, p in model.named_parameters() if "shear_gates" not in name]
    optimizer = torch.optim.AdamW(weights, lr=lr, betas=(0.9, 0.95))
    if gates is not None:
        optimizer.param_groups[0]["initial_lr"] = lr
        add_gate_param_groups(optimizer, gates, gate_lr=1.0, lambda_lr=1.0)
    steps = itertools.count()

    def step(ids: torch.Tensor) -> float:
        index = next(steps)
        if gates is not None:
            gates.start_step(seed=seed, step=index, rank=0)
        out = model(input_ids=ids, labels=ids)
        loss: Mapping[str, torch.Tensor] = {"lm": out.loss, "total": out.loss}
        if gates is not None:
            loss = {"lm": out.loss, "lagrangian": gates.penalty, "total": out.loss + gates.penalty}
        if teacher is not None:
            batch = {"input_ids": ids, "labels": ids}
            mask = predicted_positions(batch, ids.shape[1])
            kd = forward_kl(out.logits, teacher_forward(teacher, batch), mask)
            loss = add_distillation_loss(loss, kd, alpha)
        loss["total"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if gates is not None:
            gates.clamp_()
        return float(loss["total"])

    return step


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else what ``platform`` knows)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_record() -> dict[str, Any]:
    """The machine this process runs on, for a benchmark's result record.

    ``torch_threads`` is this process's intra-op thread count; a training job started from it
    (``llmfoundry train``) inherits the same environment (``OMP_NUM_THREADS``, recorded too)
    and so the same count.
    """
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "host": platform.node(),
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def machine_line(record: Mapping[str, Any] | None = None) -> str:
    """One line naming the machine (of ``record``, default this one) for a benchmark's output."""
    machine = dict(record or machine_record())
    device = machine.get("gpu") or f"{machine.get('usable_cpus')} usable CPU cores"
    return (
        f"machine: {machine.get('cpu')} ({machine.get('logical_cpus')} logical CPUs), {device}, "
        f"{machine.get('torch_threads')} torch threads, torch {machine.get('torch')}, "
        f"host {machine.get('host')}"
    )
