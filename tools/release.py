"""Release dry run of one package: everything a release does except tagging and uploading.

1. Preflight: the version in pyproject.toml is ``__version__``, CHANGELOG.md has a dated
   section ``## <version> (YYYY-MM-DD)``, the public-API snapshot is at this version and
   matches the code (tools/api_snapshot.py), the tag ``<package>-v<version>`` does not
   exist yet, the working tree is committed.
2. Build every wheel and sdist into dist/ (the package's tests need its siblings' wheels)
   and validate the package's two files (tools/check_dists.py).
3. Run the package's tests against its wheel alone in a fresh venv, with its ds-*
   dependencies at the lowest versions its ranges allow (.ci/isolated.sh).
4. ``uv publish --dry-run`` on the package's two files.
5. Print the commands that tag and upload.

Usage: uv run --frozen python tools/release.py ds-attention [--skip-tests]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import api_snapshot
import check_dists

ROOT = Path(__file__).resolve().parents[1]


def _git(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True)


def tag_name(package: str, version: str) -> str:
    return f"{package}-v{version}"


def preflight(package: str, root: Path = ROOT) -> list[str]:
    """What stops ``package`` from being released at its pyproject version."""
    package_dir = root / "packages" / package
    version = api_snapshot.package_version(package_dir)
    problems = []
    init = (package_dir / "src" / package.replace("-", "_") / "__init__.py").read_text()
    declared = re.search(r'^__version__ = "([^"]+)"', init, re.MULTILINE)
    if not declared or declared.group(1) != version:
        shown = declared.group(1) if declared else "missing"
        problems.append(f"__version__ is {shown}, pyproject.toml says {version}")
    changelog = (package_dir / "CHANGELOG.md").read_text()
    if not re.search(rf"^## {re.escape(version)} \(\d{{4}}-\d{{2}}-\d{{2}}\)$", changelog, re.M):
        problems.append(
            f"CHANGELOG.md has no dated section '## {version} (YYYY-MM-DD)' "
            "(rename 'Unreleased' to it)"
        )
    snapshot_path = package_dir / api_snapshot.SNAPSHOT_NAME
    module = __import__(package.replace("-", "_"))
    if not snapshot_path.is_file():
        problems.append(f"no API snapshot: run `{api_snapshot.UPDATE_COMMAND} {package}`")
    else:
        result = api_snapshot.check(package, package_dir, module)
        if not result.ok:
            problems.append(result.report())
        elif result.stale:
            problems.append(
                f"the API snapshot is of {result.snapshot.version}, not this release: run "
                f"`{api_snapshot.UPDATE_COMMAND} {package}` and commit it"
            )
    tag = tag_name(package, version)
    if _git(root, "rev-parse", "--verify", "--quiet", f"refs/tags/{tag}").returncode == 0:
        problems.append(f"tag {tag} exists: {package} {version} is released; bump the version")
    if _git(root, "status", "--porcelain").stdout.strip():
        problems.append(
            "the working tree has uncommitted changes: a release is built from a commit"
        )
    return problems


def _run(*command: str) -> None:
    print("+", " ".join(command), flush=True)
    subprocess.run(command, cwd=ROOT, check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("package", choices=sorted(api_snapshot.package_dirs()))
    parser.add_argument(
        "--skip-tests", action="store_true", help="skip step 3 (the isolated test run)"
    )
    args = parser.parse_args(argv)
    package = args.package
    version = api_snapshot.package_version(ROOT / "packages" / package)
    print(f"== {package} {version}: preflight")
    problems = preflight(package)
    for problem in problems:
        print(f"  - {problem}")
    if problems:
        return 1
    print(f"== {package} {version}: build and check")
    _run("rm", "-rf", "dist")
    _run("uv", "build", "--all-packages", "--out-dir", "dist", "--quiet")
    if check_dists.main(["dist", package]) != 0:
        return 1
    files = sorted(
        str(p.relative_to(ROOT))
        for p in (ROOT / "dist").glob(f"{package.replace('-', '_')}-{version}*")
    )
    if not args.skip_tests:
        print(f"== {package} {version}: tests against its wheel alone")
        _run("bash", ".ci/isolated.sh", package)
    print(f"== {package} {version}: upload dry run")
    _run("uv", "publish", "--dry-run", *files)
    tag = tag_name(package, version)
    print(f"\nDry run passed. To release {package} {version}:")
    print(f'  git tag -a {tag} -m "{package} {version}"')
    print(f"  uv publish {' '.join(files)}")
    print(f"  git push origin {tag}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
