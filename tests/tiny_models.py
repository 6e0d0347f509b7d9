"""Tiny random-weight models of every supported family, built from configs (no downloads).

These are for unit tests only: anything that claims quality uses the real SmolLM2-135M.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

from composer_shear.families import get_family

VOCAB_SIZE = 512

# name -> (config class, kwargs). Every family we support, MHA and GQA, with biases where the
# family has them. Tied/untied embeddings are a separate axis (see `tiny_config`).
FAMILIES: dict[str, tuple[type[PretrainedConfig], dict]] = {
    # Llama-2 style multi-head attention.
    "llama_mha": (
        LlamaConfig,
        dict(num_attention_heads=4, num_key_value_heads=4, head_dim=16),
    ),
    # Llama-3 / SmolLM2 style grouped-query attention.
    "llama_gqa": (
        LlamaConfig,
        dict(num_attention_heads=8, num_key_value_heads=2, head_dim=8),
    ),
    "mistral": (
        MistralConfig,
        dict(num_attention_heads=8, num_key_value_heads=4, head_dim=8, sliding_window=64),
    ),
    # Qwen2 has q/k/v biases.
    "qwen2": (
        Qwen2Config,
        dict(num_attention_heads=6, num_key_value_heads=2, head_dim=8, use_sliding_window=False),
    ),
    # Qwen3: per-head q_norm / k_norm, explicit head_dim (here not hidden / heads), biases on
    # q/k/v/o with attention_bias; sliding windows on the upper half of the layers.
    "qwen3": (
        Qwen3Config,
        dict(
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=12,
            attention_bias=True,
            use_sliding_window=True,
            sliding_window=8,
            max_window_layers=2,
        ),
    ),
    "qwen3_mqa": (
        Qwen3Config,
        dict(num_attention_heads=4, num_key_value_heads=1, head_dim=16, use_sliding_window=False),
    ),
    # Gemma 3 text: four norms per layer, (1 + weight) norms, scaled embedding, local/global
    # layers alternating (pattern 2 gives both kinds in 4 layers, the 8-token window is
    # shorter than the test sequences), q/k norms, logit soft-capping.
    "gemma3": (
        Gemma3TextConfig,
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=8,
            sliding_window_pattern=2,
            final_logit_softcapping=30.0,
            attention_bias=True,
        ),
    ),
    # Gemma-3-270M's layout: multi-query attention, head_dim larger than hidden / heads.
    "gemma3_mqa": (
        Gemma3TextConfig,
        dict(
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=24,
            query_pre_attn_scalar=24,
            sliding_window=8,
            sliding_window_pattern=3,
        ),
    ),
}


def tiny_config(family: str, tie_word_embeddings: bool = False, **overrides) -> PretrainedConfig:
    """Returns a tiny config of ``family`` (a key of :data:`FAMILIES`)."""
    config_cls, kwargs = FAMILIES[family]
    base = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    base.update(kwargs)
    base.update(overrides)
    return config_cls(**base)


def prunable_dims(family: str) -> set[str]:
    """The target keys the family of ``family`` can prune (Gemma 3 cannot prune layers)."""
    fixed = get_family(tiny_config(family)).fixed_dims(tiny_config(family))
    keys = {"num_hidden_layers", "num_attention_heads", "num_key_value_heads"}
    return keys.union({"intermediate_size", "hidden_size"}) - set(fixed)


def tiny_model(family: str, tie_word_embeddings: bool = False, seed: int = 0, **overrides):
    """Builds a tiny random-weight model of ``family`` in fp32 eval mode."""
    torch.manual_seed(seed)
    config = tiny_config(family, tie_word_embeddings, **overrides)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    # Random norm weights make the hidden-dim tests meaningful (HF initialises them to 1).
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                param.normal_(0.0, 0.1)
    return model.eval()


def _training_text() -> str:
    """A few hundred KB of real text from the Python standard library (present everywhere)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts = []
    for name in ("textwrap.py", "argparse.py", "dataclasses.py", "typing.py"):
        path = stdlib / name
        if path.exists():
            parts.append(path.read_text(encoding="utf-8", errors="replace"))
    return "\n".join(parts)


def build_tiny_tokenizer(out_dir: Path, vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Trains a small byte-level BPE tokenizer on stdlib text and saves it to ``out_dir``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([_training_text()], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast


def save_tiny_checkpoint(model: PreTrainedModel, tokenizer_dir: Path, out_dir: Path) -> Path:
    """Writes ``model`` plus the tiny tokenizer as a Hugging Face directory."""
    model.save_pretrained(out_dir)
    PreTrainedTokenizerFast.from_pretrained(tokenizer_dir).save_pretrained(out_dir)
    return out_dir
