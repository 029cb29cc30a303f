"""Domain corpora built from text that every CPython installation carries.

Three domains, each a list of documents (strings), split deterministically into train and held-out test
documents by a hash of the document's name:

* ``code``    -- Python source of the standard library (tests excluded), docstrings stripped so that the
                 domain is code, not prose.
* ``prose``   -- English: ``pydoc_data.topics`` (the language reference chapters) and the docstrings of
                 the standard library's modules, classes and functions.
* ``records`` -- structured records (JSON lines, CSV, key=value) generated deterministically from stdlib
                 data tables: ``unicodedata``, ``http.HTTPStatus``, ``errno``, ``html.entities``,
                 ``mimetypes``, ``encodings.aliases``, ``calendar``, ``locale``.

The build records a SHA-256 per domain and split, so a zoo built on another Python version is visibly
built from different text.
"""

from __future__ import annotations

import ast
import calendar
import datetime
import errno
import hashlib
import html.entities
import http
import json
import locale
import logging
import mimetypes
import pathlib
import sysconfig
import unicodedata
import warnings
from dataclasses import dataclass, field
from encodings.aliases import aliases as encoding_aliases

log = logging.getLogger(__name__)

DOMAINS: tuple[str, ...] = ("code", "prose", "records")

# Fraction of documents (by name hash) held out for evaluation.
TEST_FRACTION = 0.06
# Directories of the standard library left out of every corpus.
_SKIP_PARTS = {"test", "tests", "idle_test", "site-packages", "lib2to3", "__pycache__"}


@dataclass
class Corpus:
    """One domain: named documents split into train and test."""

    domain: str
    max_chars: int
    train: list[str] = field(default_factory=list)
    test: list[str] = field(default_factory=list)
    _counted: dict[str, tuple[int, int]] = field(default_factory=dict, repr=False)

    def add(self, name: str, text: str) -> None:
        """Add a document to its split; training documents past ``max_chars`` are dropped."""
        text = text.strip()
        if not text:
            return
        if _is_test(name):
            self.test.append(text)
        elif self.chars("train") < self.max_chars:
            self.train.append(text)

    @property
    def full(self) -> bool:
        """Both splits have what they need: the training cap, and a proportional test share."""
        return self.chars("train") >= self.max_chars and self.chars("test") >= self.max_chars * TEST_FRACTION

    def chars(self, split: str = "train") -> int:
        docs = getattr(self, split)
        cached = self._counted.get(split, (0, 0))
        total = cached[1] + sum(len(t) for t in docs[cached[0] :])
        self._counted[split] = (len(docs), total)
        return total

    def sha256(self, split: str = "train") -> str:
        h = hashlib.sha256()
        for doc in getattr(self, split):
            h.update(doc.encode("utf-8"))
            h.update(b"\0")
        return h.hexdigest()


def _is_test(name: str) -> bool:
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < TEST_FRACTION


def _stdlib_sources() -> list[pathlib.Path]:
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not (_SKIP_PARTS & set(p.relative_to(root).parts))]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _parse(path: pathlib.Path) -> ast.Module | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return None


_DOC_OWNERS = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _strip_docstrings(tree: ast.Module) -> ast.Module:
    for node in ast.walk(tree):
        if isinstance(node, _DOC_OWNERS) and ast.get_docstring(node, clean=False) is not None:
            body = node.body[1:] or [ast.Pass()]
            node.body = body
    return tree


def code_corpus(max_chars: int) -> Corpus:
    corpus = Corpus("code", max_chars)
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    for path in _stdlib_sources():
        tree = _parse(path)
        if tree is None:
            continue
        text = ast.unparse(_strip_docstrings(tree))
        corpus.add(path.relative_to(root).as_posix(), text + "\n")
        if corpus.full:
            break
    return corpus


def prose_corpus(max_chars: int) -> Corpus:
    corpus = Corpus("prose", max_chars)
    import pydoc_data.topics as topics

    for name in sorted(topics.topics):
        corpus.add(f"topic:{name}", topics.topics[name])
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    for path in _stdlib_sources():
        tree = _parse(path)
        if tree is None:
            continue
        rel = path.relative_to(root).as_posix()
        docs = []
        for node in ast.walk(tree):
            if isinstance(node, _DOC_OWNERS):
                doc = ast.get_docstring(node, clean=True)
                if doc and len(doc) >= 80:
                    docs.append(doc)
        if docs:
            corpus.add(f"doc:{rel}", "\n\n".join(docs))
        if corpus.full:
            break
    return corpus


