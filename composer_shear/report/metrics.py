"""Recording metrics: the ``jsonl_metrics`` Composer logger, and reading its files back.

:class:`JSONLMetricsLogger` is a Composer logger destination that writes every
``log_metrics`` call as one JSON line. Registered in LLM Foundry's ``loggers`` registry as
``jsonl_metrics``::

    loggers:
      jsonl_metrics:
        path: RUN/metrics/prune.jsonl

:func:`read_metrics` reads such a file into a :class:`MetricsLog`.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from composer.loggers import LoggerDestination
from composer.utils import dist, format_name_with_dist

from composer_shear.data.descriptors import bound_open_files
from composer_shear.output_paths import OutputPathError, check_output_file

if TYPE_CHECKING:
    from composer.core import State
    from composer.loggers import Logger


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


def json_safe(value: Any, depth: int = 0) -> Any:
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
        return {str(k): json_safe(v, depth + 1) for k, v in items}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [json_safe(v, depth + 1) for v in value]
    if isinstance(value, Path):
        return str(value)
    number = _to_float(value)
    if number is not None:
        return _json_number(number)
    if hasattr(value, "items") and callable(value.items):
        return json_safe(dict(value.items()), depth + 1)
    if hasattr(value, "__iter__") and not isinstance(value, (bytes, bytearray)):
        try:
            return [json_safe(v, depth + 1) for v in value]
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

    Resumption: the file opens at ``INIT`` for appending, before Composer loads a checkpoint,
    so nothing an earlier run wrote is lost if the job dies before training. At ``FIT_START``
    (after any load) the file is rewritten once, atomically: a run resumed at batch ``n``
    (autoresume or ``load_path``) keeps the earlier lines up to the end of batch ``n`` and
    drops the later ones, which it is about to log again (each metric once per step, no
    duplicates); a fresh run (batch 0) keeps only its own lines.

    Args:
        path: File to write. May contain ``{run_name}`` (and Composer's dist fields such as
            ``{rank}``). Parent folders are created; a path that cannot be written stops the
            run at ``Event.INIT``, before training.
        flush_interval: Flush the file every this many lines.
        overwrite: ``True`` (default): as above. ``False``: never drop a line (every run
            appends whatever it logs, duplicated steps included).
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
        # Bytes of the file written before this run opened it (reconciled at FIT_START).
        self._previous_bytes: int | None = None
        bound_open_files()  # before LLM Foundry builds the job's Streaming datasets

    # -- Composer hooks -----------------------------------------------------------------------

    def init(self, state: State, logger: Logger) -> None:
        """Checks the path and opens the file once the run name is known (before training).

        Raises:
            OutputPathError: The file cannot be written (on every rank, naming the YAML key).
        """
        del logger
        self._state = state
        self._run_name = state.run_name
        problem = None
        if dist.get_global_rank() == 0:
            try:
                check_output_file(self._resolved_path(), "loggers.jsonl_metrics.path")
                self._open()
            except OutputPathError as e:
                problem = str(e)
            except OSError as e:
                problem = f"loggers.jsonl_metrics.path: cannot open {self._resolved_path()}: {e}"
        status = [problem]
        dist.broadcast_object_list(status, src=0)
        if status[0] is not None:
            raise OutputPathError(status[0])

    def fit_start(self, state: State, logger: Logger) -> None:
        """Drops what an earlier run logged after this run's start step (see the class doc)."""
        del logger
        if dist.get_global_rank() != 0 or self._previous_bytes is None or self.path is None:
            return
        previous, self._previous_bytes = self._previous_bytes, None
        if not self.overwrite or previous == 0:
            return
        start = int(state.timestamp.batch)
        self._flush()
        data = self.path.read_bytes()
        kept = []
        if start > 0:
            for raw in data[:previous].decode("utf-8", errors="replace").splitlines():
                try:
                    record = json.loads(raw)
                    step, names = record.get("step"), record.get("metrics") or {}
                except (json.JSONDecodeError, AttributeError):
                    continue  # a line cut off when the earlier run died
                # The file is chronological. Composer logs `time/batch` first in every batch,
                # at the step before the batch counts (so do its train losses): the batch after
                # the checkpoint starts at the first such line of step `start`, and this run
                # logs it and everything after again.
                if step is not None and (step > start or (step == start and "time/batch" in names)):
                    break
                kept.append(raw + "\n")
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        tmp.write_bytes("".join(kept).encode("utf-8") + data[previous:])
        assert self._file is not None
        self._file.close()
        os.replace(tmp, self.path)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open

    def log_hyperparameters(self, hyperparameters: dict[str, Any]) -> None:
        """Merges hyperparameters; written as one line before the next metrics line."""
        if dist.get_global_rank() != 0:
            return
        self._pending_hparams.update(json_safe(dict(hyperparameters)))

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

    def _resolved_path(self) -> Path:
        return Path(format_name_with_dist(self.path_format, run_name=self._run_name or "run"))

    def _open(self) -> None:
        if self._file is not None:
            return
        self.path = self._resolved_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self._opened_once:
            # Never truncated here: FIT_START decides what of an earlier run's lines to keep.
            self._previous_bytes = self.path.stat().st_size if self.path.is_file() else 0
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open
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


def export_gap(
    prune: MetricsLog | None, exported: Mapping[str, Any] | None, domains: Sequence[str]
) -> tuple[float, float] | None:
    """``(exported mean loss, last in-run pruning eval mean)`` over ``domains``, or None.

    The in-run evaluation is the last ``metrics/eval/<domain>/LanguageCrossEntropy`` of the
    pruning run; ``exported`` holds the exported model's loss per domain on the same samples.
    Their difference is the *export gap*: what cutting to exactly the target shape cost.
    """
    if prune is None or not exported or not domains:
        return None
    in_run = [prune.last(f"metrics/eval/{d}/LanguageCrossEntropy") for d in domains]
    cut = [_to_float(exported.get(d)) for d in domains]
    if any(v is None for v in in_run + cut):
        return None
    return sum(cut) / len(cut), sum(in_run) / len(in_run)
