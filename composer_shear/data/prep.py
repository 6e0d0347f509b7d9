"""Raw text per domain -> tokenized, concatenated MDS shards per domain and split.

Output layout (one Streaming dataset per domain and split)::

    OUT/<domain>/train/{index.json, shard.*.mds, tokens_meta.json}
    OUT/<domain>/eval/{index.json, shard.*.mds, tokens_meta.json}
    OUT/summary.json

Each sample is one ``tokens`` column holding exactly ``max_seq_len`` token ids, encoded as
``ndarray:<dtype>``. That is LLM Foundry's pre-tokenized format: ``llmfoundry`` ``text``
datasets read such a folder unchanged for continued pre-training (its ``StreamingTextDataset``
casts an ``ndarray`` ``tokens`` column to int64). ``tokens_meta.json`` records the dtype, the
sample length and the tokenizer's vocabulary size so that the ``multi_domain`` loader can
check a config against the shards at build time, plus the tokenizer's name and a hash of
its vocabulary, which every reader of the shards compares with its own tokenizer
(:mod:`composer_shear.data.identity`); ``index.json`` records each shard's size and
``xxh3_64`` hash, which the loader checks (:mod:`composer_shear.data.verify`).

Input: either a folder with one subfolder per domain holding ``.txt`` / ``.jsonl`` files, or
one ``.jsonl`` file whose lines carry a ``domain`` field. A domain folder holding a
``train.jsonl`` + ``eval.jsonl`` pair uses those splits; otherwise an ``eval_fraction`` of
its documents (seeded, by document) becomes the eval split. A ``.txt`` file is one document;
a ``.jsonl`` line is one document (its ``text`` field, or the line itself if it is a JSON
string).

Documents are tokenized without special tokens, each followed by EOS, concatenated and cut
into ``max_seq_len`` samples; the last partial sample of each split is dropped (and counted).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from composer_shear.data.identity import META_FILE, read_split_meta, tokenizer_identity
from composer_shear.interface import ModelPathError, fraction, model_path, positive_int, progress
from composer_shear.output_paths import (
    RUN_MARKER,
    OutputPathError,
    check_remote_output,
    check_replaceable,
    discard_staged,
    is_remote,
    publish_staged,
    recover_interrupted,
    remote_stage,
    replace_dir,
    run_marker_text,
    staging_dir,
    write_run_marker,
    write_text_output,
)

__all__ = [
    "META_FILE",
    "SPLITS",
    "DataPrepError",
    "choose_token_dtype",
    "prepare_domains",
    "read_split_meta",
    "register_cli",
]

SPLITS = ("train", "eval")
SUMMARY_FILE = "summary.json"
KEY = "tokenize OUT"  # names the output in messages
# Content hash of each shard, recorded in index.json (a fast non-cryptographic hash).
SHARD_HASHES = ("xxh3_64",)
FORMAT_VERSION = 1
# Unsigned first: they double the range at the same width; int32 is what LLM Foundry's own
# converter writes, kept as an explicit choice for compatibility.
SUPPORTED_DTYPES = ("uint16", "uint32", "int32", "int64")
_TEXT_SUFFIXES = (".txt", ".jsonl")
_NOT_DOMAINS = {"license", "licenses", "licence", "licences"}


class DataPrepError(RuntimeError):
    """A problem with the input, the tokenizer or the output location (nothing was written)."""


def choose_token_dtype(vocab_size: int, requested: str | None = None) -> str:
    """Returns the numpy dtype name used to store token ids of a ``vocab_size`` vocabulary.

    Args:
        vocab_size: Number of token ids (the largest id is ``vocab_size - 1``).
        requested: Force this dtype (one of :data:`SUPPORTED_DTYPES`); ``None`` picks the
            smallest that fits (``uint16`` up to 65,536 ids, else ``uint32``).

    Raises:
        DataPrepError: The requested dtype is unknown or cannot hold every token id.
    """
    if requested is None:
        return "uint16" if vocab_size <= np.iinfo(np.uint16).max + 1 else "uint32"
    if requested not in SUPPORTED_DTYPES:
        raise DataPrepError(f"token dtype {requested!r} is not one of {SUPPORTED_DTYPES}")
    if vocab_size - 1 > np.iinfo(np.dtype(requested)).max:
        raise DataPrepError(
            f"a vocabulary of {vocab_size:,} tokens does not fit {requested} "
            f"(max id {np.iinfo(np.dtype(requested)).max:,}); use uint32"
        )
    return requested


# ----------------------------------------------------------------------------- reading input


def _jsonl_documents(path: Path, domain_field: str | None = None) -> Iterator[tuple[Any, str]]:
    """Yields ``(domain or None, text)`` per line of a JSONL file."""
    try:
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataPrepError(f"{path}:{line_no}: not valid JSON ({e.msg})") from e
                if isinstance(record, str):
                    yield None, record
                    continue
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise DataPrepError(
                        f"{path}:{line_no}: expected an object with a 'text' string"
                    )
                domain = None
                if domain_field is not None:
                    domain = record.get(domain_field)
                    if not isinstance(domain, str) or not domain:
                        raise DataPrepError(
                            f"{path}:{line_no}: missing or empty {domain_field!r} field"
                        )
                yield domain, record["text"]
    except (OSError, UnicodeDecodeError) as e:
        raise DataPrepError(f"cannot read {path}: {e}") from e


def _file_documents(path: Path) -> list[str]:
    """All documents of one .txt (one document) or .jsonl (one per line) file."""
    if path.suffix == ".jsonl":
        return [text for _, text in _jsonl_documents(path)]
    try:
        return [path.read_text(encoding="utf-8")]
    except (OSError, UnicodeDecodeError) as e:
        raise DataPrepError(f"cannot read {path}: {e}") from e


def _domain_seed(seed: int, domain: str) -> int:
    """A per-domain seed that does not depend on Python's hash randomisation."""
    digest = hashlib.sha256(f"{seed}:{domain}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _split_documents(
    docs: list[str], eval_fraction: float, seed: int, domain: str
) -> dict[str, list[str]]:
    """Splits documents of one domain into train/eval by document, seeded."""
    order = list(range(len(docs)))
    random.Random(_domain_seed(seed, domain)).shuffle(order)
    num_eval = math.ceil(eval_fraction * len(docs)) if eval_fraction > 0 else 0
    if num_eval >= len(docs):
        raise DataPrepError(
            f"domain {domain!r}: {len(docs)} document(s) cannot be split into train and eval "
            f"with eval_fraction={eval_fraction}; add documents or provide train.jsonl/eval.jsonl"
        )
    eval_ids = set(order[:num_eval])
    return {
        "train": [d for i, d in enumerate(docs) if i not in eval_ids],
        "eval": [d for i, d in enumerate(docs) if i in eval_ids],
    }


