#!/usr/bin/env python3
r"""Raw text per domain -> tokenized MDS shards per domain (same as ``composer-shear tokenize``).

Usage::

    python data_prep/tokenize_corpus.py data/sample_corpus /tmp/mds \\
        --tokenizer PATH_TO_MODEL --max-seq-len 2048

Writes ``OUT/<domain>/train`` and ``OUT/<domain>/eval`` (LLM Foundry's pre-tokenized format,
usable by ``train_loader: {name: multi_domain}`` and by plain ``text`` datasets).
"""

from __future__ import annotations

import argparse
import sys

from composer_shear.data.prep import add_arguments, run_cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run_cli(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
