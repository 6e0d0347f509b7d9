"""The run report: a run folder -> ``RUN/report/report.md`` with tables, plots and samples."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from composer_shear.downstream.evaluate import chance_levels, read_results, results_table
from composer_shear.interface import ModelPathError, model_path
from composer_shear.output_paths import check_output_dir
from composer_shear.report.labels import (
    DIM_LABELS,
    LOSS_COLUMNS,
    LOSS_LABELS,
    MODEL_LABELS,
    MODEL_ORDER,
)
from composer_shear.report.metrics import MetricsLog, export_gap, json_safe, read_metrics
from composer_shear.report.models import (
    DEFAULT_PROMPTS,
    ModelInfo,
    cached_generations,
    describe_model,
    generate_samples,
)
from composer_shear.report.plots import (
    domain_loss,
    logged_dims,
    plot_domain_weights,
    plot_eval_losses,
    plot_lambdas,
    plot_sparsity,
    plot_train_loss,
)

if TYPE_CHECKING:
    from composer_shear.shape import ModelShape

log = logging.getLogger(__name__)


def _fmt(value: float | None, digits: int = 3, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _fmt_params(n: float | None) -> str:
    if n is None:
        return "n/a"
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K" if n >= 1e3 else f"{n:.0f}"


def _fmt_seconds(seconds: Any) -> str:
    try:
        s = float(seconds)
    except (TypeError, ValueError):
        return "n/a"
    if s < 60:
        return f"{s:.1f}s"
    minutes, sec = divmod(round(s), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {sec:02d}s" if hours else f"{minutes}m {sec:02d}s"


def _fmt_share(fraction: float) -> str:
    return "<1%" if 0 < fraction < 0.005 else f"{fraction:.0%}"


def _shape_short(shape: ModelShape) -> str:
    return (
        f"{shape.num_hidden_layers} layers, hidden {shape.hidden_size}, "
        f"{shape.num_attention_heads} heads / {shape.num_key_value_heads} kv "
        f"head{'s' if shape.num_key_value_heads != 1 else ''}, "
        f"intermediate {shape.intermediate_size}"
    )


def _code(text: str) -> str:
    """Model output as an inline code span: no markdown inside it is interpreted."""
    text = " ".join(text.split()).replace("`", "'")  # one line; backticks would end the span
    return f"`{text}`" if text else "_(empty)_"


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], numeric_from: int = 1) -> str:
    align = ["---" if i < numeric_from else "---:" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _flatten(d: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            items += _flatten(value, name + ".")
        else:
            items.append((name, value))
    return items


def _read_json(path: Path, notes: list[str]) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        notes.append(f"`{path.name}` could not be read ({e}).")
        return None
    if not isinstance(data, dict):
        notes.append(f"`{path.name}` is not a JSON object.")
        return None
    return data


def _resolve(run_dir: Path, path: Any) -> Path:
    # run.json may hold paths relative to the run folder or to where the demo ran.
    p = Path(str(path)).expanduser()
    if p.is_absolute() or p.exists():
        return p
    return run_dir / p


@dataclass
class _Run:
    """Everything read from a run folder; missing pieces are None / empty."""

    run_dir: Path
    out_dir: Path
    info: dict[str, Any]
    prune: MetricsLog | None
    cpt: MetricsLog | None
    losses: dict[str, Any] | None
    models: dict[str, ModelInfo]
    model_dirs: dict[str, Path]
    model_errors: dict[str, str]
    domains: list[str]
    notes: list[str]


def _load_run(run_dir: Path, out_dir: Path) -> _Run:
    notes: list[str] = []
    info = _read_json(run_dir / "run.json", notes) or {}
    prune = read_metrics(run_dir / "metrics" / "prune.jsonl")
    cpt = read_metrics(run_dir / "metrics" / "cpt.jsonl")
    for label, m in (("prune", prune), ("cpt", cpt)):
        if m is not None and m.bad_lines:
            notes.append(f"`metrics/{label}.jsonl`: skipped {m.bad_lines} unreadable line(s).")
    losses = _read_json(run_dir / "eval" / "losses.json", notes)

    models: dict[str, ModelInfo] = {}
    model_dirs: dict[str, Path] = {}
    errors: dict[str, str] = {}
    raw_models = info.get("models") if isinstance(info.get("models"), Mapping) else {}
    for name in [*MODEL_ORDER, *[k for k in raw_models if k not in MODEL_ORDER]]:
        if not raw_models.get(name):
            continue
        directory = _resolve(run_dir, raw_models[name])
        try:
            model_path(directory)
        except ModelPathError as e:  # a model folder that is gone: report it, don't crash
            errors[name] = str(e)
            continue
        if not (directory / "config.json").is_file():
            errors[name] = f"no `config.json` in `{directory}`"
            continue
        model_dirs[name] = directory
        try:
            models[name] = describe_model(name, directory)
        except Exception as e:  # unsupported family, corrupt config: report, don't crash
            errors[name] = f"{type(e).__name__}: {e}"

    domains: list[str] = []
    if losses and isinstance(losses.get("domains"), list):
        domains = [str(d) for d in losses["domains"]]
    elif losses:
        for column in LOSS_COLUMNS:
            if isinstance(losses.get(column), Mapping):
                domains += [d for d in losses[column] if d not in domains]
    for m in (prune, cpt):
        if m is not None:
            domains += [d for d in m.suffixes("dynamic_batch_loading/weight/") if d not in domains]
    return _Run(
        run_dir, out_dir, info, prune, cpt, losses, models, model_dirs, errors, domains, notes
    )


def _summary(run: _Run) -> str:
    name = f"**{run.info['model']}**" if run.info.get("model") else "The source model"
    parts = []
    src, pruned = run.models.get("source"), run.models.get("pruned")
    if src and pruned:
        ratio = pruned.num_params / src.num_params
        parts.append(
            f"{name} was pruned from {_shape_short(src.shape)} to "
            f"{_shape_short(pruned.shape)}: **{_fmt_params(src.num_params)} → "
            f"{_fmt_params(pruned.num_params)} parameters** ({ratio:.0%} of the source; "
            f"non-embedding {_fmt_params(src.num_non_embedding_params)} → "
            f"{_fmt_params(pruned.num_non_embedding_params)})."
        )
    elif src:
        parts.append(
            f"{name} has {_fmt_params(src.num_params)} parameters; no pruned model was found."
        )
    else:
        parts.append(f"{name}: the model shapes are not available.")
    steps = []
    if run.prune is not None and run.prune.last_step() is not None:
        steps.append(f"pruning ran {run.prune.last_step()} steps")
    if run.cpt is not None and run.cpt.last_step() is not None:
        steps.append(f"continued pre-training {run.cpt.last_step()} steps")
    if steps:
        parts.append(f"Training: {', '.join(steps)}.")
    if run.losses and run.domains:
        means = []
        for column in LOSS_COLUMNS:
            values = [domain_loss(run.losses, column, d) for d in run.domains]
            if values and all(v is not None for v in values):
                means.append(f"{LOSS_LABELS[column]} {sum(values) / len(values):.3f}")  # type: ignore[arg-type]
        if means:
            parts.append(f"Mean eval loss over {len(run.domains)} domains: {', '.join(means)}.")
    if run.info.get("total_seconds") is not None:
        parts.append(f"The whole run took {_fmt_seconds(run.info['total_seconds'])}.")
    return " ".join(parts)


def _models_section(run: _Run) -> list[str]:
    lines = ["## Models", ""]
    if not run.models and not run.model_errors:
        return [*lines, "_No model directories in `run.json` (`models`)._", ""]
    src = run.models.get("source")
    rows = []
    for name, m in run.models.items():
        s = m.shape
        share = f"{m.num_params / src.num_params:.1%}" if src else "n/a"
        rows.append(
            [
                MODEL_LABELS.get(name, name),
                s.num_hidden_layers,
                s.hidden_size,
                s.num_attention_heads,
                s.num_key_value_heads,
                s.head_dim,
                s.intermediate_size,
                f"{m.num_params:,}",
                f"{m.num_non_embedding_params:,}",
                share,
            ]
        )
    if rows:
        headers = [
            "model",
            "layers",
            "hidden",
            "heads",
            "kv heads",
            "head dim",
            "intermediate",
            "parameters",
            "non-embedding",
            "% of source",
        ]
        lines += [_table(headers, rows), ""]
        lines.append(
            "Parameter counts come from each directory's `config.json` (vocabulary "
            f"{next(iter(run.models.values())).shape.vocab_size:,}; embeddings "
            f"{'tied' if next(iter(run.models.values())).shape.tie_word_embeddings else 'untied'})."
        )
        lines.append("")
    for name, error in run.model_errors.items():
        lines.append(f"- {MODEL_LABELS.get(name, name)}: shape not available ({error}).")
    if run.model_errors:
        lines.append("")
    return lines


def _losses_section(run: _Run) -> list[str]:
    lines = ["## Per-domain eval loss", ""]
    if not run.losses:
        return [*lines, "_No `eval/losses.json` in this run._", ""]
    if not run.domains:
        return [*lines, "_`eval/losses.json` names no domains._", ""]
    columns = [c for c in LOSS_COLUMNS if isinstance(run.losses.get(c), Mapping)]
    has_delta = "pruned" in columns and "cpt" in columns
    has_excess = "cpt" in columns and "reference" in columns
    headers = ["domain", *[LOSS_LABELS[c] for c in columns]]
    if has_delta:
        headers.append("Δ CPT (after - before)")
    if has_excess:
        headers.append("after CPT - reference")
    rows, deltas, sums = [], {}, {c: [] for c in columns}
    for domain in run.domains:
        row: list[Any] = [domain]
        for column in columns:
            value = domain_loss(run.losses, column, domain)
            sums[column].append(value)
            row.append(_fmt(value))
        if has_delta:
            before, after = (
                domain_loss(run.losses, "pruned", domain),
                domain_loss(run.losses, "cpt", domain),
            )
            delta = None if before is None or after is None else after - before
            deltas[domain] = delta
            row.append(_fmt(delta, signed=True))
        if has_excess:
            after, ref = (
                domain_loss(run.losses, "cpt", domain),
                domain_loss(run.losses, "reference", domain),
            )
            row.append(_fmt(None if after is None or ref is None else after - ref, signed=True))
        rows.append(row)

    def mean(values: list[float | None]) -> float | None:
        return None if not values or None in values else sum(values) / len(values)  # type: ignore[arg-type]

    mean_row: list[Any] = ["**mean**", *[f"**{_fmt(mean(sums[c]))}**" for c in columns]]
    if has_delta:
        mean_row.append(f"**{_fmt(mean(list(deltas.values())), signed=True)}**")
    if has_excess:
        m_cpt, m_ref = mean(sums["cpt"]), mean(sums["reference"])
        mean_row.append(
            f"**{_fmt(None if m_cpt is None or m_ref is None else m_cpt - m_ref, signed=True)}**"
        )
    rows.append(mean_row)
    lines += [_table(headers, rows), ""]
    lines.append("Loss is cross-entropy in nats per token; lower is better.")
    if has_delta:
        known = {d: v for d, v in deltas.items() if v is not None}
        worse = [d for d, v in known.items() if v >= 0]
        if known and not worse and len(known) == len(run.domains):
            lines.append(
                f"Continued pre-training **improved every domain** ({len(known)}/{len(known)})."
            )
        elif known:
            lines.append(
                f"Continued pre-training improved {len(known) - len(worse)}/{len(run.domains)} "
                f"domains; **not improved: {', '.join(worse) or 'none'}**"
                + (
                    f" (no numbers for {len(run.domains) - len(known)})."
                    if len(known) < len(run.domains)
                    else "."
                )
            )
    if has_excess:
        lines.append(
            "The last column is the excess loss that dynamic batch loading steers by: positive "
            "means the model after CPT is still behind the reference on that domain."
        )
    return [*lines, ""]


def _downstream_section(run: _Run) -> list[str]:
    """Downstream accuracy per model, from ``RUN/eval/downstream.json`` (demo stage 8)."""
    lines = ["## Downstream accuracy", ""]
    data = _read_json(run.run_dir / "eval" / "downstream.json", run.notes)
    if data is None:
        return [*lines, "_No `eval/downstream.json` in this run._", ""]
    try:
        results = read_results(data)
    except ValueError as e:
        run.notes.append(f"`eval/downstream.json`: {e}.")
        return [*lines, "_`eval/downstream.json` could not be read._", ""]
    names = [
        *[m for m in MODEL_ORDER if m in results],
        *[m for m in results if m not in MODEL_ORDER],
    ]
    columns = {MODEL_LABELS.get(name, name): results[name] for name in names}
    tasks = data.get("tasks") if isinstance(data.get("tasks"), list) else None
    lines += [results_table(columns, tasks, chance=chance_levels()), ""]
    items = data.get("items_per_task")
    lines.append(
        "Accuracy ± standard error (sqrt(p(1-p)/(n-1))) over n items per task"
        + (f" (a seeded subset of {items} per task, seed {data.get('seed')})" if items else "")
        + "; the mean is unweighted over tasks. "
        + f"Scored by {data.get('harness', 'LLM Foundry')}. Chance is the accuracy of guessing."
    )
    seconds = data.get("seconds")
    if isinstance(seconds, Mapping) and seconds:
        lines.append(
            "Evaluation time: "
            + ", ".join(f"{MODEL_LABELS.get(m, m)} {_fmt_seconds(t)}" for m, t in seconds.items())
            + "."
        )
    return [*lines, ""]


def _pruning_section(run: _Run) -> list[str]:
    m = run.prune
    if m is None:
        return ["## Pruning outcome", "", "_No `metrics/prune.jsonl` in this run._", ""]
    dims = logged_dims(m, "expected_sparsity")
    if not dims:
        return ["## Pruning outcome", "", "_`metrics/prune.jsonl` has no pruning metrics._", ""]
    rows = []
    for dim in dims:
        rows.append(
            [
                DIM_LABELS.get(dim, dim),
                _fmt(m.last(f"pruning/{dim}/target_sparsity")),
                _fmt(m.last(f"pruning/{dim}/expected_sparsity")),
                _fmt(m.last(f"pruning/{dim}/max_row_deviation_units"), 2),
                _fmt(m.last(f"pruning/{dim}/lambda_1"), 4),
                _fmt(m.last(f"pruning/{dim}/lambda_2"), 4),
            ]
        )
    headers = ["dimension", "target sparsity", "expected sparsity", "worst row off by (units)"]
    lines = [
        "## Pruning outcome",
        "",
        f'Values at the last pruning step ({m.last_step()}). "worst row off by" is the '
        "largest distance, over layers (and kv groups), of the expected kept units from the "
        "target count.",
        "",
        _table([*headers, "λ1", "λ2"], rows),
        "",
    ]
    lines += _landing_lines(run)
    expected, target = m.last("pruning/expected_num_params"), m.last("pruning/target_num_params")
    if expected is not None and target is not None:
        lines += [
            f"Expected model size {_fmt_params(expected)} vs target {_fmt_params(target)} "
            "(from the gates' keep probabilities).",
            "",
        ]
    return lines


def _landing_lines(run: _Run) -> list[str]:
    """Hardening and the export gap: exported model's loss minus the last in-run eval."""
    m = run.prune
    lines: list[str] = []
    hardened = m.last("pruning/hardened") if m is not None else None
    if hardened:
        steps, values = m.get("pruning/hardened")
        first = next(s for s, v in zip(steps, values, strict=True) if v)
        lines.append(
            f"The gates were **hardened** at step {first} (`harden_at`): from there on pruning "
            "trained exactly the model that export writes."
        )
    gap = export_gap(m, (run.losses or {}).get("pruned"), run.domains)
    if gap is not None:
        export, last_eval = gap
        lines.append(
            f"Export gap: the exported model's mean eval loss {export:.3f} minus the last in-run "
            f"pruning evaluation {last_eval:.3f} = **{export - last_eval:+.3f} nats** (what "
            "cutting to exactly the target shape cost at the end)."
        )
    return [*lines, ""] if lines else []