def _is_presplit(folder: Path) -> bool:
    return all((folder / f"{split}.jsonl").is_file() for split in SPLITS)


def _collect_input(
    input_path: Path,
    eval_fraction: float,
    seed: int,
    domains: Sequence[str] | None = None,
    log: Callable[..., None] = print,
) -> dict[str, dict[str, list[str]]]:
    """Reads the input into ``{domain: {split: [documents]}}``."""
    if not input_path.exists():
        raise DataPrepError(f"input {input_path} does not exist")
    raw: dict[str, list[str]] = {}
    presplit: dict[str, dict[str, list[str]]] = {}
    if input_path.is_file():
        if input_path.suffix != ".jsonl":
            raise DataPrepError(f"input file {input_path} must be .jsonl with a 'domain' field")
        for domain, text in _jsonl_documents(input_path, domain_field="domain"):
            raw.setdefault(domain, []).append(text)
        if domains is not None:
            missing = sorted(set(domains) - set(raw))
            if missing:
                raise DataPrepError(f"{input_path} has no documents of domain(s) {missing}")
            raw = {d: docs for d, docs in raw.items() if d in set(domains)}
        if not raw:
            raise DataPrepError(f"{input_path} holds no documents")
    else:
        domain_dirs = sorted(
            p for p in input_path.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))
        )
        if domains is not None:
            missing = sorted(set(domains) - {p.name for p in domain_dirs})
            if missing:
                raise DataPrepError(f"{input_path} has no domain folder(s) {missing}")
            domain_dirs = [p for p in domain_dirs if p.name in set(domains)]
        else:
            # Licence texts shipped next to a corpus (data/sample_corpus/LICENSES) are no domain.
            skipped = [p.name for p in domain_dirs if p.name.lower() in _NOT_DOMAINS]
            if skipped:
                log(f"skipping {', '.join(skipped)} (not a domain; select with --domains)")
            domain_dirs = [p for p in domain_dirs if p.name.lower() not in _NOT_DOMAINS]
        if not domain_dirs:
            raise DataPrepError(f"{input_path} has no domain subfolders")
        for domain_dir in domain_dirs:
            domain = domain_dir.name
            if _is_presplit(domain_dir):
                presplit[domain] = {
                    split: _file_documents(domain_dir / f"{split}.jsonl") for split in SPLITS
                }
                continue
            files = sorted(
                p for p in domain_dir.rglob("*") if p.is_file() and p.suffix in _TEXT_SUFFIXES
            )
            if not files:
                raise DataPrepError(f"domain {domain!r}: no .txt or .jsonl files in {domain_dir}")
            raw[domain] = [doc for path in files for doc in _file_documents(path)]
    out = dict(presplit)
    for domain, docs in raw.items():
        out[domain] = _split_documents(docs, eval_fraction, seed, domain)
    for domain, splits in sorted(out.items()):
        for split in SPLITS:
            if not any(doc.strip() for doc in splits[split]):
                raise DataPrepError(f"domain {domain!r}: the {split} split has no text")
    return dict(sorted(out.items()))


