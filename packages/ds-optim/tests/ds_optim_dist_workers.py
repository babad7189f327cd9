"""Worker functions for the multi-process tests (spawned; importable by module name).

Each ``scenario_*`` runs on every rank inside an initialized gloo process group and
raises AssertionError on failure; ``main`` runs a list of them in one spawn so the
torch start-up cost is paid once per world size.
"""

from __future__ import annotations

import copy
import os
import pickle
import sys
import traceback

import torch
import torch.distributed as dist
from ds_optim import (
    GroupedAdamW,
    QuantizedAllreduceState,
    SensitivityPolicy,
    group_parameters,
    int4_allreduce_hook,
    int8_allreduce_hook,
    zero_grouped_adamw,
)
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP


def all_equal_across_ranks(t: torch.Tensor) -> bool:
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return all(torch.equal(o, out[0]) for o in out)


def exact_average(grads: torch.Tensor) -> torch.Tensor:
    g = grads.clone()
    dist.all_reduce(g)
    return g / dist.get_world_size()


def block_absmax(x: torch.Tensor, block: int, padded: int) -> torch.Tensor:
    flat = torch.zeros(padded)
    flat[: x.numel()] = x.reshape(-1).abs()
    return flat.view(-1, block).amax(1).repeat_interleave(block)[: x.numel()]


def hook_error_bound(local: torch.Tensor, avg: torch.Tensor, bits: int, mode: str) -> torch.Tensor:
    """Worst-case |hook - exact| per element for deterministic rounding, no feedback."""
    world, block = dist.get_world_size(), 128
    qmax = (1 << (bits - 1)) - 1
    slack = 1 + 2.0**-7  # scales are bf16, rounded up
    n = local.numel()
    parts = world if mode == "reduce_scatter" else 1
    padded = -(-n // (parts * block)) * block * parts
    mine = block_absmax(local, block, padded)
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine)
    err1 = torch.stack(every).mean(0) / qmax * slack / 2
    if mode == "all_gather":
        return (err1 * (1 + 1e-5) + 1e-7).view_as(local)
    # Stage 2 quantizes the average of the dequantized inputs once more.
    err1_block = torch.zeros(padded)
    err1_block[:n] = err1
    err1_max = err1_block.view(-1, block).amax(1).repeat_interleave(block)[:n]
    err2 = (block_absmax(avg, block, padded) + err1_max) / qmax * slack / 2
    return ((err1 + err2) * (1 + 1e-5) + 1e-7).view_as(local)


def scenario_hook_bound() -> None:
    rank = dist.get_rank()
    for bits, hook in ((4, int4_allreduce_hook), (8, int8_allreduce_hook)):
        for mode in ("reduce_scatter", "all_gather"):
            torch.manual_seed(0)
            model = nn.Linear(100, 10, bias=False)  # one bucket laid out as weight.grad
            ddp = DDP(copy.deepcopy(model))
            state = QuantizedAllreduceState(
                bits=bits, stochastic_rounding=False, error_feedback=False, mode=mode
            )
            ddp.register_comm_hook(state, hook)
            gen = torch.Generator().manual_seed(100 + rank)
            x = torch.randn(8, 100, generator=gen) * (1 + 3 * rank)
            ddp(x).pow(2).sum().backward()
            model(x).pow(2).sum().backward()
            local = model.weight.grad
            avg = exact_average(local)
            got = ddp.module.weight.grad
            err = (got - avg).abs()
            bound = hook_error_bound(local, avg, bits, mode)
            assert (err <= bound).all(), (bits, mode, float((err - bound).max()))
            assert err.max() > 0, "the hook must actually quantize"
            assert all_equal_across_ranks(got), "replicas must receive identical gradients"
            assert state.stats.calls == 1
            if bits == 4 and mode == "reduce_scatter":
                assert state.stats.reduction >= 7.0, state.stats
            # Picklable and checkpointable state.
            clone = pickle.loads(pickle.dumps(state))
            assert clone.mode == mode and clone.bits == bits
            assert clone.stats == state.stats
            assert clone.process_group is None


