"""``composer-shear plan``: what a pruning or CPT job needs, before it is launched.

Reads an LLM Foundry training YAML (one of ``yamls/``, or a user's) and the source model's
config, and prints:

* the source and target shapes and their parameters (total and non-embedding);
* per-GPU memory under the YAML's FSDP settings, batch and precision: master weights,
  gradients and optimizer state (sharded), the parameters FSDP gathers for compute, autocast's
  bf16 weight copies, activations with the YAML's activation-checkpointing choice (and the
  other), logits, the gates, the KD teacher;
* model FLOPs per token and per step, and the time of the YAML's ``max_duration`` on a named
  GPU at a stated MFU;
* warnings for sizes that waste tensor cores (not multiples of 64 / 128).

The activation model is *measured*, not guessed: bytes that autograd saves per token were fitted
on Hugging Face Llama models (transformers 4.51, SDPA attention, fp32 and bf16 autocast, with and
without our gates) by counting the storages a ``saved_tensors_hooks`` pack hook sees, at two
batch sizes so weights cancel; the fit reproduces every measured model within 0.2%
(``benchmarks/bench_plan.py`` re-measures it and checks the whole estimate against a real
training step). What the model does not know: the allocator's slack, the CUDA context and NCCL
buffers, data-loader workers; ``RUNTIME_OVERHEAD_GIB`` is a stated allowance for them.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig

from composer_shear.export.search import shapes_to_score
from composer_shear.families import get_family
from composer_shear.interface import positive_int
from composer_shear.shape import ModelShape, ShapeError

__all__ = [
    "GPUS",
    "GPUSpec",
    "JobPlan",
    "PlanError",
    "activation_bytes_per_token",
    "implied_mfu",
    "plan_job",
    "register_cli",
]

GIB = 2**30


@dataclass(frozen=True)
class GPUSpec:
    """A GPU's memory and dense peak throughput (vendor figures, no sparsity)."""

    name: str
    memory_gib: float
    bf16_tflops: float
    fp32_tflops: float


GPUS = {
    "a100-80gb": GPUSpec("NVIDIA A100-SXM4-80GB", 80, 312, 19.5),
    "h100": GPUSpec("NVIDIA H100-SXM5-80GB", 80, 989, 67),
    "h200": GPUSpec("NVIDIA H200-SXM-141GB", 141, 989, 67),
}

# Bytes autograd saves per token, fitted on HF Llama layers (see the module docstring):
# per layer ``h * hidden + i * intermediate + q * (heads * head_dim)``, plus ``v * vocab`` and
# ``g * hidden`` once per model. Key / value projections do not appear on their own: with GQA,
# transformers repeats k and v to the query heads before attention, so they scale with ``q``.
ACTIVATION_COEFFICIENTS = {
    # precision -> (h, i, q, v, g)
    "fp32": (23.9, 16.0, 20.33, 4.01, 12.37),
    "amp_bf16": (25.9, 8.0, 10.33, 4.01, 10.37),
}
# What the gates' hooks add per layer and token (the hidden-dim masks on both branches).
GATED_HIDDEN_EXTRA = {"fp32": 8.0, "amp_bf16": 4.0}
# Optimizer state bytes per trainable parameter (fp32 moments).
OPTIMIZER_STATE_BYTES = {"decoupled_adamw": 8, "adamw": 8, "decoupled_lionw": 4, "sgd": 0}
# Allowance for what the estimate cannot see: CUDA context (~0.5 GiB), NCCL buffers, allocator
# fragmentation. An assumption, stated in the output.
RUNTIME_OVERHEAD_GIB = 3.0
# Default MFU for the time estimate: a well-tuned LLM Foundry run of a 7B model reaches ~40-50%
# on A100s (LLM-Shearing reports 3,684 tokens/s per A100 for plain 7B training: 48%).
DEFAULT_MFU = 0.40
# Fewer GPUs share an FSDP shard group under HYBRID_SHARD: one node.
GPUS_PER_NODE = 8


class PlanError(ValueError):
    """The YAML or the model config does not describe a job we can plan."""


@dataclass
class MemoryLine:
    """One term of the per-GPU memory estimate."""

    what: str
    gib: float
    note: str = ""


