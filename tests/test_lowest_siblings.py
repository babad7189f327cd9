"""Which sibling wheels a package's isolated tests run against: the lowest versions its
ranges allow, from dist/ when that is the current version, else built from the release tag.

The tag path is shown on a small git repository made here: a dependency released as 0.1.0
(tagged), then moved to 0.2.0, and a package whose range still admits 0.1.0.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location(
    "lowest_siblings", ROOT / "tools" / "lowest_siblings.py"
)
lowest_siblings = importlib.util.module_from_spec(_spec)
sys.modules["lowest_siblings"] = lowest_siblings
_spec.loader.exec_module(lowest_siblings)

pytestmark = pytest.mark.skipif(
    shutil.which("git") is None or shutil.which("uv") is None, reason="needs git and uv"
)


@pytest.mark.parametrize(
    ("spec", "lowest"),
    [
        (">=0.2.0,<0.3", "0.2.0"),
        ("~=0.2.1", "0.2.1"),
        ("==0.3.0", "0.3.0"),
        (">=0.1,>=0.2.4,<0.3", "0.2.4"),
    ],
)
def test_lowest_allowed_is_the_lower_bound(spec, lowest):
    assert lowest_siblings.lowest_allowed("ds-x", SpecifierSet(spec)) == Version(lowest)


@pytest.mark.parametrize("spec", ["<0.3", "", ">=0.2.0,!=0.2.0,<0.3"])
def test_lowest_allowed_refuses_a_range_without_a_usable_lower_bound(spec):
    with pytest.raises(lowest_siblings.LowestSiblingError, match="ds-x"):
        lowest_siblings.lowest_allowed("ds-x", SpecifierSet(spec))


def _write_package(root: Path, name: str, version: str, deps: list[str]) -> Path:
    module = name.replace("-", "_")
    package = root / "packages" / name
    (package / "src" / module).mkdir(parents=True, exist_ok=True)
    (package / "src" / module / "__init__.py").write_text(f'__version__ = "{version}"\n')
    dep_list = ", ".join(f'"{d}"' for d in deps)
    (package / "pyproject.toml").write_text(
        f'[project]\nname = "{name}"\nversion = "{version}"\nrequires-python = ">=3.10"\ndependencies = [{dep_list}]\n'
        '[build-system]\nrequires = ["hatchling>=1.25"]\nbuild-backend = "hatchling.build"\n'
        f'[tool.hatch.build.targets.wheel]\npackages = ["src/{module}"]\n'
    )
    return package


def _git(repo: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
        check=True,
        capture_output=True,
    )


def _build(package: Path, dist: Path) -> None:
    subprocess.run(
        ["uv", "build", "--wheel", "--quiet", "--out-dir", str(dist), str(package)], check=True
    )


@pytest.fixture(scope="module")
def released_repo(tmp_path_factory):
    """ds-leaf released as 0.1.0 (tag ds-leaf-v0.1.0) and now at 0.2.0; ds-user requires
    ds-leaf>=0.1.0,<0.3; dist/ holds the current wheels of both."""
    repo = tmp_path_factory.mktemp("repo")
    _git(repo, "init", "--quiet")
    _write_package(repo, "ds-leaf", "0.1.0", [])
    _git(repo, "add", "-A")
    _git(repo, "commit", "--quiet", "-m", "ds-leaf 0.1.0")
    _git(repo, "tag", "ds-leaf-v0.1.0")
    leaf = _write_package(repo, "ds-leaf", "0.2.0", [])
    user = _write_package(repo, "ds-user", "0.1.0", ["ds-leaf>=0.1.0,<0.3"])
    _git(repo, "add", "-A")
    _git(repo, "commit", "--quiet", "-m", "ds-leaf 0.2.0, ds-user")
    dist = repo / "dist"
    _build(leaf, dist)
    _build(user, dist)
    return repo, dist


def test_a_lower_bound_older_than_dist_is_built_from_its_tag(released_repo, tmp_path):
    repo, dist = released_repo
    chosen = lowest_siblings.wheels_for("ds-user", dist, tmp_path, repo)
    by_name = {name: (str(version), path, why) for name, version, path, why in chosen}
    assert set(by_name) == {"ds-user", "ds-leaf"}
    version, wheel, why = by_name["ds-leaf"]
    assert (version, why) == ("0.1.0", "lowest allowed, from its tag")
    assert wheel.name == "ds_leaf-0.1.0-py3-none-any.whl" and wheel.is_relative_to(tmp_path)
    assert by_name["ds-user"][0] == "0.1.0" and by_name["ds-user"][1].parent == dist


def test_a_lower_bound_equal_to_dist_takes_the_built_wheel(released_repo, tmp_path):
    repo, dist = released_repo
    shutil.copytree(dist, tmp_path / "dist")
    user = _write_package(tmp_path / "src", "ds-user", "0.1.0", ["ds-leaf>=0.2.0,<0.3"])
    (tmp_path / "dist" / "ds_user-0.1.0-py3-none-any.whl").unlink()
    _build(user, tmp_path / "dist")
    chosen = lowest_siblings.wheels_for("ds-user", tmp_path / "dist", tmp_path / "build", repo)
    assert [(n, str(v), why) for n, v, _, why in chosen] == [
        ("ds-leaf", "0.2.0", "lowest allowed, from dist"),
        ("ds-user", "0.1.0", "the package"),
    ]
    assert not (tmp_path / "build").exists()


def test_a_lower_bound_without_a_tag_is_an_error(released_repo, tmp_path):
    repo, dist = released_repo
    shutil.copytree(dist, tmp_path / "dist")
    user = _write_package(tmp_path / "src", "ds-user", "0.1.0", ["ds-leaf>=0.1.5,<0.3"])
    (tmp_path / "dist" / "ds_user-0.1.0-py3-none-any.whl").unlink()
    _build(user, tmp_path / "dist")
    with pytest.raises(lowest_siblings.LowestSiblingError, match=r"tag ds-leaf-v0\.1\.5"):
        lowest_siblings.wheels_for("ds-user", tmp_path / "dist", tmp_path / "build", repo)
