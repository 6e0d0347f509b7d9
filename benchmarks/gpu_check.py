"""One-GPU check of the pruning step under FSDP2 in bf16: speed, KD cost, memory, export.

Not yet run on a GPU (none was available to this project). On one CUDA GPU it prints:

- tokens/s of a training step with every pruning gate vs the plain model, both wrapped by
  FSDP2 (``fully_shard`` per decoder layer and the root, bf16 parameters in compute, fp32
  gradient reduction and master weights), AdamW, gradient clipping, alternating step by step;
- the time ratio of a pruning step with knowledge distillation (a bf16 copy of the source
  model as teacher, ``forward_kl`` as the ``knowledge_distillation`` algorithm computes it,
  alpha 0.5) to a pruning step without;
- peak CUDA memory (``max_memory_allocated``) of the pruning step over the plain step;
- the export time (gather to CPU, slice, fold, write) vs ``save_pretrained`` of the source.

    # from the repository root, with the pinned stack installed
    python benchmarks/gpu_check.py [--model DIR] [--batch 8] [--seq-len 1024] [--steps 20]
    python benchmarks/gpu_check.py --smoke      # tiny random model on CPU (gloo): checks the
                                                # script itself, its figures mean nothing

Default model: SmolLM2-135M (``composer-shear smollm2``). Runs as one process (world size 1,
a real FSDP2 mesh of one GPU); budget on an H100-class GPU: well under 8 minutes.

Multi-GPU mode (``--gpus N``): the real job instead of a hand-built step. It tokenizes the
sample corpus, measures the source's eval loss per domain (the reference losses, as
``make demo`` does), then runs ``composer -n N llmfoundry train yamls/smollm2/prune.yaml`` in
bf16 (``precision: amp_bf16``) under FSDP (``FULL_SHARD``, ``mixed_precision: FULL`` since the
gates must stay fp32, ``init_device: mixed``) with the recipe's ``pruned_hf_export`` in
bf16, loads the export with transformers and prints: tokens/s (whole job and per GPU, from
Composer's ``speed_monitor``), peak CUDA memory over the GPUs (``memory_monitor``, min and max
over ranks), the export's write time (rank 0's log) and the exported model's eval loss
beside the source's. ``FSDP_VERSION=2`` in the environment makes Composer use FSDP2.

    python benchmarks/gpu_check.py --gpus 8 [--steps 30] [--batch 8] [--seq-len 512]
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as torch_dist
from common import (
    SMOLLM2_PRUNE_YAML,
    machine_line,
    pruning_train_step,
    recipe_target,
    text_batches,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from transformers import AutoModelForCausalLM, AutoTokenizer

from composer_shear.data.prep import prepare_domains
from composer_shear.data.reference_loss import evaluate_domain_losses
from composer_shear.demo import DEFAULT_CORPUS, DOMAINS
from composer_shear.export.checkpoint import MODEL_PREFIX, export_model, gated_model_from_weights
from composer_shear.launch import check_hf_dir, llmfoundry_train, mapping_override
from composer_shear.pruning.masking import attach_gates
from composer_shear.report.metrics import read_metrics
from composer_shear.sharding import full_state_dict

SMOKE_TARGET = dict(
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=1,
    intermediate_size=48,
    hidden_size=48,
)


class Wrapper(torch.nn.Module):
    """Holds the HF model as ``.model``, like Composer's ``HuggingFaceModel`` (state-dict keys)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, **inputs: torch.Tensor):
        """The HF model's output (loss and logits) on ``inputs`` (``input_ids``, ``labels``)."""
        return self.model(**inputs)


def shard(model: torch.nn.Module, device: torch.device) -> Wrapper:
    """FSDP2 as Composer applies it: every decoder layer, then the root; bf16 compute."""
    wrapped = Wrapper(model).to(device)
    bf16 = device.type == "cuda"
    policy = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if bf16 else None,
        reduce_dtype=torch.float32 if bf16 else None,
    )
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(wrapped, mp_policy=policy)
    return wrapped


def timed(step, batches, device) -> list[float]:
    times = []
    for ids in batches:
        ids = ids.to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step(ids)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def peak_memory(step, ids, device) -> int:
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step(ids.to(device))
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


