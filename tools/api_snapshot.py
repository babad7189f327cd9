"""Public-API snapshots of the ds-* packages, and the semver check against them.

A package's public API is its ``__all__``: for each exported name, what it is (function,
class, Protocol, constant) and its signature; for a class, its constructor, its public
methods and properties and its annotated fields; for an Enum, its members. The snapshot
(``packages/<pkg>/api.json``) records that API with the version it belongs to, one entry
per line, sorted, so a change reads as a plain diff.

The check compares the imported package against its snapshot and demands the version move
that semver asks for while below 1.0 (the minor digit is the breaking one, as Cargo and
npm's caret read it; from 1.0 on it is the major digit):

- a removed name, a changed signature, a changed kind or a removed base class: a minor bump
  (0.2.x -> 0.3.0);
- an added name, an added optional parameter (keyword-only, or positional after the last
  one, with a default), an added base class: at least a patch bump (0.2.0 -> 0.2.1);
- any change to a Protocol (a member added or changed included) is breaking: a class that
  implemented the old Protocol no longer satisfies the new one.

Usage (from the repository root):
    uv run --frozen python tools/api_snapshot.py            # check every package
    uv run --frozen python tools/api_snapshot.py --update   # rewrite the snapshots
    uv run --frozen python tools/api_snapshot.py --update ds-model   # one package

``--update`` refuses a package whose version did not move as required; ``--force`` writes
it anyway (only for a version that was never published).
"""

from __future__ import annotations

import argparse
import ast
import enum
import importlib
import inspect
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import tomllib

ROOT = Path(__file__).resolve().parents[1]
UPDATE_COMMAND = "uv run --frozen python tools/api_snapshot.py --update"
SNAPSHOT_NAME = "api.json"
# Dunder methods that are part of a class's contract when the package defines them.
CONTRACT_DUNDERS = frozenset(
    {
        "__call__",
        "__contains__",
        "__enter__",
        "__exit__",
        "__getitem__",
        "__iter__",
        "__len__",
        "__next__",
    }
)
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


# --- extracting the API -----------------------------------------------------------------


def _clean(text: str) -> str:
    """Drop memory addresses from reprs (sentinel defaults) so snapshots are reproducible."""
    return _ADDRESS.sub("", text)


class _Annotation(str):
    """A string annotation shown bare (inspect shows a str annotation with quotes)."""

    def __repr__(self) -> str:
        return str(self)


def _bare(annotation: Any) -> Any:
    return _Annotation(annotation) if isinstance(annotation, str) else annotation


def _signature(obj: Any) -> str | None:
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    parameters = [p.replace(annotation=_bare(p.annotation)) for p in sig.parameters.values()]
    sig = sig.replace(parameters=parameters, return_annotation=_bare(sig.return_annotation))
    return _clean(str(sig))


def _is_protocol(cls: type) -> bool:
    return bool(getattr(cls, "_is_protocol", False))


def _own_classes(cls: type, package: str) -> list[type]:
    """The classes in ``cls``'s MRO that the package defines (inherited torch or stdlib
    members are not the package's API)."""
    return [c for c in cls.__mro__ if (c.__module__ or "").split(".")[0] == package]


def _class_entries(name: str, cls: type, package: str) -> dict[str, str]:
    kind = "protocol" if _is_protocol(cls) else "class"
    bases = [b.__name__ for b in cls.__bases__ if b is not object]
    entries = {name: f"{kind}({', '.join(bases)})" if bases else kind}
    if issubclass(cls, enum.Enum):
        for member in cls:
            entries[f"{name}.{member.name}"] = f"member = {member.value!r}"
        return entries
    own = _own_classes(cls, package)
    if not own:
        return entries
    if kind == "class":
        sig = _signature(cls)
        if sig is not None:
            entries[f"{name}.__init__"] = f"def {sig}"
    seen: set[str] = set()
    for owner in own:
        annotations = vars(owner).get("__annotations__", {})
        for attr, annotation in annotations.items():
            if attr.startswith("_") or attr in seen:
                continue
            seen.add(attr)
            shown = (
                annotation if isinstance(annotation, str) else inspect.formatannotation(annotation)
            )
            entries[f"{name}.{attr}"] = f"field: {_clean(shown)}"
        for attr, value in vars(owner).items():
            public = not attr.startswith("_") or attr in CONTRACT_DUNDERS
            if not public or attr in seen:
                continue
            seen.add(attr)
            entries[f"{name}.{attr}"] = _member(cls, attr, value)
    return entries


