"""Which tokenizer wrote a set of shards, and refusing a run whose tokenizer is another.

Token-id shards carry no text: the same ids mean different words under another tokenizer, and
a vocabulary-size check passes a 32k-token corpus under a 128k-token tokenizer. ``tokenize``
records the tokenizer's name and a hash of its vocabulary (every token string with its id) in
each split's ``tokens_meta.json``; the ``multi_domain`` loader, the calibration reader and
``reference-loss`` compare that record with the run's tokenizer, for local shards and for a
``remote:`` copy alike (its ``tokens_meta.json`` is fetched on its own, before any shard).
The comparison is by vocabulary hash: one tokenizer saved under two paths passes; the names
are only reported.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = [
    "META_FILE",
    "TokenizerMismatchError",
    "check_split_tokenizer",
    "read_split_meta",
    "remote_split_meta",
    "tokenizer_identity",
]

log = logging.getLogger(__name__)

META_FILE = "tokens_meta.json"


class TokenizerMismatchError(ValueError):
    """Shards were tokenized with another tokenizer than the run's."""


def tokenizer_identity(tokenizer: Any) -> dict[str, Any]:
    """The name, vocabulary size and vocabulary hash of a Hugging Face tokenizer.

    Returns:
        ``{"tokenizer": name, "vocab_size": int, "tokenizer_vocab_sha256": hex}``; the hash
        covers every ``(token, id)`` pair of ``get_vocab()`` (added tokens included), sorted
        by id.
    """
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: (item[1], item[0]))
    digest = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode("utf-8")).hexdigest()
    return {
        "tokenizer": str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__),
        "vocab_size": len(tokenizer),
        "tokenizer_vocab_sha256": digest,
    }


def read_split_meta(split_dir: str | os.PathLike) -> dict[str, Any] | None:
    """Reads ``tokens_meta.json`` of one domain split, or ``None`` if there is none."""
    path = Path(split_dir) / META_FILE
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def remote_split_meta(remote_split: str) -> dict[str, Any] | None:
    """Fetches ``tokens_meta.json`` of a remote split (any URI Composer reads), or ``None``."""
    # Composer costs seconds to import; `composer-shear tokenize` imports this module too.
    from composer.utils import get_file

    with tempfile.TemporaryDirectory() as tmp:
        destination = Path(tmp) / META_FILE
        try:
            get_file(f"{remote_split.rstrip('/')}/{META_FILE}", str(destination))
        except FileNotFoundError:
            return None
        return json.loads(destination.read_text(encoding="utf-8"))


def check_split_tokenizer(meta: dict[str, Any] | None, tokenizer: Any, where: str) -> None:
    """Refuses shards whose recorded tokenizer is not ``tokenizer``, naming both.

    Shards written before the hash was recorded (or by other tools) are let through with a
    warning: only their vocabulary size can be checked, which the loader does.

    Raises:
        TokenizerMismatchError: The recorded vocabulary hash differs from the tokenizer's.
    """
    if tokenizer is None:
        return
    recorded = None if meta is None else meta.get("tokenizer_vocab_sha256")
    if recorded is None:
        log.warning(
            "%s records no tokenizer vocabulary hash (tokenized before it was recorded): "
            "cannot check that it was tokenized with the run's tokenizer; re-tokenize with "
            "`composer-shear tokenize` to have it checked.",
            where,
        )
        return
    mine = tokenizer_identity(tokenizer)
    if recorded != mine["tokenizer_vocab_sha256"]:
        assert meta is not None
        raise TokenizerMismatchError(
            f"{where} was tokenized with {meta.get('tokenizer')!r} ({meta.get('vocab_size')} "
            f"tokens, vocabulary sha256 {recorded[:12]}), but this run's tokenizer is "
            f"{mine['tokenizer']!r} ({mine['vocab_size']} tokens, vocabulary sha256 "
            f"{mine['tokenizer_vocab_sha256'][:12]}); re-tokenize the data with this run's "
            "tokenizer (`composer-shear tokenize --tokenizer ...`) or use the tokenizer it "
            "was written with."
        )
