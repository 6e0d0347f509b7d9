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
import sysconfig
import time
from pathlib import Path

import torch
from peak_rss import PeakRSS
from transformers import AutoModelForCausalLM, AutoTokenizer

from composer_shear.distillation.algorithm import (
    add_distillation_loss,
    forward_kl,
    predicted_positions,
)
from composer_shear.distillation.teacher import (
    build_teacher_skeleton,
    place_teacher,
    source_weights,
    teacher_forward,
)
from composer_shear.pruning.algorithm import add_gate_param_groups
from composer_shear.pruning.masking import attach_gates
from composer_shear.weights.smollm2 import materialize_smollm2

# The demo's SmolLM2 target (yamls/smollm2/prune.yaml): every kind of gate is active.
TARGET = dict(
    num_hidden_layers=24,
    hidden_size=512,
    num_attention_heads=6,
    num_key_value_heads=2,
    intermediate_size=1152,
)
SETUPS = ("pruning", "pruning+kd")


def text_batches(tokenizer, batch: int, seq_len: int, count: int) -> list[torch.Tensor]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = "\n".join((stdlib / n).read_text() for n in ("argparse.py", "typing.py", "ast.py"))
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    need = batch * seq_len
    if len(ids) < need * count:
        raise SystemExit(f"not enough text for {count} batches of {batch} x {seq_len}")
    return [ids[i * need : (i + 1) * need].view(batch, seq_len) for i in range(count)]


def make_step(model, teacher=None, alpha: float = 0.5):
    """A pruning training step of ``model``, gated here (with KD if ``teacher``)."""
    model.train()
    gates = attach_gates(model, TARGET)
    params = [p for n, p in model.named_parameters() if "shear_gates" not in n]
    optimizer = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95))
    optimizer.param_groups[0]["initial_lr"] = 1e-5
    add_gate_param_groups(optimizer, gates, gate_lr=1.0, lambda_lr=1.0)
    counter = [0]

    def step(ids):
        gates.start_step(seed=0, step=counter[0], rank=0)
        counter[0] += 1
        out = model(input_ids=ids, labels=ids)
        loss = {"lm": out.loss, "lagrangian": gates.penalty, "total": out.loss + gates.penalty}
        if teacher is not None:
            batch = {"input_ids": ids, "labels": ids}
            kd = forward_kl(
                out.logits,
                teacher_forward(teacher, batch),
                predicted_positions(batch, ids.shape[1]),
            )
            loss = add_distillation_loss(loss, kd, alpha)
        loss["total"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        gates.clamp_()
        return float(loss["total"])

    return step


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
