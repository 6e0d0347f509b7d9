"""Downstream accuracy of a Hugging Face directory with LLM Foundry's own ICL evaluators.

:func:`evaluate_downstream` runs what ``llmfoundry eval`` runs for ``icl_tasks`` --
``llmfoundry.utils.builders.build_icl_evaluators`` (LLM Foundry's ICL datasets and metrics),
``build_composer_model('hf_causal_lm', ...)`` and Composer's ``Trainer.eval`` -- and returns
accuracy, standard error and the number of items per task. The scoring is therefore LLM
Foundry's: multiple choice and schema tasks pick the choice with the lowest per-token
perplexity of its continuation tokens; language modelling needs every continuation token
right under greedy decoding; generation is exact match of the normalised output.

Two things differ from a plain ``llmfoundry eval`` call, both for CPU runs:

* LLM Foundry pads every sequence of a task to ``max_seq_len``. Each task here gets the
  smallest length that holds its longest prompt + continuation with this model's tokenizer
  (measured by building the task's own LLM Foundry dataset first), rounded up to a multiple of
  8 and capped at the model's context. Nothing is truncated unless a prompt is longer than
  the cap (then LLM Foundry cuts it from the left, as it always does; a warning says so).
* The copies of the data files LLM Foundry makes go to a temporary folder, not the working
  directory, and progress is printed per task.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from composer_shear.downstream.data import EvalDataError, load_icl_tasks
from composer_shear.downstream.lengths import context_limit, tight_max_seq_lens
from composer_shear.downstream.tasks import TASKS
from composer_shear.interface import ModelPathError, model_path, positive_int, progress

__all__ = [
    "HARNESS",
    "TaskResult",
    "chance_levels",
    "downstream_score",
    "evaluate_downstream",
    "mean_accuracy",
    "read_results",
    "register_cli",
    "results_table",
    "write_results",
]

log = logging.getLogger(__name__)

# Metric per ICL task type, as LLM Foundry's build_icl_evaluators assigns them by default.
_METRICS = {
    "multiple_choice": "InContextLearningMultipleChoiceAccuracy",
    "schema": "InContextLearningMultipleChoiceAccuracy",
    "language_modeling": "InContextLearningLMAccuracy",
    "generation_task_with_answers": "InContextLearningGenerationExactMatchAccuracy",
}
HARNESS = (
    "LLM Foundry 0.22 ICL evaluators (build_icl_evaluators + Composer Trainer.eval): "
    "multiple choice / schema by lowest per-token perplexity of the continuation, "
    "LAMBADA by greedy exact match of every continuation token"
)


class TaskResult(NamedTuple):
    """Accuracy on one task.

    Attributes:
        accuracy: Fraction of items scored correct.
        stderr: Standard error of ``accuracy``, ``sqrt(p (1 - p) / (n - 1))`` (the sample
            standard deviation of the 0/1 scores over ``sqrt(n)``); 0 for ``n <= 1``.
        n: Number of items scored.
    """

    accuracy: float
    stderr: float
    n: int

    @classmethod
    def from_counts(cls, correct: float, total: float) -> TaskResult:
        """The result of ``correct`` right answers out of ``total`` items."""
        n = round(total)
        if n <= 0:
            return cls(float("nan"), float("nan"), 0)
        p = correct / total
        return cls(p, math.sqrt(p * (1.0 - p) / (n - 1)) if n > 1 else 0.0, n)


def chance_levels() -> dict[str, float]:
    """Accuracy of guessing for every known task (for the tables' chance column)."""
    return {name: spec.chance for name, spec in TASKS.items()}


def mean_accuracy(results: Mapping[str, TaskResult]) -> TaskResult:
    """The unweighted mean accuracy over tasks (the paper's "average"), with its standard error.

    The tasks' items are independent, so the variance of the mean is the sum of the tasks'
    variances over the number of tasks squared.

    Args:
        results: Per-task results, e.g. from :func:`evaluate_downstream`.

    Returns:
        ``TaskResult(mean accuracy, its standard error, total items over all tasks)``.
    """
    values = [r for r in results.values() if r.n > 0]
    if not values:
        return TaskResult(float("nan"), float("nan"), 0)
    k = len(values)
    mean = sum(r.accuracy for r in values) / k
    stderr = math.sqrt(sum(r.stderr**2 for r in values)) / k
    return TaskResult(mean, stderr, sum(r.n for r in values))


def results_table(
    columns: Mapping[str, Mapping[str, TaskResult]],
    tasks: Sequence[str] | None = None,
    chance: Mapping[str, float] | None = None,
) -> str:
    """A Markdown table of accuracies: one row per task, one column per model, plus the mean.

    Args:
        columns: ``{column title: {task: result}}``.
        tasks: Row order (default: the tasks of the first column, in its order).
        chance: Accuracy of guessing per task, shown in its own column when given.

    Returns:
        Markdown; each cell ``accuracy ± stderr``, the item count in its own column (``a/b``
        when the models scored different numbers of items). The mean row is the unweighted
        mean over tasks with its standard error; a model without every task has none.
    """
    titles = list(columns)
    if tasks is None:
        tasks = list(next(iter(columns.values()), {}))
    header = "| task | n | " + ("chance | " if chance is not None else "") + " | ".join(titles)
    lines = [header + " |", "|---|---:|" + ("---:|" if chance is not None else "")]
    lines[-1] += "---:|" * len(titles)

    def cell(result: TaskResult | None, bold: bool = False) -> str:
        if result is None or result.n == 0:
            return "n/a"
        text = f"{result.accuracy:.3f} ± {result.stderr:.3f}"
        return f"**{text}**" if bold else text

    for task in tasks:
        row = [columns[t].get(task) for t in titles]
        counts = [str(r.n) for r in row if r is not None]
        n = counts[0] if len(set(counts)) == 1 else "/".join(counts)
        guess = []
        if chance is not None:
            guess = [f"{chance[task]:.2f}" if task in chance else ""]
        lines.append("| " + " | ".join([task, n, *guess, *(cell(r) for r in row)]) + " |")
    # A mean over another set of tasks would not be comparable: n/a unless a column has all.
    means = [
        mean_accuracy({t: columns[c][t] for t in tasks})
        if all(t in columns[c] for t in tasks)
        else None
        for c in titles
    ]
    mean_chance = []
    if chance is not None:
        known = [chance[t] for t in tasks if t in chance]
        mean_chance = [f"{sum(known) / len(known):.2f}" if len(known) == len(tasks) else ""]
    lines.append(
        "| "
        + " | ".join(
            [f"**mean of {len(tasks)}**", "", *mean_chance, *(cell(m, True) for m in means)]
        )
        + " |"
    )
    return "\n".join(lines)


def write_results(
    path: str | Path, results: Mapping[str, Mapping[str, TaskResult]], **extra: Any
) -> None:
    """Writes per-model results as JSON (the format :func:`read_results` reads).

    Args:
        path: The JSON file.
        results: ``{model: {task: TaskResult}}``.
        **extra: Further top-level keys (what was evaluated, timings).
    """
    data = {
        "harness": HARNESS,
        "models": {
            model: {task: r._asdict() for task, r in per_task.items()}
            for model, per_task in results.items()
        },
        **extra,
    }
    Path(path).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def read_results(data: Mapping[str, Any]) -> dict[str, dict[str, TaskResult]]:
    """``{model: {task: TaskResult}}`` from the parsed JSON of :func:`write_results`.

    Raises:
        ValueError: the data does not have that layout.
    """
    try:
        return {
            model: {
                task: TaskResult(float(r["accuracy"]), float(r["stderr"]), int(r["n"]))
                for task, r in per_task.items()
            }
            for model, per_task in data["models"].items()
        }
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"not a downstream results file ({type(e).__name__}: {e})") from e


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


