"""Llama-2 / Llama-3 (and SmolLM2): the reference layout, every default of the base."""

from composer_shear.families.base import DecoderFamily, attention_bias_layout

# ``attention_bias`` puts biases on q/k/v *and* o_proj; ``mlp_bias`` on all three MLP
# projections.
FAMILY = DecoderFamily(("llama",), bias_layout=attention_bias_layout)
