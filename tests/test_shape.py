"""Shapes, target validation and parameter counting against real transformers models."""

import pytest

from composer_shear.families import UnsupportedModelError, get_family
from composer_shear.shape import ModelShape, ShapeError
from tests.tiny_models import FAMILIES, prunable_dims, tiny_config, tiny_model


def shape_of(model):
    return get_family(model).shape(model.config)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("tied", [False, True])
def test_param_count_matches_transformers(family, tied):
    model = tiny_model(family, tie_word_embeddings=tied)
    assert shape_of(model).num_params() == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("overrides", [dict(attention_bias=True), dict(mlp_bias=True)])
def test_param_count_with_llama_biases(overrides):
    model = tiny_model("llama_gqa", **overrides)
    assert shape_of(model).num_params() == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_param_count_of_target_matches_built_model(family, tied):
    """shape.py's count of a *target* equals what transformers builds for it (every norm,
    bias and per-head norm term of the family)."""
    source = shape_of(tiny_model(family, tie_word_embeddings=tied))
    target = dict(num_hidden_layers=2, intermediate_size=40, hidden_size=48)
    target["num_attention_heads"] = max(1, source.num_attention_heads // 2)
    if source.is_mha:
        target["num_key_value_heads"] = target["num_attention_heads"]
    elif source.num_key_value_heads > 1:
        target["num_key_value_heads"] = 1
        target["num_attention_heads"] = max(1, source.heads_per_group // 2)
    if "num_hidden_layers" not in prunable_dims(family):
        del target["num_hidden_layers"]
    shape = source.resolve_target(target)
    config = tiny_config(family, tied, **shape.config_updates())
    from transformers import AutoModelForCausalLM

    built = AutoModelForCausalLM.from_config(config)
    assert shape.num_params() == sum(p.numel() for p in built.parameters())


def test_llama2_7b_param_count():
    # The paper's source model: 6.74B parameters.
    shape = ModelShape(32, 32, 32, 128, 11008, 4096, 32000)
    assert shape.num_params() == 6_738_415_616


@pytest.fixture
def gqa_source():
    return ModelShape(
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=96,
        hidden_size=64,
        vocab_size=512,
    )


def test_target_inference_rules(gqa_source):
    # Only kv heads: whole groups go, query heads per group are kept.
    t = gqa_source.resolve_target({"num_key_value_heads": 1})
    assert (t.num_attention_heads, t.num_key_value_heads) == (4, 1)
    # Only query heads under GQA: kv heads kept, heads per group shrink.
    t = gqa_source.resolve_target({"num_attention_heads": 4})
    assert (t.num_attention_heads, t.num_key_value_heads) == (4, 2)
    mha = ModelShape(4, 4, 4, 16, 96, 64, 512)
    t = mha.resolve_target({"num_attention_heads": 2})
    assert (t.num_attention_heads, t.num_key_value_heads) == (2, 2)


@pytest.mark.parametrize(
    "target, message",
    [
        ({"hidden_size": 128}, "larger than the source"),
        ({"num_hidden_layers": 0}, "must be positive"),
        ({"intermediate_size": -3}, "must be positive"),
        ({"num_attention_heads": 6, "num_key_value_heads": 4}, "larger than the source"),
        ({"num_attention_heads": 3, "num_key_value_heads": 2}, "not divisible"),
        ({"num_attention_heads": 8, "num_key_value_heads": 1}, "query heads per kv head"),
        ({"head_dim": 4}, "head_dim"),
        ({"hiden_size": 32}, "Unknown target_shape key"),
        ({"hidden_size": 32.5}, "must be an integer"),
        ({}, "nothing to prune"),
    ],
)
def test_bad_targets_are_rejected(gqa_source, target, message):
    with pytest.raises(ShapeError, match=message):
        gqa_source.resolve_target(target)


def test_unsupported_family_names_supported_ones():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedModelError, match=r"gemma3_text.*llama.*mistral.*qwen2.*qwen3"):
        get_family(model)
