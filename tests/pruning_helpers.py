"""Helpers for tests that run real LLM Foundry pruning jobs on tiny models."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from composer_shear.pruning.masking import ShearGates, find_gates
from tests.mds_helpers import write_domain_shards
from tests.tiny_models import save_tiny_checkpoint, tiny_model

REPO = Path(__file__).resolve().parents[1]
PRUNE_YAML = REPO / "yamls" / "tests" / "prune_tiny.yaml"
VENV_BIN = Path(sys.executable).parent

# Per family, a target that exercises every kind of gate the family allows.
FAMILY_TARGETS = {
    "llama_gqa": dict(
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        intermediate_size=48,
        hidden_size=48,
    ),
    "llama_mha": dict(
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=48,
        hidden_size=48,
    ),
    "mistral": dict(
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        hidden_size=32,
    ),
    "qwen2": dict(
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=48,
        hidden_size=48,
    ),
    "qwen3": dict(
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=48,
        hidden_size=48,
    ),
    # Gemma 3 keeps its layers (local/global attention follows the layer index).
    "gemma3": dict(
        num_hidden_layers=4,
        num_attention_heads=1,
        num_key_value_heads=1,
        intermediate_size=48,
        hidden_size=48,
    ),
}


def make_tiny_run_inputs(root: Path, tokenizer_dir: Path, family: str, tied: bool = False):
    """Writes a tiny HF checkpoint and per-domain MDS shards under ``root``."""
    model_dir = root / f"model_{family}"
    if not model_dir.exists():
        save_tiny_checkpoint(tiny_model(family, tie_word_embeddings=tied), tokenizer_dir, model_dir)
    data_dir = root / "data"
    if not data_dir.exists():
        write_domain_shards(data_dir, tokenizer_dir, max_seq_len=32)
    return model_dir, data_dir


def target_overrides(target: dict) -> list[str]:
    """Dotlist overrides replacing the YAML's target shape."""
    keys = (
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "intermediate_size",
        "hidden_size",
    )
    return [f"algorithms.targeted_pruning.target_shape.{key}={target[key]}" for key in keys]


def run_prune(model_dir: Path, data_dir: Path, *overrides: str):
    """Runs ``yamls/tests/prune_tiny.yaml`` in-process; returns the Composer trainer."""
    from llmfoundry.command_utils import train_from_yaml

    args = [f"variables.model_dir={model_dir}", f"variables.data_dir={data_dir}", *overrides]
    return train_from_yaml(str(PRUNE_YAML), args)


def gates_of(trainer) -> ShearGates:
    gates = find_gates(trainer.state.model)
    assert gates is not None
    return gates


def gate_state(gates: ShearGates) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in gates.state_dict().items()}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def composer_launch(
    nproc: int,
    script: Path,
    *args: str,
    timeout: int = 600,
    env: dict[str, str] | None = None,
    launcher_args: Sequence[str] = (),
):
    """Runs ``composer -n nproc script args`` on CPU and returns the completed process.

    ``env`` adds variables to the processes' environment; ``launcher_args`` go to ``composer``
    itself (e.g. ``--stdout DIR/rank{rank}.txt`` keeps every rank's output).
    """
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [
        str(VENV_BIN / "composer"),
        "-n",
        str(nproc),
        "--master_port",
        str(free_port()),
        *launcher_args,
        str(script),
        *args,
    ]
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