# ----------------------------------------------------------------------------- tokenizing


def _load_tokenizer(tokenizer: Any) -> Any:
    if not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(tokenizer))
    except Exception as e:  # transformers raises OSError, ValueError, HFValidationError ...
        raise DataPrepError(f"cannot load a tokenizer from {tokenizer!r}: {e}") from e


def _token_stream(tokenizer: Any, docs: Iterable[str], eos_id: int) -> Iterator[list[int]]:
    """Token ids of each non-empty document followed by EOS, tokenized in small batches."""
    batch: list[str] = []

    def flush() -> Iterator[list[int]]:
        encoded = tokenizer(batch, add_special_tokens=False)["input_ids"]
        for ids in encoded:
            yield [*ids, eos_id]

    for doc in docs:
        if not doc.strip():
            continue
        batch.append(doc)
        if len(batch) == 64:
            yield from flush()
            batch = []
    if batch:
        yield from flush()


def _write_split(
    out_dir: Path,
    tokenizer: Any,
    docs: Iterable[str],
    max_seq_len: int,
    dtype: str,
    vocab_size: int,
    eos_id: int,
    meta: dict[str, Any],
    remote: str | None = None,
) -> dict[str, int]:
    """Tokenizes, concatenates and writes one split; returns its counts.

    With ``remote`` (an object-store folder), Streaming's writer uploads each shard there as
    it is finished and removes it from ``out_dir``; the split's metadata follows.
    """
    from streaming import MDSWriter

    np_dtype = np.dtype(dtype)
    buffer: list[int] = []
    counts = {"documents": 0, "samples": 0, "tokens": 0, "dropped_tokens": 0}
    with MDSWriter(
        out=str(out_dir) if remote is None else (str(out_dir), remote),
        columns={"tokens": f"ndarray:{dtype}:{max_seq_len}"},
        compression=None,
        hashes=list(SHARD_HASHES),  # recorded in index.json; `verify_hashes` checks them
    ) as writer:
        for ids in _token_stream(tokenizer, docs, eos_id):
            counts["documents"] += 1
            buffer.extend(ids)
            while len(buffer) >= max_seq_len:
                sample = np.asarray(buffer[:max_seq_len], dtype=np.int64)
                del buffer[:max_seq_len]
                if sample.max() >= vocab_size or sample.min() < 0:
                    raise DataPrepError(
                        f"token id {int(sample.max())} outside the vocabulary ({vocab_size})"
                    )
                writer.write({"tokens": sample.astype(np_dtype)})
                counts["samples"] += 1
                counts["tokens"] += max_seq_len
    counts["dropped_tokens"] = len(buffer)
    text = json.dumps({**meta, **counts}, indent=2)
    if remote is None:
        (out_dir / META_FILE).write_text(text, encoding="utf-8")
    else:
        write_text_output(f"{remote}/{META_FILE}", text, KEY)
    return counts