def _member(cls: type, attr: str, raw: Any) -> str:
    if isinstance(raw, property):
        sig = _signature(raw.fget) if raw.fget else None
        returns = sig.split(" -> ", 1)[1] if sig and " -> " in sig else "?"
        return f"property -> {returns}" + (" (settable)" if raw.fset else "")
    if isinstance(raw, classmethod):
        return f"classmethod {_signature(getattr(cls, attr))}"
    if isinstance(raw, staticmethod):
        return f"staticmethod {_signature(raw.__func__)}"
    if inspect.isfunction(raw):
        return f"def {_signature(raw)}"
    if inspect.isclass(raw):
        return "class"
    if inspect.ismemberdescriptor(raw) or inspect.isgetsetdescriptor(raw):
        return "attribute"  # a __slots__ instance attribute
    return f"attribute: {type(raw).__name__}"


def public_api(module: ModuleType) -> dict[str, str]:
    """The package's public API as ``{dotted name: description}``."""
    package = module.__name__.split(".")[0]
    names = getattr(module, "__all__", None)
    if names is None:
        raise ValueError(f"{module.__name__} has no __all__: its public API is undefined")
    api: dict[str, str] = {}
    for name in names:
        if not hasattr(module, name):
            raise ValueError(f"{module.__name__}.__all__ lists {name!r}, which it does not define")
        obj = getattr(module, name)
        if inspect.isclass(obj):
            api.update(_class_entries(name, obj, package))
        elif inspect.ismodule(obj):
            api[name] = "module"
        elif callable(obj):
            sig = _signature(obj)
            api[name] = f"def {sig}" if sig is not None else "callable"
        else:
            api[name] = f"constant: {type(obj).__name__}"
    return dict(sorted(api.items()))


# --- versions and snapshots ---------------------------------------------------------------


def parse_version(text: str) -> tuple[int, int, int]:
    match = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)", text)
    if not match:
        raise ValueError(f"version {text!r} is not MAJOR.MINOR.PATCH")
    major, minor, patch = (int(part) for part in match.groups())
    return major, minor, patch


def package_version(package_dir: Path) -> str:
    return tomllib.loads((package_dir / "pyproject.toml").read_text())["project"]["version"]


@dataclass(frozen=True)
class Snapshot:
    package: str
    version: str
    api: dict[str, str]

    def dumps(self) -> str:
        """Indented JSON: one API entry per line, sorted, so a change reads as a plain diff."""
        data = {
            "package": self.package,
            "version": self.version,
            "regenerate": UPDATE_COMMAND,
            "api": dict(sorted(self.api.items())),
        }
        return json.dumps(data, indent=1, ensure_ascii=False) + "\n"

    @classmethod
    def load(cls, path: Path) -> Snapshot:
        data = json.loads(path.read_text())
        return cls(data["package"], data["version"], data["api"])


# --- comparing -------------------------------------------------------------------------------


@dataclass
class ApiDiff:
    breaking: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)

    def required_bump(self, old_version: str) -> str | None:
        """'major', 'minor', 'patch' or None: the least version move the changes need."""
        if self.breaking:
            return "major" if parse_version(old_version)[0] >= 1 else "minor"
        return "patch" if self.added else None


def _parameters(description: str) -> ast.arguments | None:
    """The parameter list of a ``def (...) -> ...`` description, or None if unparsable."""
    prefix = next(
        (p for p in ("def ", "classmethod ", "staticmethod ") if description.startswith(p)), None
    )
    if prefix is None:
        return None
    # Reprs such as <factory> are not Python; any placeholder compares equal to itself.
    text = re.sub(r"<[^<>]*>", "...", description[len(prefix) :])
    try:
        tree = ast.parse(f"def f{text}: pass")
    except SyntaxError:
        return None
    return tree.body[0]  # type: ignore[return-value]


