"""Where ``ds-serve`` with no MODEL_PATH finds the project's built-in model.

The search rule lives in ds-model (``ds_model.default_model``), so that
``ds-model generate`` and ``ds-serve`` agree; ds-serve's override variable is
``DS_SERVE_DEFAULT_MODEL``.
"""

from __future__ import annotations

from pathlib import Path

from ds_model.default_model import DEFAULT_MODEL_DIR, DefaultModelNotFound
from ds_model.default_model import find_default_model as _find_default_model

__all__ = ["DEFAULT_MODEL_DIR", "ENV_VAR", "DefaultModelNotFound", "find_default_model"]

ENV_VAR = "DS_SERVE_DEFAULT_MODEL"


def find_default_model(start: str | Path | None = None) -> Path:
    """The built-in model's directory, found from ``start`` (default: the cwd) upward."""
    return _find_default_model(start, env_var=ENV_VAR)
