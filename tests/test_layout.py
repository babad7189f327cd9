"""The workspace dependency rule, checked statically (ast) on every source file.

- A leaf (attention, optim, quant, lora, batching) imports no other ds package.
- ds-model may import the leaves; ds-serve the leaves and ds-model.
- ds-batching is pure Python: no torch, triton or numpy.
- Each package declares in its pyproject exactly the ds packages it imports.
- Each declared ds package carries a compatible version range: a lower bound, and an upper
  bound below the next version that may break it (the next minor below 1.0), admitting the
  sibling's current version.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LEAVES = frozenset({"ds_attention", "ds_optim", "ds_quant", "ds_lora", "ds_batching"})
ALLOWED: dict[str, frozenset[str]] = {leaf: frozenset() for leaf in LEAVES}
ALLOWED["ds_model"] = LEAVES
ALLOWED["ds_serve"] = LEAVES | {"ds_model"}
PURE_PYTHON = {"ds_batching": frozenset({"torch", "triton", "numpy"})}
PACKAGES = sorted(ALLOWED)


@dataclass(frozen=True)
class Violation:
    path: str
    line: int
    module: str
    rule: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: imports {self.module}: {self.rule}"


def imported_modules(source: str, filename: str) -> list[tuple[str, int]]:
    """Top-level names of every absolute import in ``source``, with line numbers."""
    found = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        if isinstance(node, ast.Import):
            found += [(alias.name.split(".")[0], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module.split(".")[0], node.lineno))
    return found


def check_package(package_dir: Path, package: str) -> tuple[list[Violation], set[str]]:
    """Violations of the import rules in one package's sources, and the ds packages it uses."""
    violations, used = [], set()
    for path in sorted((package_dir / "src" / package).rglob("*.py")):
        shown = str(path.relative_to(package_dir.parent.parent))
        for module, line in imported_modules(path.read_text(), shown):
            if module.startswith("ds_") and module != package:
                used.add(module)
                if module not in ALLOWED[package]:
                    allowed = sorted(ALLOWED[package]) or "no other ds package"
                    rule = f"{package} may import {allowed} (workspace dependency rule)"
                    violations.append(Violation(shown, line, module, rule))
            if module in PURE_PYTHON.get(package, ()):
                rule = f"{package} must stay pure Python (no {sorted(PURE_PYTHON[package])})"
                violations.append(Violation(shown, line, module, rule))
    return violations, used


def declared_ds_dependencies(pyproject: Path) -> set[str]:
    deps = tomllib.loads(pyproject.read_text())["project"].get("dependencies", [])
    names = {re.split(r"[ <>=!~;\[]", d, maxsplit=1)[0].lower().replace("-", "_") for d in deps}
    return {name for name in names if name.startswith("ds_")}


def first_breaking_version(version: Version) -> Version:
    """The first release after ``version`` that semver lets break it (minor below 1.0)."""
    if version.major == 0:
        return Version(f"0.{version.minor + 1}.0")
    return Version(f"{version.major + 1}.0.0")


def range_problems(pyproject: Path, current: dict[str, str]) -> list[str]:
    """What is wrong with the version range of each ds-* dependency in ``pyproject``.

    ``current`` maps a sibling's distribution name to its version in this workspace.
    """
    problems = []
    for line in tomllib.loads(pyproject.read_text())["project"].get("dependencies", []):
        requirement = Requirement(line)
        name, spec = requirement.name, requirement.specifier
        if not name.startswith("ds-"):
            continue
        lower = [Version(s.version) for s in spec if s.operator in (">=", "~=", "==")]
        if not lower or not any(s.operator in ("<", "~=", "==") for s in spec):
            problems.append(
                f"{pyproject.parent.name}: {line!r} needs a compatible range with a lower and "
                f"an upper bound, such as '{name}>=0.2.0,<0.3'"
            )
            continue
        breaking = first_breaking_version(max(lower))
        if spec.contains(breaking, prereleases=True):
            problems.append(
                f"{pyproject.parent.name}: {line!r} admits {name} {breaking}, which semver lets "
                f"break it; bound it below {breaking}"
            )
        if name in current and not spec.contains(current[name], prereleases=True):
            problems.append(
                f"{pyproject.parent.name}: {line!r} excludes {name} {current[name]}, the "
                "version in this workspace"
            )
    return problems


def workspace_versions() -> dict[str, str]:
    return {
        p.name: tomllib.loads((p / "pyproject.toml").read_text())["project"]["version"]
        for p in (ROOT / "packages").glob("ds-*")
    }


def package_dir(package: str) -> Path:
    return ROOT / "packages" / package.replace("_", "-")


def test_every_package_is_checked():
    on_disk = {p.name.replace("-", "_") for p in (ROOT / "packages").glob("ds-*") if p.is_dir()}
    assert on_disk == set(PACKAGES), "packages/ and the dependency rule disagree"


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_follow_the_dependency_rule(package):
    violations, _ = check_package(package_dir(package), package)
    assert not violations, "\n".join(map(str, violations))


@pytest.mark.parametrize("package", PACKAGES)
def test_pyproject_declares_exactly_the_ds_packages_imported(package):
    _, used = check_package(package_dir(package), package)
    declared = declared_ds_dependencies(package_dir(package) / "pyproject.toml")
    assert used <= declared, f"{package} imports {sorted(used - declared)} without declaring them"
    assert declared <= used, f"{package} declares {sorted(declared - used)} but never imports them"


