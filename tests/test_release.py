"""The preflight of a one-package release (tools/release.py), on a committed copy of
ds-attention in a scratch git repository."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))  # release.py imports its sibling tools by name
_spec = importlib.util.spec_from_file_location("release", ROOT / "tools" / "release.py")
release = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(release)

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def _git(repo: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
        check=True,
        capture_output=True,
    )


@pytest.fixture
def repo(tmp_path):
    source = ROOT / "packages" / "ds-attention"
    target = tmp_path / "packages" / "ds-attention"
    (target / "src").mkdir(parents=True)
    for name in ("pyproject.toml", "CHANGELOG.md", "api.json"):
        shutil.copy(source / name, target / name)
    shutil.copytree(source / "src" / "ds_attention", target / "src" / "ds_attention")
    _git(tmp_path, "init", "--quiet")
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "commit", "--quiet", "-m", "ds-attention")
    version = release.api_snapshot.package_version(target)
    return tmp_path, target, version


def test_a_committed_package_with_dated_changelog_and_current_snapshot_passes(repo):
    root, _, _ = repo
    assert release.preflight("ds-attention", root) == []


def test_a_changelog_without_the_dated_section_is_refused(repo):
    root, package, version = repo
    changelog = package / "CHANGELOG.md"
    changelog.write_text(changelog.read_text().replace(f"## {version} (", "## Unreleased ("))
    _git(root, "commit", "--quiet", "-am", "undated")
    [problem] = release.preflight("ds-attention", root)
    assert f"no dated section '## {version} (YYYY-MM-DD)'" in problem


def test_an_existing_tag_is_refused(repo):
    root, _, version = repo
    _git(root, "tag", f"ds-attention-v{version}")
    [problem] = release.preflight("ds-attention", root)
    assert f"tag ds-attention-v{version} exists" in problem


def test_a_dirty_tree_and_a_stale_snapshot_are_refused(repo):
    root, package, _ = repo
    snapshot = release.api_snapshot.Snapshot.load(package / "api.json")
    older = release.api_snapshot.Snapshot(snapshot.package, "0.0.1", snapshot.api)
    (package / "api.json").write_text(older.dumps())
    problems = release.preflight("ds-attention", root)
    assert any("the API snapshot is of 0.0.1, not this release" in p for p in problems)
    assert any("uncommitted changes" in p for p in problems)


def test_a_version_mismatch_with_dunder_version_is_refused(repo):
    root, package, version = repo
    init = package / "src" / "ds_attention" / "__init__.py"
    init.write_text(init.read_text().replace(f'__version__ = "{version}"', '__version__ = "9.9.9"'))
    _git(root, "commit", "--quiet", "-am", "mismatch")
    assert release.preflight("ds-attention", root) == [
        f"__version__ is 9.9.9, pyproject.toml says {version}"
    ]