# The export's summary line in rank 0's log (ExportSummary.describe).
WRITTEN = re.compile(r"written: (?P<folder>\S+) \((?P<seconds>[\d.]+)s\)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; ``--steps``, ``--batch`` and ``--seq-len`` default per mode."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="HF directory (default: SmolLM2-135M)")
    parser.add_argument(
        "--batch", type=int, default=None, help="sequences per GPU and step (default 8)"
    )
    parser.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="tokens per sequence (default 1024; 512 with --gpus: the sample corpus is small)",
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="timed steps (default 20; 30 with --gpus)"
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (one GPU)")
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU (no figures)")
    parser.add_argument(
        "--gpus",
        type=int,
        default=None,
        help="multi-GPU mode: run the SmolLM2 pruning recipe with composer -n GPUS in bf16 "
        "under FSDP, with its export (default: the one-GPU check)",
    )
    parser.add_argument(
        "--run-dir",
        type=Path,
        default=None,
        help="--gpus: where data, logs, metrics and the export go (default: a temp folder)",
    )
    args = parser.parse_args(argv)
    if args.gpus is not None and args.gpus < 1:
        parser.error("--gpus must be >= 1")
    if args.gpus is not None and args.smoke:
        parser.error("--smoke checks the one-GPU mode; --gpus needs CUDA GPUs")
    multi = args.gpus is not None
    args.batch = args.batch or 8
    args.seq_len = args.seq_len or (512 if multi else 1024)
    args.steps = args.steps or (30 if multi else 20)
    return args


def check_gpus(gpus: int) -> None:
    """Stops with a clear message unless ``gpus`` CUDA GPUs are visible."""
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if available < gpus:
        raise SystemExit(
            f"gpu_check needs {gpus} CUDA GPU(s); this machine has {available} "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda}). Run it on a GPU "
            "machine, or use --smoke to check the one-GPU mode's script on CPU."
        )


def multi_gpu_overrides(
    args: argparse.Namespace,
    model_dir: Path,
    data_dir: Path,
    run_dir: Path,
    target_loss: dict[str, float],
) -> list[str]:
    """Overrides of ``yamls/smollm2/prune.yaml`` for the multi-GPU job (bf16 under FSDP)."""
    return [
        f"variables.model_dir={model_dir}",
        f"variables.data_dir={data_dir}",
        f"variables.run_dir={run_dir}",
        f"variables.steps={args.steps}",
        f"variables.max_seq_len={args.seq_len}",
        mapping_override("variables.target_loss", target_loss),
        "precision=amp_bf16",
        # init_device: mixed and FSDP as the 7-8B recipes set them; FULL keeps the gates fp32
        # (16-bit FSDP parameters are refused at INIT), amp_bf16 autocast runs the matmuls.
        "model.init_device=mixed",
        "fsdp_config.sharding_strategy=FULL_SHARD",
        "fsdp_config.mixed_precision=FULL",
        "fsdp_config.use_orig_params=true",
        "fsdp_config.sync_module_states=true",
        "fsdp_config.activation_checkpointing=false",
        "fsdp_config.state_dict_type=full",
        f"global_train_batch_size={args.batch * args.gpus}",
        f"device_train_microbatch_size={args.batch}",
        f"device_eval_batch_size={args.batch}",
        "callbacks.pruned_hf_export.precision=bfloat16",
        # Throughput over the last third of the run (Composer logs it once the window fills).
        f"callbacks.speed_monitor.window_size={max(2, args.steps // 3)}",
        # Peak memory of every GPU, reduced to min / max / mean over the ranks each batch.
        "callbacks.memory_monitor.dist_aggregate_batch_interval=1",
        "console_log_interval=1ba",
    ]


