"""Tables and plots of the quality benchmark, from its results folder only.

``benchmarks/bench_quality.py`` runs the cells and writes one JSON record per cell under
``benchmarks/results/quality/<steps>steps/`` (and ``<steps>steps/prune_only/``); this module
reads those records (and ``benchmarks/quality.yaml`` for the methods' labels and order) and
writes, without running anything:

* ``<steps>steps/table.md`` and ``quality.png``: one budget's per-domain table and its eval
  curves against tokens and compute;
* ``<steps>steps/prune_only/table.md``: the ``--prune-only`` cells (the cut before CPT);
* ``curve.md`` and ``curve.png``: every budget side by side, each cell at equal tokens and
  with its compute.

Compute is counted, not timed (wall times on shared cores are not comparable): per token, in
multiples of ``N`` (the parameters a token's matmuls pass through; the embedding lookup not
counted, the lm_head counted), a training step costs ``6 N`` (forward, activations' gradients,
weights' gradients), a mask-only step on frozen weights ``4 N`` (no weight-gradient GEMMs), a
forward-only token (calibration, a distillation teacher) ``2 N``. Pruning and calibration run
the *source* model (every gate multiplies a full-size tensor), CPT the target. Each record
carries its own multiples (``flops_per_token``); older records, written before it existed,
get those of the routes they ran.

Usage::

    python benchmarks/quality_tables.py                 # every budget, prune-only and curve
    python benchmarks/quality_tables.py --curve         # only curve.md and curve.png
    python benchmarks/quality_tables.py --steps 512     # only that budget's tables and plot
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib
import yaml

matplotlib.use("Agg")  # files only, on machines without a display
import matplotlib.pyplot as plt

REPO = Path(__file__).resolve().parents[1]
SETTINGS = Path(__file__).with_name("quality.yaml")
RESULTS_ROOT = REPO / "benchmarks" / "results" / "quality"
PRUNED_DIMS = ("layers", "heads", "kv_heads", "intermediate", "hidden")


def log(message: str) -> None:
    print(message, flush=True)


def read_settings(path: Path = SETTINGS) -> dict[str, Any]:
    """The benchmark's settings (``quality.yaml``) as written."""
    return yaml.safe_load(Path(path).read_text())


def flops_per_token(record: Mapping[str, Any]) -> dict[str, float]:
    """A record's compute per token, in multiples of N (see the module docstring).

    Keys: ``prune`` (per pruning token, source model), ``calibration`` (per calibration
    token, source), ``cpt`` (per CPT token, target) and ``cpt_teacher`` (per CPT token, the
    source as distillation teacher). Records from before the key existed ran a weight-training
    pruning stage and activation calibration; ``kd`` added a teacher forward to both stages.
    """
    if record.get("flops_per_token"):
        return dict(record["flops_per_token"])
    teacher = 2.0 if record.get("kd") else 0.0
    return {"prune": 6.0 + teacher, "calibration": 2.0, "cpt": 6.0, "cpt_teacher": teacher}


def point_flops(record: Mapping[str, Any], tokens: float) -> float:
    """Training FLOPs spent by a method once it has seen ``tokens`` (pruning first, then CPT)."""
    n_source, n_target = record["flop_params"]["source"], record["flop_params"]["target"]
    per_token = flops_per_token(record)
    prune = min(tokens, record["tokens"]["prune"])
    cpt = max(0.0, tokens - record["tokens"]["prune"])
    return (
        per_token["prune"] * n_source * prune
        + per_token["calibration"] * n_source * record["calibration_tokens"]
        + per_token["cpt"] * n_target * cpt
        + per_token["cpt_teacher"] * n_source * cpt
    )


def loss_at_flops(record: Mapping[str, Any], flops: float) -> float | None:
    """A record's mean eval loss at ``flops`` training FLOPs, or None if its curve stops short.

    Linear between the curve's evaluations.
    """
    if not record.get("flop_params") or not record.get("curve"):
        return None
    points = [(point_flops(record, tokens), loss) for tokens, loss in record["curve"]]
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x0 <= flops <= x1:
            return y0 + (y1 - y0) * (flops - x0) / (x1 - x0) if x1 > x0 else y1
    return None


