"""Atomic training checkpoints.

A checkpoint is a directory ``checkpoint-<step>/`` holding the weights (``model.safetensors``,
or a PEFT-format adapter for LoRA), ``optimizer.pt``, ``training_state.pt`` (scheduler,
loss scaler), ``rng_state_<rank>.pt`` and ``trainer_state.json`` (step, data position,
the loss history). Everything is written into ``.tmp-checkpoint-<step>/`` first, flushed
to disk, and only then renamed to its final name, so a crash at any moment leaves either
the previous checkpoints or the complete new one, never a half-written one.

Loading never runs code from a checkpoint: weights are safetensors, and the ``.pt``
files are read with ``torch.load(weights_only=True)``, which rebuilds tensors, numbers,
strings and containers only; a file holding anything else (a pickled callable) is
refused with a ``CheckpointError`` naming it.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable
from typing import Any

import torch
from safetensors.torch import load_file, save_file

__all__ = [
    "CHECKPOINT_PATTERN",
    "CheckpointError",
    "capture_rng",
    "find_latest_checkpoint",
    "list_checkpoints",
    "load_state_file",
    "load_weights",
    "restore_rng",
    "resume_checkpoint",
    "save_weights",
    "write_checkpoint",
]

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"


class CheckpointError(ValueError):
    """A checkpoint path that does not hold a complete checkpoint."""


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints under ``output_dir`` as ``(step, path)``, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        m = CHECKPOINT_PATTERN.match(name)
        path = os.path.join(output_dir, name)
        if m and os.path.isfile(os.path.join(path, STATE_FILE)):
            found.append((int(m.group(1)), path))
    return sorted(found)


def find_latest_checkpoint(path: str) -> str:
    """``path`` itself if it is a checkpoint, else the newest checkpoint inside it."""
    if os.path.isfile(os.path.join(path, STATE_FILE)):
        return path
    found = list_checkpoints(path)
    if not found:
        raise CheckpointError(
            f"resume_from={path!r}: not a checkpoint directory and holds no checkpoint-<step>/"
        )
    return found[-1][1]


def resume_checkpoint(resume_from: str | None, output_dir: str) -> str | None:
    """The checkpoint a run resumes from: none for ``None``; for ``"auto"`` the newest
    complete checkpoint in ``output_dir``, or none (a fresh start) when it holds none,
    so a restarted job recovers by itself; else ``resume_from`` itself (a checkpoint,
    or a directory whose newest checkpoint is taken; an error when it holds none).
    Temporary ``.tmp-checkpoint-*`` directories of an interrupted save are never taken."""
    if resume_from is None:
        return None
    if resume_from == "auto":
        found = list_checkpoints(output_dir)
        return found[-1][1] if found else None
    return find_latest_checkpoint(resume_from)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: str) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(root)


def tmp_dir_for(output_dir: str, step: int) -> str:
    return os.path.join(output_dir, f".tmp-checkpoint-{step}")


def write_checkpoint(
    output_dir: str,
    step: int,
    write: Callable[[str], None],
    trainer_state: dict[str, Any],
    save_total_limit: int | None = None,
    *,
    prepare: bool = True,
) -> str:
    """Run ``write(tmp_dir)``, add ``trainer_state.json`` last, then rename atomically.

    ``prepare=False`` means the caller already created the temporary directory (and
    other ranks may have written into it). Returns the final checkpoint path.
    """
    tmp = tmp_dir_for(output_dir, step)
    if prepare:
        prepare_tmp(output_dir, step)
    write(tmp)
    with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as f:
        json.dump(trainer_state, f, indent=1)
    _fsync_tree(tmp)
    final = os.path.join(output_dir, f"checkpoint-{step}")
    if os.path.exists(final):  # re-saving a step: move the old copy aside first
        old = final + f".old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(output_dir)
    if save_total_limit is not None:
        for _, path in list_checkpoints(output_dir)[:-save_total_limit]:
            shutil.rmtree(path, ignore_errors=True)
    return final


def prepare_tmp(output_dir: str, step: int) -> str:
    os.makedirs(output_dir, exist_ok=True)
    tmp = tmp_dir_for(output_dir, step)
    shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a crash mid-write
    os.makedirs(tmp)
    return tmp


def save_weights(state: dict[str, torch.Tensor], path: str) -> None:
    """Save a state dict as safetensors; tensors sharing storage (tied embeddings) are
    written once, under their first name, and the aliases are listed in the metadata."""
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for name, tensor in state.items():
        t = tensor.detach()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.cpu().contiguous()
    save_file(tensors, path, metadata={"format": "pt", "aliases": json.dumps(aliases)})


def load_weights(path: str) -> dict[str, torch.Tensor]:
    """Inverse of :func:`save_weights` (aliases come back as the same tensor)."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing from the checkpoint")
    try:
        tensors = load_file(path)
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        aliases = json.loads(meta.get("aliases", "{}"))
        for alias, name in aliases.items():
            tensors[alias] = tensors[name]
    except Exception as exc:  # SafetensorError, JSON, a dangling alias: name the file
        raise CheckpointError(f"{path}: not a readable weights file ({exc})") from None
    return tensors


def load_state_file(path: str) -> Any:
    """A ``.pt`` file of resume state (optimizer, scheduler, RNG), read with
    ``weights_only=True``: only tensors, numbers, strings and containers are rebuilt,
    so a crafted file cannot run code; anything else is refused naming the file."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing from the checkpoint")
    try:
        return torch.load(path, weights_only=True)
    except Exception as exc:  # UnpicklingError (a forbidden global), a truncated zip
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{path}: refused to load resume state: it is not the tensors-and-numbers "
            f"state this trainer writes ({reason})"
        ) from None


def capture_rng() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
