"""Each package's public API against its checked-in snapshot, under semver below 1.0.

A removed name or changed signature needs a minor bump, an addition at least a patch bump,
and any change to an existing Protocol counts as breaking. The check and the snapshot
format live in tools/api_snapshot.py; the tests below also plant changes in a real package
and in a small package built here, to show the check fails without the bump and passes
with it.
"""

from __future__ import annotations

import importlib
import importlib.util
import shutil
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("api_snapshot", ROOT / "tools" / "api_snapshot.py")
api_snapshot = importlib.util.module_from_spec(_spec)
sys.modules["api_snapshot"] = api_snapshot  # dataclasses resolve their module by name
_spec.loader.exec_module(api_snapshot)

PACKAGES = sorted(api_snapshot.package_dirs())


@pytest.mark.parametrize("package", PACKAGES)
def test_public_api_matches_its_snapshot_or_the_version_moved(package):
    result = api_snapshot.check(package, ROOT / "packages" / package)
    assert result.ok, result.report()


@pytest.mark.parametrize("package", PACKAGES)
def test_dunder_version_is_the_pyproject_version(package):
    module = importlib.import_module(package.replace("-", "_"))
    version = api_snapshot.package_version(ROOT / "packages" / package)
    assert module.__version__ == version, (
        f"{package}: __version__ is {module.__version__}, pyproject.toml says {version}"
    )


# --- a planted change in a real package ---------------------------------------------------


@pytest.fixture
def attention_copy(tmp_path):
    """ds-attention's pyproject and snapshot in a scratch folder, its version settable."""
    source = ROOT / "packages" / "ds-attention"
    target = tmp_path / "ds-attention"
    target.mkdir()
    shutil.copy(source / "api.json", target / "api.json")
    pyproject = (source / "pyproject.toml").read_text()
    snapshot_version = api_snapshot.Snapshot.load(source / "api.json").version

    def with_version(version: str) -> Path:
        (target / "pyproject.toml").write_text(
            pyproject.replace(f'version = "{snapshot_version}"', f'version = "{version}"', 1)
        )
        return target

    with_version(snapshot_version)
    return snapshot_version, with_version


def test_planted_signature_change_fails_without_a_minor_bump(attention_copy, monkeypatch):
    import ds_attention

    version, with_version = attention_copy

    def dynamic_window(max_length: int, *, stride: int):  # was dynamic_window() -> ...
        raise NotImplementedError

    monkeypatch.setattr(ds_attention, "dynamic_window", dynamic_window)
    result = api_snapshot.check("ds-attention", with_version(version), ds_attention)
    assert not result.ok
    report = result.report()
    assert "BREAKING changed dynamic_window:" in report
    assert "def (max_length: int, *, stride: int)" in report
    wanted = api_snapshot.next_version(version, "minor")
    assert f"Set {wanted} (or higher)" in report
    assert "tools/api_snapshot.py --update ds-attention" in report

    patch = api_snapshot.next_version(version, "patch")
    assert not api_snapshot.check("ds-attention", with_version(patch), ds_attention).ok
    assert api_snapshot.check("ds-attention", with_version(wanted), ds_attention).ok


def test_planted_removal_and_addition_in_a_real_package(attention_copy, monkeypatch):
    import ds_attention

    version, with_version = attention_copy
    monkeypatch.setattr(ds_attention, "brand_new", lambda x, y=1: x, raising=False)
    monkeypatch.setattr(ds_attention, "__all__", [*ds_attention.__all__, "brand_new"])
    added = api_snapshot.check("ds-attention", with_version(version), ds_attention)
    assert added.bump == "patch" and not added.ok
    assert "addition added brand_new: def (x, y=1)" in added.report()
    patch = api_snapshot.next_version(version, "patch")
    assert api_snapshot.check("ds-attention", with_version(patch), ds_attention).ok

    monkeypatch.setattr(
        ds_attention, "__all__", [n for n in ds_attention.__all__ if n != "KVCache"]
    )
    removed = api_snapshot.check("ds-attention", with_version(patch), ds_attention)
    assert removed.bump == "minor" and not removed.ok
    assert "BREAKING removed KVCache: class" in removed.report()


# --- the rules, on a small package built here -------------------------------------------------

BASE = textwrap.dedent(
    """
    from __future__ import annotations
    import enum
    from typing import Protocol

    __version__ = "0.2.0"
    __all__ = ["Backend", "Color", "Pool", "attend", "LIMIT", "__version__"]

    LIMIT = 8

    class Backend(Protocol):
        name: str
        def forward(self, x: int, *, scale: float = 1.0) -> int: ...

    class Color(enum.Enum):
        RED = "red"
        BLUE = "blue"

    class Pool:
        def __init__(self, size: int) -> None:
            self.size = size
        def take(self, n: int) -> list[int]:
            return []
        @property
        def free(self) -> int:
            return self.size

    def attend(q: int, k: int, *, causal: bool = True) -> int:
        return q
"""
)


