"""Step time of SmolLM2-135M training with vs. without targeted pruning, side by side.

Both models take the same batches of real text, alternating step by step so that machine
noise hits both equally. Prints the median step times and their ratio (goal: <= 1.15x).

    python benchmarks/bench_pruning_step.py [--steps 12] [--batch 4] [--seq-len 128]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from common import machine_line, pruning_train_step, recipe_target, text_batches
from transformers import AutoModelForCausalLM, AutoTokenizer

from composer_shear.pruning.masking import attach_gates
from composer_shear.weights.smollm2 import materialize_smollm2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args()
    torch.manual_seed(0)

    model_dir = materialize_smollm2(verbose=False)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    plain = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).train()
    pruned = copy.deepcopy(plain)
    # The demo recipe's target (yamls/smollm2/prune.yaml): every kind of gate is active.
    gates = attach_gates(pruned, recipe_target())
    steps = {"plain": pruning_train_step(plain), "pruning": pruning_train_step(pruned, gates)}
    batches = text_batches(tokenizer, args.batch, args.seq_len, args.warmup + args.steps)

    times: dict[str, list[float]] = {name: [] for name in steps}
    for index, ids in enumerate(batches):
        order = list(steps) if index % 2 == 0 else list(reversed(steps))
        for name in order:
            start = time.perf_counter()
            steps[name](ids)
            if index >= args.warmup:
                times[name].append(time.perf_counter() - start)

    plain_s, prune_s = (statistics.median(times[name]) for name in ("plain", "pruning"))
    tokens = args.batch * args.seq_len
    print(machine_line())
    print(
        f"SmolLM2-135M, {args.batch} x {args.seq_len} tokens, {args.steps} steps each, "
        f"{torch.get_num_threads()} threads, {next(plain.parameters()).device}"
    )
    print(f"  gates: {', '.join(f'{n}{tuple(g.shape)}' for n, g in gates.gates.items())}")
    print(f"  plain step   : {plain_s * 1e3:8.1f} ms  ({tokens / plain_s:8.0f} tokens/s)")
    print(f"  pruning step : {prune_s * 1e3:8.1f} ms  ({tokens / prune_s:8.0f} tokens/s)")
    print(f"  ratio pruning/plain: {prune_s / plain_s:.3f}x  (goal <= 1.15x)")


if __name__ == "__main__":
    main()
