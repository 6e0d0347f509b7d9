"""Metrics recording and run reports.

Two halves:

* :class:`JSONLMetricsLogger`, a Composer logger destination that writes every ``log_metrics``
  call as one JSON line. Registered in LLM Foundry's ``loggers`` registry as ``jsonl_metrics``::

      loggers:
        jsonl_metrics:
          path: RUN/metrics/prune.jsonl

* :func:`build_report`, which turns a run folder (see :func:`build_report` for the layout) into
  ``RUN/report/report.md`` plus PNG plots, and the ``composer-shear report RUN_DIR`` command.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from composer.loggers import LoggerDestination
from composer.utils import dist, format_name_with_dist

if TYPE_CHECKING:
    from composer.core import State
    from composer.loggers import Logger
    from matplotlib.figure import Figure

    from composer_shear.shape import ModelShape

log = logging.getLogger(__name__)

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

# Short, domain-neutral continuations: enough to see whether a pruned model still writes text.
DEFAULT_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, there was a",
)
MODEL_ORDER = ("source", "pruned", "cpt")
STEP_LABEL = "training step (batches)"
MODEL_LABELS = {"source": "source", "pruned": "pruned (before CPT)", "cpt": "after CPT"}
LOSS_COLUMNS = ("source", "pruned", "cpt", "reference")
LOSS_LABELS = {**MODEL_LABELS, "reference": "reference"}
PRUNING_DIMS = ("layers", "kv_heads", "heads", "intermediate", "hidden")
DIM_LABELS = {
    "layers": "layers",
    "kv_heads": "kv heads",
    "heads": "attention heads",
    "intermediate": "MLP intermediate",
    "hidden": "hidden size",
}


# ============================================================================ JSONL logger


def _to_float(value: Any) -> float | None:
    """A logged value as a float, or None when it is not a single number."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, numbers.Real):
        return float(value)
    # Tensors and numpy arrays: accept exactly one element (Composer logs losses as shape (1,)).
    numel = getattr(value, "numel", None) or getattr(value, "size", None)
    try:
        count = numel() if callable(numel) else numel
        if count == 1 and hasattr(value, "reshape"):
            flat = value.reshape(-1)[0]
            flat = flat.detach() if hasattr(flat, "detach") else flat
            return float(flat.item() if hasattr(flat, "item") else flat)
    except (TypeError, ValueError, RuntimeError):
        return None
    return None


def _json_number(value: float) -> float | None:
    # NaN/inf are not JSON; null keeps every line parseable by strict readers (jq, JS).
    return value if math.isfinite(value) else None


def _json_safe(value: Any, depth: int = 0) -> Any:
    """A JSON-serialisable copy of ``value`` (unknown objects become strings)."""
    if depth > 20:
        return str(value)
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        return _json_number(value)
    if isinstance(value, Mapping):
        try:
            items = list(value.items())
        except Exception:  # an OmegaConf node with a broken interpolation, for example
            return str(value)
        return {str(k): _json_safe(v, depth + 1) for k, v in items}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_json_safe(v, depth + 1) for v in value]
    if isinstance(value, Path):
        return str(value)
    number = _to_float(value)
    if number is not None:
        return _json_number(number)
    if hasattr(value, "items") and callable(value.items):
        return _json_safe(dict(value.items()), depth + 1)
    if hasattr(value, "__iter__") and not isinstance(value, (bytes, bytearray)):
        try:
            return [_json_safe(v, depth + 1) for v in value]
        except Exception:
            return str(value)
    return str(value)