def _weights_section(run: _Run) -> list[str]:
    prefix = "dynamic_batch_loading/weight/"
    phases = [(t, m) for t, m in (("pruning", run.prune), ("CPT", run.cpt)) if m is not None]
    phases = [(t, m) for t, m in phases if m.suffixes(prefix)]
    lines = ["## Dynamic batch loading", ""]
    if not phases:
        return [*lines, "_No domain weights were logged (`dynamic_batch_loading/weight/*`)._", ""]
    headers = ["domain"]
    for title, _ in phases:
        headers += [f"{title}: first", f"{title}: last"]
    rows = []
    for domain in run.domains:
        row: list[Any] = [domain]
        for _, m in phases:
            row += [_fmt(m.first(prefix + domain)), _fmt(m.last(prefix + domain))]
        rows.append(row)
    lines += [
        "Sampling weight per domain at the first and last update of each phase.",
        "",
        _table(headers, rows),
        "",
    ]
    return lines


def _timings_section(run: _Run) -> list[str]:
    stages = run.info.get("stages")
    lines = ["## Stage timings", ""]
    if not isinstance(stages, Mapping) or not stages:
        return [*lines, "_No stage timings in `run.json`._", ""]
    total = run.info.get("total_seconds")
    try:
        total_f = float(total) if total is not None else sum(float(v) for v in stages.values())
    except (TypeError, ValueError):
        total_f = None
    rows = []
    for stage, seconds in stages.items():
        try:
            share = _fmt_share(float(seconds) / total_f) if total_f else "n/a"
        except (TypeError, ValueError):
            share = "n/a"
        rows.append([stage, _fmt_seconds(seconds), share])
    rows.append(["**total**", f"**{_fmt_seconds(total_f)}**", ""])
    return [*lines, _table(["stage", "time", "share"], rows), ""]


