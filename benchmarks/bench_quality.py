r"""Quality at equal training tokens and compute: every pruning route of ``quality.yaml``, run.

Runs methods of ``benchmarks/quality.yaml`` on SmolLM2-135M and the shipped 7-domain corpus,
to the target shape of ``yamls/smollm2/prune.yaml``, with the same total training tokens
(pruning + continued pre-training), through real ``llmfoundry train`` jobs. Routes:

* ``learned``: ``yamls/smollm2/prune.yaml`` (weights and gates train), export, CPT;
* ``maskonly``: the same recipe with the source weights frozen (only gates and multipliers
  train; ``targeted_pruning.freeze_weights``), hardened on its last step, so that its export
  is the source cut at the learned units; then CPT;
* ``oneshot``: ``composer-shear prune-oneshot`` (``--method``, ``--layer-score``), CPT of the
  whole budget;
* ``scratch``: the target shape from random weights.

It writes ``RESULTS/<method>-s<seed>.json`` per cell (``RESULTS`` is
``benchmarks/results/quality/<steps>steps``, in the repository so that a long curve survives
across machines and sessions): per-domain eval losses before and after CPT, the CPT run's eval
curve, tokens, compute (counted: see ``quality_tables.py``), wall time and the machine (CPU
model, torch threads); for learned and mask-only routes also the landing (each pruned
dimension's largest per-row distance of the expected keep from the target at the end of
pruning, and at the hardening batch), the export gap (exported model's loss minus the last
in-run evaluation, same samples) and how many of its kept units one-shot cuts keep too. With
``--prune-only`` it stops every cell at the cut, before CPT (minutes instead of the CPT's half
hour), in ``RESULTS/prune_only/``. After each cell it rewrites the tables and plots with
``quality_tables.py``, which also rewrites them alone. ``OUT``
(``runs/bench_quality/<steps>steps``) holds the tokenized data and the runs' logs and metrics.

Every method is checked before anything runs: a method that needs an option this
composer_shear does not have (e.g. mask-only pruning before it lands) stops the benchmark with
a message naming the option. Finished cells are skipped on a rerun (``--force`` reruns them),
so a long benchmark can be resumed. Usage::

    python benchmarks/bench_quality.py --budget small            # all methods
    python benchmarks/bench_quality.py --methods oneshot learned_init --budget default
    python benchmarks/bench_quality.py --budget small --downstream 200   # + downstream column
    python benchmarks/bench_quality.py --steps 512 --methods learned_harden_p10 --prune-only
    python benchmarks/bench_quality.py --steps 512 --prune-only --seeds 17 18 \
        --methods maskonly_lr0.3_s51 oneshot_taylor oneshot_block_influence
    python benchmarks/quality_tables.py            # tables and plots only (also --curve)
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import io
import json
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from transformers import AutoConfig

REPO = Path(__file__).resolve().parents[1]
# Run as a script, this folder is on the path and the repository is not; imported by the
# tests, the other way round.
for folder in (REPO, Path(__file__).resolve().parent):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from common import machine_record, recipe_target  # noqa: E402
from quality_tables import (  # noqa: E402
    RESULTS_ROOT,
    SETTINGS,
    log,
    point_flops,
    read_settings,
    write_budget,
    write_curve,
    write_prune_only,
)

from composer_shear.data.prep import prepare_domains  # noqa: E402
from composer_shear.data.reference_loss import evaluate_domain_losses  # noqa: E402
from composer_shear.demo import CPT_YAML, DEFAULT_CORPUS, PRUNE_YAML  # noqa: E402
from composer_shear.downstream.data import build_eval_data  # noqa: E402
from composer_shear.downstream.evaluate import downstream_score  # noqa: E402
from composer_shear.export import oneshot  # noqa: E402
from composer_shear.export.units import compare_kept_units, read_kept_units  # noqa: E402
from composer_shear.families import get_family  # noqa: E402
from composer_shear.launch import (  # noqa: E402
    check_hf_dir,
    llmfoundry_train,
    mapping_override,
    subprocess_environment,
)
from composer_shear.pruning.algorithm import TargetedPruning  # noqa: E402
from composer_shear.report.metrics import export_gap as metrics_export_gap  # noqa: E402
from composer_shear.report.metrics import read_metrics  # noqa: E402
from composer_shear.weights.smollm2 import materialize_smollm2  # noqa: E402

# `kd: true` methods train with the KD variants of the two recipes (teacher: the source model).
PRUNE_KD_YAML = PRUNE_YAML.with_name("prune_kd.yaml")
CPT_KD_YAML = CPT_YAML.with_name("cpt_kd.yaml")
ROUTES = ("learned", "maskonly", "oneshot", "scratch")
PRUNING_ROUTES = ("learned", "maskonly")
ALGORITHM_KEY = "algorithms.targeted_pruning."

# Options quality.yaml's issue-31 methods use that are being added to composer_shear. A method
# that needs one this checkout lacks is refused before anything runs, with this reason; the
# tests accept these (and only these) as missing, so a typo still fails them.
PENDING_OPTIONS: dict[str, str] = {}  # options a method needs that are not built yet


class MethodUnavailable(RuntimeError):
    """A method of the settings needs an option this composer_shear does not have."""


def load_settings(path: Path = SETTINGS) -> dict[str, Any]:
    """The settings, with the target shape read from the pruning recipe unless they give one."""
    cfg = read_settings(path)
    cfg.setdefault("target_shape", recipe_target(PRUNE_YAML))
    return cfg


@dataclass(frozen=True)
class Bench:
    """What every cell of one budget shares: settings, folders, source model, data, reference."""

    out: Path
    cfg: dict[str, Any]
    source: Path
    data: Path
    reference: dict[str, float]
    tasks: Path | None = None

    @property
    def tokens_per_step(self) -> int:
        """Training tokens per optimizer step (the recipes' batch x sequence length)."""
        return self.cfg["global_batch_size"] * self.cfg["max_seq_len"]


@dataclass(frozen=True)
class Cell:
    """One method, one seed, one budget: its steps split between pruning and CPT.

    ``budget`` is the budget's step count before the method's ``steps_factor`` (it picks the
    evaluation interval, so that a method run at another's compute evaluates as often).
    """

    name: str
    spec: dict[str, Any]
    seed: int
    budget: int
    prune_steps: int
    cpt_steps: int

    @property
    def route(self) -> str:
        """``learned``, ``maskonly``, ``oneshot`` or ``scratch``."""
        return self.spec["route"]

    @property
    def kd(self) -> bool:
        """Whether both stages train with the KD recipes (a separate teacher)."""
        return bool(self.spec.get("kd", False))

    def run_dir(self, bench: Bench) -> Path:
        """The folder of this cell's models, logs and metrics."""
        return bench.out / "runs" / f"{self.name}-s{self.seed}"


def plan_cell(cfg: Mapping[str, Any], name: str, seed: int, budget_steps: int) -> Cell:
    """A method's cell at a budget: ``steps_factor`` applied, then the pruning/CPT split.

    Raises:
        ValueError: An unknown route, or a mask-only stage that leaves no CPT step.
    """
    spec = cfg["methods"][name]
    route = spec.get("route")
    if route not in ROUTES:
        raise ValueError(f"{name}: route must be one of {ROUTES}, got {route!r}")
    steps = round(budget_steps * float(spec.get("steps_factor", 1.0)))
    if route == "maskonly":
        if spec.get("kd"):
            raise ValueError(f"{name}: a mask-only stage distils through `objective: kd`")
        prune_steps = int(spec["prune_steps"])
        if not 0 < prune_steps < steps:
            raise ValueError(
                f"{name}: {prune_steps} mask-only steps leave no CPT step at {steps} steps"
            )
    elif route == "learned":
        prune_steps = round(steps * float(spec.get("prune_fraction", cfg["prune_fraction"])))
    else:
        prune_steps = 0
    return Cell(name, spec, seed, budget_steps, prune_steps, steps - prune_steps)


def prepare(out: Path, cfg: dict[str, Any]) -> tuple[Path, Path, dict[str, float]]:
    """SmolLM2, the tokenized corpus and the source model's losses (cached in ``out``)."""
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
    """Per-domain eval loss of a HF model on the benchmark's eval samples."""
    return evaluate_domain_losses(
        model_dir, data, cfg["domains"], cfg["max_seq_len"], 8, cfg["eval_samples"]
    )


def flop_params(model_dir: Path) -> int:
    """Parameters a token's matmuls pass through: all but the embedding lookup (lm_head kept)."""
    config = AutoConfig.from_pretrained(model_dir)
    total = get_family(config).shape(config).num_params()
    if config.tie_word_embeddings:
        return total  # one matrix: looked up for free, multiplied as lm_head
    return total - config.vocab_size * config.hidden_size


def downstream_record(model_dir: Path, tasks: Path) -> dict[str, Any]:
    """Mean downstream accuracy (LLM Foundry ICL, see README) and the per-task results."""
    mean, per_task = downstream_score(model_dir, tasks, batch_size=16)
    return {"mean": list(mean), "per_task": {k: list(v) for k, v in per_task.items()}}


def prepare_downstream(out: Path, source: Path, items: int) -> tuple[Path, dict[str, Any]]:
    """Seeded ICL subsets of the default tasks (cached in ``out``) and the source's scores."""
    tasks = out / f"downstream_data_{items}"
    if not (tasks / "manifest.json").exists():
        build_eval_data(tasks, items=items, seed=17, overwrite=True, tokenizer=source)
    ref_path = out / f"source_downstream_{items}.json"
    if not ref_path.exists():
        ref_path.write_text(json.dumps(downstream_record(source, tasks), indent=2))
    return tasks, json.loads(ref_path.read_text())


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


def maskonly_overrides(cfg: Mapping[str, Any], cell: Cell) -> list[str]:
    """A mask-only stage's recipe overrides: the shared settings, objective, gate lr, landing.

    Landing: the gates are hardened at the start of the stage's last step (``harden_at:
    last``, the default), so the cut is taken where the gates ended, and the run logs how far
    the expected shape was from the target there. Hardening earlier would spend the remaining
    steps on a model in which nothing trains any more.
    """
    shared = cfg.get("maskonly") or {}
    objective = cell.spec.get("objective", "lm")
    objectives = shared.get("objectives") or {"lm": []}
    if objective not in objectives:
        raise ValueError(f"{cell.name}: objective must be one of {sorted(objectives)}")
    harden_at = cell.spec.get("harden_at", "last")
    if harden_at == "last":
        harden_at = f"{cell.prune_steps - 1}ba"
    overrides = [*shared.get("prune", []), *objectives[objective]]
    if "gate_lr" in cell.spec:
        overrides.append(f"{ALGORITHM_KEY}gate_lr={cell.spec['gate_lr']}")
    return [*overrides, f"{ALGORITHM_KEY}harden_at={harden_at}"]


def unknown_overrides(recipe: Path, overrides: list[str]) -> list[str]:
    """Keys of ``overrides`` that neither ``targeted_pruning`` nor the recipe knows.

    A ``targeted_pruning`` key must be a parameter of :class:`TargetedPruning` (the recipe
    need not write it); any other key must exist in the recipe.
    """
    parameters = inspect.signature(TargetedPruning).parameters
    written = OmegaConf.load(recipe)
    unknown = []
    for override in overrides:
        key = override.split("=", 1)[0]
        if key.startswith(ALGORITHM_KEY):
            # target_shape.hidden_size: the parameter is target_shape
            if key.removeprefix(ALGORITHM_KEY).split(".")[0] not in parameters:
                unknown.append(key)
        elif OmegaConf.select(written, key) is None:
            unknown.append(key)
    return unknown


def oneshot_cli_error(args: list[str]) -> str | None:
    """Why ``composer-shear prune-oneshot SOURCE OUT *args`` would be refused, or None."""
    parser = argparse.ArgumentParser(prog="composer-shear")
    oneshot.register_cli(parser.add_subparsers())
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            parser.parse_args(["prune-oneshot", "SOURCE", "OUT", *args])
    except SystemExit:
        return stderr.getvalue().strip().splitlines()[-1]
    return None


def method_problems(cfg: Mapping[str, Any], name: str, steps: int) -> dict[str, str]:
    """What stops a method from running here: option (or ``plan``) -> why; empty if nothing."""
    try:
        cell = plan_cell(cfg, name, seed=RECIPE_SEED, budget_steps=steps)
    except (ValueError, KeyError) as error:
        return {"plan": str(error)}
    problems: dict[str, str] = {}
    if cell.route in PRUNING_ROUTES:
        for recipe, overrides in (
            (PRUNE_KD_YAML if cell.kd else PRUNE_YAML, prune_overrides(cfg, cell)),
            (CPT_KD_YAML if cell.kd else CPT_YAML, list(cell.spec.get("cpt", []))),
        ):
            for key in unknown_overrides(recipe, overrides):
                problems[key] = f"{key} is not an option of {recipe.name} or targeted_pruning"
        return problems
    if cell.route == "oneshot" and "units_from" not in cell.spec:
        importance = cell.spec.get("importance", "activation")
        error = oneshot_cli_error(["--method", importance])
        if error:
            problems[f"prune-oneshot --method {importance}"] = error
        if "layer_score" in cell.spec:
            error = oneshot_cli_error(["--layer-score", str(cell.spec["layer_score"])])
            if error:
                problems["prune-oneshot --layer-score"] = error
    return problems


def check_methods(cfg: Mapping[str, Any], methods: list[str], steps: int) -> None:
    """Refuses the run, before anything starts, if any method cannot run here.

    Raises:
        MethodUnavailable: Names every method, the option it needs and why.
    """
    lines = []
    for name in methods:
        for key, why in method_problems(cfg, name, steps).items():
            pending = PENDING_OPTIONS.get(key)
            reason = f" ({pending}: not in this composer_shear yet)" if pending else ""
            # A plan error names its method itself.
            lines.append(f"  {why}" if key == "plan" else f"  {name}: {why}{reason}")
    if lines:
        raise MethodUnavailable("these methods cannot run here:\n" + "\n".join(lines))


def stage_overrides(bench: Bench, cell: Cell) -> list[str]:
    """Overrides both stages of a cell share: folders, evaluation, reference losses, seed."""
    return [
        f"variables.data_dir={bench.data}",
        f"variables.run_dir={cell.run_dir(bench)}",
        f"variables.max_seq_len={bench.cfg['max_seq_len']}",
        f"variables.update_interval={update_interval(bench.cfg, cell.budget)}ba",
        mapping_override(
            "variables.target_loss", {d: bench.reference[d] for d in bench.cfg["domains"]}
        ),
        f"seed={cell.seed}",
    ]


def prune_overrides(cfg: Mapping[str, Any], cell: Cell) -> list[str]:
    """The pruning stage's overrides of its recipe that come from the settings and the seed."""
    overrides = [
        f"variables.steps={cell.prune_steps}",
        f"{ALGORITHM_KEY}init_tokens={cfg['calibration_tokens']}",
        *target_overrides(cfg),
        *seed_overrides(cell.seed, "prune"),
    ]
    if cell.route == "maskonly":
        overrides += maskonly_overrides(cfg, cell)
    return [*overrides, *cell.spec.get("prune", [])]


def run_pruning(bench: Bench, cell: Cell) -> Path:
    """The learned or mask-only pruning stage (a ``llmfoundry train`` job); its export."""
    run_dir = cell.run_dir(bench)
    log(f"  [{cell.name}] {cell.route} pruning {cell.prune_steps} steps")
    llmfoundry_train(
        PRUNE_KD_YAML if cell.kd else PRUNE_YAML,
        [
            f"variables.model_dir={bench.source}",
            *stage_overrides(bench, cell),
            *prune_overrides(bench.cfg, cell),
        ],
        run_dir / "logs" / "prune.log",
    )
    return run_dir / "models" / "pruned"


def oneshot_args(
    cfg: Mapping[str, Any], importance: str, seed: int, units: Path | None = None,
    layer_score: str | None = None,
) -> list[str]:  # fmt: skip
    """``prune-oneshot`` options after SOURCE OUT for the settings' calibration and target."""
    shape = ",".join(f"{k}={v}" for k, v in cfg["target_shape"].items())
    args = [
        "--max-seq-len", str(cfg["max_seq_len"]), "--calibration-tokens",
        str(cfg["calibration_tokens"]), "--method", importance, "--seed", str(seed),
        "--target-shape", shape,
    ]  # fmt: skip
    if units is not None:
        args += ["--units", str(units)]
    if layer_score is not None:
        args += ["--layer-score", layer_score]
    return args


def oneshot_cut(
    source: Path, out_dir: Path, data: Path, cfg: Mapping[str, Any], importance: str, seed: int,
    log_file: Path, units: Path | None = None, layer_score: str | None = None,
) -> None:  # fmt: skip
    """``composer-shear prune-oneshot`` of the source to the target shape, as a user runs it.

    With ``units`` (a pruned model directory), the cut keeps exactly that model's units.
    """
    cmd = [
        str(Path(sys.executable).parent / "composer-shear"), "prune-oneshot", str(source),
        str(out_dir), "--data", str(data), *oneshot_args(cfg, importance, seed, units, layer_score),
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=subprocess_environment(), cwd=REPO
    )
    log_file.parent.mkdir(parents=True, exist_ok=True)
    log_file.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"prune-oneshot failed:\n{proc.stderr[-3000:]}")