class JSONLMetricsLogger(LoggerDestination):
    """Writes every ``log_metrics`` call as one JSON line (global rank 0 only).

    Lines look like ``{"step": 12, "metrics": {"loss/train/total": 3.1, ...}}``; ``step`` is
    the batch count Composer passes. Values that are not a single number are skipped and
    non-finite numbers are written as ``null``. Hyperparameters are merged and written as
    ``{"hyperparameters": {...}}`` before the next metrics line (so each key appears once;
    keys Composer logs later, such as enabled algorithms at fit start, come in a second such
    line). Lines written before ``Event.INIT`` (when ``{run_name}`` is not yet known) are
    queued and written when the file opens.

    Args:
        path: File to write. May contain ``{run_name}`` (and Composer's dist fields such as
            ``{rank}``). Parent folders are created.
        flush_interval: Flush the file every this many lines.
        overwrite: Start a fresh file (default); ``False`` appends, e.g. on autoresume.
    """

    def __init__(self, path: str, flush_interval: int = 1, overwrite: bool = True) -> None:
        if flush_interval < 1:
            raise ValueError(f"flush_interval must be >= 1, got {flush_interval}.")
        self.path_format = str(path)
        self.flush_interval = int(flush_interval)
        self.overwrite = overwrite
        self.path: Path | None = None
        self._run_name: str | None = None
        self._state: State | None = None
        self._file: IO[str] | None = None
        self._queue: list[str] = []
        self._pending_hparams: dict[str, Any] = {}
        self._unflushed = 0
        self._opened_once = False

    # -- Composer hooks -----------------------------------------------------------------------

    def init(self, state: State, logger: Logger) -> None:
        """Opens the file once the run name is known."""
        del logger
        self._state = state
        self._run_name = state.run_name
        if dist.get_global_rank() == 0:
            self._open()

    def log_hyperparameters(self, hyperparameters: dict[str, Any]) -> None:
        """Merges hyperparameters; written as one line before the next metrics line."""
        if dist.get_global_rank() != 0:
            return
        self._pending_hparams.update(_json_safe(dict(hyperparameters)))

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """Writes one ``{"step", "metrics"}`` line with the numeric values of ``metrics``."""
        if dist.get_global_rank() != 0:
            return
        values: dict[str, float | None] = {}
        for name, value in metrics.items():
            number = _to_float(value)
            if number is not None:
                values[str(name)] = _json_number(number)
        if not values:
            return
        if step is None and self._state is not None:
            step = int(self._state.timestamp.batch)
        self._write_hparams()
        self._write({"step": None if step is None else int(step), "metrics": values})

    def eval_end(self, state: State, logger: Logger) -> None:
        """Eval metrics are rare and valuable: flush them at once."""
        del state, logger
        self._flush()

    def fit_end(self, state: State, logger: Logger) -> None:
        """Flushes everything written so far."""
        del state, logger
        self._write_hparams()
        self._flush()

    def close(self, state: State, logger: Logger) -> None:
        """Writes what is pending and closes the file."""
        del state, logger
        self._close()

    def post_close(self) -> None:
        """Closes the file if ``close`` did not (it is idempotent)."""
        self._close()

    # -- file handling ------------------------------------------------------------------------

    def _open(self) -> None:
        if self._file is not None:
            return
        self.path = Path(format_name_with_dist(self.path_format, run_name=self._run_name or "run"))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # A second open in the same process (after close, e.g. another fit) must not truncate.
        mode = "w" if self.overwrite and not self._opened_once else "a"
        self._file = open(self.path, mode, encoding="utf-8")  # noqa: SIM115 - kept open
        self._opened_once = True
        for line in self._queue:
            self._file.write(line)
        self._queue.clear()
        self._flush()

    def _write_hparams(self) -> None:
        if self._pending_hparams:
            hparams, self._pending_hparams = self._pending_hparams, {}
            self._write({"hyperparameters": hparams})

    def _write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, allow_nan=False) + "\n"
        if self._file is None and (self._run_name is not None or "{" not in self.path_format):
            self._open()
        if self._file is None:
            self._queue.append(line)  # path still needs the run name
            return
        self._file.write(line)
        self._unflushed += 1
        if self._unflushed >= self.flush_interval:
            self._flush()

    def _flush(self) -> None:
        if self._file is not None:
            self._file.flush()
            self._unflushed = 0

    def _close(self) -> None:
        if dist.get_global_rank() != 0:
            return
        if self._pending_hparams or self._queue:
            self._write_hparams()
            self._open()
        if self._file is not None:
            self._file.close()
            self._file = None


# ============================================================================ reading a run


@dataclass
class MetricsLog:
    """The contents of one :class:`JSONLMetricsLogger` file.

    Attributes:
        series: Metric name -> {step: value}. A step logged twice (autoresume) keeps the last.
        hyperparameters: All hyperparameter lines merged.
        bad_lines: Lines that were not valid JSON records (a run killed mid-write).
    """

    series: dict[str, dict[int, float]] = field(default_factory=dict)
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    bad_lines: int = 0

    def has(self, name: str) -> bool:
        """Whether ``name`` was logged at least once."""
        return bool(self.series.get(name))

    def get(self, name: str) -> tuple[list[int], list[float]]:
        """Steps and values of ``name``, sorted by step (empty lists if never logged)."""
        points = sorted(self.series.get(name, {}).items())
        return [s for s, _ in points], [v for _, v in points]

    def last(self, name: str) -> float | None:
        """The value at the latest step, or None."""
        _, values = self.get(name)
        return values[-1] if values else None

    def first(self, name: str) -> float | None:
        """The value at the earliest step, or None."""
        _, values = self.get(name)
        return values[0] if values else None

    def last_step(self) -> int | None:
        """The largest step logged."""
        steps = [s for points in self.series.values() for s in points]
        return max(steps) if steps else None

    def suffixes(self, prefix: str) -> list[str]:
        """Names under ``prefix`` with the prefix removed, in first-logged order."""
        return [name[len(prefix) :] for name in self.series if name.startswith(prefix)]


