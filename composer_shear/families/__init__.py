"""Model families: one module each, one :class:`DecoderFamily` declaration per module.

Llama, Mistral, Qwen2 and Qwen3 share the Llama layout; Gemma 3 adds post-branch norms, an
embedding scale and an index-dependent attention pattern. A new family with the Llama layout
is one :func:`register_family` call.
"""

from __future__ import annotations

from typing import Any

from composer_shear.families import gemma3, llama, mistral, qwen2, qwen3
from composer_shear.families.base import DecoderFamily, LayerModules, UnsupportedModelError

__all__ = [
    "FAMILIES",
    "DecoderFamily",
    "LayerModules",
    "UnsupportedModelError",
    "get_family",
    "register_family",
]

FAMILIES: dict[str, DecoderFamily] = {}


def register_family(family: DecoderFamily) -> DecoderFamily:
    """Registers ``family`` for each of its model types."""
    for model_type in family.model_types:
        FAMILIES[model_type] = family
    return family


for _module in (llama, mistral, qwen2, qwen3, gemma3):
    register_family(_module.FAMILY)


def get_family(model_or_config: Any) -> DecoderFamily:
    """Returns the family of a model (or config), or raises a clear error.

    Raises:
        UnsupportedModelError: The family is not registered; names the registered ones.
    """
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"composer_shear cannot prune model_type={model_type!r} "
            f"({type(model_or_config).__name__}). Supported model types: "
            f"{sorted(FAMILIES)} (Llama-2/3, Mistral, Qwen2, Qwen3, Gemma 3 text and other "
            "GQA models of the Llama layout). A new family with the Llama layout is one "
            "register_family() call."
        )
    return FAMILIES[model_type]