@dataclass
class JobPlan:
    """Everything ``composer-shear plan`` reports about one job."""

    kind: str
    model: dict[str, Any]
    target: dict[str, Any] | None
    gpus: int
    gpu: str
    tokens_per_step: int
    steps: int | None
    memory: list[MemoryLine] = field(default_factory=list)
    memory_other_checkpointing: float = 0.0
    flops_per_token: float = 0.0
    flops_per_step: float = 0.0
    hours: float | None = None
    mfu: float = DEFAULT_MFU
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def memory_total_gib(self) -> float:
        """The per-GPU total."""
        return sum(line.gib for line in self.memory)


def activation_bytes_per_token(
    shape: ModelShape,
    precision: str,
    gated: bool,
    checkpointing: bool,
    residual_bytes: int = 4,
) -> float:
    """Bytes of activations one token keeps alive through the backward pass, per GPU.

    Args:
        shape: The model that runs forward (the source, while pruning).
        precision: ``fp32`` or ``amp_bf16``.
        gated: Whether pruning gates' hooks run (they add hidden-dim masks).
        checkpointing: Activation checkpointing per decoder layer: only each layer's input is
            kept, plus one layer's activations while it is recomputed.
        residual_bytes: Bytes of the residual stream kept between checkpointed layers: 4 with
            fp32 parameters (autocast leaves the residual adds in fp32), 2 with bf16 ones.
    """
    h, i, q, v, g = ACTIVATION_COEFFICIENTS[precision]
    if gated:
        h += GATED_HIDDEN_EXTRA[precision]
    heads = shape.num_attention_heads * shape.head_dim
    layer = h * shape.hidden_size + i * shape.intermediate_size + q * heads
    once = v * shape.vocab_size + g * shape.hidden_size
    # The fp32 logits' gradient exists once during the backward pass, next to the saved logits.
    once += 4 * shape.vocab_size
    if checkpointing:
        return shape.num_hidden_layers * residual_bytes * shape.hidden_size + layer + once
    return shape.num_hidden_layers * layer + once


def matmul_params(shape: ModelShape) -> int:
    """Parameters that take part in matrix multiplies (no embedding lookup, with the LM head)."""
    return shape.num_non_embedding_params() + shape.vocab_size * shape.hidden_size


def flops_per_token(shape: ModelShape, seq_len: int, backward: str = "full") -> float:
    """Model FLOPs per token (PaLM's convention: 6N + 12 L h s, no recomputation).

    Args:
        shape: The model.
        seq_len: Sequence length (the attention term).
        backward: ``full`` (weights and activations), ``activations`` (frozen weights: no
            weight-gradient GEMMs) or ``none`` (forward only).
    """
    n = matmul_params(shape)
    attention = 2 * shape.num_hidden_layers * shape.num_attention_heads * shape.head_dim * seq_len
    per_pass = 2 * n + attention
    return per_pass * {"full": 3, "activations": 2, "none": 1}[backward]


def implied_mfu(tokens_per_second_per_gpu: float, flops: float, gpu: GPUSpec) -> float:
    """The MFU a measured throughput implies (bf16 peak)."""
    return tokens_per_second_per_gpu * flops / (gpu.bf16_tflops * 1e12)


def _shard_factor(fsdp: dict[str, Any] | None, gpus: int) -> int:
    if not fsdp or gpus == 1:
        return 1
    strategy = str(fsdp.get("sharding_strategy", "FULL_SHARD")).upper()
    if strategy == "NO_SHARD":
        return 1
    if strategy.startswith("HYBRID"):
        return min(gpus, GPUS_PER_NODE)
    return gpus


def _param_dtype_bytes(precision: str, fsdp: dict[str, Any] | None) -> int:
    """Bytes of the parameters FSDP gathers for compute."""
    if precision != "amp_bf16":
        return 4
    mixed = (fsdp or {}).get("mixed_precision", "DEFAULT")
    if isinstance(mixed, dict):
        return 2 if str(mixed.get("param_dtype", "fp32")) in ("bf16", "bfloat16") else 4
    return 4 if str(mixed).upper() == "FULL" else 2


def _steps(max_duration: Any, tokens_per_step: int, global_batch: int) -> int | None:
    text = str(max_duration)
    for unit, per in (("ba", 1), ("tok", tokens_per_step), ("sp", global_batch)):
        if text.endswith(unit) and text[: -len(unit)].isdigit():
            return math.ceil(int(text[: -len(unit)]) / per)
    return None


def _layer_params(shape: ModelShape) -> int:
    per_layer = (shape.num_params() - shape.vocab_size * shape.hidden_size * 2) // max(
        shape.num_hidden_layers, 1
    )
    return max(per_layer, 0)


