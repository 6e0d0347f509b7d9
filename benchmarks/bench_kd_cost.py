"""Cost of knowledge distillation while pruning SmolLM2-135M: step time and peak memory.

Two pruning set-ups on the same batches of real text, side by side: all gates of the SmolLM2
target with the LM loss + Lagrangian (baseline), and the same plus distillation from the frozen
source model (``knowledge_distillation``'s functional core: teacher forward, forward KL with
its hand-written gradient, loss combination). Step times alternate between the two in one
process, so machine noise hits both equally. Memory is measured for each set-up in its own
subprocess running the same steps: the resident set before the first step (weights, plus the
teacher) and its peak during the steps (sampled every 5 ms; optimizer state, activations,
logits). Prints both and the ratios.

    python benchmarks/bench_kd_cost.py [--steps 10] [--batch 4] [--seq-len 128]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
from common import machine_line, pruning_train_step, recipe_target, text_batches
from peak_rss import PeakRSS
from transformers import AutoModelForCausalLM, AutoTokenizer

from composer_shear.distillation.teacher import (
    build_teacher_skeleton,
    place_teacher,
    source_weights,
)
from composer_shear.pruning.masking import attach_gates
from composer_shear.weights.smollm2 import materialize_smollm2

SETUPS = ("pruning", "pruning+kd")


def make_step(model: torch.nn.Module, teacher: torch.nn.Module | None, alpha: float):
    """The pruning step of ``model``, gated here at the recipe's target (with KD if ``teacher``)."""
    model.train()
    return pruning_train_step(model, attach_gates(model, recipe_target()), teacher, alpha)


def build(setups: tuple[str, ...], alpha: float):
    model_dir = materialize_smollm2(verbose=False)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    steps, teacher = {}, None
    for name in setups:
        model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
        if name == "pruning+kd":
            # teacher: source, as the algorithm takes it (a frozen copy before gates attach).
            config, weights = source_weights(model, torch.float32)
            skeleton = build_teacher_skeleton(config, torch.float32)
            teacher = place_teacher(skeleton, weights, torch.device("cpu"), shard=False)
        steps[name] = make_step(model, teacher if name == "pruning+kd" else None, alpha)
    return tokenizer, steps, teacher


def memory_child(args) -> None:
    """Runs one set-up's steps and prints its resting and peak RSS (JSON) for the parent."""
    tokenizer, steps, _ = build((args.memory_child,), args.alpha)
    batches = text_batches(tokenizer, args.batch, args.seq_len, args.memory_steps)
    with PeakRSS() as rss:
        for ids in batches:
            steps[args.memory_child](ids)
    print(json.dumps({"rest": rss.rest, "peak": rss.peak}))


def measure_memory(args) -> dict[str, dict[str, int]]:
    memory = {}
    for name in SETUPS:
        cmd = [sys.executable, __file__, "--memory-child", name, "--batch", str(args.batch),
               "--seq-len", str(args.seq_len), "--alpha", str(args.alpha),
               "--memory-steps", str(args.memory_steps)]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise SystemExit(f"memory run of {name} failed:\n{out.stderr[-3000:]}")
        memory[name] = json.loads(out.stdout.strip().splitlines()[-1])
    return memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--memory-steps", type=int, default=3)
    parser.add_argument("--memory-child", choices=SETUPS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.memory_child:
        memory_child(args)
        return

    print("peak memory: one subprocess per set-up ...", flush=True)
    memory = measure_memory(args)
    print("step time: both set-ups alternating in this process ...", flush=True)
    tokenizer, steps, teacher = build(SETUPS, args.alpha)
    batches = text_batches(tokenizer, args.batch, args.seq_len, args.warmup + args.steps)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for index, ids in enumerate(batches):
        order = list(steps) if index % 2 == 0 else list(reversed(steps))
        for name in order:
            start = time.perf_counter()
            steps[name](ids)
            if index >= args.warmup:
                times[name].append(time.perf_counter() - start)

    base_s, kd_s = (statistics.median(times[name]) for name in SETUPS)
    teacher_mb = sum(p.numel() * p.element_size() for p in teacher.parameters()) / 2**20
    tokens = args.batch * args.seq_len
    print(machine_line())
    print(
        f"SmolLM2-135M pruning, {args.batch} x {args.seq_len} tokens, AdamW, clipping, "
        f"{args.steps} timed steps each, {torch.get_num_threads()} threads, CPU fp32; "
        f"KD alpha {args.alpha}, teacher fp32 ({teacher_mb:.0f} MiB of weights)"
    )
    print(f"  step  pruning      : {base_s * 1e3:8.1f} ms  ({tokens / base_s:6.0f} tokens/s)")
    print(f"  step  pruning + KD : {kd_s * 1e3:8.1f} ms  ({tokens / kd_s:6.0f} tokens/s)")
    mib = {name: {k: v / 2**20 for k, v in memory[name].items()} for name in SETUPS}
    for name, label in zip(SETUPS, ("pruning     ", "pruning + KD"), strict=True):
        print(
            f"  RSS   {label} : {mib[name]['rest']:6.0f} MiB before the first step, "
            f"{mib[name]['peak']:6.0f} MiB peak during {args.memory_steps} steps"
        )
    print(f"  ratio step time KD/plain: {kd_s / base_s:.3f}x")
    print(f"  ratio peak RSS KD/plain: {mib['pruning+kd']['peak'] / mib['pruning']['peak']:.3f}x")


if __name__ == "__main__":
    main()