def _only_optional_parameters_added(old: str, new: str) -> bool:
    """True when ``new`` is ``old`` plus parameters a caller of ``old`` never has to pass."""
    if old.split(" ", 1)[0] != new.split(" ", 1)[0]:
        return False
    old_def, new_def = _parameters(old), _parameters(new)
    if old_def is None or new_def is None:
        return False

    def dump(node: ast.AST | None) -> str:
        return ast.dump(node) if node is not None else ""

    if dump(old_def.returns) != dump(new_def.returns):
        return False
    o, n = old_def.args, new_def.args

    def positional(a: ast.arguments) -> list[ast.arg]:
        return [*a.posonlyargs, *a.args]

    def with_defaults(a: ast.arguments) -> list[tuple[str, str, str | None]]:
        params = positional(a)
        defaults: list[ast.expr | None] = [None] * (len(params) - len(a.defaults)) + list(
            a.defaults
        )
        return [
            (p.arg, dump(p.annotation), dump(d) if d else None) for p, d in zip(params, defaults)
        ]

    old_pos, new_pos = with_defaults(o), with_defaults(n)
    if len(o.posonlyargs) != len(n.posonlyargs) or new_pos[: len(old_pos)] != old_pos:
        return False
    if any(default is None for _, _, default in new_pos[len(old_pos) :]):
        return False

    def keyword_only(a: ast.arguments) -> dict[str, tuple[str, str | None]]:
        return {
            p.arg: (dump(p.annotation), dump(d) if d else None)
            for p, d in zip(a.kwonlyargs, a.kw_defaults)
        }

    old_kw, new_kw = keyword_only(o), keyword_only(n)
    if any(new_kw.get(name) != spec for name, spec in old_kw.items()):
        return False
    if any(new_kw[name][1] is None for name in new_kw.keys() - old_kw.keys()):
        return False
    for star in ("vararg", "kwarg"):
        was, now = getattr(o, star), getattr(n, star)
        if was is not None and dump(was) != dump(now):
            return False
    return True


def _bases(description: str) -> tuple[str, set[str]] | None:
    match = re.fullmatch(r"(class|protocol)(?:\((.*)\))?", description)
    if not match:
        return None
    return match.group(1), {b.strip() for b in (match.group(2) or "").split(",") if b.strip()}


def compare(old: dict[str, str], new: dict[str, str]) -> ApiDiff:
    """Classify every difference between two APIs as breaking or an addition."""
    # Members of a Protocol that already existed: implementers depend on them exactly.
    protocols = {k for k, v in old.items() if "." not in k and v.startswith("protocol")}
    diff = ApiDiff()
    for name in sorted(old.keys() | new.keys()):
        before, after = old.get(name), new.get(name)
        if before == after:
            continue
        in_protocol = name.split(".")[0] in protocols and "." in name
        if after is None:
            diff.breaking.append(f"removed {name}: {before}")
        elif before is None:
            if in_protocol:
                diff.breaking.append(
                    f"added {name} to Protocol {name.split('.')[0]}: {after} "
                    "(implementations of the old Protocol no longer satisfy it)"
                )
            else:
                diff.added.append(f"added {name}: {after}")
        else:
            old_bases, new_bases = _bases(before), _bases(after)
            compatible = (not in_protocol and _only_optional_parameters_added(before, after)) or (
                old_bases is not None
                and new_bases is not None
                and old_bases[0] == new_bases[0]
                and old_bases[1] < new_bases[1]
            )
            entry = f"changed {name}: {before}  ->  {after}"
            (diff.added if compatible else diff.breaking).append(entry)
    return diff


def bump_is_enough(old_version: str, new_version: str, bump: str | None) -> bool:
    old, new = parse_version(old_version), parse_version(new_version)
    if new < old:
        return False
    if bump == "major":
        return new[0] > old[0]
    if bump == "minor":
        return new[:2] > old[:2]
    if bump == "patch":
        return new > old
    return True


