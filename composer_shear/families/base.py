"""What a model family is to the pruning code: a declaration, no behaviour of its own.

Gates are injected into *unmodified* ``transformers`` models, so everything family-specific
is *where* things live and *how* a few of them behave: the module paths, which norms a layer
has and what each normalises, the biases, the parameter-count terms, the config fields that
depend on the kept layers, and which dimensions cannot be pruned. :class:`DecoderFamily`
declares all of it; :mod:`composer_shear.shape`, :mod:`composer_shear.pruning.masking`,
:mod:`composer_shear.export.surgery` and :mod:`composer_shear.pruning.importance` read the
declaration and
name no family.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from torch import nn

from composer_shear.shape import ModelShape

__all__ = [
    "DecoderFamily",
    "LayerModules",
    "UnsupportedModelError",
    "attention_bias_layout",
    "max_window_layers_fixup",
    "no_biases",
    "no_fixups",
]


class UnsupportedModelError(ValueError):
    """The model's family is not registered."""


class LayerModules(NamedTuple):
    """The modules of one decoder layer that pruning touches.

    Attributes:
        q_proj: Query projection (rows grouped by head).
        k_proj: Key projection.
        v_proj: Value projection.
        o_proj: Attention output projection (columns grouped by head).
        gate_proj: MLP gate projection.
        up_proj: MLP up projection.
        down_proj: MLP down projection.
        stream_norms: Norms that read the residual stream (before attention, before the MLP).
        branch_norms: Norms of a branch's output before it joins the residual stream (Gemma's
            post-attention / post-feedforward norms), in branch order; empty for pre-norm-only
            families.
        head_norms: Norms over ``head_dim`` inside attention (Qwen3 / Gemma 3 ``q_norm``,
            ``k_norm``), one weight shared by every head.
    """

    q_proj: nn.Linear
    k_proj: nn.Linear
    v_proj: nn.Linear
    o_proj: nn.Linear
    gate_proj: nn.Linear
    up_proj: nn.Linear
    down_proj: nn.Linear
    stream_norms: tuple[nn.Module, ...]
    branch_norms: tuple[nn.Module, ...]
    head_norms: tuple[nn.Module, ...]

    @property
    def branch_outputs(self) -> tuple[nn.Linear, nn.Linear]:
        """The projections that end the attention and MLP branches."""
        return self.o_proj, self.down_proj

    @property
    def hidden_norms(self) -> tuple[nn.Module, ...]:
        """Every norm of this layer whose weight has one entry per hidden dim."""
        return (*self.stream_norms, *self.branch_norms)


def no_biases(config: Any) -> tuple[bool, bool, bool]:
    """``(qkv_bias, o_bias, mlp_bias)`` of a family without biases."""
    return False, False, False


def attention_bias_layout(config: Any) -> tuple[bool, bool, bool]:
    """``config.attention_bias`` on q/k/v/o, ``config.mlp_bias`` (if any) on the MLP."""
    attention_bias = bool(getattr(config, "attention_bias", False))
    return attention_bias, attention_bias, bool(getattr(config, "mlp_bias", False))


def no_fixups(config: Any, kept_layers: list[int]) -> dict[str, Any]:
    """No config field depends on which layers are kept."""
    return {}


def max_window_layers_fixup(config: Any, kept_layers: list[int]) -> dict[str, Any]:
    """Qwen-style ``max_window_layers``: recount it among the kept layers.

    Layers below ``max_window_layers`` use full attention when sliding windows are on; the
    compact model keeps the same split among the layers that survive.
    """
    limit = getattr(config, "max_window_layers", None)
    if limit is None:
        return {}
    return {"max_window_layers": sum(1 for layer in kept_layers if layer < limit)}


def nothing_fixed(config: Any) -> dict[str, str]:
    """Every target dimension is prunable."""
    return {}


@dataclass(frozen=True)
class DecoderFamily:
    """Declaration of a Llama-layout causal LM family (``XxxForCausalLM``).

    The default values describe Llama; a family with that layout only names its model types
    (and biases / layer fixups where they differ).

    Attributes:
        model_types: ``config.model_type`` values this family serves.
        bias_layout: ``config -> (qkv_bias, o_bias, mlp_bias)``.
        layer_fixups: ``(config, kept_layer_indices) -> config updates`` written at export
            when layers are pruned (fields whose meaning depends on layer indices).
        fixed_dims: ``config -> {target key: reason}``: target dimensions that cannot be
            pruned in this family, and why (the target check rejects them up front).
        decoder: Attribute of the causal LM holding the bare decoder.
        embed: Attribute of the decoder holding the token embedding.
        layers: Attribute of the decoder holding the layer list.
        final_norm: Attribute of the decoder holding the norm before ``lm_head``.
        lm_head: Attribute of the causal LM holding the output projection.
        attention: Attribute of a layer holding attention (``q_proj`` ... ``o_proj``).
        mlp: Attribute of a layer holding the MLP (``gate_proj``, ``up_proj``, ``down_proj``).
        stream_norms: Attributes of a layer: the norms that read the residual stream.
        branch_norms: Attributes of a layer: norms of the attention and MLP outputs before
            the residual add (empty for pre-norm-only families).
        head_norms: Attributes of the attention module: per-head norms over ``head_dim``.
        norm_weight_offset: RMSNorms scale by ``offset + weight`` (Gemma: 1, others: 0).
        embed_scale_follows_hidden: The embedding output is multiplied by
            ``sqrt(config.hidden_size)``, a buffer recomputed from the config (Gemma), so a
            model with fewer hidden dims scales by ``sqrt(kept)``.
    """

    model_types: tuple[str, ...]
    bias_layout: Callable[[Any], tuple[bool, bool, bool]] = no_biases
    layer_fixups: Callable[[Any, list[int]], dict[str, Any]] = no_fixups
    fixed_dims: Callable[[Any], dict[str, str]] = field(default=nothing_fixed)
    decoder: str = "model"
    embed: str = "embed_tokens"
    layers: str = "layers"
    final_norm: str = "norm"
    lm_head: str = "lm_head"
    attention: str = "self_attn"
    mlp: str = "mlp"
    stream_norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    branch_norms: tuple[str, ...] = ()
    head_norms: tuple[str, ...] = ()
    norm_weight_offset: float = 0.0
    embed_scale_follows_hidden: bool = False

    def __post_init__(self):
        if len(self.stream_norms) != 2 or len(self.branch_norms) not in (0, 2):
            raise ValueError(
                f"{self.model_types}: a layer has two stream norms and zero or two branch norms "
                f"(got {self.stream_norms}, {self.branch_norms})."
            )

    def shape(self, config: Any) -> ModelShape:
        """The prunable shape of ``config`` with this family's parameter-count terms."""
        return ModelShape.from_config(
            config,
            bias_layout=self.bias_layout(config),
            norms_per_layer=len(self.stream_norms) + len(self.branch_norms),
            head_norms_per_layer=len(self.head_norms),
            fixed=self.fixed_dims(config),
        )

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
            tuple(getattr(layer, name) for name in self.stream_norms),
            tuple(getattr(layer, name) for name in self.branch_norms),
            tuple(getattr(attn, name) for name in self.head_norms),
        )
