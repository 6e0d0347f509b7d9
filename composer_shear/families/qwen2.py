"""Qwen2: the Llama layout with fixed q/k/v biases and a layer-indexed sliding-window split."""

from typing import Any

from composer_shear.families.base import DecoderFamily, max_window_layers_fixup


def qwen2_biases(config: Any) -> tuple[bool, bool, bool]:
    """Qwen2 hard-codes biases on q/k/v and none on o_proj or the MLP (no config field)."""
    return True, False, False


FAMILY = DecoderFamily(("qwen2",), bias_layout=qwen2_biases, layer_fixups=max_window_layers_fixup)
