"""Per-task ``max_seq_len``: the shortest padding that truncates nothing.

LLM Foundry pads every sequence of an ICL task to the task's ``max_seq_len`` (and cuts longer
prompts from the left), so on a CPU the cost of a task is proportional to that length. Here
each task's own LLM Foundry dataset is built once at a generous length with the tokenizer
that will be used, exactly as the evaluation builds it (same few-shot draws, delimiters and
categories), and the longest unpadded prompt + continuation is read back.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["context_limit", "longest_sequence", "tight_max_seq_lens"]

log = logging.getLogger(__name__)

# Keys of an icl_tasks entry that are not constructor arguments of LLM Foundry's ICL datasets
# (build_icl_evaluators removes the same ones before building them).
_NOT_DATASET_KWARGS = (
    "label",
    "dataset_uri",
    "icl_task_type",
    "batch_size",
    "metric_names",
    "has_categories",
    "num_fewshot",
    "max_seq_len",
)


def context_limit(model_dir: str | Path) -> int | None:
    """``max_position_embeddings`` of a Hugging Face directory's config, if it has one."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    value = config.get("max_position_embeddings")
    return int(value) if isinstance(value, int) and value > 0 else None


def longest_sequence(task: Mapping[str, Any], tokenizer: Any, cap: int, scratch: Path) -> int:
    """Tokens of the task's longest prompt + continuation, as LLM Foundry builds them.

    Args:
        task: One ``icl_tasks`` entry (with a local ``dataset_uri``).
        tokenizer: The tokenizer of the model to evaluate.
        cap: Length the dataset is built at (longer prompts are cut to it, as they would be).
        scratch: A folder for LLM Foundry's copy of the data file.

    Returns:
        The longest sequence in tokens, at most ``cap``.
    """
    from llmfoundry.eval.datasets.in_context_learning_evaluation import get_icl_task_dataloader

    options = {k: v for k, v in task.items() if k not in _NOT_DATASET_KWARGS}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    longest = 1
    for shots in task["num_fewshot"]:
        built = get_icl_task_dataloader(
            icl_task_type=task["icl_task_type"],
            dataset_uri=task["dataset_uri"],
            tokenizer=tokenizer,
            batch_size=1,
            has_categories=bool(task.get("has_categories", False)),
            destination_path=str(scratch / f"measure-{task['label']}-{shots}.jsonl"),
            kwargs={**options, "max_seq_len": cap, "pad_tok_id": pad, "num_fewshot": shots},
        )
        specs = built.values() if isinstance(built, dict) else [built]
        for spec in specs:
            dataset = spec.dataloader.dataset
            for index in range(len(dataset)):
                longest = max(longest, _unpadded_length(dataset, dataset[index], pad))
    return longest


def _unpadded_length(dataset: Any, item: Mapping[str, Any], pad: int) -> int:
    if "continuation_indices" in item:
        spans = item["continuation_indices"]
        # Multiple choice / schema: one span per choice; language modelling: one span. A
        # span's last index + 1 is the sequence's length before right padding.
        ends = [s[-1] for s in spans] if spans and isinstance(spans[0], list) else [spans[-1]]
        return max(int(e) + 1 for e in ends)
    # Generation: the prompt is left-padded, and LLM Foundry keeps room for the longest answer.
    ids = item[dataset.context_key]
    leading = next((i for i, t in enumerate(ids) if t != pad), len(ids))
    return len(ids) - leading + dataset.max_answer_length


def tight_max_seq_lens(
    tasks: Sequence[Mapping[str, Any]], tokenizer: Any, cap: int, multiple: int = 8
) -> dict[str, int]:
    """The ``max_seq_len`` each task needs: its longest sequence, rounded up to ``multiple``.

    Args:
        tasks: ``icl_tasks`` entries.
        tokenizer: The tokenizer of the model to evaluate.
        cap: Upper bound (the model's context). A task that reaches it has prompts that LLM
            Foundry cuts from the left; a warning names it.
        multiple: Round up to a multiple of this (friendlier shapes for the kernels).

    Returns:
        ``{label: max_seq_len}``.
    """
    lengths = {}
    with tempfile.TemporaryDirectory(prefix="composer_shear_lengths_") as scratch:
        for task in tasks:
            longest = longest_sequence(task, tokenizer, cap, Path(scratch))
            if longest >= cap:
                log.warning(
                    "%s: some prompts need %s tokens or more; LLM Foundry cuts them from the "
                    "left to %s.",
                    task["label"],
                    cap,
                    cap,
                )
            lengths[str(task["label"])] = min(cap, multiple * math.ceil(longest / multiple))
    return lengths