def cell_settings(cfg: Mapping[str, Any], cell: Cell) -> dict[str, Any]:
    """The settings a cell's one-shot cut uses: a method may give its own ``target_shape``.

    E.g. the shape a search picked at the same parameter budget (``oneshot_searched``).
    """
    return {**cfg, "target_shape": dict(cell.spec.get("target_shape", cfg["target_shape"]))}


def run_oneshot(bench: Bench, cell: Cell) -> Path:
    """The one-shot cut of a oneshot or scratch cell (scratch: a random cut, reinitialised)."""
    run_dir = cell.run_dir(bench)
    importance = "random" if cell.route == "scratch" else cell.spec.get("importance", "activation")
    units_dir = None
    if "units_from" in cell.spec:
        # Another method's export of the same seed: its unit choice, cut from the source.
        units_dir = bench.out / "runs" / f"{cell.spec['units_from']}-s{cell.seed}" / "models"
        units_dir /= "pruned"
        if not units_dir.is_dir():
            raise FileNotFoundError(
                f"{cell.name} cuts the units of {cell.spec['units_from']} (seed {cell.seed}): "
                f"run that method at this budget first ({units_dir} is missing)"
            )
    choice = f"units of {cell.spec['units_from']}" if units_dir else importance
    log(f"  [{cell.name}] one-shot ({choice}) cut")
    pruned = run_dir / "models" / "pruned"
    oneshot_cut(
        bench.source, pruned, bench.data, cell_settings(bench.cfg, cell), importance, cell.seed,
        run_dir / "logs" / "oneshot.log", units_dir, cell.spec.get("layer_score"),
    )  # fmt: skip
    return pruned


