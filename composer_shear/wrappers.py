"""The Hugging Face model inside the wrappers a Composer run puts around it.

A run's ``state.model`` is Composer's ``HuggingFaceModel`` (the HF causal LM is its
``.model``), possibly inside DDP (``.module``); FSDP wraps the HF model's submodules and keeps
the Composer model outside. Every algorithm and callback that needs the HF model finds it here,
by the same rule.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["composer_model_of", "hf_causal_lm"]


def hf_causal_lm(model: nn.Module, user: str = "composer_shear") -> nn.Module:
    """The Hugging Face causal LM (the module with the LM head) in or behind ``model``.

    Args:
        model: A HF causal LM, Composer's ``HuggingFaceModel`` around one, or DDP around that.
        user: Who asks (named in the error).

    Raises:
        TypeError: No Hugging Face causal LM is there.
    """
    while isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    for candidate in (model, getattr(model, "model", None)):
        get_head = getattr(candidate, "get_output_embeddings", None)
        if callable(get_head) and get_head() is not None and hasattr(candidate, "config"):
            return candidate
    raise TypeError(
        f"{user} needs a Hugging Face causal LM (e.g. llm-foundry's hf_causal_lm); "
        f"got {type(model).__name__}."
    )


def composer_model_of(model: nn.Module) -> nn.Module:
    """The Composer model inside DDP (``.module``); FSDP keeps the Composer model outside."""
    while isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    return model
