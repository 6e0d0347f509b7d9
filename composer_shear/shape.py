"""Model shapes: read from a Hugging Face config, validate a pruning target, count parameters.

A *shape* is the handful of config numbers that structured pruning changes. Everything else in
the config (rope settings, vocabulary, norm epsilon, ...) is carried over unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "TARGET_KEYS",
    "ModelShape",
    "ShapeError",
    "count_params",
]

# The keys a user may put under `target_shape:`. `head_dim` is accepted only to restate the
# source value: pruning never changes it (rotary embeddings and kernels depend on it).
TARGET_KEYS = (
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "hidden_size",
    "head_dim",
)


class ShapeError(ValueError):
    """A target shape that cannot be reached from the source model."""


def count_params(
    *,
    vocab_size: int,
    hidden: Any,
    layer_keep: Sequence[Any],
    q_heads: Sequence[Any],
    kv_heads: Sequence[Any],
    intermediate: Sequence[Any],
    head_dim: int,
    tie_word_embeddings: bool,
    qkv_bias: bool,
    o_bias: bool,
    mlp_bias: bool,
    norms_per_layer: int = 2,
    head_norms_per_layer: int = 0,
) -> Any:
    """Counts the parameters of a decoder of the q/k/v/o + gate/up/down layout, layer by layer.

    Works on plain numbers (exact counts) and on tensors of expected counts (the pruning
    penalty's expected model size), so that both come from one formula.

    Args:
        vocab_size: Vocabulary size.
        hidden: (Expected) hidden size.
        layer_keep: Per layer, 1 if the layer is kept (or its keep probability).
        q_heads: Per layer, (expected) number of query heads.
        kv_heads: Per layer, (expected) number of key/value heads.
        intermediate: Per layer, (expected) MLP intermediate size.
        head_dim: Head dimension.
        tie_word_embeddings: Whether lm_head shares the embedding matrix.
        qkv_bias: Whether q/k/v projections have biases.
        o_bias: Whether the output projection has a bias.
        mlp_bias: Whether the MLP projections have biases.
        norms_per_layer: Norms of one layer with a weight per hidden dim (2 with pre-norms
            only, 4 with post-branch norms too).
        head_norms_per_layer: Norms of one layer over ``head_dim`` (per-head query / key
            norms: 2), whose size pruning never changes.

    Returns:
        The parameter count (same type as the inputs).
    """
    total = vocab_size * hidden  # embedding
    total = total + hidden  # final norm
    if not tie_word_embeddings:
        total = total + vocab_size * hidden
    for keep, nq, nkv, inter in zip(layer_keep, q_heads, kv_heads, intermediate, strict=True):
        attn = hidden * head_dim * (nq + 2 * nkv) + nq * head_dim * hidden
        if qkv_bias:
            attn = attn + head_dim * (nq + 2 * nkv)
        if o_bias:
            attn = attn + hidden
        mlp = 3 * hidden * inter
        if mlp_bias:
            mlp = mlp + 2 * inter + hidden
        norms = norms_per_layer * hidden + head_norms_per_layer * head_dim
        total = total + keep * (attn + mlp + norms)
    return total


@dataclass(frozen=True)
class ModelShape:
    """The prunable dimensions of a decoder LM, plus what parameter counting needs.

    Attributes:
        num_hidden_layers: Number of decoder layers.
        num_attention_heads: Number of query heads.
        num_key_value_heads: Number of key/value heads (GQA groups).
        head_dim: Per-head dimension (never pruned).
        intermediate_size: MLP intermediate size.
        hidden_size: Model (residual stream) dimension.
        vocab_size: Vocabulary size (never pruned).
        tie_word_embeddings: Whether lm_head shares the embedding matrix.
        qkv_bias: Whether q/k/v projections carry biases.
        o_bias: Whether o_proj carries a bias.
        mlp_bias: Whether gate/up/down projections carry biases.
        norms_per_layer: Norms per layer with one weight per hidden dim.
        head_norms_per_layer: Norms per layer over ``head_dim`` (never pruned).
        fixed: ``(target key, reason)`` pairs: dimensions the family cannot prune.
    """

    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    hidden_size: int
    vocab_size: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    norms_per_layer: int = 2
    head_norms_per_layer: int = 0
    fixed: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_config(
        cls,
        config: Any,
        bias_layout: tuple[bool, bool, bool] | None = None,
        norms_per_layer: int = 2,
        head_norms_per_layer: int = 0,
        fixed: Mapping[str, str] | None = None,
    ) -> ModelShape:
        """Reads the shape of a Hugging Face config.

        The family-specific arguments come from the family declaration
        (:meth:`composer_shear.families.DecoderFamily.shape` passes them all).

        Args:
            config: A ``transformers`` decoder config.
            bias_layout: ``(qkv_bias, o_bias, mlp_bias)``.
            norms_per_layer: Norms per layer over the hidden dims.
            head_norms_per_layer: Norms per layer over ``head_dim``.
            fixed: Target keys the family cannot prune, with the reason.
        """
        heads = config.num_attention_heads
        kv = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        qkv_bias, o_bias, mlp_bias = bias_layout or (False, False, False)
        return cls(
            num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=heads,
            num_key_value_heads=kv,
            head_dim=head_dim,
            intermediate_size=config.intermediate_size,
            hidden_size=config.hidden_size,
            vocab_size=config.vocab_size,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=mlp_bias,
            norms_per_layer=norms_per_layer,
            head_norms_per_layer=head_norms_per_layer,
            fixed=tuple(sorted((fixed or {}).items())),
        )

    @property
    def heads_per_group(self) -> int:
        """Query heads sharing one key/value head."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def is_mha(self) -> bool:
        """True for plain multi-head attention (one kv head per query head)."""
        return self.num_attention_heads == self.num_key_value_heads

    def num_params(self) -> int:
        """Exact parameter count of a model of this shape (as ``transformers`` builds it)."""
        n = self.num_hidden_layers
        return count_params(
            vocab_size=self.vocab_size,
            hidden=self.hidden_size,
            layer_keep=[1] * n,
            q_heads=[self.num_attention_heads] * n,
            kv_heads=[self.num_key_value_heads] * n,
            intermediate=[self.intermediate_size] * n,
            head_dim=self.head_dim,
            tie_word_embeddings=self.tie_word_embeddings,
            qkv_bias=self.qkv_bias,
            o_bias=self.o_bias,
            mlp_bias=self.mlp_bias,
            norms_per_layer=self.norms_per_layer,
            head_norms_per_layer=self.head_norms_per_layer,
        )

    def num_non_embedding_params(self) -> int:
        """Parameters outside the embedding and lm_head matrices."""
        embed = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.num_params() - embed

    def config_updates(self) -> dict[str, int]:
        """The config fields that describe this shape (``head_dim`` always explicit)."""
        return {
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "hidden_size": self.hidden_size,
        }

    def describe(self) -> str:
        """One line for logs and CLI output."""
        return (
            f"layers={self.num_hidden_layers} hidden={self.hidden_size} "
            f"heads={self.num_attention_heads} kv_heads={self.num_key_value_heads} "
            f"head_dim={self.head_dim} intermediate={self.intermediate_size} "
            f"params={self.num_params():,}"
        )

    def resolve_target(self, target: Mapping[str, Any]) -> ModelShape:
        """Validates a (partial) target and returns the full target shape.

        Omitted dimensions are kept, with two conveniences for attention: for a multi-head
        source, a target that only names ``num_attention_heads`` prunes heads (kv heads follow);
        a target that only names ``num_key_value_heads`` prunes whole kv groups (query heads
        per group are kept).

        Args:
            target: A mapping of :data:`TARGET_KEYS` to positive integers.

        Returns:
            The target :class:`ModelShape`.

        Raises:
            ShapeError: Unknown keys, non-positive sizes, a target larger than the source,
                a changed ``head_dim``, a dimension the family cannot prune, or an invalid
                attention layout.
        """
        target = dict(target or {})
        unknown = sorted(set(target) - set(TARGET_KEYS))
        if unknown:
            raise ShapeError(
                f"Unknown target_shape key(s) {unknown}; allowed keys are {list(TARGET_KEYS)}."
            )
        for key, value in target.items():
            if isinstance(value, bool) or not isinstance(value, int):
                raise ShapeError(f"target_shape.{key} must be an integer, got {value!r}.")
            if value <= 0:
                raise ShapeError(f"target_shape.{key} must be positive, got {value}.")
        if "head_dim" in target and target["head_dim"] != self.head_dim:
            raise ShapeError(
                f"target_shape.head_dim={target['head_dim']} differs from the source head_dim "
                f"{self.head_dim}; pruning keeps head_dim (prune heads instead)."
            )

        for key, reason in self.fixed:
            if key in target and target[key] != getattr(self, key):
                raise ShapeError(
                    f"target_shape.{key}={target[key]} differs from the source's "
                    f"{getattr(self, key)}, and this family cannot prune it: {reason}"
                )

        heads = target.get("num_attention_heads")
        kv = target.get("num_key_value_heads")
        if heads is not None and kv is None:
            kv = heads if self.is_mha else self.num_key_value_heads
        elif kv is not None and heads is None:
            heads = kv * self.heads_per_group
        heads = heads or self.num_attention_heads
        kv = kv or self.num_key_value_heads

        new = dataclasses.replace(
            self,
            num_hidden_layers=target.get("num_hidden_layers", self.num_hidden_layers),
            num_attention_heads=heads,
            num_key_value_heads=kv,
            intermediate_size=target.get("intermediate_size", self.intermediate_size),
            hidden_size=target.get("hidden_size", self.hidden_size),
        )
        for key in TARGET_KEYS[:5]:
            if getattr(new, key) > getattr(self, key):
                raise ShapeError(
                    f"target_shape.{key}={getattr(new, key)} is larger than the source "
                    f"model's {getattr(self, key)}; pruning can only shrink."
                )
        if new.num_attention_heads % new.num_key_value_heads:
            raise ShapeError(
                f"num_attention_heads={new.num_attention_heads} is not divisible by "
                f"num_key_value_heads={new.num_key_value_heads}."
            )
        if new.heads_per_group > self.heads_per_group:
            raise ShapeError(
                f"Target has {new.heads_per_group} query heads per kv head but the source has "
                f"only {self.heads_per_group} ({self.num_attention_heads} heads / "
                f"{self.num_key_value_heads} kv heads); keep more kv heads."
            )
        if new == self:
            raise ShapeError(
                f"target_shape equals the source shape: nothing to prune. Source: {self.describe()}"
            )
        return new
