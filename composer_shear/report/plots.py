"""The report's PNG plots (matplotlib ``Figure`` objects, no pyplot state)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from composer_shear.report.labels import (
    DIM_LABELS,
    LOSS_COLUMNS,
    LOSS_LABELS,
    PRUNING_DIMS,
    STEP_LABEL,
)
from composer_shear.report.metrics import MetricsLog

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def domain_loss(losses: Mapping[str, Any], column: str, domain: str) -> float | None:
    """One domain's loss in one column of a run's loss table (None: missing or not a number)."""
    table = losses.get(column)
    if not isinstance(table, Mapping):
        return None
    value = table.get(domain)
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def _new_figure(nrows: int, ncols: int, width: float, height: float) -> tuple[Figure, Any]:
    # Figure without pyplot: no global backend switch, safe inside other programs.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, format="png")
    return path


def _domain_colors(domains: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"] if len(domains) <= 10 else colormaps["tab20"]
    return {d: cmap(i % cmap.N) for i, d in enumerate(domains)}


def _style(ax: Any, title: str, xlabel: str, ylabel: str) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_title(title)
    if xlabel.startswith(STEP_LABEL):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole batches
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)


def plot_domain_weights(
    phases: Mapping[str, MetricsLog], domains: Sequence[str], out: Path
) -> Path | None:
    """Dynamic batch loading weights over steps, one panel per phase, one line per domain."""
    prefix = "dynamic_batch_loading/weight/"
    panels = [(title, m) for title, m in phases.items() if m is not None and m.suffixes(prefix)]
    if not panels:
        return None
    all_domains = list(domains) + [
        d for _, m in panels for d in m.suffixes(prefix) if d not in domains
    ]
    colors = _domain_colors(all_domains)
    fig, axes = _new_figure(1, len(panels), 6.0 * len(panels), 4.2)
    for ax, (title, metrics) in zip(axes[0], panels, strict=True):
        for domain in all_domains:
            steps, values = metrics.get(prefix + domain)
            if steps:
                ax.plot(steps, values, marker="o", ms=3, color=colors[domain], label=domain)
        _style(ax, f"Domain weights: {title}", STEP_LABEL, "sampling weight (fraction of batch)")
        ax.set_ylim(bottom=0)
    axes[0][-1].legend(title="domain", loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(fig, out)


def logged_dims(metrics: MetricsLog, suffix: str) -> list[str]:
    """The pruned dimensions with a ``pruning/<dim>/<suffix>`` series, in the usual order."""
    found = [d for d in PRUNING_DIMS if metrics.has(f"pruning/{d}/{suffix}")]
    # Any dimension a newer version adds still gets a panel.
    extra = sorted(
        {
            name.split("/")[1]
            for name in metrics.series
            if name.startswith("pruning/") and name.endswith("/" + suffix)
        }
        - set(found)
    )
    return found + extra


def _grid(n: int) -> tuple[int, int]:
    ncols = min(n, 3)
    return math.ceil(n / ncols), ncols


def plot_sparsity(metrics: MetricsLog, out: Path) -> Path | None:
    """Expected vs target sparsity per pruned dimension, plus expected vs target model size."""
    dims = logged_dims(metrics, "expected_sparsity")
    size = metrics.has("pruning/expected_num_params")
    n = len(dims) + int(size)
    if n == 0:
        return None
    nrows, ncols = _grid(n)
    fig, axes = _new_figure(nrows, ncols, 4.6 * ncols, 3.4 * nrows)
    flat = list(axes.flat)
    for ax, dim in zip(flat, dims, strict=False):
        steps, expected = metrics.get(f"pruning/{dim}/expected_sparsity")
        ax.plot(steps, expected, color="tab:blue", label="expected (gates)")
        t_steps, target = metrics.get(f"pruning/{dim}/target_sparsity")
        ax.plot(t_steps, target, color="tab:red", ls="--", label="target (warmup)")
        _style(ax, f"Sparsity: {DIM_LABELS.get(dim, dim)}", STEP_LABEL, "fraction pruned")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(loc="best", fontsize="small")
    if size:
        ax = flat[len(dims)]
        steps, expected = metrics.get("pruning/expected_num_params")
        t_steps, target = metrics.get("pruning/target_num_params")
        finite = [abs(v) for v in expected + target if math.isfinite(v)]
        scale, unit = (1e6, "millions") if max(finite, default=0) >= 1e6 else (1e3, "thousands")
        ax.plot(steps, [v / scale for v in expected], color="tab:blue", label="expected")
        if t_steps:
            ax.plot(t_steps, [v / scale for v in target], color="tab:red", ls="--", label="target")
        _style(ax, "Model size", STEP_LABEL, f"parameters ({unit})")
        ax.legend(loc="best", fontsize="small")
    for ax in flat[n:]:
        ax.set_visible(False)
    fig.suptitle("Targeted pruning: expected vs target sparsity")
    return _save(fig, out)


def plot_lambdas(metrics: MetricsLog, out: Path) -> Path | None:
    """Lagrange multipliers λ1 and λ2 per pruned dimension."""
    dims = sorted(
        set(logged_dims(metrics, "lambda_1")) | set(logged_dims(metrics, "lambda_2")),
        key=lambda d: PRUNING_DIMS.index(d) if d in PRUNING_DIMS else len(PRUNING_DIMS),
    )
    if not dims:
        return None
    nrows, ncols = _grid(len(dims))
    fig, axes = _new_figure(nrows, ncols, 4.6 * ncols, 3.4 * nrows)
    flat = list(axes.flat)
    for ax, dim in zip(flat, dims, strict=False):
        for key, label, color in (
            ("lambda_1", "λ1", "tab:purple"),
            ("lambda_2", "λ2", "tab:green"),
        ):
            steps, values = metrics.get(f"pruning/{dim}/{key}")
            if steps:
                ax.plot(steps, values, color=color, label=label)
        ax.axhline(0.0, color="grey", lw=0.8)
        _style(ax, f"Multipliers: {DIM_LABELS.get(dim, dim)}", STEP_LABEL, "value")
        ax.legend(loc="best", fontsize="small")
    for ax in flat[len(dims) :]:
        ax.set_visible(False)
    fig.suptitle("Lagrange multipliers (penalty λ1·(s-t) + λ2·(s-t)²)")
    return _save(fig, out)


def _smooth(values: Sequence[float], window: int) -> list[float]:
    """Trailing moving average (NaN-free prefix averages at the start)."""
    out, acc, buf = [], 0.0, []
    for v in values:
        buf.append(v)
        acc += v
        if len(buf) > window:
            acc -= buf.pop(0)
        out.append(acc / len(buf))
    return out


def plot_train_loss(prune: MetricsLog | None, cpt: MetricsLog | None, out: Path) -> Path | None:
    """LM loss over training: pruning then continued pre-training on one step axis."""
    curves = []
    boundary = None
    for phase, metrics, color in (
        ("pruning (LM loss)", prune, "tab:blue"),
        ("continued pre-training", cpt, "tab:orange"),
    ):
        if metrics is None:
            continue
        name = "loss/train/lm" if metrics.has("loss/train/lm") else "loss/train/total"
        steps, values = metrics.get(name)
        if not steps:
            continue
        if curves:
            # CPT restarts at step 0: place it right after the last pruning step.
            last = curves[-1][1][-1]
            shift = last + 1 - steps[0]
            steps = [s + shift for s in steps]
            boundary = last + 0.5
        curves.append((phase, steps, values, color))
    if not curves:
        return None
    fig, axes = _new_figure(1, 1, 9.0, 4.2)
    ax = axes[0][0]
    for label, steps, values, color in curves:
        finite = [(s, v) for s, v in zip(steps, values, strict=True) if math.isfinite(v)]
        if not finite:
            continue
        xs, ys = zip(*finite, strict=True)
        window = max(1, len(ys) // 25)
        if window > 1:
            ax.plot(xs, ys, color=color, alpha=0.25, lw=0.8)
            ax.plot(xs, _smooth(ys, window), color=color, label=f"{label}, {window}-step mean")
        else:
            ax.plot(xs, ys, color=color, label=label)
    if boundary is not None:
        ax.axvline(boundary, color="grey", ls=":", label="pruned model exported")
    xlabel = STEP_LABEL + (", CPT numbered on from pruning" if boundary is not None else "")
    _style(ax, "Training loss", xlabel, "cross-entropy (nats/token)")
    ax.legend(loc="upper right")
    return _save(fig, out)


def plot_eval_losses(losses: Mapping[str, Any], domains: Sequence[str], out: Path) -> Path | None:
    """Grouped bars of per-domain eval loss for each model and the reference."""
    columns = [c for c in LOSS_COLUMNS if isinstance(losses.get(c), Mapping) and losses[c]]
    if not columns or not domains:
        return None
    import numpy as np

    colors = {
        "source": "tab:grey",
        "pruned": "tab:red",
        "cpt": "tab:blue",
        "reference": "tab:green",
    }
    fig, axes = _new_figure(1, 1, max(8.0, 1.3 * len(domains) + 2), 4.6)
    ax = axes[0][0]
    x = np.arange(len(domains))
    width = 0.8 / len(columns)
    for i, column in enumerate(columns):
        values = [domain_loss(losses, column, d) for d in domains]
        ax.bar(
            x + (i - (len(columns) - 1) / 2) * width,
            [math.nan if v is None else v for v in values],
            width,
            label=LOSS_LABELS[column],
            color=colors[column],
            alpha=0.5 if column == "reference" else 0.9,
            hatch="//" if column == "reference" else None,
            edgecolor="black" if column == "reference" else None,
            linewidth=0.5,
        )
    ax.set_xticks(x, domains)
    _style(ax, "Per-domain eval loss (lower is better)", "domain", "cross-entropy (nats/token)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.grid(False, axis="x")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, out)
