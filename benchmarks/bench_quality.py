"""Quality at equal training tokens: learned targeted pruning vs. the alternatives.

Runs every method of ``benchmarks/quality.yaml`` on SmolLM2-135M and the shipped 7-domain
corpus, to the same target shape, with the same total training tokens (pruning + continued
pre-training), through real ``llmfoundry train`` jobs, and writes:

* ``RESULTS/<method>-s<seed>.json``: per-domain eval losses before and after CPT, the
  eval curve of the CPT run, tokens, training compute, wall time; for learned routes also the
  landing (each pruned dimension's largest per-row distance of the expected keep from the
  target at the end of pruning), the export gap (exported model's loss minus the last
  in-run pruning evaluation, same samples) and how many of its kept units one-shot cuts keep
  too (``units_shared_with_oneshot``);
* with ``--prune-only``, ``RESULTS/prune_only/``: the same up to the end of pruning (minutes
  instead of the CPT's half hour), and a table of them;
* ``RESULTS/table.md``: per-domain and mean eval loss, worst gap to the reference loss, tokens,
  wall time, seeds (mean and spread when several seeds ran);
* ``RESULTS/quality.png``: mean eval loss against training tokens, per method;
* with ``--curve``, ``benchmarks/results/quality/curve.md`` and ``curve.png``: every budget
  measured so far side by side, each cell at equal tokens and with its compute.

``RESULTS`` is ``benchmarks/results/quality/<steps>steps`` (in the repository, so that a long
curve survives across machines and sessions); ``OUT`` (``runs/bench_quality/<steps>steps``)
holds the tokenized data and the runs' logs and metrics.

Compute is counted, not timed (wall times on shared cores are not comparable): a training
token costs ``6 N`` FLOPs and a forward-only token (calibration, a KD teacher) ``2 N``, with
``N`` the parameters the token passes through (the *source* model's during pruning: every
gate multiplies a full-size tensor; the lm_head counted, the embedding lookup not). A
method's ``steps_factor`` scales its budget, e.g. to give one-shot + CPT the compute of a
learned route.

Finished methods are skipped on a rerun (``--force`` reruns them), so a long benchmark can be
resumed. Usage::

    python benchmarks/bench_quality.py --budget small            # all methods
    python benchmarks/bench_quality.py --methods oneshot learned_init --budget default
    python benchmarks/bench_quality.py --budget small --table-only   # table and plot only
    python benchmarks/bench_quality.py --budget small --downstream 200   # + downstream column
    python benchmarks/bench_quality.py --curve        # cross-budget table and plot only
    python benchmarks/bench_quality.py --steps 512 --methods learned_harden_p10 --prune-only
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from composer_shear.demo import CPT_YAML, DEFAULT_CORPUS, PRUNE_YAML  # noqa: E402
from composer_shear.export.units import compare_kept_units, read_kept_units  # noqa: E402
from composer_shear.launch import (  # noqa: E402
    check_hf_dir,
    llmfoundry_train,
    mapping_override,
    subprocess_environment,
)
from composer_shear.report.metrics import export_gap as metrics_export_gap  # noqa: E402
from composer_shear.report.metrics import read_metrics  # noqa: E402

SETTINGS = Path(__file__).with_name("quality.yaml")
RESULTS_ROOT = REPO / "benchmarks" / "results" / "quality"
# `kd: true` methods train with the KD variants of the two recipes (teacher: the source model).
PRUNE_KD_YAML = PRUNE_YAML.with_name("prune_kd.yaml")
CPT_KD_YAML = CPT_YAML.with_name("cpt_kd.yaml")


def log(message: str) -> None:
    print(message, flush=True)


def prepare(out: Path, cfg: dict[str, Any]) -> tuple[Path, Path, dict[str, float]]:
    """SmolLM2, the tokenized corpus and the source model's losses (cached in ``out``)."""
    from composer_shear.data.prep import prepare_domains
    from composer_shear.data.reference_loss import evaluate_domain_losses
    from composer_shear.weights.smollm2 import materialize_smollm2

    source = materialize_smollm2(verbose=True)
    data = out / "data"
    if not (data / "done").exists():
        shutil.rmtree(data, ignore_errors=True)
        prepare_domains(
            DEFAULT_CORPUS, data, str(source), cfg["max_seq_len"], domains=cfg["domains"]
        )
        (data / "done").write_text("")
    ref_path = out / "source_losses.json"
    if not ref_path.exists():
        log("measuring the source model's eval losses (the reference losses)")
        losses = evaluate_domain_losses(
            source, data, cfg["domains"], cfg["max_seq_len"], 8, cfg["eval_samples"]
        )
        ref_path.write_text(json.dumps(losses, indent=2))
    return source, data, json.loads(ref_path.read_text())