def _unicode_records() -> list[tuple[str, str]]:
    docs: list[tuple[str, str]] = []
    lines: list[str] = []
    block_start = 0
    for cp in range(0x20, 0x30000):
        ch = chr(cp)
        name = unicodedata.name(ch, "")
        if not name:
            continue
        rec = {
            "codepoint": f"U+{cp:04X}",
            "name": name,
            "category": unicodedata.category(ch),
            "bidi": unicodedata.bidirectional(ch),
            "east_asian_width": unicodedata.east_asian_width(ch),
            "mirrored": bool(unicodedata.mirrored(ch)),
        }
        decomposition = unicodedata.decomposition(ch)
        if decomposition:
            rec["decomposition"] = decomposition
        numeric = unicodedata.numeric(ch, None)
        if numeric is not None:
            rec["numeric"] = numeric
        lines.append(json.dumps(rec, ensure_ascii=True))
        if cp // 256 != block_start // 256 or len(lines) >= 64:
            docs.append((f"unicode:{block_start:05X}", "\n".join(lines)))
            lines, block_start = [], cp + 1
    if lines:
        docs.append((f"unicode:{block_start:05X}", "\n".join(lines)))
    return docs


def _table_records() -> list[tuple[str, str]]:
    docs: list[tuple[str, str]] = []
    status = ["code,phrase,description"]
    for s in http.HTTPStatus:
        status.append(f'{s.value},"{s.phrase}","{s.description}"')
    docs.append(("http-status", "\n".join(status)))
    err = [
        f"errno={code} name={name} message={json.dumps(__import__('os').strerror(code))}"
        for code, name in sorted(errno.errorcode.items())
    ]
    docs.append(("errno", "\n".join(err)))
    ents = sorted(html.entities.html5.items())
    for i in range(0, len(ents), 64):
        chunk = ents[i : i + 64]
        docs.append(
            (
                f"html-entities:{i}",
                "\n".join(json.dumps({"entity": k, "text": v}, ensure_ascii=True) for k, v in chunk),
            )
        )
    mt = mimetypes.MimeTypes()
    types = sorted(mt.types_map[True].items())
    docs.append(("mimetypes", "\n".join(f"extension={ext} type={typ}" for ext, typ in types)))
    al = sorted(encoding_aliases.items())
    docs.append(("encodings", "\n".join(f"alias={a} codec={c}" for a, c in al)))
    loc = sorted(locale.locale_alias.items())
    for i in range(0, len(loc), 64):
        docs.append(
            (
                f"locale:{i}",
                "\n".join(json.dumps({"alias": a, "locale": v}) for a, v in loc[i : i + 64]),
            )
        )
    return docs


def _calendar_records(years: range) -> list[tuple[str, str]]:
    docs: list[tuple[str, str]] = []
    for year in years:
        for month in range(1, 13):
            rows = ["date,weekday,month,iso_week,day_of_year,quarter,leap_year"]
            _, days = calendar.monthrange(year, month)
            for day in range(1, days + 1):
                d = datetime.date(year, month, day)
                rows.append(
                    f"{d.isoformat()},{calendar.day_name[d.weekday()]},{calendar.month_name[month]},"
                    f"{d.isocalendar()[1]},{d.timetuple().tm_yday},Q{(month - 1) // 3 + 1},"
                    f"{str(calendar.isleap(year)).lower()}"
                )
            docs.append((f"calendar:{year}-{month:02d}", "\n".join(rows)))
    return docs


def records_corpus(max_chars: int) -> Corpus:
    corpus = Corpus("records", max_chars)
    # Interleave the sources so a size cap keeps every kind of record.
    sources = [_unicode_records(), _table_records(), _calendar_records(range(1900, 2100))]
    longest = max(len(s) for s in sources)
    for i in range(longest):
        for src in sources:
            if i < len(src):
                corpus.add(*src[i])
        if corpus.full:
            break
    return corpus


def build_corpora(max_chars: int) -> dict[str, Corpus]:
    """Build every domain's corpus, each capped at about ``max_chars`` training characters."""
    builders = {"code": code_corpus, "prose": prose_corpus, "records": records_corpus}
    out = {}
    for domain in DOMAINS:
        out[domain] = builders[domain](max_chars)
        log.info(
            "corpus %s: %d train docs (%.2f MB), %d test docs",
            domain,
            len(out[domain].train),
            out[domain].chars() / 1e6,
            len(out[domain].test),
        )
    return out
