"""Mistral: the Llama layout without biases.

``sliding_window`` is one value for every layer, so no config field depends on which layers
survive.
"""

from composer_shear.families.base import DecoderFamily

FAMILY = DecoderFamily(("mistral",))
