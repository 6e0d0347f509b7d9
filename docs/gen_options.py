"""Writes ``docs/options.md`` from the code: every YAML option and every CLI option.

The YAML tables come from the signatures (names, types, defaults) and the Google-style
``Args:`` sections (meanings) of the registered components; the command tables come from the
``composer-shear`` argparse parser (arguments, defaults, choices, help). Nothing here repeats
an option by hand, so a renamed or added option reaches the docs by rerunning::

    python docs/gen_options.py          # rewrite docs/options.md
    python docs/gen_options.py --check  # exit 1 if docs/options.md is out of date

``tests/test_docs.py`` runs the check. A parameter without an ``Args:`` entry (or an entry
without a parameter) is an error: the docstring is the documentation.
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from composer_shear.callbacks.dynamic_batch_loading import DynamicBatchLoading
from composer_shear.callbacks.pruned_hf_export import PrunedHFExport
from composer_shear.cli import build_parser
from composer_shear.data import builder
from composer_shear.data.mixer import MultiDomainDataset
from composer_shear.distillation import KnowledgeDistillation
from composer_shear.export.oneshot_job import OneshotPruning
from composer_shear.pruning import TargetedPruning
from composer_shear.report.metrics import JSONLMetricsLogger
from composer_shear.shape import TARGET_KEYS

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "options.md"

# Sections of a Google docstring that end an ``Args:`` block.
SECTION = re.compile(r"^(Args|Arguments|Returns|Yields|Raises|Example|Examples|Note|Notes):\s*$")
# Sphinx roles (:mod:`x`, :func:`~a.b`) become plain code spans in Markdown.
ROLE = re.compile(r":(?:mod|func|class|meth|attr|data|obj):`~?([^`]+)`")


class DocError(ValueError):
    """A component's docstring does not document its signature."""


@dataclass
class Option:
    """One row of an options table."""

    name: str
    type: str
    default: str
    meaning: str


def markdown(text: str) -> str:
    """RST inline markup of a docstring as one Markdown table cell."""
    text = ROLE.sub(lambda m: f"``{m.group(1)}``", text)
    text = text.replace("``", "`")
    return " ".join(text.split()).replace("|", "\\|")


def args_section(doc: str | None) -> dict[str, str]:
    """The ``Args:`` entries of a Google-style docstring, ``{name: text}`` in order.

    Raises:
        DocError: The docstring has no ``Args:`` section.
    """
    lines = inspect.cleandoc(doc or "").splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() in {"Args:", "Arguments:"})
    except StopIteration:
        raise DocError("no Args: section") from None
    base = len(lines[start]) - len(lines[start].lstrip())
    entries: dict[str, list[str]] = {}
    current: list[str] | None = None
    entry_indent = None
    for line in lines[start + 1 :]:
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        if indent <= base or SECTION.match(line.strip()):
            break
        if entry_indent is None:
            entry_indent = indent
        if indent == entry_indent:
            name, _, text = line.strip().partition(":")
            current = entries.setdefault(name.strip().lstrip("*").split(" ")[0], [])
            current.append(text.strip())
        elif current is not None:
            current.append(line.strip())
    return {name: " ".join(parts) for name, parts in entries.items()}


def summary(doc: str | None) -> str:
    """First paragraph of a docstring, as one line."""
    return markdown(inspect.cleandoc(doc or "").split("\n\n")[0])


def yaml_value(value: Any) -> str:
    """A Python default as it is written in YAML."""
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, (list, tuple)):
        return "`[" + ", ".join(str(v) for v in value) + "]`"
    return f"`{value}`"


def type_name(annotation: Any) -> str:
    """An annotation as written in the source (``from __future__ import annotations``)."""
    if annotation is inspect.Parameter.empty:
        return ""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    return f"`{text}`".replace("|", "\\|")