def read_metrics(path: str | Path) -> MetricsLog | None:
    """Reads a :class:`JSONLMetricsLogger` file; None if it does not exist."""
    path = Path(path)
    if not path.is_file():
        return None
    out = MetricsLog()
    with path.open(encoding="utf-8") as f:
        for raw in f:
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except json.JSONDecodeError:
                out.bad_lines += 1
                continue
            if not isinstance(record, dict):
                out.bad_lines += 1
            elif isinstance(record.get("hyperparameters"), dict):
                out.hyperparameters.update(record["hyperparameters"])
            elif isinstance(record.get("metrics"), dict) and record.get("step") is not None:
                step = int(record["step"])
                for name, value in record["metrics"].items():
                    number = math.nan if value is None else float(value)
                    out.series.setdefault(name, {})[step] = number
            else:
                out.bad_lines += 1
    return out


@dataclass
class ModelInfo:
    """Shape and size of one Hugging Face model directory.

    Attributes:
        name: Role in the run (``source``, ``pruned``, ``cpt``).
        path: The directory.
        shape: Its :class:`~composer_shear.shape.ModelShape`.
        num_params: Total parameter count.
        num_non_embedding_params: Parameters outside embedding and lm_head.
    """

    name: str
    path: Path
    shape: ModelShape
    num_params: int
    num_non_embedding_params: int


def describe_model(name: str, path: str | Path) -> ModelInfo:
    """Reads a model directory's config and counts its parameters (no weights are loaded)."""
    from transformers import AutoConfig

    from composer_shear.adapters import get_adapter
    from composer_shear.shape import ModelShape

    config = AutoConfig.from_pretrained(str(path))
    shape = ModelShape.from_config(config, get_adapter(config).bias_layout(config))
    return ModelInfo(name, Path(path), shape, shape.num_params(), shape.num_non_embedding_params())


# ============================================================================ generations