def multi_gpu_figures(metrics_path: Path, log_path: Path) -> dict[str, float | None]:
    """The job's figures from its JSONL metrics and rank 0's log (None: not logged)."""
    metrics = read_metrics(metrics_path)

    def last(name: str) -> float | None:
        return None if metrics is None else metrics.last(name)

    written = WRITTEN.findall(log_path.read_text(encoding="utf-8")) if log_path.exists() else []
    return {
        "tokens_per_s": last("throughput/tokens_per_sec"),
        "tokens_per_s_per_gpu": last("throughput/device/tokens_per_sec"),
        "peak_allocated_gb_max": last("memory/peak_allocated_mem_max"),
        "peak_allocated_gb_min": last("memory/peak_allocated_mem_min"),
        "peak_reserved_gb_max": last("memory/peak_reserved_mem_max"),
        "export_s": float(written[-1][1]) if written else None,
    }


def run_multi_gpu(args: argparse.Namespace) -> None:
    """``--gpus N``: the SmolLM2 pruning recipe on N GPUs, then its export's figures."""
    from composer_shear.weights.smollm2 import materialize_smollm2

    started = time.perf_counter()
    run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix="gpu_check_multi_"))
    model_dir = Path(args.model) if args.model else materialize_smollm2(verbose=False)
    data_dir = run_dir / "data"
    if not data_dir.exists():
        prepare_domains(DEFAULT_CORPUS, data_dir, str(model_dir), args.seq_len, domains=DOMAINS)

    def losses(path: Path) -> dict[str, float]:
        return evaluate_domain_losses(
            path, data_dir, DOMAINS, max_seq_len=args.seq_len, batch_size=8, device="cuda"
        )

    source = losses(model_dir)
    log_path = run_dir / "logs" / "prune.log"
    overrides = multi_gpu_overrides(args, model_dir, data_dir, run_dir, source)
    start = time.perf_counter()
    llmfoundry_train(SMOLLM2_PRUNE_YAML, overrides, log_path, processes=args.gpus)
    job_s = time.perf_counter() - start
    export_dir = run_dir / "models" / "pruned"
    config = check_hf_dir(export_dir)  # loads strictly with transformers
    pruned = losses(export_dir)
    figures = multi_gpu_figures(run_dir / "metrics" / "prune.jsonl", log_path)

    def show(value: float | None, unit: str = "", digits: int = 1) -> str:
        return "not logged" if value is None else f"{value:,.{digits}f}{unit}"

    print(
        f"model {model_dir}, {args.gpus} GPU(s) x {args.batch} x {args.seq_len} tokens, "
        f"{args.steps} steps, amp_bf16, FSDP FULL_SHARD mixed_precision FULL"
    )
    print(machine_line())
    print(f"  job (llmfoundry train, {args.gpus} processes): {job_s:.0f} s")
    print(
        f"  tokens/s: {show(figures['tokens_per_s'], digits=0)} "
        f"({show(figures['tokens_per_s_per_gpu'], digits=0)} per GPU)"
    )
    print(
        f"  peak CUDA memory per GPU: allocated {show(figures['peak_allocated_gb_min'], ' GB', 2)}"
        f" - {show(figures['peak_allocated_gb_max'], ' GB', 2)} (min - max over ranks), "
        f"reserved max {show(figures['peak_reserved_gb_max'], ' GB', 2)}"
    )
    print(f"  export (rank 0: slice, fold, write bf16): {show(figures['export_s'], ' s')}")
    print(
        f"  export: layers={config['num_hidden_layers']} hidden={config['hidden_size']} "
        f"heads={config['num_attention_heads']}/{config['num_key_value_heads']} "
        f"intermediate={config['intermediate_size']} dtype={config.get('torch_dtype')}"
    )
    mean = {
        name: statistics.mean(values.values())
        for name, values in (("source", source), ("pruned", pruned))
    }
    print(
        "  eval loss (mean over the 7 domains): "
        f"source {mean['source']:.3f}, exported pruned model {mean['pruned']:.3f}"
    )
    print("    " + "  ".join(f"{d} {pruned[d]:.3f}" for d in DOMAINS))
    print(f"  run folder: {run_dir}")
    print(f"total {time.perf_counter() - started:.0f} s")