def build(source: str, name: str = "ds_fixture"):
    """Import ``source`` as a fresh module named ``name``."""
    spec = importlib.util.spec_from_loader(name, loader=None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        exec(compile(source, f"<{name}>", "exec"), module.__dict__)
    finally:
        del sys.modules[name]
    return module


def diff_after(old: str, new: str) -> api_snapshot.ApiDiff:
    return api_snapshot.compare(
        api_snapshot.public_api(build(old)), api_snapshot.public_api(build(new))
    )


def test_snapshot_lists_every_export_with_its_signature():
    api = api_snapshot.public_api(build(BASE))
    assert api["attend"] == "def (q: int, k: int, *, causal: bool = True) -> int"
    assert api["Backend"] == "protocol(Protocol)"
    assert api["Backend.forward"] == "def (self, x: int, *, scale: float = 1.0) -> int"
    assert api["Backend.name"] == "field: str"
    assert api["Color.RED"] == "member = 'red'"
    assert api["Pool.__init__"] == "def (size: int) -> None"
    assert api["Pool.free"] == "property -> int"
    assert api["LIMIT"] == "constant: int"
    assert list(api) == sorted(api)


def test_snapshot_refuses_a_name_missing_from_the_module():
    with pytest.raises(ValueError, match=r"__all__ lists 'ghost'"):
        api_snapshot.public_api(build(BASE + '\n__all__.append("ghost")\n'))


@pytest.mark.parametrize(
    ("old", "new", "what"),
    [
        ("def attend(q: int, k: int", "def attend(q: int, key: int", "parameter renamed"),
        ("def attend(q: int, k: int", "def attend(q: int, k: int, v: int", "required parameter"),
        ("causal: bool = True", "causal: bool = False", "default changed"),
        (
            "k: int, *, causal: bool = True) -> int",
            "k: int, *, causal: bool = True) -> str",
            "return",
        ),
        ("def take(self, n: int)", "def take(self, n: int, m: int)", "method parameter"),
        ('"attend", ', "", "removed name"),
        ('BLUE = "blue"', "", "removed enum member"),
        ("def __init__(self, size: int)", "def __init__(self, size: int, flag: bool)", "init"),
        (
            "    def forward(self, x: int, *, scale: float = 1.0) -> int: ...",
            "    def forward(self, x: int, *, scale: float = 1.0, bias: int = 0) -> int: ...",
            "optional parameter on a Protocol",
        ),
        (
            "    name: str\n",
            "    name: str\n    def reset(self) -> None: ...\n",
            "member added to a Protocol",
        ),
    ],
)
def test_breaking_changes_need_a_minor_bump(old, new, what):
    assert old in BASE, what
    diff = diff_after(BASE, BASE.replace(old, new))
    assert diff.breaking, what
    assert diff.required_bump("0.2.0") == "minor"
    assert diff.required_bump("1.4.2") == "major"


@pytest.mark.parametrize(
    "edits",
    [
        [("causal: bool = True)", "causal: bool = True, window: int | None = None)")],
        [("def take(self, n: int)", "def take(self, n: int, strict: bool = False)")],
        [('"LIMIT", ', '"LIMIT", "LATER", '), ("LIMIT = 8\n", "LIMIT = 8\nLATER = 9\n")],
        [
            ('"LIMIT", ', '"LIMIT", "Extra", '),
            ("LIMIT = 8\n", "LIMIT = 8\nclass Extra(Protocol):\n    def go(self) -> None: ...\n"),
        ],
        [("    def take(", "    def give(self) -> None:\n        pass\n    def take(")],
    ],
    ids=["keyword-only parameter", "trailing parameter", "constant", "new Protocol", "method"],
)
def test_additions_need_a_patch_bump(edits):
    new_source = BASE
    for old, new in edits:
        assert old in new_source
        new_source = new_source.replace(old, new)
    diff = diff_after(BASE, new_source)
    assert not diff.breaking, diff.breaking
    assert diff.added
    assert diff.required_bump("0.2.0") == "patch"


def test_a_base_class_added_is_an_addition_and_removed_is_breaking():
    with_base = BASE.replace("class Pool:", "class Pool(dict):")
    assert diff_after(BASE, with_base).added == ["changed Pool: class  ->  class(dict)"]
    assert diff_after(with_base, BASE).breaking == ["changed Pool: class(dict)  ->  class"]


def test_an_unchanged_api_needs_no_bump():
    diff = diff_after(BASE, BASE)
    assert diff.breaking == diff.added == [] and diff.required_bump("0.2.0") is None


@pytest.mark.parametrize(
    ("old", "new", "bump", "enough"),
    [
        ("0.2.0", "0.3.0", "minor", True),
        ("0.2.0", "0.2.1", "minor", False),
        ("0.2.3", "1.0.0", "minor", True),
        ("0.2.0", "0.2.1", "patch", True),
        ("0.2.0", "0.2.0", "patch", False),
        ("0.2.0", "0.2.0", None, True),
        ("0.2.0", "0.1.9", None, False),
        ("1.4.2", "1.5.0", "major", False),
        ("1.4.2", "2.0.0", "major", True),
    ],
)
def test_bump_rules(old, new, bump, enough):
    assert api_snapshot.bump_is_enough(old, new, bump) is enough


def _parameter_lists():
    names = st.lists(st.sampled_from("abcdefgh"), min_size=1, max_size=5, unique=True)
    return names.map(lambda ns: ", ".join(f"{n}: int" for n in ns))


@settings(max_examples=50, deadline=None)
@given(params=_parameter_lists(), extra=st.sampled_from("uvwxyz"), keyword_only=st.booleans())
def test_adding_an_optional_parameter_is_never_breaking(params, extra, keyword_only):
    old = f"def ({params}) -> int"
    added = f"*, {extra}: int = 0" if keyword_only else f"{extra}: int = 0"
    new = f"def ({params}, {added}) -> int"
    diff = api_snapshot.compare({"f": old}, {"f": new})
    assert diff.breaking == [] and len(diff.added) == 1


@settings(max_examples=50, deadline=None)
@given(params=_parameter_lists(), data=st.data())
def test_dropping_a_parameter_is_always_breaking(params, data):
    names = params.split(", ")
    dropped = data.draw(st.sampled_from(names))
    new = ", ".join(n for n in names if n != dropped)
    diff = api_snapshot.compare({"f": f"def ({params})"}, {"f": f"def ({new})"})
    assert len(diff.breaking) == 1


# --- the one command that regenerates snapshots ------------------------------------------------


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A workspace with one package, ds-fixture, importable as ds_fixture."""
    src = tmp_path / "packages" / "ds-fixture" / "src" / "ds_fixture"
    src.mkdir(parents=True)
    monkeypatch.syspath_prepend(str(src.parent))

    def write(source: str, version: str) -> None:
        (src / "__init__.py").write_text(textwrap.dedent(source))
        (src.parent.parent / "pyproject.toml").write_text(
            f'[project]\nname = "ds-fixture"\nversion = "{version}"\n'
        )
        sys.modules.pop("ds_fixture", None)
        importlib.invalidate_caches()

    yield tmp_path, write
    sys.modules.pop("ds_fixture", None)


def test_update_writes_snapshots_and_refuses_a_missing_bump(workspace, capsys):
    root, write = workspace
    snapshot_path = root / "packages" / "ds-fixture" / "api.json"
    write(BASE, "0.2.0")
    assert api_snapshot.main(["--update"], root=root) == 0
    first = snapshot_path.read_text()
    assert api_snapshot.Snapshot.load(snapshot_path).version == "0.2.0"
    assert api_snapshot.main([], root=root) == 0

    changed = BASE.replace("def attend(q: int, k: int", "def attend(q: int, key: int")
    write(changed, "0.2.0")
    assert api_snapshot.main([], root=root) == 1
    assert api_snapshot.main(["--update"], root=root) == 1
    assert snapshot_path.read_text() == first
    out = capsys.readouterr().out
    assert "BREAKING changed attend:" in out and "Set 0.3.0 (or higher)" in out

    write(changed, "0.3.0")
    assert api_snapshot.main([], root=root) == 0  # bumped: passes before the snapshot moves
    assert api_snapshot.main(["--update", "ds-fixture"], root=root) == 0
    snapshot = api_snapshot.Snapshot.load(snapshot_path)
    assert snapshot.version == "0.3.0"
    assert snapshot.api["attend"].startswith("def (q: int, key: int")


def test_update_force_records_an_unbumped_change(workspace):
    root, write = workspace
    write(BASE, "0.2.0")
    api_snapshot.main(["--update"], root=root)
    write(BASE.replace('"attend", ', ""), "0.2.0")
    assert api_snapshot.main(["--update", "--force"], root=root) == 0
    assert api_snapshot.main([], root=root) == 0