def size_warnings(shape: ModelShape, label: str) -> list[str]:
    """Sizes that leave tensor cores idle (GEMM dimensions that are not multiples of 64/128)."""
    out = []
    for key, value, multiple in (
        ("hidden_size", shape.hidden_size, 128),
        ("intermediate_size", shape.intermediate_size, 128),
        ("heads x head_dim", shape.num_attention_heads * shape.head_dim, 64),
        ("vocab_size", shape.vocab_size, 64),
    ):
        if value % multiple:
            out.append(
                f"{label} {key}={value} is not a multiple of {multiple}: GEMMs pad or fall off "
                "the fast tensor-core paths"
            )
    return out


def load_yaml(path: str | Path, overrides: list[str] | None = None) -> DictConfig:
    """The YAML with command-line overrides applied (``key=value``, as ``llmfoundry train``)."""
    cfg = OmegaConf.load(path)
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
    return cfg


def _get(cfg: DictConfig, key: str, default: Any = None) -> Any:
    """A resolved value, or ``default`` when it is missing (``???``) or absent."""
    try:
        value = OmegaConf.select(cfg, key, default=default, throw_on_missing=True)
    except Exception:  # an interpolation into a missing value (e.g. data_local: ???)
        return default
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else value


def read_config(source: str | Path) -> Any:
    """A ``transformers`` config from a ``config.json``, a model directory or a cached hub id."""
    path = Path(source)
    try:
        if path.is_file():
            raw = json.loads(path.read_text())
            return AutoConfig.for_model(**raw)
        return AutoConfig.from_pretrained(str(source))
    except (OSError, ValueError, KeyError) as error:
        raise PlanError(
            f"cannot read the model config {source!s}: {error}. Pass --source-config with a "
            "config.json (or model directory) of the source model."
        ) from error