def options_of(
    target: Callable[..., Any],
    skip: Iterable[str] = (),
    only: Iterable[str] | None = None,
    defaults: dict[str, str] | None = None,
) -> list[Option]:
    """Rows for the parameters of ``target`` (a class or a function).

    Args:
        target: The component; its signature gives names, types and defaults, its docstring's
            ``Args:`` section the meanings (a class's own docstring, Google style).
        skip: Parameters that are not YAML keys (filled in by LLM Foundry).
        only: If given, just these parameters (in signature order).
        defaults: Defaults the caller applies instead of the signature's.

    Raises:
        DocError: A parameter has no ``Args:`` entry, or an entry names no parameter.
    """
    where = f"{target.__module__}.{target.__qualname__}"
    try:
        docs = args_section(target.__doc__)
    except DocError as err:
        raise DocError(f"{where}: {err}") from None
    params = inspect.signature(target).parameters
    named = {
        n: p
        for n, p in params.items()
        if p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
    }
    stray = set(docs) - set(params)
    if stray:
        raise DocError(f"{where}: Args: documents {sorted(stray)}, not in the signature")
    keep = set(only) if only is not None else set(named)
    rows = []
    for name, param in named.items():
        if name in skip or name not in keep:
            continue
        if name not in docs:
            raise DocError(f"{where}: parameter {name!r} has no Args: entry")
        if defaults and name in defaults:
            default = defaults[name]
        elif param.default is inspect.Parameter.empty:
            default = "required"
        else:
            default = yaml_value(param.default)
        rows.append(Option(name, type_name(param.annotation), default, markdown(docs[name])))
    return rows


def table(rows: list[Option]) -> list[str]:
    """A Markdown options table."""
    out = ["| key | type | default | meaning |", "|---|---|---|---|"]
    out += [f"| `{r.name}` | {r.type} | {r.default} | {r.meaning} |" for r in rows]
    return out


def component(title: str, target: Any, rows: list[Option], note: str = "") -> list[str]:
    """One YAML component's section: where it is defined, what it does, its table."""
    where = f"{target.__module__}.{target.__qualname__}"
    out = [f"## {title}", "", f"`{where}`: {summary(target.__doc__)}", ""]
    if note:
        out += [note, ""]
    return [*out, *table(rows), ""]


def cli_default(action: argparse.Action) -> str:
    """An argparse default for the table (repository paths relative, flags as flags)."""
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return "flag"
    if action.default is None or action.default is argparse.SUPPRESS:
        return "required" if action.required else ""
    value = action.default
    if isinstance(value, Path) or (isinstance(value, str) and value.startswith(str(REPO))):
        value = Path(value)
        value = value.relative_to(REPO) if value.is_relative_to(REPO) else value
    if isinstance(value, (list, tuple)):
        return "`" + " ".join(str(v) for v in value) + "`"
    return f"`{value}`"


