"""Check every built wheel and sdist in a folder before it may be uploaded.

- Core metadata parses and validates with ``packaging.metadata`` (what ``twine check``
  and the package index run on upload), including a Markdown README as the description.
- Each package under packages/ has exactly one wheel and one sdist, at its pyproject
  version.
- Each ds-* requirement in the built metadata carries a version range.
- Each wheel ships its ``py.typed`` marker (the Protocols are typed API).

Usage: uv run --frozen python tools/check_dists.py dist [ds-x ...]
"""

from __future__ import annotations

import argparse
import sys
import tarfile
import zipfile
from pathlib import Path

import tomllib
from packaging.metadata import ExceptionGroup, Metadata
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def read_metadata(path: Path) -> tuple[bytes, list[str]]:
    """The core metadata file of a wheel or sdist, and the names of the files it holds."""
    if path.name.endswith(".whl"):
        with zipfile.ZipFile(path) as wheel:
            names = wheel.namelist()
            [metadata] = [
                n for n in names if n.count("/") == 1 and n.endswith(".dist-info/METADATA")
            ]
            return wheel.read(metadata), names
    if path.name.endswith(".tar.gz"):
        with tarfile.open(path) as sdist:
            names = sdist.getnames()
            [pkg_info] = [n for n in names if n.count("/") == 1 and n.endswith("/PKG-INFO")]
            member = sdist.extractfile(pkg_info)
            assert member is not None
            return member.read(), names
    raise ValueError(f"{path}: not a wheel (.whl) or sdist (.tar.gz)")


def check_file(path: Path) -> tuple[str, str, list[str]]:
    """(name, version, problems) of one distribution file."""
    data, names = read_metadata(path)
    try:
        metadata = Metadata.from_email(data, validate=True)
    except ExceptionGroup as group:
        return "?", "?", [f"{path.name}: invalid metadata: {e}" for e in group.exceptions]
    name, version = str(canonicalize_name(metadata.name)), str(metadata.version)
    problems = []
    if not metadata.description or not metadata.description.strip():
        problems.append(f"{path.name}: no long description (README)")
    if metadata.description_content_type != "text/markdown":
        problems.append(
            f"{path.name}: description content type is {metadata.description_content_type!r}, "
            "expected 'text/markdown'"
        )
    for requirement in metadata.requires_dist or []:
        requirement = Requirement(str(requirement))
        if requirement.name.startswith("ds-") and not requirement.specifier:
            problems.append(f"{path.name}: requires {requirement.name} with no version range")
    if path.name.endswith(".whl") and not any(n.endswith("/py.typed") for n in names):
        problems.append(f"{path.name}: no py.typed marker")
    return name, version, problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dist", type=Path)
    parser.add_argument("packages", nargs="*", help="ds-* packages expected (default: all)")
    args = parser.parse_args(argv)
    expected = args.packages or sorted(p.name for p in (ROOT / "packages").glob("ds-*"))
    found: dict[tuple[str, str], list[str]] = {}
    problems = []
    for path in sorted(args.dist.iterdir()):
        if not path.name.endswith((".whl", ".tar.gz")):
            continue
        name, version, file_problems = check_file(path)
        problems += file_problems
        kind = "wheel" if path.name.endswith(".whl") else "sdist"
        found.setdefault((name, kind), []).append(version)
        print(f"{path.name}: {'ok' if not file_problems else 'FAILED'}")
    for package in expected:
        pyproject = ROOT / "packages" / package / "pyproject.toml"
        version = tomllib.loads(pyproject.read_text())["project"]["version"]
        for kind in ("wheel", "sdist"):
            versions = found.get((package, kind), [])
            if versions != [version]:
                problems.append(f"{package}: expected one {kind} at {version}, found {versions}")
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
