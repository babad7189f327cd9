"""The workspace dependency rule, checked statically (ast) on every source file.

- A leaf (attention, optim, quant, lora, batching) imports no other ds package.
- ds-model may import the leaves; ds-serve the leaves and ds-model.
- ds-batching is pure Python: no torch, triton or numpy.
- Each package declares in its pyproject exactly the ds packages it imports.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import tomllib

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