def plan_job(
    cfg: DictConfig,
    source_config: Any,
    gpus: int = 8,
    gpu: str = "a100-80gb",
    mfu: float = DEFAULT_MFU,
) -> JobPlan:
    """Plans one ``llmfoundry train`` job.

    Args:
        cfg: The training YAML (overrides applied).
        source_config: The source model's ``transformers`` config. For a CPT recipe whose model
            directory does not exist yet, its ``variables.pruned_shape`` is resolved against it.
        gpus: GPUs the job runs on (``composer -n``, times nodes).
        gpu: A key of :data:`GPUS`.
        mfu: Model FLOPs utilisation assumed for the time estimate.

    Raises:
        PlanError: Missing batch settings, an unknown GPU, a target that does not resolve.
    """
    if gpu not in GPUS:
        raise PlanError(f"unknown GPU {gpu!r}; known: {sorted(GPUS)}")
    if gpus < 1 or not 0 < mfu <= 1:
        raise PlanError("gpus must be >= 1 and mfu in (0, 1]")
    source = get_family(source_config).shape(source_config)
    pruning = _get(cfg, "algorithms.targeted_pruning")
    # A one-shot job is mask-only pruning of the source: frozen weights, gates, one batch.
    oneshot = _get(cfg, "algorithms.oneshot_pruning")
    if pruning is None and oneshot is not None:
        pruning = oneshot
    kd = _get(cfg, "algorithms.knowledge_distillation")
    target = model = None
    notes: list[str] = []
    try:
        if pruning is not None:
            kind, model = ("oneshot" if oneshot is pruning else "prune"), source
            budget = pruning.get("target_params") if oneshot is pruning else None
            if budget is not None:
                # The job searches the shape at FIT_START: plan the largest candidate (the
                # memory of a one-shot job is the frozen source's; the gates are small).
                searched = shapes_to_score(
                    source,
                    int(float(budget)),
                    bool(pruning.get("non_embedding", False)),
                    int(pruning.get("search_candidates", 24)),
                    width_multiple=int(pruning.get("width_multiple", 64)),
                    slack=float(pruning.get("budget_slack", 0.03)),
                )
                target = searched[0].shape
                notes.append(
                    f"target_params {int(float(budget)):,}: the job scores {len(searched)} "
                    "shapes and cuts the best; the target shown is the largest"
                )
            else:
                target = source.resolve_target(pruning.get("target_shape") or {})
        else:
            kind = "cpt"
            pruned = _get(cfg, "variables.pruned_shape")
            model = source.resolve_target(pruned) if pruned else source
    except ShapeError as error:
        raise PlanError(str(error)) from error
    seq = _get(cfg, "max_seq_len")
    global_batch = _get(cfg, "global_train_batch_size")
    if seq is None or global_batch is None:
        raise PlanError("the YAML sets no max_seq_len / global_train_batch_size")
    per_gpu = math.ceil(global_batch / gpus)
    micro = _get(cfg, "device_train_microbatch_size", per_gpu)
    micro = per_gpu if micro == "auto" else min(int(micro), per_gpu)
    precision = str(_get(cfg, "precision", "fp32"))
    precision = "amp_bf16" if precision.startswith("amp") else "fp32"
    fsdp = _get(cfg, "fsdp_config")
    checkpointing = bool((fsdp or {}).get("activation_checkpointing", False))
    shard = _shard_factor(fsdp, gpus)
    frozen = oneshot is pruning or bool((pruning or {}).get("freeze_weights", False))
    optimizer = str(_get(cfg, "optimizer.name", "decoupled_adamw"))
    state_bytes = OPTIMIZER_STATE_BYTES.get(optimizer, 8)

    params = model.num_params()
    trainable = 0 if frozen else params
    plan = JobPlan(
        kind=kind,
        model={
            "shape": model.config_updates(),
            "params": params,
            "non_embedding_params": model.num_non_embedding_params(),
        },
        target=None
        if target is None
        else {
            "shape": target.config_updates(),
            "params": target.num_params(),
            "non_embedding_params": target.num_non_embedding_params(),
        },
        gpus=gpus,
        gpu=gpu,
        tokens_per_step=global_batch * seq,
        steps=_steps(_get(cfg, "max_duration"), global_batch * seq, global_batch),
        mfu=mfu,
    )
    memory = plan.memory
    memory.append(
        MemoryLine("master weights (fp32)", 4 * params / shard / GIB, f"sharded over {shard}")
    )
    memory.append(
        MemoryLine(
            "gradients (fp32)",
            4 * trainable / shard / GIB,
            "none: weights frozen" if frozen else f"sharded over {shard}",
        )
    )
    memory.append(
        MemoryLine(
            f"optimizer state ({optimizer})",
            state_bytes * trainable / shard / GIB,
            f"sharded over {shard}",
        )
    )
    compute_bytes = _param_dtype_bytes(precision, fsdp)
    if shard > 1:
        root = model.vocab_size * model.hidden_size * (1 if model.tie_word_embeddings else 2)
        # FSDP keeps the root unit (embeddings, LM head) gathered through the step and
        # prefetches the next layer while one runs (limit_all_gathers caps it at two).
        gathered = (root + 2 * _layer_params(model)) * compute_bytes
        memory.append(
            MemoryLine(
                "parameters gathered for compute",
                gathered / GIB,
                f"{compute_bytes}-byte, root + 2 layers",
            )
        )
    if precision == "amp_bf16" and compute_bytes == 4:
        # Autocast casts fp32 weights to bf16 per matmul and autograd keeps the copy for the
        # backward pass: the whole model without checkpointing, one layer with it.
        copies = (_layer_params(model) if checkpointing else params) * 2
        memory.append(
            MemoryLine(
                "autocast bf16 weight copies",
                copies / GIB,
                "one layer (checkpointing)" if checkpointing else "whole model",
            )
        )
    tokens = micro * seq
    gated = pruning is not None
    act = activation_bytes_per_token(model, precision, gated, checkpointing, compute_bytes)
    other = activation_bytes_per_token(model, precision, gated, not checkpointing, compute_bytes)
    memory.append(
        MemoryLine(
            "activations + logits",
            act * tokens / GIB,
            f"microbatch {micro} x {seq}, checkpointing {'on' if checkpointing else 'off'}",
        )
    )
    plan.memory_other_checkpointing = (other - act) * tokens / GIB
    if pruning is not None:
        units = (
            model.num_hidden_layers
            * (model.num_attention_heads + model.num_key_value_heads + model.intermediate_size + 1)
            + model.hidden_size
        )
        memory.append(
            MemoryLine("gates and multipliers", units * 4 * 4 / GIB, "value, grad, 2 Adam moments")
        )
    teacher_flops = 0.0
    if kd is not None:
        sharded = str(kd.get("teacher_sharding", "auto")) != "none" and shard > 1
        memory.append(
            MemoryLine(
                "KD teacher weights (bf16)",
                2 * source.num_params() / (shard if sharded else 1) / GIB,
                "sharded" if sharded else "replicated",
            )
        )
        # Teacher logits (bf16), the KD loss's fp32 softmax and its gradient.
        memory.append(MemoryLine("KD logits", tokens * source.vocab_size * (2 + 4 + 4) / GIB))
        teacher_flops = flops_per_token(source, seq, backward="none")
    memory.append(
        MemoryLine(
            "runtime allowance",
            RUNTIME_OVERHEAD_GIB,
            "CUDA context, NCCL, allocator slack (assumed)",
        )
    )
    backward = "activations" if frozen else "full"
    plan.flops_per_token = flops_per_token(model, seq, backward) + teacher_flops
    plan.flops_per_step = plan.flops_per_token * plan.tokens_per_step
    if plan.steps is not None:
        peak = GPUS[gpu].bf16_tflops if precision == "amp_bf16" else GPUS[gpu].fp32_tflops
        seconds = plan.flops_per_step * plan.steps / (gpus * peak * 1e12 * mfu)
        plan.hours = seconds / 3600
    plan.notes = notes
    plan.warnings = size_warnings(model, "model")
    if target is not None:
        plan.warnings += size_warnings(target, "target")
    if plan.memory_total_gib > GPUS[gpu].memory_gib:
        plan.warnings.append(
            f"the estimate ({plan.memory_total_gib:.1f} GiB) exceeds the {GPUS[gpu].name}'s "
            f"{GPUS[gpu].memory_gib:.0f} GiB: lower device_train_microbatch_size, turn on "
            "activation_checkpointing, or use more GPUs"
        )
    return plan


