"""Loading optimizer checkpoints by parameter name, so they survive regrouping.

torch's ``Optimizer.load_state_dict`` pairs saved state with parameters by position:
group i, slot j. Dynamic grouping moves parameters between groups, so positions
change and a positional load would hand one tensor's moments to another. When every
group (saved and current) carries ``param_names``, :func:`load_grouped_state_dict`
pairs by name instead:

- every saved name must exist in the optimizer and vice versa (else ``KeyError``);
- if every saved group has a ``name`` that the optimizer also has, the optimizer
  takes the saved membership (parameters move to the group they were in when
  saved) and the saved hyperparameters: a resumed run continues exactly;
- otherwise the optimizer keeps its current grouping and hyperparameters and only
  the per-parameter state (moments, step, sensitivity) is loaded.

Without names it falls back to torch's positional rule and raises ``ValueError``
when the group sizes differ.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["load_grouped_state_dict"]


def _has_names(groups: list[dict[str, Any]]) -> bool:
    return bool(groups) and all("param_names" in g for g in groups)


def _group_names(groups: list[dict[str, Any]]) -> list[Any]:
    return [g.get("name") for g in groups]


def load_grouped_state_dict(
    optimizer: torch.optim.Optimizer,
    state_dict: dict[str, Any],
    base_load: Callable[[dict[str, Any]], None],
) -> list[tuple[torch.Tensor, dict[str, Any]]]:
    """Load ``state_dict`` into ``optimizer`` (through torch's ``base_load``).

    Returns ``(param, saved_state)`` pairs with the saved tensors as they were in the
    checkpoint (before torch cast them), for callers that restore exact dtypes.
    """
    if not isinstance(state_dict, dict) or {"state", "param_groups"} - state_dict.keys():
        raise TypeError("state_dict must be a dict with 'state' and 'param_groups'")
    saved_groups = state_dict["param_groups"]
    saved_state = state_dict["state"]
    groups = optimizer.param_groups

    if not (_has_names(saved_groups) and _has_names(groups)):
        saved_sizes = [len(g["params"]) for g in saved_groups]
        sizes = [len(g["params"]) for g in groups]
        if saved_sizes != sizes:
            raise ValueError(
                f"checkpoint has param groups of sizes {saved_sizes}, the optimizer has {sizes}; "
                "positional loading needs the same grouping. Give the groups 'param_names' "
                "(ds_optim.group_parameters does) to load by name after regrouping."
            )
        originals = copy.deepcopy(saved_state)
        base_load(state_dict)
        flat = [p for g in groups for p in g["params"]]
        ids = [i for g in saved_groups for i in g["params"]]
        return [(p, originals[i]) for p, i in zip(flat, ids) if i in originals]

    by_name: dict[str, dict[str, Any]] = {}
    saved_member: dict[str, Any] = {}
    for g in saved_groups:
        for idx, name in zip(g["params"], g["param_names"]):
            saved_member[name] = g.get("name")
            if idx in saved_state:
                by_name[name] = saved_state[idx]
    params = {n: p for g in groups for n, p in zip(g["param_names"], g["params"])}
    missing = sorted(set(params) - set(saved_member))
    unexpected = sorted(set(saved_member) - set(params))
    if missing or unexpected:
        raise KeyError(
            f"checkpoint does not match the optimizer's parameters: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )

    current_names = _group_names(groups)
    saved_names = _group_names(saved_groups)
    restore_membership = (
        None not in current_names
        and None not in saved_names
        and len(set(current_names)) == len(current_names)
        and set(saved_names) <= set(current_names)
    )
    saved_by_group_name = {g.get("name"): g for g in saved_groups}
    if restore_membership:
        members: dict[Any, list[str]] = {n: [] for n in current_names}
        for g in saved_groups:
            members[g["name"]].extend(g["param_names"])
        for g in groups:
            g["param_names"] = members[g["name"]]
            g["params"] = [params[n] for n in g["param_names"]]

    new_groups, new_state, pairs, index = [], {}, [], 0
    for g in groups:
        saved = saved_by_group_name.get(g.get("name")) if restore_membership else None
        template = saved if saved is not None else g
        ng = {
            k: copy.deepcopy(v) for k, v in template.items() if k not in ("params", "param_names")
        }
        ng["params"] = list(range(index, index + len(g["params"])))
        ng["param_names"] = list(g["param_names"])
        for name, p in zip(g["param_names"], g["params"]):
            if name in by_name:
                new_state[index] = by_name[name]
                pairs.append((p, by_name[name]))
            index += 1
        new_groups.append(ng)
    base_load({"state": new_state, "param_groups": new_groups})
    return pairs