def _settings_section(run: _Run) -> list[str]:
    settings = run.info.get("settings")
    lines = ["## Settings", ""]
    started = run.info.get("started")
    if started:
        lines += [f"Started {started}.", ""]
    if not isinstance(settings, Mapping) or not settings:
        return [*lines, "_No settings in `run.json`._", ""]
    rows = [[f"`{k}`", f"`{json.dumps(json_safe(v))}`"] for k, v in _flatten(settings)]
    return [*lines, _table(["setting", "value"], rows, numeric_from=2), ""]


def _plots_section(run: _Run) -> list[str]:
    out = run.out_dir
    plots: list[tuple[str, str, Any]] = [
        (
            "Per-domain eval loss",
            "eval_losses.png",
            lambda p: plot_eval_losses(run.losses or {}, run.domains, p),
        ),
        ("Training loss", "train_loss.png", lambda p: plot_train_loss(run.prune, run.cpt, p)),
        (
            "Domain weights",
            "domain_weights.png",
            lambda p: plot_domain_weights(
                {"pruning": run.prune, "continued pre-training": run.cpt}, run.domains, p
            ),
        ),
        (
            "Sparsity",
            "sparsity.png",
            lambda p: plot_sparsity(run.prune, p) if run.prune else None,
        ),
        (
            "Lagrange multipliers",
            "lambdas.png",
            lambda p: plot_lambdas(run.prune, p) if run.prune else None,
        ),
    ]
    lines = ["## Plots", ""]
    for title, filename, make in plots:
        path = out / filename
        path.unlink(missing_ok=True)  # never show a stale plot from an earlier build
        try:
            made = make(path)
        except Exception as e:  # a plotting bug must not cost the rest of the report
            log.warning("Plot %s failed: %s", filename, e)
            made, reason = None, f"failed ({type(e).__name__}: {e})"
        else:
            reason = "no data in this run"
        lines.append(f"### {title}")
        lines.append("")
        lines.append(f"![{title}]({filename})" if made else f"_{title}: {reason}._")
        lines.append("")
    return lines


