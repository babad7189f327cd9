"""The pre-upload check of built wheels and sdists (tools/check_dists.py), on archives
written here with good and broken metadata."""

from __future__ import annotations

import importlib.util
import io
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("check_dists", ROOT / "tools" / "check_dists.py")
check_dists = importlib.util.module_from_spec(_spec)
sys.modules["check_dists"] = check_dists
_spec.loader.exec_module(check_dists)

GOOD = """\
Metadata-Version: 2.4
Name: ds-serve
Version: 0.2.0
Requires-Python: >=3.10
Requires-Dist: ds-model>=0.2.0,<0.3
Requires-Dist: msgspec>=0.18
Description-Content-Type: text/markdown

# ds-serve

An OpenAI-compatible server.
"""


def wheel(tmp_path: Path, metadata: str, typed: bool = True) -> Path:
    path = tmp_path / "ds_serve-0.2.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("ds_serve-0.2.0.dist-info/METADATA", metadata)
        archive.writestr("ds_serve/__init__.py", "")
        if typed:
            archive.writestr("ds_serve/py.typed", "")
    return path


def sdist(tmp_path: Path, metadata: str) -> Path:
    path = tmp_path / "ds_serve-0.2.0.tar.gz"
    with tarfile.open(path, "w:gz") as archive:
        data = metadata.encode()
        info = tarfile.TarInfo("ds_serve-0.2.0/PKG-INFO")
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("make", [wheel, sdist])
def test_good_metadata_passes(tmp_path, make):
    assert check_dists.check_file(make(tmp_path, GOOD)) == ("ds-serve", "0.2.0", [])


@pytest.mark.parametrize(
    ("old", "new", "problem"),
    [
        ("Version: 0.2.0", "Version: two", "invalid metadata"),
        ("Name: ds-serve", "Name: -ds-serve-", "invalid metadata"),
        ("Requires-Dist: ds-model>=0.2.0,<0.3", "Requires-Dist: ds-model", "no version range"),
        ("text/markdown", "text/x-rst", "expected 'text/markdown'"),
        ("# ds-serve\n\nAn OpenAI-compatible server.\n", "", "no long description"),
    ],
)
def test_broken_metadata_is_reported(tmp_path, old, new, problem):
    assert old in GOOD
    _, _, problems = check_dists.check_file(wheel(tmp_path, GOOD.replace(old, new)))
    assert any(problem in p for p in problems), problems


def test_a_wheel_without_py_typed_is_reported(tmp_path):
    _, _, problems = check_dists.check_file(wheel(tmp_path, GOOD, typed=False))
    assert problems == ["ds_serve-0.2.0-py3-none-any.whl: no py.typed marker"]


def test_the_folder_needs_one_wheel_and_one_sdist_at_the_pyproject_version(tmp_path, capsys):
    pyproject = (ROOT / "packages" / "ds-serve" / "pyproject.toml").read_text()
    version = check_dists.tomllib.loads(pyproject)["project"]["version"]
    metadata = GOOD.replace("Version: 0.2.0", f"Version: {version}")
    built_wheel = wheel(tmp_path, metadata)
    built_sdist = sdist(tmp_path, metadata)
    built_wheel.rename(tmp_path / built_wheel.name.replace("0.2.0", version))
    built_sdist.rename(tmp_path / built_sdist.name.replace("0.2.0", version))
    assert check_dists.main([str(tmp_path), "ds-serve"]) == 0
    (tmp_path / built_sdist.name.replace("0.2.0", version)).unlink()
    assert check_dists.main([str(tmp_path), "ds-serve"]) == 1
    assert f"ds-serve: expected one sdist at {version}, found []" in capsys.readouterr().err