def scenario_no_sync_accumulation() -> None:
    rank = dist.get_rank()
    torch.manual_seed(1)
    model = nn.Linear(64, 8, bias=False)
    ddp = DDP(copy.deepcopy(model))
    state = QuantizedAllreduceState(stochastic_rounding=False, error_feedback=False)
    ddp.register_comm_hook(state, int4_allreduce_hook)
    gen = torch.Generator().manual_seed(7 + rank)
    batches = [torch.randn(4, 64, generator=gen) for _ in range(3)]
    with ddp.no_sync():
        for x in batches[:2]:
            ddp(x).pow(2).sum().backward()
    assert state.stats.calls == 0, "no communication inside no_sync"
    ddp(batches[2]).pow(2).sum().backward()
    assert state.stats.calls == 1, "one compressed exchange for the whole accumulation window"
    for x in batches:
        model(x).pow(2).sum().backward()
    local = model.weight.grad
    avg = exact_average(local)
    err = (ddp.module.weight.grad - avg).abs()
    assert (err <= hook_error_bound(local, avg, 4, "reduce_scatter")).all()


def _train(hook_state: QuantizedAllreduceState | None, steps: int) -> tuple[float, nn.Module]:
    """Regression with label noise (sigma 0.3): like an LM's entropy, the loss has a floor
    (0.09) that both runs approach, so "within 2%" compares converged runs."""
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 1))
    teacher = torch.randn(16, 1, generator=torch.Generator().manual_seed(3))

    def batch(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, 16, generator=gen)
        return x, torch.tanh(0.5 * x @ teacher) + 0.3 * torch.randn(n, 1, generator=gen)

    ddp = DDP(model)
    if hook_state is not None:
        ddp.register_comm_hook(hook_state, int4_allreduce_hook)
    opt = GroupedAdamW(group_parameters(model, "static"), lr=1e-2, weight_decay=0.01)
    gen = torch.Generator().manual_seed(1000 + rank)
    for _ in range(steps):
        x, y = batch(32, gen)
        loss = nn.functional.mse_loss(ddp(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    xe, ye = batch(2048, torch.Generator().manual_seed(5))
    with torch.no_grad():
        final = nn.functional.mse_loss(model(xe), ye).item()
    return final, model


def scenario_convergence_200_steps() -> None:
    base, _ = _train(None, 200)
    state = QuantizedAllreduceState()  # int4, stochastic rounding, error feedback
    compressed, model = _train(state, 200)
    assert abs(compressed - base) <= 0.02 * base, (compressed, base)
    for p in model.parameters():
        assert all_equal_across_ranks(p.detach()), "replicas drifted apart"
    # Counted from the hook: 1153 gradients pad to whole 128-blocks per rank, so a bit
    # under the 7.76x of a large bucket.
    world, n = dist.get_world_size(), 1153
    chunk = -(-n // (world * 128)) * 128
    per_call = 2 * (world - 1) * (chunk // 2 + 2 * chunk // 128)
    assert state.stats.bytes_sent == 200 * per_call, state.stats
    assert state.stats.fp32_allreduce_bytes == 200 * (2 * (world - 1) * 4 * n // world)
    # The state checkpoints: residuals and RNG round-trip.
    restored = QuantizedAllreduceState()
    restored.load_state_dict(state.state_dict())
    for k, v in state.compressor.residuals.items():
        assert torch.equal(restored.compressor.residuals[k], v)


def scenario_zero1_matches_unsharded() -> None:
    rank = dist.get_rank()
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))
    sharded_model, plain_model = copy.deepcopy(base), copy.deepcopy(base)
    ddp_a, ddp_b = DDP(sharded_model), DDP(plain_model)
    zero = zero_grouped_adamw(group_parameters(sharded_model, "static"), lr=1e-2, weight_decay=0.1)
    plain = GroupedAdamW(group_parameters(plain_model, "static"), lr=1e-2, weight_decay=0.1)
    gen = torch.Generator().manual_seed(rank)
    for _ in range(5):
        x = torch.randn(16, 8, generator=gen)
        for ddp, opt in ((ddp_a, zero), (ddp_b, plain)):
            opt.zero_grad()
            ddp(x).pow(2).mean().backward()
            opt.step()
    for a, b in zip(sharded_model.parameters(), plain_model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    held = torch.tensor([len(zero.optim.state)])
    total = sum(1 for _ in base.parameters())
    dist.all_reduce(held)
    assert held.item() == total and len(zero.optim.state) < total, "state must be sharded"
    try:
        zero_grouped_adamw(sharded_model.parameters(), regrouper=object())
    except ValueError as e:
        assert "regrouper" in str(e)
    else:
        raise AssertionError("a regrouper under ZeRO-1 must be refused")


def scenario_fsdp2_sensitivity_is_global() -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    world = dist.get_world_size()
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 4 * world), nn.Tanh(), nn.Linear(4 * world, 2))
    ref_model, sharded = copy.deepcopy(base), copy.deepcopy(base)
    fully_shard(sharded, mesh=init_device_mesh("cpu", (world,)))
    policy = SensitivityPolicy(regroup_every=1)
    local_policy = SensitivityPolicy(regroup_every=1, reduce_dtensor_stats=False)
    ref = GroupedAdamW.from_model(ref_model, policy, lr=1e-2)
    opt = GroupedAdamW.from_model(sharded, policy, lr=1e-2)
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(11))  # same batch everywhere
    for model, o in ((ref_model, ref), (sharded, opt)):
        model(x).pow(2).sum().backward()
        o.step()
    names = dict(ref_model.named_parameters())
    for name, p in sharded.named_parameters():
        want = ref.state[names[name]]["sensitivity"]
        got = opt.state[p]["sensitivity"]
        assert abs(got - want) <= 1e-5 * want, (name, got, want)
        torch.testing.assert_close(p.full_tensor(), names[name].detach(), atol=1e-6, rtol=0)
    # Same grouping on every rank and as the unsharded model.
    mine = {n: g["tier"] for g in opt.param_groups for n in g["param_names"]}
    assert mine == {n: g["tier"] for g in ref.param_groups for n in g["param_names"]}
    # Local-shard statistics would differ: the reduction is what makes them global.
    from ds_optim.sensitivity import mean_squares

    w = sharded[0].weight
    local = mean_squares([w.grad], reduce_dtensors=False)[0]
    glob = mean_squares([w.grad], reduce_dtensors=True)[0]
    ref_ms = names["0.weight"].grad.pow(2).mean().item()
    assert abs(glob - ref_ms) <= 1e-5 * ref_ms
    shard_differs = torch.tensor([float(abs(local - ref_ms) > 1e-3 * ref_ms)])
    dist.all_reduce(shard_differs)
    assert shard_differs.item() > 0
    del local_policy


def scenario_many_buckets() -> None:
    """Several buckets in flight at once: no deadlock, identical replicas, close to exact."""
    rank = dist.get_rank()
    for mode in ("reduce_scatter", "all_gather"):
        torch.manual_seed(2)
        model = nn.Sequential(*[nn.Linear(32, 32) for _ in range(6)])
        ddp = DDP(copy.deepcopy(model), bucket_cap_mb=0.005)  # ~1 layer per bucket
        state = QuantizedAllreduceState(mode=mode, stochastic_rounding=False, error_feedback=False)
        ddp.register_comm_hook(state, int4_allreduce_hook)
        gen = torch.Generator().manual_seed(rank)
        for _ in range(3):
            x = torch.randn(4, 32, generator=gen)
            ddp.zero_grad()
            model.zero_grad()
            ddp(x).pow(2).sum().backward()
            model(x).pow(2).sum().backward()
            # Every block's absmax is at most G, the largest local gradient on any rank:
            # stage 1 errs by <= G/14, stage 2 by <= (G + G/14)/14 (bf16 scale slack 1%).
            g_max = torch.stack([q.grad.abs().max() for q in model.parameters()]).max()
            dist.all_reduce(g_max, op=dist.ReduceOp.MAX)
            for p, q in zip(ddp.module.parameters(), model.parameters()):
                assert all_equal_across_ranks(p.grad)
                exact = exact_average(q.grad)
                assert (p.grad - exact).abs().max() <= 0.16 * g_max + 1e-6
        assert state.stats.calls > 3, state.stats  # several buckets per step (after the rebuild)


SCENARIOS = {
    "many_buckets": scenario_many_buckets,
    "hook_bound": scenario_hook_bound,
    "no_sync": scenario_no_sync_accumulation,
    "convergence": scenario_convergence_200_steps,
    "zero1": scenario_zero1_matches_unsharded,
    "fsdp2": scenario_fsdp2_sensitivity_is_global,
}


def main(rank: int, world: int, port: int, names: list[str], errors) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        for name in names:
            try:
                SCENARIOS[name]()
            except Exception:
                errors.put((rank, name, traceback.format_exc()))
                raise
            dist.barrier()
    finally:
        dist.destroy_process_group()
    # Every scenario passed. Leave without the interpreter's teardown: in one CI run a
    # rank died of SIGABRT ("terminate called without an active exception": a C++
    # thread destroyed while joinable, as torch/gloo threads can be at exit) with no
    # Python error reported; not reproduced in 5 local runs, so exiting here is a guard,
    # not a proven fix. Failures above still raise and exit non-zero.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