def equal_compute(results: Mapping[str, list[dict[str, Any]]]) -> float | None:
    """The compute a budget's cells are compared at.

    The one-shot route's (the cheapest real route), else the smallest any cell spent.
    """
    pool = results.get("oneshot") or [r for records in results.values() for r in records]
    flops = [r["train_flops"] for r in pool if r.get("train_flops")]
    return min(flops) if flops else None


def stat(values: list[float]) -> str:
    """``mean`` of one value, ``mean ± population spread`` of several."""
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.pstdev(values):.3f}"


def downstream_cell(means: list[list[float]]) -> str:
    """``acc ± stderr (n items)`` of the first seed's mean accuracy, or ``-``."""
    if not means:
        return "-"
    accuracy, stderr, n = means[0]
    return f"{accuracy:.3f} ± {stderr:.3f} ({int(n)})"


def method_label(cfg: Mapping[str, Any], name: str, record: Mapping[str, Any] | None = None) -> str:
    """The settings' current label of a method (relabelling needs no rerun), else the record's."""
    spec = cfg["methods"].get(name) or {}
    return spec.get("label") or (record or {}).get("label") or name


def read_records(folder: Path) -> dict[str, list[dict[str, Any]]]:
    """Method -> its records (one per seed) of the ``<method>-s<seed>.json`` files in ``folder``."""
    results: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(folder.glob("*-s*.json")):
        record = json.loads(path.read_text())
        results.setdefault(record["method"], []).append(record)
    return results


def method_order(cfg: Mapping[str, Any], names: list[str] | dict[str, Any]) -> list[str]:
    """``names`` in the settings' order, methods the settings no longer have last."""
    return [m for m in cfg["methods"] if m in names] + [m for m in names if m not in cfg["methods"]]


def machines_note(records: list[Mapping[str, Any]]) -> str:
    """A line naming the machines the records ran on, or ``""`` when none recorded one."""
    machines = sorted(
        {
            f"{m.get('cpu')}, {m.get('torch_threads')} torch threads, host {m.get('host')}"
            for m in (r.get("machine") for r in records)
            if m
        }
    )
    unrecorded = sum(1 for r in records if not r.get("machine"))
    if not machines:
        return ""
    note = "; ".join(machines)
    if unrecorded:
        note += f"; {unrecorded} cell(s) ran before machines were recorded"
    return f"Machines: {note}."


def results_table(
    results: Mapping[str, list[dict[str, Any]]],
    cfg: Mapping[str, Any],
    reference: Mapping[str, float],
    source_downstream: Mapping[str, Any] | None = None,
) -> str:
    """One budget's markdown table: per-domain and mean eval loss, gaps, compute, seeds."""
    domains = cfg["domains"]
    at = equal_compute(results)
    at_header = f"at {at / 1e12:.1f} TFLOPs" if at else "at equal compute"
    header = ["method", "train tokens", "train TFLOPs", "mean eval loss", at_header, *domains,
              "worst gap to ref", "before CPT", "export gap", "landing (units)",
              "downstream acc", "wall time", "seeds"]  # fmt: skip
    rows = []
    for name in method_order(cfg, list(results)):
        records = results[name]
        means = [statistics.fmean(r["after_cpt"][d] for d in domains) for r in records]
        gaps = [max(r["after_cpt"][d] - reference[d] for d in domains) for r in records]
        befores = [statistics.fmean(r["before_cpt"].values()) for r in records if r["before_cpt"]]
        tokens = records[0]["tokens"]
        flops = [r["train_flops"] for r in records if r.get("train_flops")]
        gaps_export = [r["export_gap"] for r in records if r.get("export_gap") is not None]
        landings = [max(r["landing"].values()) for r in records if r.get("landing")]
        accs = [r["downstream"]["mean"] for r in records if r.get("downstream")]
        seconds = statistics.fmean(sum(r["seconds"].values()) for r in records)
        at_compute = [loss_at_flops(r, at) for r in records] if at else []
        rows.append([
            method_label(cfg, name, records[0]),
            f"{tokens['prune'] + tokens['cpt']:,} ({tokens['prune']:,} + {tokens['cpt']:,})",
            f"{flops[0] / 1e12:.1f}" if flops else "-",
            f"**{stat(means)}**",
            stat(at_compute) if at_compute and None not in at_compute else "-",
            *(stat([r["after_cpt"][d] for r in records]) for d in domains),
            stat(gaps),
            stat(befores) if befores else "-",
            stat(gaps_export) if gaps_export else "-",
            f"{max(landings):.2f}" if landings else "-",
            downstream_cell(accs),
            f"{seconds / 60:.1f} min",
            ",".join(str(r["seed"]) for r in records),
        ])  # fmt: skip
    source_acc = [source_downstream["mean"]] if source_downstream else []
    mean_reference = f"{statistics.fmean(reference.values()):.3f}"
    rows.append(["source model (reference)", "-", "-", mean_reference, "-",
                 *(f"{reference[d]:.3f}" for d in domains), "0", "-", "-", "-",
                 downstream_cell(source_acc), "-", "-"])  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    note = machines_note([r for records in results.values() for r in records])
    return "\n".join(lines) + (f"\n\n{note}" if note else "")


