"""Where the project's built-in model is found when no model path is given.

The rule: starting at the current directory and walking up to the filesystem root,
the first ``models/ds-tiny-coder`` directory that holds a ``config.json`` is used.
So ``uv run ds-model generate "def fibonacci(n):"`` and ``uv run ds-serve`` work from
the repository root and from any folder inside it. An environment variable (by
default ``DS_DEFAULT_MODEL``; ds-serve reads ``DS_SERVE_DEFAULT_MODEL``), when set,
names the directory directly and wins over the search.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["DEFAULT_MODEL_DIR", "ENV_VAR", "DefaultModelNotFound", "find_default_model"]

DEFAULT_MODEL_DIR = Path("models") / "ds-tiny-coder"
ENV_VAR = "DS_DEFAULT_MODEL"


class DefaultModelNotFound(FileNotFoundError):
    """No model path was given and the built-in model is not where the rule looks."""


def find_default_model(start: str | Path | None = None, *, env_var: str = ENV_VAR) -> Path:
    """The built-in model's directory, found from ``start`` (default: the cwd) upward."""
    override = os.environ.get(env_var)
    if override:
        path = Path(override)
        if not (path / "config.json").is_file():
            raise DefaultModelNotFound(
                f"{env_var}={override!r} does not name a model directory "
                f"(no {path / 'config.json'})"
            )
        return path
    here = Path(start if start is not None else Path.cwd()).resolve()
    looked = []
    for folder in (here, *here.parents):
        candidate = folder / DEFAULT_MODEL_DIR
        looked.append(candidate)
        if (candidate / "config.json").is_file():
            return candidate
    raise DefaultModelNotFound(
        f"no model path given and the built-in model was not found: looked for "
        f"{DEFAULT_MODEL_DIR}/config.json in {here} and every parent "
        f"(first tried: {looked[0]}). Pass a model directory, run from inside the "
        f"deepseek-stack repository, or set {env_var}."
    )