def landing(metrics_file: Path) -> tuple[dict[str, float], dict[str, float] | None]:
    """Per pruned dimension, the largest per-row distance of the expected keep from the target.

    Returns:
        At the end of pruning (the last ``pruning/<dim>/max_row_deviation_units`` logged), and
        at the hardening batch (``pruning/hardening/<dim>/...``; None if never hardened).
    """
    last = last_metrics(metrics_file, "pruning/")
    suffix = "/max_row_deviation_units"
    at_end = {
        key.split("/")[1]: value
        for key, value in last.items()
        if key.endswith(suffix) and not key.startswith("pruning/hardening/")
    }
    hardening = {
        key.split("/")[2]: value
        for key, value in last.items()
        if key.startswith("pruning/hardening/") and key.endswith(suffix)
    }
    return at_end, hardening or None


def pruning_record(
    bench: Bench, cell: Cell, pruned: Path, before: dict[str, float]
) -> dict[str, Any]:
    """A pruning stage's landing, hardening deviation, export gap and units shared with one-shot."""
    prune_metrics = cell.run_dir(bench) / "metrics" / "prune.jsonl"
    at_end, hardening = landing(prune_metrics)
    gap = metrics_export_gap(read_metrics(prune_metrics), before, bench.cfg["domains"])
    return {
        "landing": at_end,
        "hardening": hardening,
        "export_gap": None if gap is None else gap[0] - gap[1],
        "units_shared_with_oneshot": units_shared_with_oneshot(
            pruned, cell.run_dir(bench), bench.source, bench.data, bench.cfg, cell.seed
        ),
    }


