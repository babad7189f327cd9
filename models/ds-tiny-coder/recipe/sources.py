"""Where the corpus comes from: the interpreter's standard library and the Python files
of the installed distributions whose license metadata is permissive, read from local
disk only.

A distribution's license is its ``License-Expression`` (SPDX), else its ``License ::``
trove classifiers, else its free-text ``License`` field. An SPDX expression is permissive
when every ``AND`` term (any ``OR`` alternative of it) names a permissive license; free
text and classifiers are matched by name. Anything unknown is not permissive.
"""

from __future__ import annotations

import importlib.metadata
import platform
import re
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

# SPDX identifiers counted as permissive: the MIT, BSD, Apache-2.0, PSF and ISC families,
# plus licenses at least as permissive (0BSD, Zlib, BSL-1.0, CC0-1.0, Unlicense,
# CNRI-Python). Copyleft (GPL, LGPL, MPL) and proprietary licenses are not.
PERMISSIVE_SPDX = {
    "MIT", "MIT-0", "BSD-2-Clause", "BSD-3-Clause", "0BSD", "Apache-2.0", "PSF-2.0",
    "Python-2.0", "CNRI-Python", "ISC", "Zlib", "BSL-1.0", "CC0-1.0", "Unlicense",
}  # fmt: skip
# Free-text and classifier names, matched as whole words (case-insensitive).
PERMISSIVE_NAMES = re.compile(
    r"^(mit|bsd|new bsd|simplified bsd|bsd[- ][23][- ]clause|apache|apache[- ]2(\.0)?|"
    r"apache software|apache (software )?license[, ]*(version )?2(\.0)?|psf|python software "
    r"foundation|isc|isc license \(iscl\)|isc license|mit license|bsd license|"
    r"apache 2\.0 license|zlib|cc0)( license)?$",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Source:
    """One Python file and what it belongs to."""

    package: str
    version: str
    license: str
    path: str  # "package/relative/path.py": unique across the corpus
    text: str


@dataclass(frozen=True)
class Distribution:
    name: str
    version: str
    license: str
    permissive: bool
    files: tuple[Path, ...]  # absolute paths of its .py files


def spdx_is_permissive(expression: str) -> bool:
    """``A AND (B OR C) AND D WITH exception``: every AND term must be permissive; an OR
    group is permissive when one alternative is."""
    expression = re.sub(r"\s+WITH\s+[\w.\-+]+", "", expression.strip())
    depth, terms, current = 0, [], ""
    for token in re.findall(r"\(|\)|[^\s()]+", expression):
        if token == "(":
            depth += 1
        elif token == ")":
            depth -= 1
        if depth == 0 and token.upper() == "AND":
            terms.append(current)
            current = ""
        else:
            current += f" {token}"
    terms.append(current)

    def term_ok(term: str) -> bool:
        term = term.strip()
        while term.startswith("(") and term.endswith(")"):
            term = term[1:-1].strip()
        if re.search(r"\bAND\b", term, re.IGNORECASE):
            return spdx_is_permissive(term)
        alternatives = re.split(r"\s+OR\s+", term, flags=re.IGNORECASE)
        return any(a.strip("() ") in PERMISSIVE_SPDX for a in alternatives)

    return bool(expression) and all(term_ok(t) for t in terms if t.strip())


def license_of(metadata) -> tuple[str, bool]:
    """(the license as the metadata states it, whether it is permissive)."""
    expression = (metadata.get("License-Expression") or "").strip()
    if expression:
        return expression, spdx_is_permissive(expression)
    classifiers = [
        c.split("::")[-1].strip()
        for c in metadata.get_all("Classifier") or []
        if c.startswith("License ::")
    ]
    if classifiers:
        return " OR ".join(classifiers), any(PERMISSIVE_NAMES.match(c) for c in classifiers)
    text = (metadata.get("License") or "").strip()
    first_line = text.splitlines()[0].strip() if text else ""
    if first_line in PERMISSIVE_SPDX or spdx_is_permissive(first_line):
        return first_line, True
    return first_line or "unknown", bool(PERMISSIVE_NAMES.match(first_line))


def installed_distributions(paths: list[str] | None = None) -> list[Distribution]:
    """The distributions importable from ``paths`` (default: this interpreter's sys.path)
    with their license and .py files (from their RECORD), by name."""
    found = {}
    for dist in (
        importlib.metadata.distributions(path=paths)
        if paths
        else (importlib.metadata.distributions())
    ):
        name = dist.metadata["Name"]
        if not name or name.lower() in found:
            continue
        license_text, permissive = license_of(dist.metadata)
        files = tuple(
            Path(dist.locate_file(f)).resolve()
            for f in dist.files or []
            if str(f).endswith(".py") and "__pycache__" not in str(f)
        )
        found[name.lower()] = Distribution(
            name, dist.version, license_text, permissive, tuple(sorted(files))
        )
    return [found[k] for k in sorted(found)]


def read_python(path: Path) -> str | None:
    """The file's text, or None for unreadable, non-UTF-8 or blank files."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    return text if text.strip() else None


def stdlib_sources(root: Path | None = None) -> Iterator[Source]:
    root = root or Path(sysconfig.get_paths()["stdlib"])
    version = platform.python_version()
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "__pycache__" in path.parts:
            continue
        text = read_python(path)
        if text is not None:
            rel = path.relative_to(root).as_posix()
            yield Source("python-stdlib", version, "PSF-2.0", f"stdlib/{rel}", text)


def package_sources(distributions: Iterable[Distribution]) -> Iterator[Source]:
    """Files of the permissive distributions only (the others are counted, not read)."""
    for dist in distributions:
        if not dist.permissive:
            continue
        for path in dist.files:
            text = read_python(path)
            if text is not None:
                rel = _relative(path)
                yield Source(dist.name, dist.version, dist.license, f"{dist.name}/{rel}", text)


def _relative(path: Path) -> str:
    parts = path.parts
    for marker in ("site-packages", "dist-packages"):
        if marker in parts:
            return "/".join(parts[parts.index(marker) + 1 :])
    return path.name