def _check_weights(hf_model: Any, model_dir: Path) -> None:
    """Checks that the model LLM Foundry built holds exactly the weights of ``model_dir``.

    LLM Foundry loads with ``from_pretrained``, which fills a missing tensor with random
    values and only warns (it also warns, harmlessly, about ``lm_head`` of tied models). A
    downstream number of a partly random model would look like a bad pruning result, so every
    tensor in the safetensors files is compared with the built model's, and a tensor the files
    lack must be tied to one they have.
    """
    import torch
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        log.warning("%s has no safetensors files; its loaded weights are not checked.", model_dir)
        return
    params = dict(hf_model.named_parameters(remove_duplicate=False))
    buffers = dict(hf_model.named_buffers())
    seen = set()
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                tensor = params.get(name, buffers.get(name))
                if tensor is None:
                    raise EvalDataError(f"{file}: tensor {name} is not a parameter of the model.")
                stored = f.get_tensor(name).to(tensor.dtype)
                if not torch.equal(tensor.detach().cpu(), stored):
                    raise EvalDataError(f"{file}: tensor {name} differs from the loaded model.")
                seen.add(name)
    pointers = {params[name].data_ptr() for name in seen if name in params}
    missing = [n for n, p in params.items() if n not in seen and p.data_ptr() not in pointers]
    if missing:
        raise EvalDataError(
            f"{model_dir}: parameters {missing[:5]} are not in its safetensors files; the model "
            "would be scored with random values there. Re-export the model."
        )