def render(plan: JobPlan) -> str:
    """The human-readable report."""
    gpu = GPUS[plan.gpu]
    lines = [f"job: {plan.kind} on {plan.gpus} x {gpu.name}"]
    lines.append(
        f"model  : {plan.model['params']:,} params "
        f"({plan.model['non_embedding_params']:,} non-embedding) {plan.model['shape']}"
    )
    if plan.target:
        lines.append(
            f"target : {plan.target['params']:,} params "
            f"({plan.target['non_embedding_params']:,} non-embedding) {plan.target['shape']}"
        )
    lines.append("memory per GPU:")
    for line in plan.memory:
        lines.append(f"  {line.what:<34}{line.gib:9.2f} GiB  {line.note}")
    lines.append(f"  {'total':<34}{plan.memory_total_gib:9.2f} GiB  of {gpu.memory_gib:.0f} GiB")
    lines.append(
        f"  (activation checkpointing the other way: {plan.memory_other_checkpointing:+.2f} GiB)"
    )
    lines.append(
        f"compute: {plan.flops_per_token / 1e9:.2f} GFLOPs per token, "
        f"{plan.flops_per_step / 1e15:.2f} PFLOPs per step of {plan.tokens_per_step:,} tokens"
    )
    if plan.hours is not None:
        lines.append(
            f"time   : {plan.steps:,} steps = {plan.hours:.1f} h on {plan.gpus} GPUs at "
            f"{plan.mfu:.0%} MFU ({plan.hours * plan.gpus:,.0f} GPU-hours)"
        )
    lines += [f"note   : {n}" for n in plan.notes]
    lines += [f"warning: {w}" for w in plan.warnings]
    return "\n".join(lines)


def _run_cli(args: argparse.Namespace) -> int:
    try:
        cfg = load_yaml(args.yaml, args.overrides)
        source = args.source_config or _get(cfg, "model.pretrained_model_name_or_path")
        if source is None:
            raise PlanError("the YAML names no model; pass --source-config")
        plan = plan_job(cfg, read_config(source), args.gpus, args.gpu, args.mfu)
    except (PlanError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(render(plan))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(asdict(plan), indent=2) + "\n")
    return 0


def register_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Adds ``composer-shear plan``."""
    parser = subparsers.add_parser(
        "plan",
        help="memory, compute and time of a training YAML before launch",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("yaml", help="LLM Foundry training YAML (a prune or CPT recipe)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, as llmfoundry train")
    parser.add_argument(
        "--source-config",
        help="config.json or model directory of the source model (default: the YAML's "
        "model.pretrained_model_name_or_path, read offline)",
    )
    parser.add_argument("--gpus", type=positive_int, default=8, help="GPUs of the job (all nodes)")
    parser.add_argument("--gpu", choices=sorted(GPUS), default="a100-80gb", help="GPU model")
    parser.add_argument("--mfu", type=float, default=DEFAULT_MFU, help="assumed MFU")
    parser.add_argument("--json", dest="json_out", help="also write the plan as JSON here")
    parser.set_defaults(func=_run_cli)
    return parser