def run_cpt(bench: Bench, cell: Cell, pruned: Path) -> Path:
    """Continued pre-training of the pruned model (a ``llmfoundry train`` job); its final model."""
    log(f"  [{cell.name}] continued pre-training {cell.cpt_steps} steps")
    overrides = [
        f"variables.model_dir={pruned}",
        f"variables.steps={cell.cpt_steps}",
        *stage_overrides(bench, cell),
        *seed_overrides(cell.seed, "cpt"),
    ]
    if cell.route == "scratch":
        overrides.append("model.pretrained=false")
    if cell.kd:
        overrides.append(f"variables.teacher_dir={bench.source}")
    llmfoundry_train(
        CPT_KD_YAML if cell.kd else CPT_YAML,
        [*overrides, *cell.spec.get("cpt", [])],
        cell.run_dir(bench) / "logs" / "cpt.log",
    )
    return cell.run_dir(bench) / "models" / "cpt" / "huggingface" / "final"


def calibration_tokens(cfg: Mapping[str, Any], cell: Cell) -> int:
    """Calibration tokens a cell's unit choice costs (a random or transplanted cut: none)."""
    # A transplanted unit choice calibrates nothing here (its own pruning run is not counted).
    random_cut = (
        cell.route == "scratch"
        or cell.spec.get("importance") == "random"
        or "units_from" in cell.spec
    )
    return 0 if random_cut else int(cfg["calibration_tokens"])


