"""Qwen3: the Llama layout plus per-head ``q_norm`` / ``k_norm`` inside attention.

The two norms are RMSNorms over ``head_dim`` (weight ``(head_dim,)``, shared by all heads),
applied to every query / key head before rotary embeddings. Pruning never changes
``head_dim``, so they are copied as they are and only add ``2 * head_dim`` parameters per
layer. ``attention_bias`` covers q/k/v/o (the MLP has none) and, as in Qwen2, layers at or
above ``max_window_layers`` use sliding windows when ``use_sliding_window`` is on.
"""

from typing import Any

from composer_shear.families.base import DecoderFamily, max_window_layers_fixup


def qwen3_biases(config: Any) -> tuple[bool, bool, bool]:
    """``attention_bias`` on q/k/v/o; Qwen3's MLP is always bias-free."""
    attention_bias = bool(getattr(config, "attention_bias", False))
    return attention_bias, attention_bias, False


FAMILY = DecoderFamily(
    ("qwen3",),
    bias_layout=qwen3_biases,
    layer_fixups=max_window_layers_fixup,
    head_norms=("q_norm", "k_norm"),
)
