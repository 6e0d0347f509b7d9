"""Masked model (deterministic gates) == exported compact model, for every family and gate."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from composer_shear.export.surgery import plan_from_masks, prune_model
from composer_shear.families import get_family
from composer_shear.pruning.masking import attach_gates
from composer_shear.shape import ShapeError
from tests.tiny_models import FAMILIES, prunable_dims, tiny_model

# Per family: a target for each gate kind alone, and all of them combined.
HEAD_TARGETS = {
    "llama_mha": {"heads": {"num_attention_heads": 2}},
    "llama_gqa": {
        "kv_heads": {"num_key_value_heads": 1},
        "heads": {"num_attention_heads": 4},
        "kv_and_heads": {"num_attention_heads": 2, "num_key_value_heads": 1},
    },
    "mistral": {
        "kv_heads": {"num_key_value_heads": 2},
        "heads": {"num_attention_heads": 4},
        "kv_and_heads": {"num_attention_heads": 3, "num_key_value_heads": 3},
    },
    "qwen2": {
        "kv_heads": {"num_key_value_heads": 1},
        "heads": {"num_attention_heads": 4},
        "kv_and_heads": {"num_attention_heads": 2, "num_key_value_heads": 1},
    },
    "qwen3": {
        "kv_heads": {"num_key_value_heads": 1},
        "heads": {"num_attention_heads": 4},
        "kv_and_heads": {"num_attention_heads": 2, "num_key_value_heads": 1},
    },
    # Multi-query: one kv head, so only query heads can go.
    "qwen3_mqa": {"heads": {"num_attention_heads": 2}},
    "gemma3": {
        "kv_heads": {"num_key_value_heads": 1},
        "heads": {"num_attention_heads": 2},
        "kv_and_heads": {"num_attention_heads": 1, "num_key_value_heads": 1},
    },
    "gemma3_mqa": {"heads": {"num_attention_heads": 3}},
}
COMMON = {
    "layers": {"num_hidden_layers": 2},
    "intermediate": {"intermediate_size": 40},
    "hidden": {"hidden_size": 48},
}


def cases():
    for family in sorted(FAMILIES):
        heads = HEAD_TARGETS[family]
        # Only the gate kinds the architecture allows (Gemma 3 keeps its layers).
        common = {k: t for k, t in COMMON.items() if set(t) <= prunable_dims(family)}
        kinds = {**common, **heads}
        combined = {}
        for target in common.values():
            combined.update(target)
        combined.update(heads.get("kv_and_heads", heads["heads"]))
        kinds["combined"] = combined
        for kind, target in kinds.items():
            yield family, kind, target


def randomize_gates(gates, seed=0):
    """Spread log-alpha so that masks are non-trivial and kept values lie strictly in (0, 1)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in gates.gates.values():
            gate.log_alpha.copy_(torch.randn(gate.shape, generator=generator) * 1.5 + 1.0)


def input_ids(vocab, seed=0, batch=2, length=12):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=generator)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("family, kind, target", list(cases()))
def test_masked_equals_pruned(family, kind, target, tied, tmp_path):
    model = tiny_model(family, tie_word_embeddings=tied)
    gates = attach_gates(model, target)
    randomize_gates(gates)
    model.eval()
    ids = input_ids(model.config.vocab_size)
    with torch.no_grad():
        masked = model(ids).logits

    compact = prune_model(model)
    expected = gates.target
    for key, value in expected.config_updates().items():
        assert getattr(compact.config, key) == value, key
    assert sum(p.numel() for p in compact.parameters()) == expected.num_params()

    # Round trip through a standard HF directory, loaded strictly by transformers.
    compact.save_pretrained(tmp_path)
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    loaded.eval()
    with torch.no_grad():
        pruned = loaded(ids).logits
    assert (masked - pruned).abs().max().item() < 1e-4

    # Same greedy generation (the KV-cache path as well).
    prompt = ids[:1, :4]
    gen_kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(
            model.generate(prompt, **gen_kwargs), loaded.generate(prompt, **gen_kwargs)
        )


def test_masked_model_actually_changes_output():
    """Guard against a vacuous equivalence: the gates must alter the model's output."""
    model = tiny_model("llama_gqa")
    ids = input_ids(model.config.vocab_size)
    with torch.no_grad():
        before = model(ids).logits
    gates = attach_gates(model, {"hidden_size": 48, "num_attention_heads": 4})
    randomize_gates(gates)
    with torch.no_grad():
        after = model.eval()(ids).logits
    assert (before - after).abs().max() > 1e-2


