"""The ds-* wheels a package is tested against alone: its direct ds-* dependencies at the
lowest versions their ranges allow.

For a package with ds-* dependencies (ds-model, ds-serve) this picks, for each direct one,
the lower bound of its range (``ds-attention>=0.2.0,<0.3`` -> 0.2.0), the "lowest-direct"
rule of uv's resolver. Siblings are workspace members, so uv itself always resolves them
to the workspace source and cannot pick an older one; nothing is published to an index
either. So a lower bound is found:

- in ``dist/``, when it equals the sibling's current version (the wheel just built);
- otherwise at the release tag ``<sibling>-v<version>`` (fetched from ``origin`` when a
  fresh clone lacks it), built into a wheel from that tag's sources. A lower bound with no
  tag is an error: the range claims a version nobody can test against.

Dependencies of those dependencies (ds-serve -> ds-model -> ds-attention) come from
``dist/`` at their current version; ``uv pip check`` in the test venv then proves the set
is consistent.

Usage: python tools/lowest_siblings.py ds-serve --dist dist --build-dir /tmp/x
prints one wheel path per line: the package's own wheel and every ds-* wheel it needs.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from packaging.metadata import Metadata
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


class LowestSiblingError(RuntimeError):
    pass


def lowest_allowed(name: str, specifier: SpecifierSet) -> Version:
    """The lower bound of a compatible range, which the range must admit."""
    bounds = [Version(s.version) for s in specifier if s.operator in (">=", "~=", "==")]
    if not bounds:
        raise LowestSiblingError(f"{name}{specifier} has no lower bound (>=, ~= or ==)")
    lowest = max(bounds)
    if not specifier.contains(lowest, prereleases=True):
        raise LowestSiblingError(f"{name}{specifier} excludes its own lower bound {lowest}")
    return lowest


def wheel_requirements(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as archive:
        [name] = [n for n in archive.namelist() if n.count("/") == 1 and n.endswith("/METADATA")]
        metadata = Metadata.from_email(archive.read(name), validate=False)
    return [Requirement(str(r)) for r in metadata.requires_dist or []]


def dist_wheels(dist: Path) -> dict[str, tuple[Version, Path]]:
    wheels = {}
    for path in dist.glob("*.whl"):
        name, version, _, _ = parse_wheel_filename(path.name)
        wheels[str(name)] = (version, path)
    return wheels


def _git(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)


def wheel_from_tag(name: str, version: Version, build_dir: Path, repo: Path = ROOT) -> Path:
    """Build ``name`` at ``version`` from its release tag ``<name>-v<version>``."""
    tag = f"{name}-v{version}"
    if _git(repo, "rev-parse", "--verify", "--quiet", f"refs/tags/{tag}").returncode != 0:
        fetched = _git(repo, "fetch", "--quiet", "origin", f"refs/tags/{tag}:refs/tags/{tag}")
        if fetched.returncode != 0:
            raise LowestSiblingError(
                f"{name} {version} is the lowest version a range allows, but tag {tag} is "
                f"neither in this clone nor fetchable from origin ({fetched.stderr.strip()}); "
                "fetch the release tags (git fetch --tags) or raise the range's lower bound"
            )
    with tempfile.TemporaryDirectory() as scratch:
        archive = Path(scratch) / "source.tar"
        made = _git(repo, "archive", "--format=tar", f"--output={archive}", tag, f"packages/{name}")
        if made.returncode != 0:
            raise LowestSiblingError(f"tag {tag} has no packages/{name}: {made.stderr.strip()}")
        with tarfile.open(archive) as tar:
            tar.extractall(scratch, filter="data")
        source = Path(scratch) / "packages" / name
        out = build_dir / tag
        # --no-sources: the tag's [tool.uv.sources] name workspace siblings this lone copy lacks.
        subprocess.run(
            [
                "uv",
                "build",
                "--wheel",
                "--no-sources",
                "--quiet",
                "--out-dir",
                str(out),
                str(source),
            ],
            check=True,
        )
    [wheel] = out.glob("*.whl")
    built = parse_wheel_filename(wheel.name)[1]
    if built != version:
        raise LowestSiblingError(f"tag {tag} builds {name} {built}, not {version}")
    return wheel


def wheels_for(
    package: str, dist: Path, build_dir: Path, repo: Path = ROOT
) -> list[tuple[str, Version, Path, str]]:
    """(name, version, wheel, why) for the package and every ds-* wheel its isolated test
    needs; ``why`` says whether a wheel is the lowest allowed or the current one."""
    current = dist_wheels(dist)
    name = str(canonicalize_name(package))
    if name not in current:
        raise LowestSiblingError(f"no wheel of {name} in {dist}")
    chosen = {name: (*current[name], "the package")}
    for requirement in wheel_requirements(current[name][1]):
        sibling = str(canonicalize_name(requirement.name))
        if not sibling.startswith("ds-"):
            continue
        lowest = lowest_allowed(sibling, requirement.specifier)
        if sibling in current and current[sibling][0] == lowest:
            chosen[sibling] = (*current[sibling], "lowest allowed, from dist")
        else:
            wheel = wheel_from_tag(sibling, lowest, build_dir, repo)
            chosen[sibling] = (lowest, wheel, "lowest allowed, from its tag")
    queue = [path for _, path, _ in chosen.values()]
    while queue:  # transitive ds-* dependencies: their current wheels
        for requirement in wheel_requirements(queue.pop()):
            dependency = str(canonicalize_name(requirement.name))
            if dependency.startswith("ds-") and dependency not in chosen:
                if dependency not in current:
                    raise LowestSiblingError(f"no wheel of {dependency} in {dist}")
                chosen[dependency] = (*current[dependency], "indirect, current")
                queue.append(current[dependency][1])
    return [(n, v, p, why) for n, (v, p, why) in sorted(chosen.items())]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("package")
    parser.add_argument("--dist", type=Path, default=ROOT / "dist")
    parser.add_argument("--build-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        chosen = wheels_for(args.package, args.dist, args.build_dir)
    except LowestSiblingError as error:
        print(f"lowest siblings of {args.package}: {error}", file=sys.stderr)
        return 1
    for name, version, path, why in chosen:
        print(f"{args.package}: {name} {version} ({why})", file=sys.stderr)
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
