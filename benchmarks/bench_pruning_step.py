"""Step time of SmolLM2-135M training with vs. without targeted pruning, side by side.

Both models take the same batches of real text, alternating step by step so that machine
noise hits both equally. Prints the median step times and their ratio (goal: <= 1.15x).

    python benchmarks/bench_pruning_step.py [--steps 12] [--batch 4] [--seq-len 128]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sysconfig
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from composer_shear.pruning.masking import attach_gates
from composer_shear.weights.smollm2 import materialize_smollm2

# The SmolLM2 target: every kind of gate is active.
TARGET = dict(
    num_hidden_layers=20,
    num_attention_heads=6,
    num_key_value_heads=2,
    intermediate_size=1024,
    hidden_size=384,
)


def text_batches(tokenizer, batch: int, seq_len: int, count: int) -> list[torch.Tensor]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = "\n".join((stdlib / n).read_text() for n in ("argparse.py", "typing.py", "ast.py"))
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    need = batch * seq_len
    return [ids[i * need : (i + 1) * need].view(batch, seq_len) for i in range(count)]


def make_step(model, gates=None):
    params = [p for n, p in model.named_parameters() if "shear_gates" not in n]
    optimizer = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95))
    if gates is not None:
        from composer_shear.pruning.algorithm import add_gate_param_groups

        optimizer.param_groups[0]["initial_lr"] = 1e-5
        add_gate_param_groups(optimizer, gates, gate_lr=1.0, lambda_lr=1.0)
        gates.start_step(seed=0, step=0, rank=0)

    def step(ids):
        loss = model(input_ids=ids, labels=ids).loss
        if gates is not None:
            loss = loss + gates.penalty
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if gates is not None:
            gates.clamp_()
        return float(loss)

    return step


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
    gates = attach_gates(pruned, TARGET)
    steps = {"plain": make_step(plain), "pruning": make_step(pruned, gates)}
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
