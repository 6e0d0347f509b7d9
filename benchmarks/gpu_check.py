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
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as torch_dist
from common import machine_line, pruning_train_step, recipe_target, text_batches
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from transformers import AutoModelForCausalLM, AutoTokenizer

from composer_shear.export.checkpoint import MODEL_PREFIX, export_model, gated_model_from_weights
from composer_shear.pruning.masking import attach_gates
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", help="HF directory (default: SmolLM2-135M)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU (no figures)")
    args = parser.parse_args()
    started = time.perf_counter()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    if args.smoke:
        device, backend = torch.device("cpu"), "gloo"
        args.batch, args.seq_len, args.steps, args.warmup = 2, 32, 3, 1
    else:
        if not torch.cuda.is_available():
            raise SystemExit("gpu_check needs a CUDA GPU (or --smoke on CPU).")
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
