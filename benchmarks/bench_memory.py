"""Peak memory of a pruning job vs plain LLM Foundry training of the same model and batches.

Runs ``yamls/smollm2/prune.yaml`` (the demo's pruning recipe: SmolLM2-135M, 8 x 128 tokens,
7-domain dynamic batch loading) as real ``llmfoundry train`` jobs, each in its own process, for
the same number of steps and evaluations, and prints each job's peak resident set size (the
child's ``ru_maxrss``) and the ratios against plain training:

* ``plain``: the recipe without ``targeted_pruning`` and ``pruned_hf_export`` (the same model,
  data, loaders, evaluations, optimizer and domain reweighting);
* ``pruning, uniform init``: with the gates, no importance calibration;
* ``pruning (the recipe)``: with the gates and ``init: activation`` (calibration forwards).

The goal is a ratio of at most 1.15: gates and multipliers are O(units).

It also prints, measured in this process, the activation memory autograd saves for the
backward pass of one training forward of the same batch (distinct storages, counted by a
``saved_tensors_hooks`` pack hook) with and without the gates: unlike RSS it does not depend on
the allocator, and it is what grows with the batch on a GPU.

    python benchmarks/bench_memory.py [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from bench_quality import SETTINGS, load_settings, prepare
from common import REPO, machine_line, machine_record
from common import SMOLLM2_PRUNE_YAML as PRUNE_YAML
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

from composer_shear.launch import mapping_override
from composer_shear.pruning.masking import attach_gates

CHILD = """
import resource, subprocess, sys
code = subprocess.run(sys.argv[1:]).returncode
print("MAXRSS_KB", resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "RC", code)
"""


def job_yaml(out: Path, setup: str) -> Path:
    """The recipe for one set-up, written to ``out``."""
    cfg = OmegaConf.load(PRUNE_YAML)
    if setup == "plain":
        del cfg.algorithms["targeted_pruning"]
        del cfg.callbacks["pruned_hf_export"]
    elif setup == "uniform":
        cfg.algorithms.targeted_pruning.init = "uniform"
    path = out / f"{setup}.yaml"
    OmegaConf.save(cfg, path)
    return path


def peak_rss_mib(yaml_path: Path, overrides: list[str], log_path: Path) -> float:
    """Runs ``llmfoundry train`` in a child process; returns its peak RSS in MiB."""
    llmfoundry = Path(sys.executable).parent / "llmfoundry"
    cmd = [sys.executable, "-c", CHILD, str(llmfoundry), "train", str(yaml_path), *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    log_path.write_text(proc.stdout + proc.stderr)
    last = [line for line in proc.stdout.splitlines() if line.startswith("MAXRSS_KB")]
    if not last or not last[-1].endswith("RC 0"):
        raise SystemExit(f"{yaml_path.name} failed; see {log_path}")
    return int(last[-1].split()[1]) / 1024


def saved_for_backward_mib(
    model_dir: Path, target: dict | None, batch: int, seq_len: int, vocab: int
) -> float:
    """MiB of distinct storages autograd saves in one training forward + backward."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).train()
    if target is not None:
        attach_gates(model, target)
    ids = torch.randint(0, vocab, (batch, seq_len))
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=ids, labels=ids).loss.backward()
    return sum(storages.values()) / 2**20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", default=str(REPO / "runs" / "bench_memory"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_settings(SETTINGS)
    print(machine_line(), flush=True)
    source, data, reference = prepare(out, cfg)
    vocab = AutoModelForCausalLM.from_pretrained(source).config.vocab_size
    saved = {
        label: saved_for_backward_mib(
            Path(source), target, cfg["global_batch_size"], cfg["max_seq_len"], vocab
        )
        for label, target in (("plain", None), ("gated", cfg["target_shape"]))
    }
    print(
        f"saved for backward, one {cfg['global_batch_size']} x {cfg['max_seq_len']} batch: "
        f"plain {saved['plain']:.0f} MiB, with the gates {saved['gated']:.0f} MiB "
        f"({saved['gated'] / saved['plain']:.3f}x)",
        flush=True,
    )
    target_loss = mapping_override(
        "variables.target_loss", {d: reference[d] for d in cfg["domains"]}
    )
    results: dict[str, float] = {}
    for setup, label in (
        ("plain", "plain training"),
        ("uniform", "pruning, uniform init"),
        ("recipe", "pruning (the recipe)"),
    ):
        with tempfile.TemporaryDirectory() as tmp:
            overrides = [
                f"variables.model_dir={source}",
                f"variables.data_dir={data}",
                f"variables.run_dir={tmp}",
                f"variables.steps={args.steps}",
                f"variables.update_interval={args.steps}ba",  # one evaluation, at the end
                target_loss,
            ]
            results[label] = peak_rss_mib(
                job_yaml(Path(tmp), setup), overrides, out / f"{setup}.log"
            )
        print(f"{label:>24}: peak RSS {results[label]:8.0f} MiB", flush=True)
    base = results["plain training"]
    for label, value in results.items():
        print(f"{label:>24}: {value / base:.3f}x plain")
    (out / "results.json").write_text(
        json.dumps(
            {
                "peak_rss_mib": results,
                "saved_for_backward_mib": saved,
                "steps": args.steps,
                "machine": machine_record(),
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
