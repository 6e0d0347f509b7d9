"""Running LLM Foundry jobs as a user would: ``llmfoundry train`` in a subprocess.

The demo, the benchmarks and the tests launch real ``llmfoundry train`` processes through this
module, so there is one place that knows how (the console script beside this interpreter, an
offline environment, the full log kept, the progress lines echoed) and one error type for a
job that failed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "REPO",
    "LaunchError",
    "check_hf_dir",
    "list_override",
    "llmfoundry_train",
    "llmfoundry_train_command",
    "mapping_override",
    "subprocess_environment",
]

# The checkout the recipes (``yamls/``) and the sample corpus live in; jobs run from there so
# the recipes' relative paths resolve.
REPO = Path(__file__).resolve().parents[1]
# Console lines of `llmfoundry train` worth echoing (the full log goes to the log file).
_ECHO = re.compile(r"\[batch=\d+/\d+\]|loss/train/(lm|total)|Error|error:|Traceback")


class LaunchError(RuntimeError):
    """A launched job failed, or what it wrote does not load; the message says where to look."""


def llmfoundry_train_command(yaml: Path, overrides: list[str], processes: int = 1) -> list[str]:
    """The command line of ``llmfoundry train``; under ``composer -n processes`` when > 1."""
    bin_dir = Path(sys.executable).parent
    command = [str(bin_dir / "llmfoundry"), "train", str(yaml), *overrides]
    if processes > 1:
        # Composer's launcher runs the console script once per process (one per GPU).
        command = [str(bin_dir / "composer"), "-n", str(processes), *command]
    return command


def llmfoundry_train(
    yaml: Path, overrides: list[str], log_path: Path, cwd: Path = REPO, processes: int = 1
) -> None:
    """Runs ``llmfoundry train`` in a subprocess, echoing progress and keeping the full log.

    Args:
        yaml: The run's YAML.
        overrides: OmegaConf command-line overrides (``key=value``).
        log_path: Where the whole console output goes (created with its parents).
        cwd: Working directory of the job (the recipes' relative paths resolve from it).
        processes: Processes (GPUs) to launch with ``composer -n``; 1 runs it directly. The
            log then holds global rank 0's output (Composer's launcher shows a failed
            rank's output too).

    Raises:
        LaunchError: The job exited non-zero; the message carries the log's last lines.
    """
    command = llmfoundry_train_command(yaml, overrides, processes)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w", encoding="utf-8") as log:
        log.write(" ".join(command) + "\n")
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=cwd,
            env=subprocess_environment(),
        )
        assert process.stdout is not None
        for line in process.stdout:
            log.write(line)
            if _ECHO.search(line):
                print("    " + line.strip(), flush=True)
        code = process.wait()
    if code != 0:
        tail = log_path.read_text(encoding="utf-8").splitlines()[-40:]
        raise LaunchError(
            f"llmfoundry train {yaml.name} failed (exit {code}); last lines of {log_path}:\n"
            + "\n".join(tail)
        )


def subprocess_environment() -> dict[str, str]:
    """This process's environment, offline for the hub and quiet for tokenizers."""
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def list_override(name: str, values: list[float]) -> str:
    """An OmegaConf command-line override setting ``name`` to a list of floats."""
    return f"{name}=[{','.join(f'{value:.4f}' for value in values)}]"


def mapping_override(name: str, values: Mapping[str, float]) -> str:
    """An OmegaConf command-line override setting ``name`` to a ``{key: float}`` mapping.

    OmegaConf merges a mapping into an existing one key by key: keys of the recipe's mapping
    that ``values`` lacks stay, so give every key (``dynamic_batch_loading`` then names any
    extra or missing domain).
    """
    return f"{name}={{{', '.join(f'{key}: {value:.4f}' for key, value in values.items())}}}"


def check_hf_dir(path: Path) -> dict[str, Any]:
    """Loads an HF directory back with transformers (strictly) and returns its config."""
    # transformers costs seconds to import; only the callers that check a model pay for it.
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    problems = {key: value for key, value in info.items() if value}
    if problems:
        raise LaunchError(f"{path} does not load cleanly: {problems}")
    return model.config.to_dict()