def cell_flops_per_token(cfg: Mapping[str, Any], cell: Cell) -> dict[str, float]:
    """A cell's compute per token in multiples of N (``quality_tables.flops_per_token``).

    A learned pruning step trains the weights (6 N); a mask-only step runs the forward and
    the activations' gradients through the frozen network but no weight-gradient GEMMs (4 N),
    plus a teacher forward (2 N) with the distillation objective. Calibration costs what the
    settings' ``calibration_flops`` give per importance (a forward for activations; Taylor
    adds the backward to the activations), the largest of the method's scores.
    """
    teacher = 2.0 if cell.kd else 0.0
    prune = {"learned": 6.0 + teacher, "maskonly": 4.0}.get(cell.route, 0.0)
    if cell.route == "maskonly" and cell.spec.get("objective", "lm") == "kd":
        prune += 2.0
    per_token = cfg.get("calibration_flops") or {}
    if cell.route == "oneshot":
        scores = [cell.spec.get("importance", "activation"), cell.spec.get("layer_score")]
    else:  # the pruning routes' importance init
        scores = ["activation"]
    calibration = max(float(per_token.get(score, 2.0)) for score in scores if score)
    return {"prune": prune, "calibration": calibration, "cpt": 6.0, "cpt_teacher": teacher}


def cell_record(bench: Bench, cell: Cell, **fields: Any) -> dict[str, Any]:
    """A cell's result record: identity, tokens, compute counting, machine, then ``fields``."""
    return {
        "method": cell.name,
        "label": cell.spec.get("label", cell.name),
        "route": cell.route,
        "seed": cell.seed,
        "steps": {"prune": cell.prune_steps, "cpt": cell.cpt_steps},
        "kd": cell.kd,
        "tokens": {
            "prune": cell.prune_steps * bench.tokens_per_step,
            "cpt": cell.cpt_steps * bench.tokens_per_step,
        },
        "calibration_tokens": calibration_tokens(bench.cfg, cell),
        "flops_per_token": cell_flops_per_token(bench.cfg, cell),
        "machine": machine_record(),
        **fields,
    }


