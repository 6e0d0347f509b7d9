"""Metrics recording and run reports.

* :mod:`~composer_shear.report.metrics` -- :class:`JSONLMetricsLogger` (the ``jsonl_metrics``
  logger: every logged metric as one JSON line) and :func:`read_metrics` / :class:`MetricsLog`.
* :mod:`~composer_shear.report.models` -- shapes and sizes of model folders, sample generations.
* :mod:`~composer_shear.report.plots` -- the PNG plots.
* :mod:`~composer_shear.report.markdown` -- :func:`build_report`: a run folder ->
  ``RUN/report/report.md``.
* :mod:`~composer_shear.report.cli` -- ``composer-shear report RUN_DIR``.

Names are loaded on first use, so that the logger does not pull in matplotlib.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "DEFAULT_PROMPTS",
    "JSONLMetricsLogger",
    "MetricsLog",
    "ModelInfo",
    "build_report",
    "describe_model",
    "generate_samples",
    "read_metrics",
    "register_cli",
]

_HOMES = {
    "JSONLMetricsLogger": "metrics",
    "MetricsLog": "metrics",
    "read_metrics": "metrics",
    "DEFAULT_PROMPTS": "models",
    "ModelInfo": "models",
    "describe_model": "models",
    "generate_samples": "models",
    "build_report": "markdown",
    "register_cli": "cli",
}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        module = importlib.import_module(f"{__name__}.{_HOMES[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
