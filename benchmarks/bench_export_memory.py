"""Peak host memory of exporting a pruning checkpoint that carries AdamW state.

Writes a Composer-style ``targeted_pruning`` checkpoint of a random Llama (default ~1.1B
parameters, TinyLlama's shape; AdamW's two moments per parameter, so the file is ~3x the
weights), then exports it twice, each in a fresh process:

- ``streamed``: what ``composer-shear export`` does:
  :func:`~composer_shear.export.checkpoint.load_composer_checkpoint` (memory-mapped,
  ``weights_only``; optimizer state never read), a ``meta`` skeleton with the gates, and the
  export cutting one tensor at a time from the mapped file into the safetensors shards;
- ``full load``: the earlier path, ``torch.load(..., weights_only=False)`` without ``mmap``
  (every tensor, optimizer state included, read into memory), the gated model loaded, then
  the same export from the live model (``--skip-full-load`` leaves it out: it needs RAM for
  the whole checkpoint).

Each child reports its resident set after imports (the interpreter) and its peak
(``ru_maxrss``). The table sets both next to the exported model's bytes; the goal is
``peak - interpreter <= 1.3 x exported bytes``.

    python benchmarks/bench_export_memory.py [--size 1b|small] [--keep DIR] [--skip-full-load]

It writes ~13 GB to a temp folder at ``--size 1b`` and needs that much free disk; the
``full load`` child needs as much RAM. ``--size small`` (~0.2B) runs the same in a minute.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

SIZES = {
    # TinyLlama-1.1B's shape -> a ~0.5B target.
    "1b": (
        dict(
            hidden_size=2048,
            num_hidden_layers=22,
            num_attention_heads=32,
            num_key_value_heads=4,
            intermediate_size=5632,
            vocab_size=32000,
        ),
        dict(
            hidden_size=1536,
            num_hidden_layers=16,
            num_attention_heads=24,
            num_key_value_heads=4,
            intermediate_size=4096,
        ),
    ),
    "small": (
        dict(
            hidden_size=1024,
            num_hidden_layers=12,
            num_attention_heads=16,
            num_key_value_heads=4,
            intermediate_size=2816,
            vocab_size=32000,
        ),
        dict(
            hidden_size=768,
            num_hidden_layers=8,
            num_attention_heads=12,
            num_key_value_heads=4,
            intermediate_size=2048,
        ),
    ),
}


def rss_bytes() -> int:
    """Current resident set of this process."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def make_checkpoint(size: str, path: Path) -> None:
    """Writes the random gated model + AdamW state as a Composer-style checkpoint."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from composer_shear.pruning.masking import attach_gates

    source, target = SIZES[size]
    config = LlamaConfig(**source, torch_dtype="float32", tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu")
    with torch.no_grad():  # random weights: memory use, not quality (and finite: export checks)
        for param in model.parameters():
            param.uniform_(-0.02, 0.02)
    attach_gates(model, target)
    weights = {f"model.{k}": v for k, v in model.state_dict().items()}
    # AdamW's moments, one pair per parameter, as Composer's optimizer state holds them.
    moments = {
        name: {"exp_avg": torch.empty_like(p), "exp_avg_sq": torch.empty_like(p), "step": 1.0}
        for name, p in model.named_parameters()
    }
    checkpoint = {
        "state": {
            "model": weights,
            "optimizers": {"DecoupledAdamW": {"state": moments, "param_groups": []}},
            "algorithms": [("TargetedPruning", {"target_shape": target, "seed": 0})],
            "integrations": {
                "huggingface": {
                    "model": {"config": {"content": config.to_dict(), "class": "LlamaConfig"}}
                }
            },
        },
        "rng": [],
    }
    torch.save(checkpoint, path)


def export_child(mode: str, checkpoint: Path, out: Path) -> dict:
    """Exports ``checkpoint`` in this (fresh) process; returns the memory figures."""
    import torch

    from composer_shear.export.checkpoint import (
        checkpoint_tensors,
        export_model,
        gated_model_from_checkpoint,
        load_composer_checkpoint,
    )

    interpreter = rss_bytes()
    if mode == "streamed":
        loaded = load_composer_checkpoint(checkpoint)
        model = gated_model_from_checkpoint(loaded, load=False)
        weights = checkpoint_tensors(loaded)
    else:  # the earlier path: everything read into memory, any pickle allowed
        loaded = torch.load(checkpoint, map_location="cpu", weights_only=False)
        loaded["_path"] = str(checkpoint)
        model, weights = gated_model_from_checkpoint(loaded), None
    del loaded
    summary = export_model(model, out, tokenizer=None, weights=weights)
    exported = sum(p.stat().st_size for p in Path(out).glob("*.safetensors"))
    return {
        "mode": mode,
        "interpreter": interpreter,
        "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "exported_bytes": exported,
        "params": summary.target.num_params(),
        "shards": len(list(Path(out).glob("*.safetensors"))),
    }


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=SIZES, default="1b", help="source model size")
    parser.add_argument("--keep", help="work folder to use and keep (default: a temp folder)")
    parser.add_argument(
        "--skip-full-load",
        action="store_true",
        help="measure the streamed export only (the full load needs RAM for the checkpoint)",
    )
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--make", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make:
        make_checkpoint(args.make[0], Path(args.make[1]))
        return
    if args.child:
        mode, checkpoint, out = args.child
        print(json.dumps(export_child(mode, Path(checkpoint), Path(out))))
        return
    work = Path(args.keep or tempfile.mkdtemp(prefix="bench_export_memory_"))
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = work / "ckpt.pt"
    if not checkpoint.exists():
        print(f"writing the {args.size} checkpoint with AdamW state to {checkpoint}", flush=True)
        # In its own process, so that none of its memory counts against the exports.
        subprocess.run([sys.executable, __file__, "--make", args.size, str(checkpoint)], check=True)
    size = checkpoint.stat().st_size
    rows = []
    for mode in ("streamed",) if args.skip_full_load else ("streamed", "full load"):
        out = work / f"export_{mode.replace(' ', '_')}"
        print(f"exporting ({mode})", flush=True)
        proc = subprocess.run(
            [sys.executable, __file__, "--child", mode, str(checkpoint), str(out)],
            check=True,
            capture_output=True,
            text=True,
        )
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"\ncheckpoint: {gib(size)} GiB ({args.size}, weights + gates + AdamW moments)")
    header = f"{'path':<11}{'interp GiB':>11}{'peak GiB':>10}{'peak-interp':>12}"
    header += f"{'exported GiB':>14}{'ratio':>7}{'shards':>8}"
    print(header)
    for row in rows:
        work_set = row["peak"] - row["interpreter"]
        print(
            f"{row['mode']:<11}{gib(row['interpreter']):>11}{gib(row['peak']):>10}"
            f"{gib(work_set):>12}{gib(row['exported_bytes']):>14}"
            f"{work_set / row['exported_bytes']:>7.2f}{row['shards']:>8}"
        )
    print("goal: ratio (peak - interpreter) / exported bytes <= 1.3")


if __name__ == "__main__":
    main()
