"""Small per-domain MDS shards for tests, in the layout ``prepare_domains`` writes."""

from __future__ import annotations

import json
from pathlib import Path

from composer_shear.data.prep import prepare_domains


def write_raw_corpus(root: Path, domains: dict[str, list[str]]) -> Path:
    """Writes ``root/<domain>/{train,eval}.jsonl``; every 5th document goes to eval."""
    for domain, docs in domains.items():
        folder = root / domain
        folder.mkdir(parents=True, exist_ok=True)
        splits = {"train": [], "eval": []}
        for i, doc in enumerate(docs):
            splits["eval" if i % 5 == 4 else "train"].append(doc)
        for split, split_docs in splits.items():
            with open(folder / f"{split}.jsonl", "w", encoding="utf-8") as f:
                for doc in split_docs:
                    f.write(json.dumps({"text": doc, "source": domain}) + "\n")
    return root


def synthetic_domains(
    names: tuple[str, ...] = ("code", "books", "docs"), docs_per_domain: int = 40, seed: int = 0
) -> dict[str, list[str]]:
    """Distinct, deterministic documents per domain (each a few hundred characters)."""
    import random

    rng = random.Random(seed)
    words = {
        "code": ["def", "return", "self", "import", "class", "for", "in", "if", "None", "x"],
        "books": ["the", "king", "said", "love", "night", "sword", "castle", "and", "of", "a"],
        "docs": ["parameter", "returns", "the", "value", "example", "see", "also", "type", "int"],
    }
    out = {}
    for name in names:
        vocab = words.get(name, [name, "lorem", "ipsum", "dolor", "sit", "amet"])
        out[name] = [
            f"{name} document {i}: "
            + " ".join(rng.choice(vocab) for _ in range(rng.randint(40, 120)))
            for i in range(docs_per_domain)
        ]
    return out


def write_domain_shards(
    out_dir: Path,
    tokenizer,
    domains: dict[str, list[str]] | None = None,
    max_seq_len: int = 32,
    token_dtype: str | None = None,
) -> Path:
    """Tokenizes ``domains`` (default: :func:`synthetic_domains`) into ``out_dir/<domain>/<split>``.

    Args:
        out_dir: Output folder (created; must not exist).
        tokenizer: A tokenizer object or a path for ``AutoTokenizer``.
        domains: ``{domain: [documents]}``; every 5th document becomes eval data.
        max_seq_len: Tokens per sample.
        token_dtype: Force the stored token dtype.

    Returns:
        ``out_dir``.
    """
    domains = synthetic_domains() if domains is None else domains
    out_dir = Path(out_dir)
    raw = write_raw_corpus(out_dir.parent / f"{out_dir.name}_raw", domains)
    prepare_domains(raw, out_dir, tokenizer, max_seq_len, verbose=False, token_dtype=token_dtype)
    return out_dir
