"""Gemma 3, text only (``Gemma3ForCausalLM``, ``model_type`` ``gemma3_text``).

Differences from the Llama layout, and what each means for pruning:

* Four norms per layer. ``input_layernorm`` and ``pre_feedforward_layernorm`` read the
  residual stream; ``post_attention_layernorm`` and ``post_feedforward_layernorm`` normalise
  the attention / MLP output *before* the residual add. A hidden mask on ``o_proj`` /
  ``down_proj`` output alone would be normalised away, so the masking code also masks
  the post norms (statistics over the kept dims, output masked before the add), and a
  layer's scale is folded into its post norms, not into the projections.
* RMSNorm scales by ``1 + weight``. Slicing the weight elementwise is unaffected; folding a
  scale ``s`` into a norm gives ``s * (1 + w) - 1``.
* ``q_norm`` / ``k_norm`` over ``head_dim``, as in Qwen3 (copied; ``head_dim`` is fixed, so
  ``query_pre_attn_scalar``, which sets the attention scale, stays right as well).
* The embedding output is multiplied by ``sqrt(hidden_size)``, a non-persistent buffer
  recomputed from the config: the compact model scales by ``sqrt(kept)``, and the masked
  model reproduces it (no scale can be folded into a matrix that ``lm_head`` may share).
* Local (sliding-window, ``rope_local_base_freq``) and global layers alternate by layer
  *index*: layer ``i`` is global iff ``(i + 1) % sliding_window_pattern == 0``, with no
  per-layer list in the config to rewrite. Dropping layers would change which kept layer is
  global (and its rotary base), so layer pruning is rejected up front.
* ``attn_logit_softcapping`` / ``final_logit_softcapping`` act on attention scores and
  logits, whose shapes pruning does not change.
"""

from typing import Any

from composer_shear.families.base import DecoderFamily, attention_bias_layout


def gemma3_fixed_dims(config: Any) -> dict[str, str]:
    """Layers are not prunable: local/global attention is a function of the layer index."""
    pattern = getattr(config, "sliding_window_pattern", None)
    return {
        "num_hidden_layers": (
            "Gemma 3 alternates local and global attention by layer index "
            f"(every {pattern}th layer is global, with its own rotary base) and its config "
            "has no per-layer list to rewrite; removing layers would turn kept local layers "
            "into global ones and back. Prune heads, intermediate and hidden dims instead."
        )
    }


FAMILY = DecoderFamily(
    ("gemma3_text",),
    bias_layout=attention_bias_layout,
    fixed_dims=gemma3_fixed_dims,
    stream_norms=("input_layernorm", "pre_feedforward_layernorm"),
    branch_norms=("post_attention_layernorm", "post_feedforward_layernorm"),
    head_norms=("q_norm", "k_norm"),
    norm_weight_offset=1.0,
    embed_scale_follows_hidden=True,
)