def next_version(old_version: str, bump: str) -> str:
    major, minor, patch = parse_version(old_version)
    if bump == "major":
        return f"{major + 1}.0.0"
    if bump == "minor":
        return f"{major}.{minor + 1}.0"
    return f"{major}.{minor}.{patch + 1}"


# --- the check -------------------------------------------------------------------------------


@dataclass
class Result:
    package: str
    snapshot: Snapshot
    version: str
    api: dict[str, str]
    diff: ApiDiff

    @property
    def bump(self) -> str | None:
        return self.diff.required_bump(self.snapshot.version)

    @property
    def ok(self) -> bool:
        return bump_is_enough(self.snapshot.version, self.version, self.bump)

    @property
    def stale(self) -> bool:
        return self.api != self.snapshot.api or self.version != self.snapshot.version

    def report(self) -> str:
        lines = [f"{self.package}: public API against its snapshot of {self.snapshot.version}:"]
        lines += [f"  BREAKING {entry}" for entry in self.diff.breaking]
        lines += [f"  addition {entry}" for entry in self.diff.added]
        if self.ok:
            lines.append(f"  version {self.version} covers these changes")
            return "\n".join(lines)
        wanted = next_version(self.snapshot.version, self.bump or "patch")
        rule = (
            "a removal or changed signature needs a minor bump below 1.0 (a major from 1.0 on)"
            if self.bump in ("minor", "major")
            else "an addition needs at least a patch bump"
        )
        lines.append(
            f"  version is still {self.version}: {rule}. Set {wanted} (or higher) in "
            f"packages/{self.package}/pyproject.toml and __version__, add a dated CHANGELOG "
            f"section for it, then run `{UPDATE_COMMAND} {self.package}`."
        )
        return "\n".join(lines)


def package_dirs(root: Path = ROOT) -> dict[str, Path]:
    return {p.name: p for p in sorted((root / "packages").glob("ds-*")) if p.is_dir()}


def check(package: str, package_dir: Path, module: ModuleType | None = None) -> Result:
    module = module or importlib.import_module(package.replace("-", "_"))
    snapshot_path = package_dir / SNAPSHOT_NAME
    if not snapshot_path.is_file():
        raise FileNotFoundError(f"{snapshot_path} is missing: run `{UPDATE_COMMAND} {package}`")
    snapshot = Snapshot.load(snapshot_path)
    api = public_api(module)
    return Result(package, snapshot, package_version(package_dir), api, compare(snapshot.api, api))


def main(argv: list[str] | None = None, root: Path = ROOT) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("packages", nargs="*", help="ds-* packages (default: all)")
    parser.add_argument("--update", action="store_true", help="rewrite the snapshots")
    parser.add_argument(
        "--force",
        action="store_true",
        help="with --update: write even where the version did not move as required",
    )
    args = parser.parse_args(argv)
    dirs = package_dirs(root)
    unknown = sorted(set(args.packages) - dirs.keys())
    if unknown:
        parser.error(f"unknown packages {unknown}; known: {sorted(dirs)}")
    failed = False
    for package in args.packages or sorted(dirs):
        package_dir = dirs[package]
        snapshot_path = package_dir / SNAPSHOT_NAME
        module = importlib.import_module(package.replace("-", "_"))
        if not snapshot_path.is_file():
            if not args.update:
                print(f"{package}: no snapshot; run `{UPDATE_COMMAND} {package}`")
                failed = True
                continue
            result = None
        else:
            result = check(package, package_dir, module)
            if result.stale or not result.ok:
                print(result.report())
            if not result.ok and not (args.update and args.force):
                failed = True
                continue
        if args.update and (result is None or result.stale):
            snapshot = Snapshot(package, package_version(package_dir), public_api(module))
            snapshot_path.write_text(snapshot.dumps())
            print(f"{package}: wrote {snapshot_path.relative_to(root)} ({snapshot.version})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
