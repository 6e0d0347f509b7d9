"""Model facts for the report: shapes and sizes of model folders, and sample generations."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from composer_shear.families import get_family
from composer_shear.interface import model_path

if TYPE_CHECKING:
    from composer_shear.shape import ModelShape

log = logging.getLogger(__name__)

# Short, domain-neutral continuations: enough to see whether a pruned model still writes text.
DEFAULT_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, there was a",
)


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

    config = AutoConfig.from_pretrained(model_path(path))
    shape = get_family(config).shape(config)
    return ModelInfo(name, Path(path), shape, shape.num_params(), shape.num_non_embedding_params())


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


def cached_generations(
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
