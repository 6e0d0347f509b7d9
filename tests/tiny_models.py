"""Tiny random-weight models of every supported family, built from configs (no downloads).

These are for unit tests only: anything that claims quality uses the real SmolLM2-135M.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

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