def wrapped(label: str, width: int = 70) -> str:
    """A legend label broken into lines, so that a long one does not widen the figure."""
    return "\n".join(textwrap.wrap(label, width)) or label


def legend_below(fig: Any, handles: list[Any], labels: list[str]) -> None:
    """The legend in its own band under the axes, where it cannot cover a curve."""
    fig.legend(
        handles, [wrapped(label) for label in labels], loc="outside lower center", ncol=2,
        fontsize=8, frameon=False,
    )  # fmt: skip


def plot_results(
    results: Mapping[str, list[dict[str, Any]]],
    cfg: Mapping[str, Any],
    reference: Mapping[str, float],
    path: Path,
) -> None:
    """One budget's eval curves (first seed) against tokens and against compute."""
    fig, (ax, ax_c) = plt.subplots(1, 2, figsize=(14, 6.5), sharey=True, layout="constrained")
    for name in method_order(cfg, list(results)):
        record = results[name][0]
        xs, ys = zip(*record["curve"], strict=True) if record["curve"] else ((), ())
        ax.plot(xs, ys, marker="o", markersize=3, label=method_label(cfg, name, record))
        if record.get("flop_params") and xs:
            ax_c.plot([point_flops(record, x) / 1e12 for x in xs], ys, marker="o", markersize=3)
    for axis in (ax, ax_c):
        axis.axhline(statistics.fmean(reference.values()), color="grey", ls=":")
        axis.grid(alpha=0.3)
    ax.set_xlabel("training tokens (pruning + CPT)")
    ax_c.set_xlabel(
        "training compute, TFLOPs (6 N a training token, 4 N mask-only, 2 N forward-only)"
    )
    ax.set_ylabel(f"mean eval loss over {len(cfg['domains'])} domains")
    ax.set_title("SmolLM2-135M -> 80.2M: eval loss vs. tokens (first seed)")
    ax_c.set_title("the same vs. compute (source model dotted)")
    legend_below(fig, *ax.get_legend_handles_labels())
    fig.savefig(path, dpi=120)
    plt.close(fig)


def reference_losses(folder: Path) -> dict[str, float]:
    """The source model's losses a budget's cells were measured against."""
    path = folder / "source_losses.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run bench_quality.py at this budget first")
    return json.loads(path.read_text())


def source_downstream(folder: Path, items: int | None = None) -> dict[str, Any] | None:
    """The source's downstream scores at ``items`` per task (default: the only ones kept)."""
    if items is not None:
        path = folder / f"source_downstream_{items}.json"
        return json.loads(path.read_text()) if path.exists() else None
    kept = sorted(folder.glob("source_downstream_*.json"))
    return json.loads(kept[0].read_text()) if len(kept) == 1 else None