def evaluate(model_dir: Path, data: Path, cfg: dict[str, Any]) -> dict[str, float]:
    from composer_shear.data.reference_loss import evaluate_domain_losses

    return evaluate_domain_losses(
        model_dir, data, cfg["domains"], cfg["max_seq_len"], 8, cfg["eval_samples"]
    )


def eval_curve(metrics_file: Path, domains: list[str]) -> list[tuple[int, float]]:
    """(step, mean eval loss) of every evaluation round logged in a jsonl metrics file."""
    if not metrics_file.exists():
        return []
    by_step: dict[int, dict[str, float]] = {}
    for line in metrics_file.read_text().splitlines():
        row = json.loads(line)
        for key, value in (row.get("metrics") or {}).items():
            parts = key.split("/")  # metrics/eval/<domain>/LanguageCrossEntropy, one line each
            if len(parts) == 4 and parts[1] == "eval" and parts[3] == "LanguageCrossEntropy":
                by_step.setdefault(int(row["step"]), {})[parts[2]] = value
    return [
        (step, statistics.fmean(losses[d] for d in domains))
        for step, losses in sorted(by_step.items())
        if all(losses.get(d) is not None for d in domains)
    ]


def flop_params(model_dir: Path) -> int:
    """Parameters a token's matmuls pass through: all but the embedding lookup (lm_head kept)."""
    from transformers import AutoConfig

    from composer_shear.families import get_family

    config = AutoConfig.from_pretrained(model_dir)
    total = get_family(config).shape(config).num_params()
    if config.tie_word_embeddings:
        return total  # one matrix: looked up for free, multiplied as lm_head
    return total - config.vocab_size * config.hidden_size


def downstream_record(model_dir: Path, tasks: Path) -> dict[str, Any]:
    """Mean downstream accuracy (LLM Foundry ICL, see README) and the per-task results."""
    from composer_shear.downstream.evaluate import downstream_score

    mean, per_task = downstream_score(model_dir, tasks, batch_size=16)
    return {"mean": list(mean), "per_task": {k: list(v) for k, v in per_task.items()}}


def prepare_downstream(out: Path, source: Path, items: int) -> tuple[Path, dict[str, Any]]:
    """Seeded ICL subsets of the default tasks (cached in ``out``) and the source's scores."""
    from composer_shear.downstream.data import build_eval_data

    tasks = out / f"downstream_data_{items}"
    if not (tasks / "manifest.json").exists():
        build_eval_data(tasks, items=items, seed=17, overwrite=True, tokenizer=source)
    ref_path = out / f"source_downstream_{items}.json"
    if not ref_path.exists():
        ref_path.write_text(json.dumps(downstream_record(source, tasks), indent=2))
    return tasks, json.loads(ref_path.read_text())


def point_flops(record: dict[str, Any], tokens: float) -> float:
    """Training FLOPs spent by a method once it has seen ``tokens`` (pruning first, then CPT)."""
    n_source, n_target = record["flop_params"]["source"], record["flop_params"]["target"]
    prune = min(tokens, record["tokens"]["prune"])
    cpt = max(0.0, tokens - record["tokens"]["prune"])
    flops = 6 * n_source * prune + 2 * n_source * record["calibration_tokens"] + 6 * n_target * cpt
    if record.get("kd"):
        flops += 2 * n_source * tokens
    return flops