def prepare_domains(
    input_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    tokenizer: Any,
    max_seq_len: int,
    eval_fraction: float = 0.05,
    seed: int = 17,
    overwrite: bool = False,
    verbose: bool = True,
    token_dtype: str | None = None,
    domains: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Tokenizes raw text per domain into MDS shards ``out_dir/<domain>/{train,eval}``.

    The output is written to a temporary folder next to ``out_dir`` and renamed into place
    at the end, so a failure never leaves a half-written ``out_dir``. An object-store
    ``out_dir`` (``s3://bucket/data``) gets each shard uploaded as it is written, to a staging
    sibling that is published at the end (:func:`~composer_shear.output_paths.upload_dir`'s
    rules): local disk holds one shard at a time.

    Args:
        input_dir: Folder with one subfolder per domain, or one JSONL file with a ``domain``
            field per line.
        out_dir: Output folder, local or an object-store URI (must be absent or empty unless
            ``overwrite``).
        tokenizer: A Hugging Face tokenizer, or a path/name for ``AutoTokenizer``; use the
            tokenizer of the model to prune.
        max_seq_len: Tokens per sample.
        eval_fraction: Fraction of each domain's documents held out for eval when the domain
            has no ``train.jsonl``/``eval.jsonl`` pair.
        seed: Seed of the document-level split.
        overwrite: Replace an existing ``out_dir``.
        verbose: Print progress and a summary table.
        token_dtype: Force the stored dtype (default: ``uint16`` if the vocabulary fits,
            else ``uint32``).
        domains: Only these domains (default: every subfolder except hidden ones, ``_*``
            and ``LICENSES``-like folders).

    Returns:
        The summary: ``{"domains": {domain: {split: counts}}, "dtype", "max_seq_len",
        "vocab_size", "tokenizer", ...}`` (also written to ``out_dir/summary.json``).

    Raises:
        DataPrepError: Empty domain, unreadable file, missing tokenizer, vocabulary too large
            for the dtype, existing output, or bad arguments.
    """
    if max_seq_len < 1:
        raise DataPrepError(f"max_seq_len must be positive, got {max_seq_len}")
    if not 0.0 <= eval_fraction < 1.0:
        raise DataPrepError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    remote = str(out_dir).rstrip("/") if is_remote(out_dir) else None
    out_path = None if remote else Path(out_dir).resolve()
    try:
        # An existing folder is replaced only if an earlier tokenize (or another of our
        # commands) wrote it: a folder of someone else's files is never deleted.
        if remote is not None:
            check_remote_output(remote, KEY, overwrite)
        else:
            for line in recover_interrupted(out_path):
                print(line, file=sys.stderr)
            check_replaceable(out_path, KEY, overwrite)
    except OutputPathError as error:
        raise DataPrepError(str(error)) from error

    log = print if verbose else (lambda *a, **k: None)
    tok = _load_tokenizer(tokenizer)
    eos_id = tok.eos_token_id
    if eos_id is None:
        raise DataPrepError("the tokenizer has no EOS token, which separates documents")
    vocab_size = len(tok)
    dtype = choose_token_dtype(vocab_size, token_dtype)
    documents = _collect_input(Path(input_dir), eval_fraction, seed, domains, log)
    log(
        f"tokenizing {len(documents)} domain(s) into {max_seq_len}-token samples "
        f"(vocab {vocab_size:,}, {dtype})"
    )

    meta_base = {
        "format_version": FORMAT_VERSION,
        "column": "tokens",
        "dtype": dtype,
        "max_seq_len": max_seq_len,
        "vocab_size": vocab_size,
        "eos_token_id": eos_id,
        # Name, vocabulary size and vocabulary hash: the loader, calibration and
        # reference-loss refuse a run whose tokenizer is another (data.identity).
        **tokenizer_identity(tok),
        "tokenizer": getattr(tok, "name_or_path", None) or str(tokenizer),
    }
    summary: dict[str, Any] = {**meta_base, "seed": seed, "eval_fraction": eval_fraction}
    summary["domains"] = {}
    try:
        staged = None if remote is None else remote_stage(remote, KEY)
    except OutputPathError as error:
        raise DataPrepError(str(error)) from error
    scratch = (
        contextlib.nullcontext(None)
        if remote is None
        else tempfile.TemporaryDirectory(prefix="composer_shear_tokenize_")
    )
    with scratch as local:
        tmp = staging_dir(out_path) if out_path is not None else Path(local)
        try:
            _tokenize_domains(
                documents, tmp, staged, tok, max_seq_len, dtype, vocab_size, eos_id, meta_base,
                summary, verbose, log,
            )  # fmt: skip
            text = json.dumps(summary, indent=2)
            if staged is None:
                (tmp / SUMMARY_FILE).write_text(text, encoding="utf-8")
                write_run_marker(tmp, "composer-shear tokenize")
                replace_dir(tmp, out_path)
            else:
                write_text_output(f"{staged}/{SUMMARY_FILE}", text, KEY)
                write_text_output(
                    f"{staged}/{RUN_MARKER}", run_marker_text("composer-shear tokenize"), KEY
                )
                publish_staged(staged, remote, KEY)
        except BaseException as error:
            if staged is None:
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                discard_staged(staged, remote, KEY)
            if isinstance(error, OutputPathError):
                raise DataPrepError(str(error)) from error
            raise
    if verbose:
        print(format_summary(summary))
        print(f"wrote {remote or out_path}")
    return summary


def _tokenize_domains(
    documents: dict[str, dict[str, list[str]]],
    tmp: Path,
    staged: str | None,
    tok: Any,
    max_seq_len: int,
    dtype: str,
    vocab_size: int,
    eos_id: int,
    meta_base: dict[str, Any],
    summary: dict[str, Any],
    verbose: bool,
    log: Callable[..., None],
) -> None:
    """Writes every domain and split under ``tmp`` (shards uploaded to ``staged`` if given)."""
    for domain, splits in documents.items():
        summary["domains"][domain] = {}
        for split in SPLITS:
            start = time.perf_counter()
            counts = _write_split(
                tmp / domain / split,
                tok,
                progress(splits[split], desc=f"{domain}/{split}", unit="doc", enabled=verbose),
                max_seq_len,
                dtype,
                vocab_size,
                eos_id,
                {**meta_base, "domain": domain, "split": split},
                remote=None if staged is None else f"{staged}/{domain}/{split}",
            )
            if counts["samples"] == 0:
                raise DataPrepError(
                    f"domain {domain!r}, {split}: only {counts['dropped_tokens']} tokens, "
                    f"fewer than one {max_seq_len}-token sample"
                )
            summary["domains"][domain][split] = counts
            log(
                f"  {domain}/{split}: {counts['documents']:,} docs -> "
                f"{counts['samples']:,} samples ({time.perf_counter() - start:.1f} s)"
            )


def format_summary(summary: dict[str, Any]) -> str:
    """A plain-text table of documents, samples and tokens per domain and split."""
    header = f"{'domain':<16}{'split':<7}{'docs':>10}{'samples':>10}{'tokens':>14}{'dropped':>10}"
    lines = [header, "-" * len(header)]
    totals = dict.fromkeys(SPLITS, 0)
    for domain, splits in summary["domains"].items():
        for split in SPLITS:
            c = splits[split]
            totals[split] += c["tokens"]
            lines.append(
                f"{domain:<16}{split:<7}{c['documents']:>10,}{c['samples']:>10,}"
                f"{c['tokens']:>14,}{c['dropped_tokens']:>10,}"
            )
    lines.append("-" * len(header))
    lines.append("  ".join(f"{split} tokens: {n:,}" for split, n in totals.items()))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``tokenize`` options to ``parser``."""
    parser.add_argument(
        "input", help="folder with one subfolder per domain, or a JSONL file with 'domain'"
    )
    parser.add_argument(
        "out", help="output folder, local or s3://... (written OUT/<domain>/{train,eval})"
    )
    parser.add_argument(
        "--tokenizer", required=True, help="tokenizer directory or hub id (the model to prune)"
    )
    parser.add_argument("--max-seq-len", type=positive_int, required=True, help="tokens per sample")
    parser.add_argument(
        "--eval-fraction",
        type=fraction,
        default=0.05,
        help="share of each domain's documents held out for eval, in [0, 1) (domains with "
        "their own train.jsonl / eval.jsonl keep that split)",
    )
    parser.add_argument("--seed", type=int, default=17, help="seed of the train/eval split")
    parser.add_argument(
        "--token-dtype",
        choices=SUPPORTED_DTYPES,
        default=None,
        help="stored token dtype (default: uint16 if the vocabulary fits, else uint32)",
    )
    parser.add_argument(
        "--domains",
        nargs="+",
        default=None,
        help="only these domains (default: every domain subfolder)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    parser.add_argument("--quiet", action="store_true", help="no progress output")


def run_cli(args: argparse.Namespace) -> int:
    """Runs :func:`prepare_domains` from parsed arguments; returns the exit code."""
    try:
        prepare_domains(
            args.input,
            args.out,
            model_path(args.tokenizer, "tokenizer"),
            args.max_seq_len,
            eval_fraction=args.eval_fraction,
            seed=args.seed,
            overwrite=args.overwrite,
            verbose=not args.quiet,
            token_dtype=args.token_dtype,
            domains=args.domains,
        )
    except (DataPrepError, ModelPathError) as e:
        # Bad values of the command line were refused by argparse (exit 2); what is left
        # failed on the files themselves.
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def register_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Adds the ``tokenize`` subcommand to an ``argparse`` subparsers object."""
    parser = subparsers.add_parser(
        "tokenize",
        help="raw text per domain -> tokenized MDS shards per domain (train/eval)",
        description=__doc__.split("\n\n")[0],
    )
    add_arguments(parser)
    parser.set_defaults(func=run_cli)
    return parser