def _generations_section(run: _Run, generate: bool, prompts: Sequence[str]) -> list[str]:
    lines = ["## Sample generations", ""]
    cache = run.out_dir / "generations.json"
    if not run.model_dirs:
        return [*lines, "_No model directories to generate from._", ""]
    data = cached_generations(cache, run.model_dirs, prompts, 24)
    if data is None and generate:
        data = generate_samples(run.model_dirs, prompts, max_new_tokens=24)
        cache.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")
    elif data is None:
        try:  # --no-generations: show an older cache rather than nothing, but say so
            data = json.loads(cache.read_text(encoding="utf-8"))
            lines += ["_Generations are from an earlier build (`--no-generations`)._", ""]
        except (OSError, json.JSONDecodeError):
            return [*lines, "_Skipped (`--no-generations`) and no cached generations._", ""]
    lines += [
        f"Greedy decoding, {data.get('max_new_tokens')} new tokens, CPU fp32, plain prompts "
        "(no chat template). Each row is the model's continuation of the prompt.",
        "",
    ]
    models = data.get("models", {})
    for i, prompt in enumerate(data.get("prompts", [])):
        lines.append(f"**Prompt {i + 1}:** {_code(prompt)}")
        lines.append("")
        rows = []
        for name, entry in models.items():
            completions = entry.get("completions", [])
            text = completions[i] if i < len(completions) else ""
            rows.append([MODEL_LABELS.get(name, name), _code(text)])
        lines += [_table(["model", "continuation"], rows, numeric_from=2), ""]
    for name, error in data.get("errors", {}).items():
        lines.append(f"- {MODEL_LABELS.get(name, name)}: generation failed ({error}).")
    return [*lines, ""]


