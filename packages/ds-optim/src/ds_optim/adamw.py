"""GroupedAdamW: AdamW with per-group lr scaling, BF16 moments and name-aware checkpoints.

The update is torch's AdamW (decoupled weight decay, bias-corrected moments). On CPU
it runs torch's fused AdamW kernel (``torch.optim.AdamW(fused=True)``'s, one pass over
each tensor and no temporaries, which is also what transformers' Trainer picks by
default); elsewhere, and for bf16 moments, ``torch._foreach_*`` multi-tensor ops: one
kernel launch per op for all tensors of a (device, dtype) group, like
``torch.optim.AdamW(foreach=True)``, with a full-size temporary for the denominator.

Per group: ``lr`` is the base learning rate (what LR schedulers drive) and
``lr_scale`` a multiplier set by the grouping policy; a tensor moves by
``lr * lr_scale``. Weight decay is decoupled: ``p *= 1 - lr * lr_scale * weight_decay``.

Moments are stored in ``state_dtype``: the parameter's dtype by default, or bfloat16
(as DeepSeek-V3 does) to halve optimizer memory. BF16 moments are updated in fp32 and
written back with stochastic rounding by default: with round-to-nearest,
``v = 0.999 v + 0.001 g^2`` rounds back to ``v`` whenever ``g^2`` is within 2x of
``v`` (bf16 has 8 significant bits), so the second moment would freeze. The rounding
noise comes from a generator seeded by (seed, step), so resuming from a checkpoint
is still bit-exact.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from ds_optim.checkpoint import load_grouped_state_dict
from ds_optim.grouping import get_policy, group_parameters
from ds_optim.sensitivity import SensitivityRegrouper

__all__ = ["GroupedAdamW"]

_STATE_DTYPES = (None, torch.float32, torch.bfloat16)
_ROUNDINGS = ("stochastic", "nearest")


def _check_float(name: str, value: object, *, low: float = 0.0, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {value!r}")
    if not (low <= value < high) or math.isnan(value):
        raise ValueError(f"{name}={value!r} is out of range; allowed: [{low}, {high})")
    return float(value)


def stochastic_round_to_bf16(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """fp32 -> bf16, rounding up with probability equal to the dropped fraction.

    Adds uniform random bits below bf16's last kept bit, then truncates. Exact for
    values already representable; non-finite values stay non-finite.
    """
    bits = x.view(torch.int32)
    noise = torch.randint(
        0, 1 << 16, x.shape, generator=generator, device=x.device, dtype=torch.int32
    )
    # inf and nan keep their top 16 bits under the added noise (a carry out of the
    # mantissa of the largest finite values correctly rounds them up to inf).
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)


class GroupedAdamW(Optimizer):
    """AdamW over parameter groups, optionally regrouped by a sensitivity policy.

    Args:
        params: tensors, ``named_parameters()`` pairs or group dicts (as for any torch
            optimizer); groups may carry ``name``, ``lr_scale`` and ``param_names``.
            :func:`ds_optim.group_parameters` builds such groups from a model.
        lr, betas, eps, weight_decay: AdamW's hyperparameters (defaults of every group).
        state_dtype: ``None`` (moments in the parameter's dtype), ``torch.float32`` or
            ``torch.bfloat16``.
        bf16_rounding: ``"stochastic"`` (default) or ``"nearest"``, for bf16 moments.
        foreach: use multi-tensor ops (default ``None``: yes) where the fused kernel
            is not used.
        fused: use torch's fused AdamW kernel: ``None`` (default) where it applies
            (plain CPU tensors whose moments share their dtype), ``False`` never,
            ``True`` always (a step raises ``ValueError`` for tensors it cannot take).
        regrouper: an object with ``observe(optimizer)`` (called before each update,
            gradients present) and ``maybe_regroup(optimizer)`` (called after), such as
            :class:`ds_optim.SensitivityRegrouper`.
        seed: seeds bf16 stochastic rounding.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        state_dtype: torch.dtype | None = None,
        bf16_rounding: str = "stochastic",
        foreach: bool | None = None,
        fused: bool | None = None,
        regrouper: Any = None,
        seed: int = 0,
    ) -> None:
        _check_float("lr", lr)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"betas must be a pair of floats, got {betas!r}")
        _check_float("betas[0]", betas[0], high=1.0)
        _check_float("betas[1]", betas[1], high=1.0)
        _check_float("eps", eps)
        _check_float("weight_decay", weight_decay)
        if state_dtype not in _STATE_DTYPES:
            raise ValueError(
                f"state_dtype={state_dtype!r} is not supported; allowed: None, torch.float32, "
                "torch.bfloat16"
            )
        if fused not in (None, True, False):
            raise ValueError(f"fused={fused!r} must be None, True or False")
        if fused and foreach:
            raise ValueError("fused=True and foreach=True are exclusive; pick one")
        if bf16_rounding not in _ROUNDINGS:
            raise ValueError(
                f"bf16_rounding={bf16_rounding!r} is not supported; allowed: {_ROUNDINGS}"
            )
        defaults = dict(
            lr=float(lr),
            betas=(float(betas[0]), float(betas[1])),
            eps=float(eps),
            weight_decay=float(weight_decay),
            lr_scale=1.0,
            state_dtype=state_dtype,
            bf16_rounding=bf16_rounding,
            foreach=foreach,
            fused=fused,
        )
        super().__init__(params, defaults)
        self.seed = int(seed)
        self.regrouper = regrouper

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group)!r}")
        _check_not_duplicated(self.param_groups, param_group)
        for key in ("lr", "eps", "weight_decay", "lr_scale"):
            if key in param_group:
                _check_float(key, param_group[key])
        if param_group.get("state_dtype", None) not in _STATE_DTYPES:
            raise ValueError(
                f"group state_dtype={param_group['state_dtype']!r} is not supported; allowed: "
                "None, torch.float32, torch.bfloat16"
            )
        super().add_param_group(param_group)
        for p in self.param_groups[-1]["params"]:
            if p.is_complex():
                raise TypeError("GroupedAdamW does not support complex parameters")

    @classmethod
    def from_model(
        cls, model: torch.nn.Module, policy: Any = "static", **kwargs: Any
    ) -> GroupedAdamW:
        """Group ``model``'s parameters under ``policy`` (a name or policy object); a
        dynamic policy also gets its :class:`SensitivityRegrouper`."""
        pol = get_policy(policy)
        groups = group_parameters(model, pol)
        regrouper = SensitivityRegrouper(pol) if pol.dynamic else None
        return cls(groups, regrouper=regrouper, **kwargs)

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        if self.regrouper is not None and hasattr(self.regrouper, "state_dict"):
            sd["regrouper"] = self.regrouper.state_dict()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a checkpoint; see :func:`ds_optim.checkpoint.load_grouped_state_dict`.

        When groups carry ``param_names`` the state is matched by name, so a checkpoint
        loads after parameters changed groups. Moments are restored from the saved
        tensors straight into the dtype this optimizer stores them in (torch's loader
        casts them to the parameter's dtype, which would round fp32 moments of bf16
        parameters).
        """
        pairs = load_grouped_state_dict(self, state_dict, super().load_state_dict)
        if "regrouper" in state_dict and self.regrouper is not None:
            self.regrouper.load_state_dict(state_dict["regrouper"])
        group_of = {p: g for g in self.param_groups for p in g["params"]}
        for p, saved in pairs:
            st = self.state[p]
            dtype = group_of[p]["state_dtype"] or p.dtype
            for key in ("exp_avg", "exp_avg_sq"):
                if key in saved:
                    st[key] = saved[key].detach().to(device=p.device, dtype=dtype, copy=True)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.regrouper is not None:
            self.regrouper.observe(self)
        for group in self.param_groups:
            self._update_group(group)
        if self.regrouper is not None:
            self.regrouper.maybe_regroup(self)
        return loss

    def _init_state(self, p: torch.Tensor, dtype: torch.dtype) -> dict[str, Any]:
        st = self.state[p]
        if "step" not in st:  # a regrouper may have stored statistics already
            st["step"] = torch.tensor(0.0, dtype=torch.float32)
            st["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        return st

    def _update_group(self, group: dict[str, Any]) -> None:
        beta1, beta2 = group["betas"]
        lr = group["lr"] * group["lr_scale"]
        by_key: dict[tuple[Any, ...], list[torch.Tensor]] = defaultdict(list)
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("GroupedAdamW does not support sparse gradients")
            dtype = group["state_dtype"] or p.dtype
            st = self._init_state(p, dtype)
            st["step"] += 1
            # Tensors of one bucket share device, dtypes and step, so bias corrections
            # are per bucket, not per tensor.
            by_key[(p.device, p.dtype, dtype, float(st["step"]))].append(p)
        for (_, p_dtype, s_dtype, step), params in by_key.items():
            states = [self.state[p] for p in params]
            exp_avgs = [s["exp_avg"] for s in states]
            exp_avg_sqs = [s["exp_avg_sq"] for s in states]
            grads = [p.grad for p in params]
            foreach = group["foreach"]
            if foreach is None:
                foreach = True
            same_dtype = p_dtype == s_dtype and all(g.dtype == p_dtype for g in grads)
            fused = group.get("fused")
            if fused is not False and same_dtype and _fusable(params, grads):
                torch._fused_adamw_(
                    params,
                    grads,
                    exp_avgs,
                    exp_avg_sqs,
                    [],
                    [s["step"] for s in states],
                    lr=lr,
                    beta1=beta1,
                    beta2=beta2,
                    weight_decay=group["weight_decay"],
                    eps=group["eps"],
                    amsgrad=False,
                    maximize=False,
                )
                continue
            if fused:
                raise ValueError(
                    "fused=True: torch's fused AdamW takes plain CPU tensors whose "
                    f"moments share their dtype; got {p_dtype} parameters on "
                    f"{params[0].device} with {s_dtype} moments"
                )
            if same_dtype:
                _adamw(
                    params,
                    grads,
                    exp_avgs,
                    exp_avg_sqs,
                    step,
                    lr,
                    beta1,
                    beta2,
                    group["eps"],
                    group["weight_decay"],
                    foreach,
                )
                continue
            # Mixed precision: update fp32 copies, then write back.
            p32 = [p.float() for p in params]
            m32 = [m.float() for m in exp_avgs]
            v32 = [v.float() for v in exp_avg_sqs]
            g32 = [g.float() for g in grads]
            _adamw(
                p32,
                g32,
                m32,
                v32,
                step,
                lr,
                beta1,
                beta2,
                group["eps"],
                group["weight_decay"],
                foreach,
            )
            for p, new in zip(params, p32):
                p.copy_(new)
            self._write_moments(exp_avgs, m32, group, step, salt=1)
            self._write_moments(exp_avg_sqs, v32, group, step, salt=2)

    def _write_moments(
        self,
        dst: list[torch.Tensor],
        src: list[torch.Tensor],
        group: dict[str, Any],
        step: float,
        salt: int,
    ) -> None:
        if dst[0].dtype != torch.bfloat16 or group["bf16_rounding"] == "nearest":
            torch._foreach_copy_(dst, src)
            return
        gens: dict[torch.device, torch.Generator] = {}
        for d, s in zip(dst, src):
            gen = gens.get(s.device)
            if gen is None:
                gen = torch.Generator(device=s.device)
                gen.manual_seed(hash((self.seed, int(step), salt)) & 0x7FFFFFFF)
                gens[s.device] = gen
            d.copy_(stochastic_round_to_bf16(s.contiguous(), gen))


def _fusable(params: list[torch.Tensor], grads: list[torch.Tensor]) -> bool:
    """torch's fused AdamW applies: plain (no subclass such as DTensor) CPU tensors of a
    float dtype it implements. (CUDA also has one; it wants the step counters on the
    device, and this optimizer keeps them on the CPU, so CUDA runs the foreach ops.)"""
    return hasattr(torch, "_fused_adamw_") and all(
        t.device.type == "cpu"
        and type(t) in (torch.Tensor, torch.nn.Parameter)
        and t.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16)
        for t in (*params, *grads)
    )


def _adamw(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    step: float,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    foreach: bool,
) -> None:
    """One AdamW step, the same arithmetic as torch's ``_multi_tensor_adamw``."""
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = math.sqrt(1 - beta2**step)
    step_size = lr / bias_correction1
    if not foreach:
        for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
            if weight_decay:
                p.mul_(1 - lr * weight_decay)
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
            p.addcdiv_(m, denom, value=-step_size)
        return
    if weight_decay:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bias_correction2_sqrt)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, -step_size)


def _check_not_duplicated(groups: list[dict[str, Any]], new: dict[str, Any]) -> None:
    """Raise ValueError naming the parameter if ``new`` repeats one already grouped."""
    params = new.get("params")
    if params is None:
        raise KeyError("param_group has no 'params'")
    new["params"] = params = [params] if isinstance(params, torch.Tensor) else list(params)
    seen: dict[int, str] = {}

    def label(group: dict[str, Any], gi: Any, pi: int, p: Any) -> str:
        names = group.get("param_names")
        name = p[0] if isinstance(p, tuple) else (names[pi] if names else f"params[{pi}]")
        return f"group {group.get('name', gi)!r} ({name})"

    for gi, group in enumerate(groups):
        for pi, p in enumerate(group["params"]):
            seen[id(p)] = label(group, gi, pi, p)
    for pi, item in enumerate(params):
        p = item[1] if isinstance(item, tuple) else item
        where = label(new, len(groups), pi, item)
        if id(p) in seen:
            raise ValueError(f"a parameter is in two groups: {seen[id(p)]} and {where}")
        seen[id(p)] = where