def write_budget(folder: Path, cfg: Mapping[str, Any], downstream_items: int | None = None) -> str:
    """``folder/table.md`` and ``folder/quality.png`` from the records in ``folder``."""
    reference = reference_losses(folder)
    results = read_records(folder)
    table = results_table(results, cfg, reference, source_downstream(folder, downstream_items))
    (folder / "table.md").write_text(table + "\n")
    plot_results(results, cfg, reference, folder / "quality.png")
    return table


def prune_only_table(folder: Path) -> str:
    """Markdown table of the ``--prune-only`` records in ``folder``, one row per run."""
    # Each units cell: the share of the learned export's units that the importance init's
    # one-shot cut keeps too, the same against the one-shot route's cut, the two cuts against
    # each other, and (in brackets) what two random cuts share.
    lines = [
        "| method | seed | pruning steps | before CPT | "
        + " | ".join(f"{d}: init / route / calibration (chance)" for d in PRUNED_DIMS)
        + " |",
        "|---|---|---|---|" + "---|" * len(PRUNED_DIMS),
    ]
    records = [json.loads(path.read_text()) for path in sorted(folder.glob("*-s*.json"))]
    for record in records:
        units = record.get("units_shared_with_oneshot") or {}
        cells = [
            "{shared:.3f} / {shared_route:.3f} / {calibration:.3f} ({chance:.3f})".format(
                **units[d]
            )
            if d in units
            else "-"
            for d in PRUNED_DIMS
        ]
        before = record.get("before_cpt")
        mean = f"{statistics.fmean(before.values()):.3f}" if before else "-"
        lines.append(
            f"| {record['method']} | {record['seed']} | {record['steps']['prune']} | {mean} | "
            + " | ".join(cells)
            + " |"
        )
    note = machines_note(records)
    return "\n".join(lines) + (f"\n\n{note}" if note else "")


def write_prune_only(folder: Path) -> str:
    """``folder/table.md`` from the ``--prune-only`` records in ``folder``."""
    table = prune_only_table(folder)
    (folder / "table.md").write_text(table + "\n")
    return table


def budget_results(root: Path) -> dict[int, dict[str, list[dict[str, Any]]]]:
    """Every finished result under ``root/<steps>steps``: steps -> method -> records."""
    budgets: dict[int, dict[str, list[dict[str, Any]]]] = {}
    for folder in sorted(root.glob("*steps")):
        records = read_records(folder)
        if records:
            budgets[int(folder.name.removesuffix("steps"))] = records
    return budgets


CurvePoint = tuple[float, float, float, float]  # tokens, TFLOPs, mean loss, spread over seeds


def curve_cell(records: list[Mapping[str, Any]]) -> tuple[str, CurvePoint]:
    """A curve cell's text and point: mean ± spread over seeds, compute, seeds."""
    means = [statistics.fmean(r["after_cpt"].values()) for r in records]
    spread = statistics.pstdev(means) if len(means) > 1 else 0.0
    flops = statistics.fmean(r["train_flops"] for r in records) / 1e12
    seeds = ",".join(str(r["seed"]) for r in records)
    loss = f"{statistics.fmean(means):.3f}" + (f" ± {spread:.3f}" if spread else "")
    tokens = sum(records[0]["tokens"].values())
    return f"**{loss}** ({flops:.0f} TFLOPs; s{seeds})", (
        tokens,
        flops,
        statistics.fmean(means),
        spread,
    )