def last_metrics(metrics_file: Path, prefix: str) -> dict[str, float]:
    """The last logged value of every metric whose name starts with ``prefix``."""
    last: dict[str, float] = {}
    if metrics_file.exists():
        for line in metrics_file.read_text().splitlines():
            for key, value in (json.loads(line).get("metrics") or {}).items():
                if key.startswith(prefix) and value is not None:
                    last[key] = value
    return last


def update_interval(cfg: dict[str, Any], steps: int) -> int:
    """Batches between evaluations for a budget: ``update_interval``, or the budget's own."""
    return int(cfg.get("update_interval_by_steps", {}).get(steps, cfg["update_interval"]))


def target_overrides(cfg: dict[str, Any]) -> list[str]:
    return [
        f"algorithms.targeted_pruning.target_shape.{key}={value}"
        for key, value in cfg["target_shape"].items()
    ]


# The recipes fix their own seeds (data order 17 in pruning and 18 in CPT, gate noise 0), so
# Composer's global `seed` alone changes nothing in a run from pretrained weights: a second
# seed must move the data order and the gate noise. Seed 17 runs the recipes as written.
RECIPE_SEED = 17


def gate_seed(seed: int) -> int:
    """The pruning algorithm's own seed for a benchmark seed (17: 0, as the recipes are written).

    It seeds the gate noise and the importance init's calibration sample.
    """
    return seed - RECIPE_SEED


def seed_overrides(seed: int, stage: str) -> list[str]:
    """Dotlist overrides that make ``seed`` move a stage's data order (and gate noise)."""
    if seed < 0:
        raise ValueError(f"seeds must be non-negative, got {seed}")
    if stage == "prune":
        return [
            f"train_loader.dataset.shuffle_seed={seed}",
            f"algorithms.targeted_pruning.seed={gate_seed(seed)}",
        ]
    return [f"train_loader.dataset.shuffle_seed={seed + 1}"]


def oneshot_cut(
    source: Path, out_dir: Path, data: Path, cfg: dict[str, Any], importance: str, seed: int,
    log_file: Path, units: Path | None = None,
) -> None:  # fmt: skip
    """``composer-shear prune-oneshot`` of the source to the target shape, as a user runs it.

    With ``units`` (a pruned model directory), the cut keeps exactly that model's units.
    """
    shape = ",".join(f"{k}={v}" for k, v in cfg["target_shape"].items())
    cmd = [
        str(Path(sys.executable).parent / "composer-shear"), "prune-oneshot", str(source),
        str(out_dir), "--data", str(data), "--max-seq-len", str(cfg["max_seq_len"]),
        "--calibration-tokens", str(cfg["calibration_tokens"]), "--method", importance,
        "--seed", str(seed), "--target-shape", shape,
    ]  # fmt: skip
    if units is not None:
        cmd += ["--units", str(units)]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=subprocess_environment(), cwd=REPO
    )
    log_file.parent.mkdir(parents=True, exist_ok=True)
    log_file.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"prune-oneshot failed:\n{proc.stderr[-3000:]}")


def units_shared_with_oneshot(
    pruned: Path, run_dir: Path, source: Path, data: Path, cfg: dict[str, Any], seed: int
) -> dict[str, dict[str, float]]:
    """How far a learned export's kept units are from one-shot cuts, per dimension.

    Two one-shot cuts are made: ``init`` from the calibration sample of the learned route's
    importance init (so at step 0 of pruning the learned route keeps exactly its units), and
    ``route`` as the one-shot route of the same seed makes it (another calibration sample).

    Returns:
        Per dimension: ``shared`` (share of the learned export's units that ``init`` keeps
        too: what it lacks of 1.0 is what the learned stage moved), ``shared_route`` (the same
        against ``route``), ``calibration`` (``init`` against ``route``: what the calibration
        sample alone moves) and ``chance`` (what two random cuts share on average).
    """
    cuts = {}
    for name, cut_seed in (("init", gate_seed(seed)), ("route", seed)):
        cut = run_dir / "models" / f"oneshot_cut_{name}"
        shutil.rmtree(cut, ignore_errors=True)
        oneshot_cut(
            source, cut, data, cfg, "activation", cut_seed, run_dir / "logs" / f"{name}.log"
        )
        cuts[name] = read_kept_units(cut)
        shutil.rmtree(cut, ignore_errors=True)
    learned = read_kept_units(pruned)
    vs_init = compare_kept_units(learned, cuts["init"])
    vs_route = compare_kept_units(learned, cuts["route"])
    calibration = compare_kept_units(cuts["init"], cuts["route"])
    return {
        dim: {
            "shared": row["shared"],
            "shared_route": vs_route[dim]["shared"],
            "calibration": calibration[dim]["shared"],
            "chance": row["chance"],
        }
        for dim, row in vs_init.items()
    }