def _fingerprint(path: Path) -> list[list[Any]]:
    """Names, sizes and mtimes of a model's weights and config: changes when it is rewritten."""
    if not path.is_dir():
        return []
    files = sorted(
        p
        for p in path.iterdir()
        if p.suffix in {".safetensors", ".bin", ".json"} and p.name != "generations.json"
    )
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def generate_samples(
    model_dirs: Mapping[str, str | Path],
    prompts: Sequence[str] = DEFAULT_PROMPTS,
    max_new_tokens: int = 24,
) -> dict[str, Any]:
    """Greedy continuations of ``prompts`` from each model (CPU, fp32).

    Args:
        model_dirs: Role (e.g. ``source``) -> Hugging Face directory with a tokenizer.
        prompts: Plain-text prompts (no chat template: the models are compared as LMs).
        max_new_tokens: Tokens generated per prompt.

    Returns:
        ``{"prompts": [...], "max_new_tokens": n, "models": {role: {"path", "fingerprint",
        "completions": [...]}}, "errors": {role: message}}``; a model that fails to load or
        generate is reported under ``errors`` instead of raising.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result: dict[str, Any] = {
        "prompts": list(prompts),
        "max_new_tokens": int(max_new_tokens),
        "models": {},
        "errors": {},
    }
    for name, directory in model_dirs.items():
        directory = Path(directory)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(directory))
            model = AutoModelForCausalLM.from_pretrained(str(directory), torch_dtype=torch.float32)
            model.eval()
            gen_config = model.generation_config
            # Greedy decoding; clear sampling knobs a chat checkpoint may ship (avoids warnings).
            gen_config.do_sample = False
            gen_config.temperature = gen_config.top_p = gen_config.top_k = None
            pad_id = tokenizer.pad_token_id
            if pad_id is None:
                pad_id = tokenizer.eos_token_id
            completions = []
            for prompt in prompts:
                encoded = tokenizer(prompt, return_tensors="pt")
                with torch.no_grad():
                    output = model.generate(
                        # Only these two: some tokenizers add token_type_ids, which Llama rejects.
                        input_ids=encoded["input_ids"],
                        attention_mask=encoded["attention_mask"],
                        generation_config=gen_config,
                        max_new_tokens=max_new_tokens,
                        pad_token_id=pad_id,
                    )
                new_tokens = output[0, encoded["input_ids"].shape[1] :]
                completions.append(tokenizer.decode(new_tokens, skip_special_tokens=True))
            result["models"][name] = {
                "path": str(directory),
                "fingerprint": _fingerprint(directory),
                "completions": completions,
            }
            del model
        except Exception as e:  # one broken model must not cost the whole report
            log.warning("Generation with %s (%s) failed: %s", name, directory, e)
            result["errors"][name] = f"{type(e).__name__}: {e}"
    return result


def _cached_generations(
    cache: Path, model_dirs: Mapping[str, Path], prompts: Sequence[str], max_new_tokens: int
) -> dict[str, Any] | None:
    """The cached generations if they were made from the same models and prompts."""
    try:
        data = json.loads(cache.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if data.get("prompts") != list(prompts) or data.get("max_new_tokens") != max_new_tokens:
        return None
    models = data.get("models", {})
    for name, directory in model_dirs.items():
        entry = models.get(name)
        if entry is None or entry.get("fingerprint") != _fingerprint(directory):
            return None
    return data


# ============================================================================ plots


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


def _dims(metrics: MetricsLog, suffix: str) -> list[str]:
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
    dims = _dims(metrics, "expected_sparsity")
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
        set(_dims(metrics, "lambda_1")) | set(_dims(metrics, "lambda_2")),
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
        values = [_loss(losses, column, d) for d in domains]
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


# ============================================================================ markdown


def _loss(losses: Mapping[str, Any], column: str, domain: str) -> float | None:
    table = losses.get(column)
    if not isinstance(table, Mapping):
        return None
    value = table.get(domain)
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


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
            values = [_loss(run.losses, column, d) for d in run.domains]
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
            value = _loss(run.losses, column, domain)
            sums[column].append(value)
            row.append(_fmt(value))
        if has_delta:
            before, after = _loss(run.losses, "pruned", domain), _loss(run.losses, "cpt", domain)
            delta = None if before is None or after is None else after - before
            deltas[domain] = delta
            row.append(_fmt(delta, signed=True))
        if has_excess:
            after, ref = _loss(run.losses, "cpt", domain), _loss(run.losses, "reference", domain)
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


def _pruning_section(run: _Run) -> list[str]:
    m = run.prune
    if m is None:
        return ["## Pruning outcome", "", "_No `metrics/prune.jsonl` in this run._", ""]
    dims = _dims(m, "expected_sparsity")
    if not dims:
        return ["## Pruning outcome", "", "_`metrics/prune.jsonl` has no pruning metrics._", ""]
    rows = []
    for dim in dims:
        rows.append(
            [
                DIM_LABELS.get(dim, dim),
                _fmt(m.last(f"pruning/{dim}/target_sparsity")),
                _fmt(m.last(f"pruning/{dim}/expected_sparsity")),
                _fmt(m.last(f"pruning/{dim}/lambda_1"), 4),
                _fmt(m.last(f"pruning/{dim}/lambda_2"), 4),
            ]
        )
    lines = [
        "## Pruning outcome",
        "",
        f"Values at the last pruning step ({m.last_step()}).",
        "",
        _table(["dimension", "target sparsity", "expected sparsity", "λ1", "λ2"], rows),
        "",
    ]
    expected, target = m.last("pruning/expected_num_params"), m.last("pruning/target_num_params")
    if expected is not None and target is not None:
        lines += [
            f"Expected model size {_fmt_params(expected)} vs target {_fmt_params(target)} "
            "(from the gates' keep probabilities).",
            "",
        ]
    return lines


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
    rows = [[f"`{k}`", f"`{json.dumps(_json_safe(v))}`"] for k, v in _flatten(settings)]
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
    data = _cached_generations(cache, run.model_dirs, prompts, 24)
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


# ============================================================================ CLI


def _run_cli(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        print(f"composer-shear report: no such run folder: {run_dir}")
        return 1
    print(build_report(run_dir, generations=not args.no_generations))
    return 0


def register_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Adds the ``report`` subcommand to an ``argparse`` subparsers object."""
    parser = subparsers.add_parser(
        "report",
        help="write RUN_DIR/report/report.md with tables, plots and sample generations",
        description=(
            "Turn a run folder (run.json, metrics/*.jsonl, eval/losses.json, model "
            "directories) into RUN_DIR/report/report.md plus PNG plots. Prints the path."
        ),
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run folder")
    parser.add_argument(
        "--no-generations",
        action="store_true",
        help="do not load models to generate samples (a cached generations.json is still used)",
    )
    parser.set_defaults(func=_run_cli)
    return parser