def curve_table(
    budgets: Mapping[int, Mapping[str, list[dict[str, Any]]]], cfg: Mapping[str, Any]
) -> tuple[str, dict[str, list[CurvePoint]]]:
    """The cross-budget markdown table and, per method, its points (tokens, TFLOPs, loss)."""
    steps_list = sorted(budgets)
    tokens_per_step = cfg["global_batch_size"] * cfg["max_seq_len"]
    measured = {m for steps in steps_list for m in budgets[steps]}
    header = ["method", *(f"{s * tokens_per_step:,} tokens ({s} steps)" for s in steps_list)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    points: dict[str, list[CurvePoint]] = {}
    for name in method_order(cfg, sorted(measured)):
        cells = []
        for steps in steps_list:
            records = budgets[steps].get(name)
            if not records:
                cells.append("")
                continue
            text, point = curve_cell(records)
            cells.append(text)
            points.setdefault(name, []).append(point)
        lines.append("| " + " | ".join([method_label(cfg, name), *cells]) + " |")
    note = machines_note(
        [r for steps in steps_list for records in budgets[steps].values() for r in records]
    )
    return "\n".join(lines) + (f"\n\n{note}" if note else ""), points


def curve_figure(points: Mapping[str, list[CurvePoint]], cfg: Mapping[str, Any]) -> Any:
    """The quality curve against tokens and against compute, the legend under both."""
    fig, (ax, ax_c) = plt.subplots(1, 2, figsize=(14, 6.5), sharey=True, layout="constrained")
    for name, pts in points.items():
        tokens, flops, losses, spreads = zip(*pts, strict=True)
        label = method_label(cfg, name)
        ax.errorbar(tokens, losses, yerr=spreads, marker="o", capsize=3, label=label)
        ax_c.errorbar(flops, losses, yerr=spreads, marker="o", capsize=3)
    for axis in (ax, ax_c):
        axis.set_xscale("log")
        axis.grid(alpha=0.3)
    ax.set_xlabel("training tokens (pruning + CPT)")
    ax_c.set_xlabel("training compute, TFLOPs")
    ax.set_ylabel(f"mean eval loss after CPT, {len(cfg['domains'])} domains")
    ax.set_title("SmolLM2-135M -> 80.2M: the quality curve at equal tokens")
    ax_c.set_title("the same at equal compute")
    legend_below(fig, *ax.get_legend_handles_labels())
    return fig


def plot_curve(points: Mapping[str, list[CurvePoint]], cfg: Mapping[str, Any], path: Path) -> None:
    """``curve_figure`` written to ``path``."""
    fig = curve_figure(points, cfg)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_curve(root: Path, cfg: Mapping[str, Any]) -> str:
    """The quality curve over every budget measured: ``root/curve.md`` and ``curve.png``.

    A cell is one method at one budget: its mean eval loss after CPT (mean ± spread over
    seeds), the seeds, and its training compute. Cells of one column share the tokens;
    compute differs by route (pruning steps run the source model).
    """
    budgets = budget_results(root)
    if not budgets:
        return "no results yet"
    table, points = curve_table(budgets, cfg)
    (root / "curve.md").write_text(table + "\n")
    plot_curve(points, cfg, root / "curve.png")
    return table


def write_all(root: Path, cfg: Mapping[str, Any], downstream_items: int | None = None) -> str:
    """Every budget's tables and plot, every prune-only table, and the curve."""
    parts = []
    for folder in sorted(root.glob("*steps")):
        if (folder / "source_losses.json").exists() and read_records(folder):
            parts.append(f"{folder.name}:\n{write_budget(folder, cfg, downstream_items)}")
        if (folder / "prune_only").is_dir():
            parts.append(f"{folder.name}/prune_only:\n{write_prune_only(folder / 'prune_only')}")
    parts.append(f"curve:\n{write_curve(root, cfg)}")
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", default=str(SETTINGS), help="default: %(default)s")
    parser.add_argument("--root", default=str(RESULTS_ROOT), help="default: %(default)s")
    parser.add_argument("--steps", type=int, help="only this budget's table and plot")
    parser.add_argument("--curve", action="store_true", help="only the cross-budget curve")
    parser.add_argument(
        "--downstream", type=int, metavar="ITEMS", help="the source's downstream row at ITEMS"
    )
    args = parser.parse_args(argv)
    cfg, root = read_settings(Path(args.settings)), Path(args.root)
    if args.curve:
        log(write_curve(root, cfg))
    elif args.steps:
        folder = root / f"{args.steps}steps"
        log(write_budget(folder, cfg, args.downstream))
        if (folder / "prune_only").is_dir():
            log("\n" + write_prune_only(folder / "prune_only"))
    else:
        log(write_all(root, cfg, args.downstream))
    return 0


if __name__ == "__main__":
    sys.exit(main())