def _progress_callback(interval_s: float) -> Any:
    from composer.core import Callback, State
    from composer.loggers import Logger

    class Progress(Callback):
        """A bar per evaluator on a terminal; else a line at most every ``interval_s`` seconds."""

        def __init__(self) -> None:
            self.started = self.last = 0.0
            self.bar: Any = None

        def eval_start(self, state: State, logger: Logger) -> None:
            self.started = self.last = time.perf_counter()
            total = state.dataloader_len  # a Time in batches, or None
            self.bar = progress(
                desc=str(state.dataloader_label),
                total=int(total) if total is not None else None,
                unit="batch",
            )

        def eval_batch_end(self, state: State, logger: Logger) -> None:
            if not self.bar.disable:
                self.bar.update()
                return
            now = time.perf_counter()
            if now - self.last >= interval_s:
                self.last = now
                done = int(state.eval_timestamp.batch)
                total = state.dataloader_len
                print(
                    f"    {state.dataloader_label}: batch {done}/"
                    f"{int(total) if total is not None else '?'}, "
                    f"{now - self.started:.0f}s",
                    flush=True,
                )

        def eval_end(self, state: State, logger: Logger) -> None:
            self.bar.close()

    return Progress()


def evaluate_downstream(
    model_dir: str | Path,
    tasks: str | Path,
    batch_size: int = 8,
    max_seq_len: int | None = None,
    precision: str | None = None,
    labels: Sequence[str] | None = None,
    verbose: bool = True,
    progress_interval_s: float = 30.0,
) -> dict[str, TaskResult]:
    """Accuracy of a Hugging Face causal LM on ICL tasks, scored by LLM Foundry.

    Args:
        model_dir: A Hugging Face directory (config, weights, tokenizer), e.g. an export.
        tasks: An ``icl_tasks`` YAML or a folder written by ``composer-shear eval-data``
            (checked first: a missing or damaged file is an error naming it and the fix).
        batch_size: Sequences per forward pass (LLM Foundry's ``device_eval_batch_size``;
            a multiple-choice item counts once per choice).
        max_seq_len: Upper bound of every task's sequence length. Default: the model's
            ``max_position_embeddings``. Each task uses the smallest multiple of 8 that holds
            its longest sequence with this model's tokenizer, up to this bound (a
            ``max_seq_len`` in the YAML is replaced by that).
        precision: Composer precision; default ``amp_bf16`` on a GPU, ``fp32`` on CPU.
        labels: Only these task labels (default: every task of the YAML).
        verbose: Print one line per task (and progress every ``progress_interval_s``).
        progress_interval_s: Seconds between progress lines within a task.

    Returns:
        ``{task: TaskResult(accuracy, stderr, n)}`` in YAML order; a task evaluated at several
        shot counts appears as ``<label>/<k>-shot``; a task with ``has_categories`` (MMLU)
        pools the items of all its categories.

    Raises:
        EvalDataError: missing or damaged evaluation files.
        KeyError: a requested label is not in the YAML.
    """
    import torch
    from composer.trainer import Trainer
    from composer.utils import dist
    from llmfoundry.utils.builders import (
        build_composer_model,
        build_icl_evaluators,
        build_tokenizer,
    )

    model_dir = Path(model_dir)
    entries = load_icl_tasks(tasks)
    if labels is not None:
        known = {e["label"] for e in entries}
        unknown = [label for label in labels if label not in known]
        if unknown:
            raise KeyError(f"tasks {unknown} are not in {tasks} (it has {sorted(known)})")
        entries = [e for e in entries if e["label"] in set(labels)]
    model_dir = Path(model_path(model_dir))
    if not (model_dir / "config.json").is_file():
        raise EvalDataError(f"{model_dir} is not a Hugging Face model directory (no config.json).")
    cap = max_seq_len or context_limit(model_dir) or 2048
    if precision is None:
        precision = "amp_bf16" if torch.cuda.is_available() else "fp32"

    started = time.perf_counter()
    tokenizer = build_tokenizer(str(model_dir), {})
    with tempfile.TemporaryDirectory(prefix="composer_shear_icl_") as scratch:
        lengths = tight_max_seq_lens(entries, tokenizer, cap)
        icl_tasks = [{**e, "max_seq_len": lengths[e["label"]]} for e in entries]
        evaluators, _ = build_icl_evaluators(
            icl_tasks,
            tokenizer,
            default_max_seq_len=cap,
            default_batch_size=batch_size,
            destination_dir=scratch,
        )
        model = build_composer_model(
            name="hf_causal_lm",
            cfg={"pretrained_model_name_or_path": str(model_dir), "pretrained": True},
            tokenizer=tokenizer,
        )
        _check_weights(model.model, model_dir)
        trainer = Trainer(
            model=model,
            precision=precision,
            callbacks=[_progress_callback(progress_interval_s)] if verbose else [],
            progress_bar=False,
            log_to_console=False,
            loggers=[],
            # Nothing here is random (few-shot draws have their own seed, decoding is
            # greedy); a fixed seed keeps Composer from drawing and printing one.
            seed=17,
        )
        if verbose:
            print(
                f"  {model_dir.name}: {len(entries)} task(s), precision {precision}, "
                f"sequence lengths {lengths}",
                flush=True,
            )
        # An evaluator's label is "<label>/<k>-shot", or "<label>/<k>-shot/<category>" for
        # tasks with has_categories; results are pooled per task (and shot count).
        keys = []
        for evaluator in evaluators:
            name, shot = evaluator.label.split("/")[:2]
            several = len(next(e for e in entries if e["label"] == name)["num_fewshot"]) > 1
            keys.append(f"{name}/{shot}" if several else name)
        pooled: dict[str, list[float]] = {}
        try:
            for i, (evaluator, key) in enumerate(zip(evaluators, keys, strict=True)):
                task_started = time.perf_counter()
                trainer.eval(eval_dataloader=evaluator, subset_num_batches=-1)
                metric = next(iter(trainer.state.eval_metrics[evaluator.label].values()))
                # The metric's state is this rank's share (torchmetrics restores the local
                # state after its synced compute); sum it over ranks under a launcher.
                counts = torch.tensor([float(metric.correct), float(metric.total)])
                counts = trainer.state.device.tensor_to_device(counts)  # NCCL needs the GPU
                dist.all_reduce(counts)
                sums = pooled.setdefault(key, [0.0, 0.0, 0.0])
                sums[0] += float(counts[0])
                sums[1] += float(counts[1])
                sums[2] += time.perf_counter() - task_started
                if verbose and key not in keys[i + 1 :]:
                    result = TaskResult.from_counts(sums[0], sums[1])
                    print(
                        f"    {key}: {result.accuracy:.3f} ± {result.stderr:.3f} "
                        f"(n={result.n}, {lengths[key.split('/')[0]]} tokens, {sums[2]:.0f}s)",
                        flush=True,
                    )
        finally:
            trainer.close()
    results = {key: TaskResult.from_counts(sums[0], sums[1]) for key, sums in pooled.items()}
    if verbose:
        mean = mean_accuracy(results)
        print(
            f"  {model_dir.name}: mean {mean.accuracy:.3f} ± {mean.stderr:.3f} over "
            f"{len(results)} task(s) in {time.perf_counter() - started:.0f}s",
            flush=True,
        )
    return results