def main(argv: list[str] | None = None) -> None:
    """Runs the one-GPU check, its CPU smoke test, or the multi-GPU job (``--gpus``)."""
    args = parse_args(argv)
    if args.gpus is not None:
        check_gpus(args.gpus)
        run_multi_gpu(args)
        return
    started = time.perf_counter()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    if args.smoke:
        device, backend = torch.device("cpu"), "gloo"
        args.batch, args.seq_len, args.steps, args.warmup = 2, 32, 3, 1
    else:
        check_gpus(1)
        device, backend = torch.device("cuda", 0), "nccl"
        torch.cuda.set_device(device)
    torch_dist.init_process_group(backend, rank=0, world_size=1)
    torch.manual_seed(0)

    if args.smoke:
        from tests.tiny_models import build_tiny_tokenizer, save_tiny_checkpoint, tiny_model

        root = Path(tempfile.mkdtemp(prefix="gpu_check_smoke_"))
        build_tiny_tokenizer(root / "tokenizer")
        model_dir = save_tiny_checkpoint(tiny_model("llama_gqa"), root / "tokenizer", root / "m")
        target = SMOKE_TARGET
    else:
        from composer_shear.weights.smollm2 import materialize_smollm2

        model_dir = Path(args.model) if args.model else materialize_smollm2(verbose=False)
        target = recipe_target()  # yamls/smollm2/prune.yaml's
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    source = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    vocab = source.config.vocab_size
    count = args.warmup + args.steps
    batches = text_batches(tokenizer, args.batch, args.seq_len, count, vocab)
    tokens = args.batch * args.seq_len

    plain_model = copy.deepcopy(source).train()
    pruned_model = copy.deepcopy(source).train()
    gates = attach_gates(pruned_model, target)
    kd_model = copy.deepcopy(source).train()
    kd_gates = attach_gates(kd_model, target)
    teacher_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    teacher = copy.deepcopy(source).to(device, teacher_dtype).eval().requires_grad_(False)
    plain = pruning_train_step(shard(plain_model, device))
    pruned_wrapped = shard(pruned_model, device)
    pruned = pruning_train_step(pruned_wrapped, gates)
    with_kd = pruning_train_step(shard(kd_model, device), kd_gates, teacher)

    # Alternate the three steps so that clock and thermal drift hit all of them alike.
    times: dict[str, list[float]] = {"plain": [], "pruned": [], "kd": []}
    for index, ids in enumerate(batches):
        for name, step in (("plain", plain), ("pruned", pruned), ("kd", with_kd)):
            elapsed = timed(step, [ids], device)[0]
            if index >= args.warmup:
                times[name].append(elapsed)
    median = {name: statistics.median(values) for name, values in times.items()}
    memory = {
        name: peak_memory(step, batches[0], device)
        for name, step in (("plain", plain), ("pruned", pruned))
    }

    # Export: gather the FSDP2 model to CPU, rebuild, slice, fold, write; vs save_pretrained.
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        weights = full_state_dict(pruned_wrapped)
        weights = {k[len(MODEL_PREFIX) :]: v for k, v in weights.items()}
        gated = gated_model_from_weights(source.config, weights, target)
        export_model(gated, Path(tmp) / "pruned", tokenizer)
        export_s = time.perf_counter() - start
        start = time.perf_counter()
        source.save_pretrained(Path(tmp) / "source", safe_serialization=True)
        save_s = time.perf_counter() - start

    print(f"model {model_dir}, {args.batch} x {args.seq_len} tokens, {args.steps} timed steps")
    print(machine_line())
    for name in ("plain", "pruned", "kd"):
        rate = tokens / median[name]
        print(f"  {name:7s} step {median[name] * 1e3:9.1f} ms  {rate:12,.0f} tok/s")
    print(f"pruning step vs plain: {median['pruned'] / median['plain']:.3f}x time")
    print(f"KD pruning step vs pruning step: {median['kd'] / median['pruned']:.3f}x time")
    if device.type == "cuda":
        ratio = memory["pruned"] / memory["plain"]
        print(
            f"peak CUDA memory: pruning {memory['pruned'] / 2**20:,.0f} MiB vs plain "
            f"{memory['plain'] / 2**20:,.0f} MiB: {ratio:.3f}x"
        )
    print(f"export {export_s:.2f} s vs save_pretrained {save_s:.2f} s: {export_s / save_s:.2f}x")
    print(f"total {time.perf_counter() - started:.0f} s")
    torch_dist.destroy_process_group()


if __name__ == "__main__":
    main()