@pytest.mark.parametrize("package", PACKAGES)
def test_ds_dependencies_carry_compatible_ranges(package):
    problems = range_problems(package_dir(package) / "pyproject.toml", workspace_versions())
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("package", PACKAGES)
def test_package_shape(package):
    root = package_dir(package)
    for name in ["pyproject.toml", "README.md", "CHANGELOG.md"]:
        assert (root / name).is_file(), f"{root.name}: missing {name}"
    for name in ["__init__.py", "py.typed", "protocol.py"]:
        assert (root / "src" / package / name).is_file(), (
            f"{root.name}: missing src/{package}/{name}"
        )
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"]), "static semver version expected"
    init = ast.parse((root / "src" / package / "__init__.py").read_text())
    assigned = {
        target.id
        for node in init.body
        if isinstance(node, ast.Assign)
        for target in node.targets
        if isinstance(target, ast.Name)
    }
    assert {"__all__", "__version__"} <= assigned, (
        f"{package}/__init__.py needs __all__ and __version__"
    )


def test_ds_batching_declares_no_torch():
    deps = tomllib.loads((package_dir("ds_batching") / "pyproject.toml").read_text())["project"]
    assert not deps.get("dependencies"), "ds-batching must have no runtime dependencies"


# The checker itself must catch a broken rule: a fixture tree where one leaf imports
# another, one imports torch where it must not, and one forgets to declare.


@pytest.fixture
def broken_tree(tmp_path):
    def make(package: str, source: str, deps: list[str]) -> Path:
        pkg = tmp_path / "packages" / package.replace("_", "-")
        (pkg / "src" / package).mkdir(parents=True)
        (pkg / "src" / package / "bad.py").write_text(source)
        dep_list = ", ".join(f'"{d}"' for d in deps)
        (pkg / "pyproject.toml").write_text(f'[project]\nname = "x"\ndependencies = [{dep_list}]\n')
        return pkg

    return make


def test_checker_flags_a_leaf_importing_a_leaf(broken_tree):
    pkg = broken_tree("ds_lora", "import torch\nfrom ds_quant import QuantizedLinear\n", [])
    violations, _ = check_package(pkg, "ds_lora")
    assert len(violations) == 1
    message = str(violations[0])
    assert "packages/ds-lora/src/ds_lora/bad.py:2" in message
    assert "ds_quant" in message and "dependency rule" in message


def test_checker_flags_torch_in_the_pure_python_package(broken_tree):
    pkg = broken_tree("ds_batching", "import numpy as np\n", [])
    violations, _ = check_package(pkg, "ds_batching")
    assert [v.module for v in violations] == ["numpy"]
    assert "pure Python" in str(violations[0])


def test_checker_flags_an_undeclared_ds_import(broken_tree):
    pkg = broken_tree("ds_model", "import ds_attention\nimport ds_lora.tuner\n", ["ds-lora>=0.1"])
    violations, used = check_package(pkg, "ds_model")
    assert not violations
    assert used - declared_ds_dependencies(pkg / "pyproject.toml") == {"ds_attention"}


@pytest.fixture
def pyproject_with(tmp_path):
    def make(*deps: str) -> Path:
        path = tmp_path / "ds-model" / "pyproject.toml"
        path.parent.mkdir(exist_ok=True)
        dep_list = ", ".join(f'"{d}"' for d in deps)
        path.write_text(f'[project]\nname = "ds-model"\ndependencies = [{dep_list}]\n')
        return path

    return make


def test_range_check_flags_an_unranged_ds_dependency(pyproject_with):
    path = pyproject_with("ds-attention", "ds-quant>=0.2.0,<0.3", "torch>=2.4")
    problems = range_problems(path, {"ds-attention": "0.2.0", "ds-quant": "0.2.0"})
    assert len(problems) == 1
    assert "'ds-attention' needs a compatible range" in problems[0]


@pytest.mark.parametrize("spec", [">=0.2.0", "<0.3", "!=0.2.1"])
def test_range_check_needs_both_bounds(pyproject_with, spec):
    problems = range_problems(pyproject_with(f"ds-lora{spec}"), {"ds-lora": "0.2.0"})
    assert len(problems) == 1 and "needs a compatible range" in problems[0]


@pytest.mark.parametrize(
    ("spec", "breaking"),
    [(">=0.2.0,<1", "0.3.0"), ("~=0.2", "0.3.0"), (">=1.2,<3", "2.0.0")],
)
def test_range_check_flags_a_range_that_admits_a_breaking_version(pyproject_with, spec, breaking):
    current = "1.2.0" if breaking == "2.0.0" else "0.2.0"
    problems = range_problems(pyproject_with(f"ds-optim{spec}"), {"ds-optim": current})
    assert problems == [
        f"ds-model: 'ds-optim{spec}' admits ds-optim {breaking}, which semver lets break it; "
        f"bound it below {breaking}"
    ]


def test_range_check_flags_a_range_without_the_workspace_version(pyproject_with):
    problems = range_problems(pyproject_with("ds-quant>=0.2.0,<0.3"), {"ds-quant": "0.3.0"})
    assert len(problems) == 1 and "excludes ds-quant 0.3.0" in problems[0]


@pytest.mark.parametrize("spec", [">=0.2.0,<0.3", "~=0.2.1", ">=1.4,<2", "==0.2.0"])
def test_range_check_accepts_compatible_ranges(pyproject_with, spec):
    current = "1.4.0" if spec.startswith(">=1") else ("0.2.1" if "0.2.1" in spec else "0.2.0")
    assert range_problems(pyproject_with(f"ds-attention{spec}"), {"ds-attention": current}) == []