def downstream_score(
    model_dir: str | Path, tasks: str | Path, **kwargs: Any
) -> tuple[TaskResult, dict[str, TaskResult]]:
    """Mean downstream accuracy of one model: a single number for benchmark tables.

    Args:
        model_dir: A Hugging Face directory.
        tasks: A folder from ``composer-shear eval-data`` (or an ``icl_tasks`` YAML).
        **kwargs: Passed to :func:`evaluate_downstream` (``batch_size``, ``labels``, ...).

    Returns:
        ``(mean, per_task)``: the unweighted mean over tasks as a :class:`TaskResult`
        (accuracy, its standard error, items over all tasks) and the per-task results.
    """
    per_task = evaluate_downstream(model_dir, tasks, **kwargs)
    return mean_accuracy(per_task), per_task


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def _run_cli(args: argparse.Namespace) -> int:
    try:
        results = evaluate_downstream(
            args.model,
            args.tasks,
            batch_size=args.batch_size,
            max_seq_len=args.max_seq_len,
            precision=args.precision,
            labels=args.only,
        )
    except (EvalDataError, KeyError, ModelPathError) as e:
        # A KeyError's str() is its message in quotes.
        print(f"error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 1
    name = Path(args.model).name
    print(results_table({name: results}, chance=chance_levels()))
    if args.out:
        write_results(args.out, {name: results}, model_dir=str(args.model), tasks=str(args.tasks))
        print(f"Wrote {args.out}")
    return 0


def register_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Adds ``composer-shear downstream``."""
    parser = subparsers.add_parser(
        "downstream",
        help="downstream accuracy of a Hugging Face model (LLM Foundry's ICL evaluators)",
        description=(
            "Scores a Hugging Face directory on the ICL tasks written by `composer-shear "
            "eval-data` (or any LLM Foundry icl_tasks YAML) with LLM Foundry's own "
            "evaluators; prints accuracy ± standard error and the item count per task."
        ),
    )
    parser.add_argument("model", help="Hugging Face model directory")
    parser.add_argument(
        "tasks", help="folder from `composer-shear eval-data`, or an icl_tasks YAML"
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=8, help="sequences per forward pass"
    )
    parser.add_argument(
        "--max-seq-len",
        type=positive_int,
        default=None,
        help="upper bound of the per-task lengths (default: the model's context)",
    )
    parser.add_argument(
        "--precision",
        default=None,
        help="Composer precision (default: fp32 on CPU, amp_bf16 on GPU)",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        default=None,
        metavar="TASK",
        help="evaluate only these task labels (default: every task)",
    )
    parser.add_argument("--out", default=None, help="also write the results as JSON")
    parser.set_defaults(func=_run_cli)
    return parser