def run_method(
    name: str, spec: dict[str, Any], seed: int, steps: int, out: Path, cfg: dict[str, Any],
    source: Path, data: Path, reference: dict[str, float], tasks: Path | None = None,
    prune_only: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """Runs one method end to end; returns its result record.

    With ``prune_only``, stops after the pruning stage (or the one-shot cut) and returns the
    model before CPT: its losses, landing, export gap and the units it shares with the
    one-shot cut (learned routes).
    """
    run_dir = out / "runs" / f"{name}-s{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    tokens_per_step = cfg["global_batch_size"] * cfg["max_seq_len"]
    common = [
        f"variables.data_dir={data}",
        f"variables.run_dir={run_dir}",
        f"variables.max_seq_len={cfg['max_seq_len']}",
        f"variables.update_interval={update_interval(cfg, steps)}ba",
        mapping_override("variables.target_loss", {d: reference[d] for d in cfg["domains"]}),
        f"seed={seed}",
    ]
    route = spec["route"]
    kd = bool(spec.get("kd", False))
    steps = round(steps * float(spec.get("steps_factor", 1.0)))
    prune_fraction = spec.get("prune_fraction", cfg["prune_fraction"])
    prune_steps = round(steps * prune_fraction) if route == "learned" else 0
    cpt_steps = steps - prune_steps
    pruned = run_dir / "models" / "pruned"
    times: dict[str, float] = {}
    start = time.perf_counter()
    if route == "learned":
        log(f"  [{name}] pruning {prune_steps} steps")
        llmfoundry_train(
            PRUNE_KD_YAML if kd else PRUNE_YAML,
            [
                f"variables.model_dir={source}",
                f"variables.steps={prune_steps}",
                f"algorithms.targeted_pruning.init_tokens={cfg['calibration_tokens']}",
                *target_overrides(cfg),
                *common,
                *seed_overrides(seed, "prune"),
                *spec.get("prune", []),
            ],
            run_dir / "logs" / "prune.log",
        )
    else:
        importance = "random" if route == "scratch" else spec.get("importance", "activation")
        units_dir = None
        if "units_from" in spec:
            # Another method's export of the same seed: its unit choice, cut from the source.
            units_dir = out / "runs" / f"{spec['units_from']}-s{seed}" / "models" / "pruned"
            if not units_dir.is_dir():
                raise FileNotFoundError(
                    f"{name} cuts the units of {spec['units_from']} (seed {seed}): run that "
                    f"method at this budget first ({units_dir} is missing)"
                )
        choice = f"units of {spec['units_from']}" if units_dir else importance
        log(f"  [{name}] one-shot ({choice}) cut")
        oneshot_cut(
            source, pruned, data, cfg, importance, seed, run_dir / "logs" / "oneshot.log", units_dir
        )
    times["prune"] = time.perf_counter() - start
    check_hf_dir(pruned)
    before = None if route == "scratch" else evaluate(pruned, data, cfg)
    landing, export_gap, units = None, None, None
    if route == "learned":
        prune_metrics = run_dir / "metrics" / "prune.jsonl"
        landing = {
            key.split("/")[1]: value
            for key, value in last_metrics(prune_metrics, "pruning/").items()
            if key.endswith("/max_row_deviation_units") and "hardening" not in key
        }
        gap = metrics_export_gap(read_metrics(prune_metrics), before, cfg["domains"])
        export_gap = None if gap is None else gap[0] - gap[1]
        units = units_shared_with_oneshot(pruned, run_dir, source, data, cfg, seed)
    if prune_only:
        return {
            "method": name,
            "seed": seed,
            "steps": {"prune": prune_steps, "cpt": cpt_steps},
            "before_cpt": before,
            "landing": landing,
            "export_gap": export_gap,
            "units_shared_with_oneshot": units,
            "seconds": times,
        }

    log(f"  [{name}] continued pre-training {cpt_steps} steps")
    start = time.perf_counter()
    cpt_overrides = [
        f"variables.model_dir={pruned}",
        f"variables.steps={cpt_steps}",
        *common,
        *seed_overrides(seed, "cpt"),
    ]
    if route == "scratch":
        cpt_overrides.append("model.pretrained=false")
    if kd:
        cpt_overrides.append(f"variables.teacher_dir={source}")
    llmfoundry_train(
        CPT_KD_YAML if kd else CPT_YAML,
        [*cpt_overrides, *spec.get("cpt", [])],
        run_dir / "logs" / "cpt.log",
    )
    times["cpt"] = time.perf_counter() - start
    final_dir = run_dir / "models" / "cpt" / "huggingface" / "final"
    after = evaluate(final_dir, data, cfg)
    downstream = None if tasks is None else downstream_record(final_dir, tasks)
    curve = [
        ((prune_steps + step) * tokens_per_step, loss)
        for step, loss in eval_curve(run_dir / "metrics" / "cpt.jsonl", cfg["domains"])
    ]
    if before is not None:
        curve.insert(0, (prune_steps * tokens_per_step, statistics.fmean(before.values())))
    # Keep the record, drop the checkpoints (tens of MB each).
    shutil.rmtree(run_dir / "models" / "cpt", ignore_errors=True)
    n_source, n_target = flop_params(source), flop_params(pruned)
    # A transplanted unit choice calibrates nothing here (its own pruning run is not counted).
    random_cut = route == "scratch" or spec.get("importance") == "random" or "units_from" in spec
    calibration = 0 if random_cut else cfg["calibration_tokens"]
    prune_tokens, cpt_tokens = prune_steps * tokens_per_step, cpt_steps * tokens_per_step
    record = {
        "method": name,
        "label": spec.get("label", name),
        "seed": seed,
        "steps": {"prune": prune_steps, "cpt": cpt_steps},
        "kd": kd,
        "tokens": {"prune": prune_steps * tokens_per_step, "cpt": cpt_steps * tokens_per_step},
        "calibration_tokens": calibration,
        "before_cpt": before,
        "after_cpt": after,
        "curve": curve,
        "seconds": times,
        "flop_params": {"source": n_source, "target": n_target},
        "landing": landing,
        "export_gap": export_gap,
        "units_shared_with_oneshot": units,
        "downstream": downstream,
    }
    # KD adds the teacher's forward (2 N_source) on every training token.
    record["train_flops"] = point_flops(record, prune_tokens + cpt_tokens)
    return record


def downstream_cell(means: list[list[float]]) -> str:
    """``acc ± stderr (n items)`` of the first seed's mean accuracy, or ``-``."""
    if not means:
        return "-"
    accuracy, stderr, n = means[0]
    return f"{accuracy:.3f} ± {stderr:.3f} ({int(n)})"


def write_outputs(
    out: Path,
    cfg: dict[str, Any],
    reference: dict[str, float],
    source_downstream: dict[str, Any] | None = None,
) -> str:
    """Table (markdown) and plot of every result in the results folder ``out``."""
    results: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(out.glob("*-s*.json")):
        record = json.loads(path.read_text())
        results.setdefault(record["method"], []).append(record)
    domains = cfg["domains"]
    order = [m for m in cfg["methods"] if m in results] + [
        m for m in results if m not in cfg["methods"]
    ]

    def stat(values: list[float]) -> str:
        if len(values) == 1:
            return f"{values[0]:.3f}"
        return f"{statistics.fmean(values):.3f} ± {statistics.pstdev(values):.3f}"

    header = ["method", "train tokens", "train TFLOPs", "mean eval loss", *domains,
              "worst gap to ref", "before CPT", "export gap", "landing (units)",
              "downstream acc", "wall time", "seeds"]  # fmt: skip
    rows = []
    for name in order:
        records = results[name]
        means = [statistics.fmean(r["after_cpt"][d] for d in domains) for r in records]
        per_domain = [stat([r["after_cpt"][d] for r in records]) for d in domains]
        gaps = [max(r["after_cpt"][d] - reference[d] for d in domains) for r in records]
        befores = [statistics.fmean(r["before_cpt"].values()) for r in records if r["before_cpt"]]
        tokens = records[0]["tokens"]
        flops = [r["train_flops"] for r in records if r.get("train_flops")]
        gaps_export = [r["export_gap"] for r in records if r.get("export_gap") is not None]
        landings = [max(r["landing"].values()) for r in records if r.get("landing")]
        accs = [r["downstream"]["mean"] for r in records if r.get("downstream")]
        seconds = statistics.fmean(sum(r["seconds"].values()) for r in records)
        # The settings' current label wins, so that relabelling needs no rerun.
        label = cfg["methods"].get(name, {}).get("label", records[0]["label"])
        rows.append([
            label,
            f"{tokens['prune'] + tokens['cpt']:,} ({tokens['prune']:,} + {tokens['cpt']:,})",
            f"{flops[0] / 1e12:.1f}" if flops else "-",
            f"**{stat(means)}**",
            *per_domain,
            stat(gaps),
            stat(befores) if befores else "-",
            stat(gaps_export) if gaps_export else "-",
            f"{max(landings):.2f}" if landings else "-",
            downstream_cell(accs),
            f"{seconds / 60:.1f} min",
            ",".join(str(r["seed"]) for r in records),
        ])  # fmt: skip
    source_acc = [source_downstream["mean"]] if source_downstream else []
    ref_row = ["source model (reference)", "-", "-", f"{statistics.fmean(reference.values()):.3f}",
               *(f"{reference[d]:.3f}" for d in domains), "0", "-", "-", "-",
               downstream_cell(source_acc), "-", "-"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in [*rows, ref_row]]
    table = "\n".join(lines)
    (out / "table.md").write_text(table + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_c) = plt.subplots(1, 2, figsize=(14, 5), sharey=True)
    for name in order:
        record = results[name][0]
        xs, ys = zip(*record["curve"], strict=True) if record["curve"] else ((), ())
        label = cfg["methods"].get(record["method"], {}).get("label", record["label"])
        ax.plot(xs, ys, marker="o", markersize=3, label=label)
        if record.get("flop_params") and xs:
            ax_c.plot([point_flops(record, x) / 1e12 for x in xs], ys, marker="o", markersize=3)
    for axis in (ax, ax_c):
        axis.axhline(statistics.fmean(reference.values()), color="grey", ls=":")
        axis.grid(alpha=0.3)
    ax.set_xlabel("training tokens (pruning + CPT)")
    ax_c.set_xlabel("training compute, TFLOPs (6 N per training token, 2 N per forward-only)")
    ax.set_ylabel(f"mean eval loss over {len(domains)} domains")
    ax.set_title("SmolLM2-135M -> 80.2M: eval loss vs. tokens (first seed)")
    ax_c.set_title("the same vs. compute (source model dotted)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "quality.png", dpi=120)
    plt.close(fig)
    return table


def pending_cells(
    folder: Path, seeds: list[int], methods: list[str], force: bool
) -> Iterator[tuple[int, str, Path]]:
    """(seed, method, result path) of every cell still to run; finished ones are skipped."""
    for seed in seeds:
        for name in methods:
            path = folder / f"{name}-s{seed}.json"
            if path.exists() and not force:
                log(f"{name} (seed {seed}): done earlier, skipped")
                continue
            yield seed, name, path


def prune_only_table(folder: Path) -> str:
    """Markdown table of the ``--prune-only`` records in ``folder``, one row per run."""
    dims = ["layers", "heads", "kv_heads", "intermediate", "hidden"]
    # Each cell: the share of the learned export's units that the importance init's one-shot
    # cut keeps too, the same against the one-shot route's cut, the two cuts against each
    # other, and (in brackets) what two random cuts share.
    lines = [
        "| method | seed | pruning steps | before CPT | "
        + " | ".join(f"{d}: init / route / calibration (chance)" for d in dims)
        + " |",
        "|---|---|---|---|" + "---|" * len(dims),
    ]
    for path in sorted(folder.glob("*-s*.json")):
        record = json.loads(path.read_text())
        units = record.get("units_shared_with_oneshot") or {}
        cells = [
            "{shared:.3f} / {shared_route:.3f} / {calibration:.3f} ({chance:.3f})".format(
                **units[d]
            )
            if d in units
            else "-"
            for d in dims
        ]
        before = record.get("before_cpt")
        mean = f"{statistics.fmean(before.values()):.3f}" if before else "-"
        lines.append(
            f"| {record['method']} | {record['seed']} | {record['steps']['prune']} | {mean} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines)


def budget_results(root: Path) -> dict[int, dict[str, list[dict[str, Any]]]]:
    """Every finished result under ``root/<steps>steps``: steps -> method -> records."""
    budgets: dict[int, dict[str, list[dict[str, Any]]]] = {}
    for folder in sorted(root.glob("*steps")):
        steps = int(folder.name.removesuffix("steps"))
        for path in sorted(folder.glob("*-s*.json")):
            record = json.loads(path.read_text())
            budgets.setdefault(steps, {}).setdefault(record["method"], []).append(record)
    return budgets


def write_curve(root: Path, cfg: dict[str, Any]) -> str:
    """The quality curve over every budget measured: ``root/curve.md`` and ``curve.png``.

    A cell is one method at one budget: its mean eval loss after CPT (mean ± spread over
    seeds), the seeds, and its training compute. Cells of one column share the tokens;
    compute differs by route (pruning steps run the source model).
    """
    budgets = budget_results(root)
    if not budgets:
        return "no results yet"
    steps_list = sorted(budgets)
    tokens_per_step = cfg["global_batch_size"] * cfg["max_seq_len"]
    methods = [m for m in cfg["methods"] if any(m in budgets[s] for s in steps_list)]
    header = ["method", *(f"{s * tokens_per_step:,} tokens ({s} steps)" for s in steps_list)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    points: dict[str, list[tuple[float, float, float, float]]] = {}
    for name in methods:
        cells = []
        for steps in steps_list:
            records = budgets[steps].get(name)
            if not records:
                cells.append("")
                continue
            means = [statistics.fmean(r["after_cpt"].values()) for r in records]
            spread = statistics.pstdev(means) if len(means) > 1 else 0.0
            flops = statistics.fmean(r["train_flops"] for r in records) / 1e12
            seeds = ",".join(str(r["seed"]) for r in records)
            loss = f"{statistics.fmean(means):.3f}" + (f" ± {spread:.3f}" if spread else "")
            cells.append(f"**{loss}** ({flops:.0f} TFLOPs; s{seeds})")
            tokens = sum(records[0]["tokens"].values())
            points.setdefault(name, []).append((tokens, flops, statistics.fmean(means), spread))
        label = cfg["methods"][name].get("label", name)
        lines.append("| " + " | ".join([label, *cells]) + " |")
    table = "\n".join(lines)
    (root / "curve.md").write_text(table + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_c) = plt.subplots(1, 2, figsize=(14, 5), sharey=True)
    for name, pts in points.items():
        tokens, flops, losses, spreads = zip(*pts, strict=True)
        label = cfg["methods"][name].get("label", name)
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
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(root / "curve.png", dpi=120)
    plt.close(fig)
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", default=str(SETTINGS))
    parser.add_argument("--budget", default="default", help="a key of budgets: in the settings")
    parser.add_argument("--steps", type=int, help="total training steps (overrides --budget)")
    parser.add_argument("--methods", nargs="+", help="subset of the settings' methods")
    parser.add_argument("--seeds", nargs="+", type=int, help="override the settings' seeds")
    parser.add_argument("--out", help="work folder (default runs/bench_quality/<steps>steps)")
    parser.add_argument(
        "--results", help="results folder (default benchmarks/results/quality/<steps>steps)"
    )
    parser.add_argument("--force", action="store_true", help="rerun finished methods")
    parser.add_argument(
        "--table-only", action="store_true", help="rewrite table and plot from finished results"
    )
    parser.add_argument(
        "--curve", action="store_true", help="only write the cross-budget curve (table, plot)"
    )
    parser.add_argument(
        "--prune-only",
        action="store_true",
        help="stop each method before CPT: the pruned model's losses, landing and the units it "
        "shares with the one-shot cut (RESULTS/prune_only/)",
    )
    parser.add_argument(
        "--downstream",
        type=int,
        metavar="ITEMS",
        help="also score every final model on the default downstream tasks, ITEMS per task",
    )
    args = parser.parse_args()

    cfg = yaml.safe_load(Path(args.settings).read_text())
    if args.curve:
        log(write_curve(RESULTS_ROOT, cfg))
        return 0
    steps = args.steps or cfg["budgets"][args.budget]
    out = Path(args.out or REPO / "runs" / "bench_quality" / (f"{steps}steps"))
    results = Path(args.results or RESULTS_ROOT / f"{steps}steps")
    out.mkdir(parents=True, exist_ok=True)
    results.mkdir(parents=True, exist_ok=True)
    methods = args.methods or list(cfg["methods"])
    unknown = sorted(set(methods) - set(cfg["methods"]))
    if unknown:
        parser.error(f"unknown methods {unknown}; known: {list(cfg['methods'])}")
    seeds = args.seeds or cfg["seeds"]
    log(f"bench_quality: {steps} steps x {cfg['global_batch_size']} x {cfg['max_seq_len']} "
        f"tokens per method; methods {methods}; seeds {seeds}; results {results}")  # fmt: skip
    ref_down = results / f"source_downstream_{args.downstream}.json"
    if args.table_only:
        reference = json.loads((results / "source_losses.json").read_text())
        source_down = json.loads(ref_down.read_text()) if ref_down.exists() else None
        log("\n" + write_outputs(results, cfg, reference, source_down))
        return 0
    source, data, reference = prepare(out, cfg)
    (results / "source_losses.json").write_text(json.dumps(reference, indent=2))
    tasks, source_down = None, None
    if args.downstream:
        tasks, source_down = prepare_downstream(out, source, args.downstream)
        ref_down.write_text(json.dumps(source_down, indent=2))
    started = time.perf_counter()
    if args.prune_only:
        folder = results / "prune_only"
        folder.mkdir(exist_ok=True)
        for seed, name, path in pending_cells(folder, seeds, methods, args.force):
            log(f"{name} (seed {seed}): pruning stage only")
            spec = cfg["methods"][name]
            record = run_method(
                name, spec, seed, steps, out, cfg, source, data, reference, prune_only=True
            )
            path.write_text(json.dumps(record, indent=2))
        table = prune_only_table(folder)
        (folder / "table.md").write_text(table + "\n")
        log("\n" + table)
        return 0
    for seed, name, result_path in pending_cells(results, seeds, methods, args.force):
        log(f"{name} (seed {seed}): {cfg['methods'][name].get('label', name)}")
        record = run_method(
            name, cfg["methods"][name], seed, steps, out, cfg, source, data, reference, tasks
        )
        result_path.write_text(json.dumps(record, indent=2))
        mean = statistics.fmean(record["after_cpt"].values())
        log(f"  [{name}] mean eval loss after CPT {mean:.3f} "
            f"({sum(record['seconds'].values()) / 60:.1f} min)")  # fmt: skip
        write_outputs(results, cfg, reference, source_down)
        write_curve(RESULTS_ROOT, cfg)
    log("\n" + write_outputs(results, cfg, reference, source_down))
    log(f"\ntotal {(time.perf_counter() - started) / 60:.1f} min; table {results / 'table.md'}, "
        f"plot {results / 'quality.png'}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