def run_method(
    bench: Bench,
    name: str,
    seed: int,
    steps: int,
    prune_only: bool = False,
    pruned_record: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Runs one method end to end at a budget of ``steps``; returns its result record.

    With ``prune_only``, stops after the pruning stage (or the one-shot cut) and returns the
    model before CPT: its losses, landing, export gap, the units it shares with the one-shot
    cut (pruning routes) and the compute spent so far.

    With ``pruned_record`` (the cell's ``--prune-only`` record, its pruned model still in
    ``OUT``), CPT starts from that model and the record's pruning-stage figures are kept: the
    pruning stage is deterministic, so this only saves running it twice.
    """
    cell = plan_cell(bench.cfg, name, seed, steps)
    run_dir = cell.run_dir(bench)
    stage_keys = ("landing", "hardening", "export_gap", "units_shared_with_oneshot")
    if pruned_record is not None:
        pruned = run_dir / "models" / "pruned"
        check_hf_dir(pruned)
        shutil.rmtree(run_dir / "models" / "cpt", ignore_errors=True)
        times = {"prune": pruned_record["seconds"]["prune"]}
        before = pruned_record["before_cpt"]
        stage = {key: pruned_record.get(key) for key in stage_keys}
    else:
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        start = time.perf_counter()
        route = cell.route in PRUNING_ROUTES
        pruned = run_pruning(bench, cell) if route else run_oneshot(bench, cell)
        times = {"prune": time.perf_counter() - start}
        check_hf_dir(pruned)
        before = None if cell.route == "scratch" else evaluate(pruned, bench.data, bench.cfg)
        stage = dict.fromkeys(stage_keys)  # a one-shot cut shares all its units with itself
        if cell.route in PRUNING_ROUTES:
            stage = pruning_record(bench, cell, pruned, before)
    flops = {"source": flop_params(bench.source), "target": flop_params(pruned)}
    if prune_only:
        record = cell_record(bench, cell, before_cpt=before, flop_params=flops, **stage)
        record["prune_flops"] = point_flops(record, record["tokens"]["prune"])
        return {**record, "seconds": times}

    start = time.perf_counter()
    final_dir = run_cpt(bench, cell, pruned)
    times["cpt"] = time.perf_counter() - start
    after = evaluate(final_dir, bench.data, bench.cfg)
    downstream = None if bench.tasks is None else downstream_record(final_dir, bench.tasks)
    curve = [
        ((cell.prune_steps + step) * bench.tokens_per_step, loss)
        for step, loss in eval_curve(run_dir / "metrics" / "cpt.jsonl", bench.cfg["domains"])
    ]
    if before is not None:
        start_tokens = cell.prune_steps * bench.tokens_per_step
        curve.insert(0, (start_tokens, statistics.fmean(before.values())))
    # Keep the record, drop the checkpoints (tens of MB each).
    shutil.rmtree(run_dir / "models" / "cpt", ignore_errors=True)
    record = cell_record(
        bench, cell, before_cpt=before, after_cpt=after, curve=curve, seconds=times,
        flop_params=flops, downstream=downstream, **stage,
    )  # fmt: skip
    record["train_flops"] = point_flops(record, sum(record["tokens"].values()))
    if pruned_record is not None:
        record["pruning_stage_from"] = "prune_only"
    return record


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


def run_cells(
    bench: Bench, folder: Path, seeds: list[int], methods: list[str], steps: int,
    args: argparse.Namespace,
) -> None:  # fmt: skip
    """Runs every pending cell into ``folder``, rewriting the tables after each.

    ``args`` gives ``force``, ``prune_only`` and ``downstream`` (the command line's).
    """
    for seed, name, path in pending_cells(folder, seeds, methods, args.force):
        label = bench.cfg["methods"][name].get("label", name)
        log(f"{name} (seed {seed}): {'pruning stage only' if args.prune_only else label}")
        pruned_record = None
        reusable = folder / "prune_only" / path.name
        if args.reuse_pruning and not args.prune_only and reusable.is_file():
            pruned_record = json.loads(reusable.read_text())
            log(f"  [{name}] CPT from the pruned model of {reusable}")
        record = run_method(
            bench, name, seed, steps, prune_only=args.prune_only, pruned_record=pruned_record
        )
        path.write_text(json.dumps(record, indent=2))
        if args.prune_only:
            write_prune_only(folder)
            continue
        mean = statistics.fmean(record["after_cpt"].values())
        log(f"  [{name}] mean eval loss after CPT {mean:.3f} "
            f"({sum(record['seconds'].values()) / 60:.1f} min)")  # fmt: skip
        write_budget(folder, bench.cfg, args.downstream)
        write_curve(RESULTS_ROOT, bench.cfg)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", default=str(SETTINGS), help="default: %(default)s")
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
        "--table-only",
        action="store_true",
        help="rewrite this budget's table and plot from finished results (quality_tables.py)",
    )
    parser.add_argument(
        "--curve", action="store_true", help="only write the cross-budget curve (quality_tables.py)"
    )
    parser.add_argument(
        "--prune-only",
        action="store_true",
        help="stop each method before CPT: the pruned model's losses, landing and the units it "
        "shares with the one-shot cut (RESULTS/prune_only/)",
    )
    parser.add_argument(
        "--reuse-pruning",
        action="store_true",
        help="a cell run with --prune-only before (its record in RESULTS/prune_only/, its "
        "pruned model still in OUT) goes on to CPT from that model instead of pruning again",
    )
    parser.add_argument(
        "--downstream",
        type=int,
        metavar="ITEMS",
        help="also score every final model on the default downstream tasks, ITEMS per task",
    )
    args = parser.parse_args()

    cfg = load_settings(Path(args.settings))
    if args.curve:
        log(write_curve(RESULTS_ROOT, cfg))
        return 0
    steps = args.steps or cfg["budgets"][args.budget]
    results = Path(args.results or RESULTS_ROOT / f"{steps}steps")
    if args.table_only:
        log(write_budget(results, cfg, args.downstream))
        return 0
    methods = args.methods or list(cfg["methods"])
    unknown = sorted(set(methods) - set(cfg["methods"]))
    if unknown:
        parser.error(f"unknown methods {unknown}; known: {list(cfg['methods'])}")
    try:
        check_methods(cfg, methods, steps)
    except MethodUnavailable as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out = Path(args.out or REPO / "runs" / "bench_quality" / (f"{steps}steps"))
    out.mkdir(parents=True, exist_ok=True)
    results.mkdir(parents=True, exist_ok=True)
    seeds = args.seeds or cfg["seeds"]
    log(f"bench_quality: {steps} steps x {cfg['global_batch_size']} x {cfg['max_seq_len']} "
        f"tokens per method; methods {methods}; seeds {seeds}; results {results}")  # fmt: skip
    source, data, reference = prepare(out, cfg)
    (results / "source_losses.json").write_text(json.dumps(reference, indent=2))
    bench = Bench(out, cfg, source, data, reference)
    if args.downstream:
        tasks, source_down = prepare_downstream(out, source, args.downstream)
        (results / f"source_downstream_{args.downstream}.json").write_text(
            json.dumps(source_down, indent=2)
        )
        bench = Bench(out, cfg, source, data, reference, tasks)
    started = time.perf_counter()
    if args.prune_only:
        folder = results / "prune_only"
        folder.mkdir(exist_ok=True)
        run_cells(bench, folder, seeds, methods, steps, args)
        log("\n" + write_prune_only(folder))
        return 0
    run_cells(bench, results, seeds, methods, steps, args)
    log("\n" + write_budget(results, cfg, args.downstream))
    log(f"\ntotal {(time.perf_counter() - started) / 60:.1f} min; table {results / 'table.md'}, "
        f"plot {results / 'quality.png'}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
