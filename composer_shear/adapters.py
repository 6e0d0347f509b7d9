"""Per-family maps of where a ``transformers`` decoder keeps its projections and norms.

Gates are injected into *unmodified* models, so all the pruning code needs from a family is
where things live. Llama, Mistral and Qwen2 share one layout; they differ only in biases and
in a few config fields that depend on the number of layers. A new family with the same layout
is one :func:`register_adapter` call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from torch import nn

__all__ = [
    "ADAPTERS",
    "DecoderAdapter",
    "LayerModules",
    "UnsupportedModelError",
    "get_adapter",
    "register_adapter",
]


class UnsupportedModelError(ValueError):
    """The model's family has no adapter."""


class LayerModules(NamedTuple):
    """The modules of one decoder layer that pruning touches."""

    q_proj: nn.Linear
    k_proj: nn.Linear
    v_proj: nn.Linear
    o_proj: nn.Linear
    gate_proj: nn.Linear
    up_proj: nn.Linear
    down_proj: nn.Linear
    input_norm: nn.Module
    post_attention_norm: nn.Module


def _llama_biases(config: Any) -> tuple[bool, bool, bool]:
    attention_bias = bool(getattr(config, "attention_bias", False))
    return attention_bias, attention_bias, bool(getattr(config, "mlp_bias", False))


def _no_biases(config: Any) -> tuple[bool, bool, bool]:
    return False, False, False


def _qwen2_biases(config: Any) -> tuple[bool, bool, bool]:
    # Qwen2 hard-codes biases on q/k/v and none on o_proj or the MLP.
    return True, False, False


def _qwen2_layer_fixups(config: Any, kept_layers: list[int]) -> dict[str, Any]:
    # Layers below max_window_layers use full attention when sliding windows are on; keep the
    # same split among the layers that survive.
    limit = getattr(config, "max_window_layers", None)
    if limit is None:
        return {}
    return {"max_window_layers": sum(1 for layer in kept_layers if layer < limit)}


@dataclass(frozen=True)
class DecoderAdapter:
    """Attribute paths of a Llama-layout causal LM (``XxxForCausalLM``).

    Attributes:
        model_types: ``config.model_type`` values this adapter serves.
        bias_layout: ``config -> (qkv_bias, o_bias, mlp_bias)``.
        layer_fixups: ``(config, kept_layer_indices) -> config updates`` on layer pruning.
    """

    model_types: tuple[str, ...]
    bias_layout: Callable[[Any], tuple[bool, bool, bool]] = _no_biases
    layer_fixups: Callable[[Any, list[int]], dict[str, Any]] = field(
        default=lambda config, kept: {}
    )
    decoder: str = "model"
    embed: str = "embed_tokens"
    layers: str = "layers"
    final_norm: str = "norm"
    lm_head: str = "lm_head"
    attention: str = "self_attn"
    mlp: str = "mlp"
    input_norm: str = "input_layernorm"
    post_attention_norm: str = "post_attention_layernorm"

    def decoder_module(self, model: nn.Module) -> nn.Module:
        """The bare decoder (``model.model``)."""
        return getattr(model, self.decoder)

    def embedding(self, model: nn.Module) -> nn.Embedding:
        """The token embedding."""
        return getattr(self.decoder_module(model), self.embed)

    def final_norm_module(self, model: nn.Module) -> nn.Module:
        """The norm before lm_head."""
        return getattr(self.decoder_module(model), self.final_norm)

    def lm_head_module(self, model: nn.Module) -> nn.Linear:
        """The output projection."""
        return getattr(model, self.lm_head)

    def layer_list(self, model: nn.Module) -> nn.ModuleList:
        """The decoder layers."""
        return getattr(self.decoder_module(model), self.layers)

    def layer_modules(self, layer: nn.Module) -> LayerModules:
        """The prunable modules of one decoder layer."""
        attn, mlp = getattr(layer, self.attention), getattr(layer, self.mlp)
        return LayerModules(
            attn.q_proj,
            attn.k_proj,
            attn.v_proj,
            attn.o_proj,
            mlp.gate_proj,
            mlp.up_proj,
            mlp.down_proj,
            getattr(layer, self.input_norm),
            getattr(layer, self.post_attention_norm),
        )


ADAPTERS: dict[str, DecoderAdapter] = {}


def register_adapter(adapter: DecoderAdapter) -> DecoderAdapter:
    """Registers ``adapter`` for each of its model types."""
    for model_type in adapter.model_types:
        ADAPTERS[model_type] = adapter
    return adapter


register_adapter(DecoderAdapter(("llama",), bias_layout=_llama_biases))
register_adapter(DecoderAdapter(("mistral",)))
register_adapter(
    DecoderAdapter(("qwen2",), bias_layout=_qwen2_biases, layer_fixups=_qwen2_layer_fixups)
)


def get_adapter(model_or_config: Any) -> DecoderAdapter:
    """Returns the adapter of a model (or config), or raises a clear error.

    Raises:
        UnsupportedModelError: The family is not supported; names the supported ones.
    """
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise UnsupportedModelError(
            f"composer_shear cannot prune model_type={model_type!r} "
            f"({type(model_or_config).__name__}). Supported model types: "
            f"{sorted(ADAPTERS)} (Llama-2/3, Mistral, Qwen2 and other GQA models of that "
            "layout). A new family with the same layout is one register_adapter() call."
        )
    return ADAPTERS[model_type]