def test_norm_statistics_over_kept_dims_only():
    """With hidden pruning alone, the compact model's RMSNorm must see only kept dims."""
    model = tiny_model("llama_gqa")
    gates = attach_gates(model, {"hidden_size": 32})
    randomize_gates(gates, seed=3)
    model.eval()
    ids = input_ids(model.config.vocab_size, seed=3)
    compact = prune_model(model)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, compact(ids).logits, atol=1e-4)
    # Without the norm correction the outputs would differ: drop the hooks' scale and compare.
    values = gates.deterministic_values()
    masks = gates.build_masks(values)
    masks.norm_scale = torch.tensor(1.0)
    gates.forward = lambda: setattr(gates, "masks", masks)
    with torch.no_grad():
        wrong = model(ids).logits
    assert (wrong - compact(ids).logits).abs().max() > 1e-3


def test_eval_masks_are_cached_until_a_gate_changes():
    model = tiny_model("llama_gqa")
    gates = attach_gates(model, {"hidden_size": 48, "intermediate_size": 40})
    ids = input_ids(model.config.vocab_size)
    with torch.no_grad():
        model(ids)
        first = gates.masks
        model(ids)
        assert gates.masks is first  # generate() calls forward per token: no recomputation
        gates.gates["hidden"].log_alpha.copy_(torch.randn(64))
        model(ids)
    assert gates.masks is not first
    assert not torch.equal(first.hidden, gates.masks.hidden)


def test_masked_equals_pruned_with_o_proj_and_mlp_biases(tmp_path):
    """Llama's attention_bias / mlp_bias put biases on o_proj and down_proj, where layer gates
    are folded in."""
    model = tiny_model("llama_gqa", attention_bias=True, mlp_bias=True)
    target = {
        **COMMON["layers"],
        **COMMON["intermediate"],
        **COMMON["hidden"],
        "num_attention_heads": 4,
    }
    gates = attach_gates(model, target)
    randomize_gates(gates, seed=5)
    model.eval()
    ids = input_ids(model.config.vocab_size, seed=5)
    compact = prune_model(model)
    compact.save_pretrained(tmp_path)
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    assert loaded.model.layers[0].self_attn.o_proj.bias is not None
    with torch.no_grad():
        assert (model(ids).logits - loaded.eval()(ids).logits).abs().max().item() < 1e-4


@pytest.mark.parametrize("family", ["gemma3", "gemma3_mqa"])
def test_gemma3_rejects_layer_pruning_up_front(family):
    model = tiny_model(family)
    with pytest.raises(ShapeError, match=r"num_hidden_layers.*local and global attention"):
        attach_gates(model, {"num_hidden_layers": 2})
    with pytest.raises(ShapeError, match="layer index"):
        get_family(model).shape(model.config).resolve_target(
            {"num_hidden_layers": 3, "hidden_size": 48}
        )
    # Restating the source value is not pruning it.
    attach_gates(model, {"num_hidden_layers": 4, "hidden_size": 48})


@pytest.mark.parametrize("family", ["gemma3", "llama_gqa", "qwen3"])
def test_layer_scale_is_folded_after_branch_norms(family):
    """A layer scale (gates keep every layer at values < 1) must be folded where the masking
    hooks apply it: into o_proj / down_proj for pre-norm families, into the post-branch norms
    (``s * (1 + w) - 1``) for Gemma 3, whose post norms would normalise a projection scale
    away. The reference scales each layer's branch outputs by hand."""
    model = tiny_model(family, attention_bias=True)
    fam = get_family(model)
    source = fam.shape(model.config)
    n_layers = source.num_hidden_layers
    scales = torch.tensor([0.3, 0.55, 0.8, 0.95])[:n_layers]
    plan = plan_from_masks(
        source,
        source,
        {"layers": torch.ones(n_layers, dtype=torch.bool)},
        {"layers": scales},
    )
    compact = prune_model(model, plan=plan)
    handles = []
    for index, layer in enumerate(fam.layer_list(model)):
        mods = fam.layer_modules(layer)
        ends = mods.branch_norms or mods.branch_outputs
        for module in ends:
            handles.append(module.register_forward_hook(lambda m, a, out, s=scales[index]: out * s))
    ids = input_ids(model.config.vocab_size, seed=7)
    with torch.no_grad():
        expected = model(ids).logits
        for handle in handles:
            handle.remove()
        unscaled = model(ids).logits
        got = compact(ids).logits
    assert (expected - got).abs().max().item() < 1e-4
    assert (unscaled - got).abs().max().item() > 1e-2