def cli_section(parser: argparse.ArgumentParser) -> list[str]:
    """One table per ``composer-shear`` subcommand, in the parser's order."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {a.dest: a.help for a in sub._choices_actions}
    out = ["## `composer-shear` commands", ""]
    out += ["| command | what |", "|---|---|"]
    out += [
        f"| [`{n}`](#composer-shear-{n}) | {markdown(helps.get(n) or '')} |" for n in sub.choices
    ]
    out.append("")
    for name, sp in sub.choices.items():
        out += [
            f"### `composer-shear {name}`",
            "",
            markdown(sp.description or helps.get(name) or ""),
            "",
        ]
        out += ["| argument | default | help |", "|---|---|---|"]
        for action in sp._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if action.option_strings:
                arg = ", ".join(f"`{o}`" for o in action.option_strings)
                if action.nargs in ("+", "*"):
                    arg += " (one or more)" if action.nargs == "+" else " (any number)"
            else:
                arg = f"`{(action.metavar or action.dest).upper()}`"
            text = markdown(action.help or "")
            if action.choices:
                choices = ", ".join(f"`{c}`" for c in action.choices)
                text += ("; " if text else "") + f"choices: {choices}"
            out.append(f"| {arg} | {cli_default(action)} | {text} |")
        out.append("")
    return out


def render() -> str:
    """The whole of ``docs/options.md``."""
    out = [
        "# Every option",
        "",
        "<!-- Generated by `python docs/gen_options.py` from the signatures and docstrings;",
        "     do not edit by hand: tests/test_docs.py fails when this file is out of date. -->",
        "",
        "Every YAML key of the components this package registers with LLM Foundry, and every",
        "`composer-shear` command. Types and defaults are the code's (`null` = YAML null);",
        "how the options fit together is in [the tutorial](tutorial.md), the recipes that set",
        "them in [recipes.md](recipes.md).",
        "",
    ]
    out += component(
        "`algorithms: targeted_pruning`",
        TargetedPruning,
        options_of(TargetedPruning),
        "`target_shape` takes any of "
        + ", ".join(f"`{k}`" for k in TARGET_KEYS)
        + " (`head_dim` only to restate the source's: it is never pruned); omitted dimensions "
        "are kept and every dimension that shrinks gets its gates. "
        "Bad targets (larger than the source, heads not divisible by kv heads, a changed "
        "`head_dim`, zero sizes, unknown keys, a target equal to the source) stop the run at "
        "`INIT`, before the first step. Logged every step: "
        "`pruning/<dim>/{expected_sparsity,max_row_deviation,max_row_deviation_units,"
        "target_sparsity,lambda_1,lambda_2,lagrangian}` per pruned dimension (`layers`, "
        "`kv_heads`, `heads`, `intermediate`, `hidden`), `pruning/expected_num_params`, "
        "`pruning/target_num_params`, `pruning/penalty`, `pruning/hardened` and "
        "`loss/train/{lm,lagrangian,total}`.",
    )
    out += component(
        "`algorithms: oneshot_pruning`",
        OneshotPruning,
        options_of(OneshotPruning),
        "`target_shape` as for `targeted_pruning`. A one-shot job: every weight frozen at "
        "`INIT`, the cut chosen and the gates hardened at `FIT_START`, `max_duration: 1ba`, "
        "`pruned_hf_export` writes the cut ([recipes.md](recipes.md)).",
    )
    out += component(
        "`algorithms: knowledge_distillation`",
        KnowledgeDistillation,
        options_of(KnowledgeDistillation),
        "Logged: `loss/train/{lm,kd,total}` every batch; at fit start "
        "`knowledge_distillation/{teacher,teacher_dtype,teacher_sharding,"
        "teacher_mib_per_rank}`.",
    )
    loader = options_of(
        builder.build_multi_domain_dataloader, skip=("tokenizer", "device_batch_size", "dataset")
    )
    dataset_keys = builder.DATASET_KEYS | builder.EXTRA_KEYS
    dataset = options_of(
        MultiDomainDataset,
        only=dataset_keys,
        # The builder's own defaults, where they differ from the dataset class's.
        defaults={
            **{k: "required" for k in builder.REQUIRED_KEYS},
            "shuffle": "`true` for `split: train`, else `false`",
            "domain_batch_size": "the device batch size",
        },
    )
    streaming = ", ".join(f"`{k}`" for k in sorted(builder.STREAMING_KEYS))
    out += component(
        "`train_loader: multi_domain` (and per-domain `eval_loader` entries)",
        builder.build_multi_domain_dataloader,
        loader,
        "Loader keys below; `device_batch_size` comes from LLM Foundry. Unknown keys are "
        "an error naming them.",
    )
    out += ["Keys of its `dataset:` block:", "", *table(dataset), ""]
    out += [
        f"Also passed through to each domain's `StreamingDataset`: {streaming}.",
        "",
    ]
    out += component(
        "`callbacks: dynamic_batch_loading`",
        DynamicBatchLoading,
        options_of(DynamicBatchLoading),
        "It updates after every evaluation round (`eval_interval` is the update interval), "
        "from the eval loader whose `label` is each domain.",
    )
    out += component("`callbacks: pruned_hf_export`", PrunedHFExport, options_of(PrunedHFExport))
    out += component(
        "`loggers: jsonl_metrics`",
        JSONLMetricsLogger,
        options_of(JSONLMetricsLogger),
        "`composer-shear report` reads these files.",
    )
    out += cli_section(build_parser())
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write ``docs/options.md``, or with ``--check`` report whether it is current."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if docs/options.md is out of date"
    )
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if OUT.read_text(encoding="utf-8") != text:
            print(
                f"{OUT.relative_to(REPO)} is out of date: run python docs/gen_options.py",
                file=sys.stderr,
            )
            return 1
        return 0
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