def build_report(
    run_dir: str | Path,
    generations: bool = True,
    prompts: Sequence[str] = DEFAULT_PROMPTS,
) -> Path:
    """Writes ``RUN/report/report.md`` and its plots from a run folder.

    Layout read (every part optional; what is missing is named in the report)::

        RUN/run.json          model, started, total_seconds, stages{}, models{}, settings{}
        RUN/metrics/prune.jsonl, RUN/metrics/cpt.jsonl   (JSONLMetricsLogger output)
        RUN/eval/losses.json  domains[], source{}, pruned{}, cpt{}, reference{}
        RUN/eval/downstream.json  models{model: {task: {accuracy, stderr, n}}}, tasks[], ...

    Args:
        run_dir: The run folder.
        generations: Generate sample outputs from each model when the cache
            (``RUN/report/generations.json``) is missing or stale. ``False`` never loads a
            model; a cache from an earlier build is still shown.
        prompts: Prompts for the sample generations.

    Returns:
        Path of ``report.md``.
    """
    run_dir = Path(run_dir)
    out_dir = run_dir / "report"
    # Before any model is loaded for the generations: fail early on an unwritable folder.
    check_output_dir(out_dir, f"composer-shear report {run_dir}", overwrite=True, in_place=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    run = _load_run(run_dir, out_dir)

    title = run.info.get("model") or run_dir.name
    lines = [f"# Sheared-LLaMA run report: {title}", "", _summary(run), ""]
    if not (run_dir / "run.json").is_file():
        lines += [
            "_No `run.json` in this run folder: model, timings and settings are unknown._",
            "",
        ]
    lines += _models_section(run)
    lines += _losses_section(run)
    lines += _downstream_section(run)
    lines += _pruning_section(run)
    lines += _weights_section(run)
    lines += _plots_section(run)
    lines += _generations_section(run, generations, prompts)
    lines += _timings_section(run)
    lines += _settings_section(run)
    if run.notes:
        lines += ["## Notes", "", *[f"- {n}" for n in run.notes], ""]
    lines.append(f"_Generated by `composer-shear report {run_dir}`._")

    report = out_dir / "report.md"
    report.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return report
