"""Export time and peak memory for SmolLM2-135M, next to a plain ``save_pretrained``.

Both write the same kind of directory (safetensors + config) from the same in-memory model,
alternating, in one process. Peak memory is the resident-set growth during each operation,
sampled every 5 ms. Goals: export <= 2x the time of save_pretrained; peak <= 2x model size.

    python benchmarks/bench_export.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import machine_line, recipe_target
from peak_rss import PeakRSS
from transformers import AutoModelForCausalLM

from composer_shear.export.checkpoint import export_model
from composer_shear.pruning.masking import attach_gates
from composer_shear.weights.smollm2 import materialize_smollm2


def measure(fn) -> tuple[float, int]:
    """(seconds, peak RSS growth in bytes) of ``fn()``."""
    with PeakRSS() as rss:
        start = time.perf_counter()
        fn()
        seconds = time.perf_counter() - start
    return seconds, rss.peak - rss.rest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model_dir = materialize_smollm2(verbose=False)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    gates = attach_gates(model, recipe_target())  # the demo recipe's target
    with torch.no_grad():  # non-trivial gate values, so folding really happens
        for gate in gates.gates.values():
            gate.log_alpha.normal_(1.0, 1.5, generator=torch.Generator().manual_seed(0))

    results: dict[str, list[tuple[float, int]]] = {"save_pretrained": [], "export": []}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        ops = {
            # The gates are a child module; save only the HF weights, as a user would.
            "save_pretrained": lambda: model.save_pretrained(
                out / "plain",
                state_dict={k: v for k, v in model.state_dict().items() if "shear_gates" not in k},
            ),
            "export": lambda: export_model(model, out / "export"),
        }
        for index in range(args.repeats):
            for name in list(ops) if index % 2 == 0 else list(reversed(ops)):
                shutil.rmtree(out / "plain", ignore_errors=True)
                shutil.rmtree(out / "export", ignore_errors=True)
                results[name].append(measure(ops[name]))

    mib = 2**20
    print(machine_line())
    print(
        f"SmolLM2-135M fp32 ({model_bytes / mib:.0f} MiB of parameters), "
        f"{args.repeats} repeats, median time / max peak RSS growth"
    )
    times = {}
    for name, rows in results.items():
        times[name] = statistics.median(t for t, _ in rows)
        peak = max(m for _, m in rows)
        print(
            f"  {name:16s}: {times[name]:6.2f} s   peak +{peak / mib:6.0f} MiB "
            f"({peak / model_bytes:.2f}x model size)"
        )
    print(
        f"  time ratio export/save_pretrained: {times['export'] / times['save_pretrained']:.2f}x"
        "  (goal <= 2x)"
    )


if __name__ == "__main__":
    main()
