"""GPU sweep of the flash kernels' tile configurations, against SDPA's flash backend.

Dense causal, bf16, q/k/v (batch, seqlen, heads, d) with batch * seqlen = --tokens and
heads = --hidden // d. For each head_dim d, every candidate (BLOCK_M, BLOCK_N, num_warps,
num_stages) of the forward and, separately, of the backward is checked against SDPA
(max abs error of out, or of dq/dk/dv, within a bf16 tolerance) and timed at the first
seqlen; the fastest few and the current default are timed again at the other seqlens.
The backward's two kernels share one pair (dk/dv: one program per BLOCK_N keys, looping
over BLOCK_M query rows; dq: the other way round), so each backward row also gives the
dk/dv and dq kernels' own times (the whole backward with the other kernel skipped, less
the shared delta/lse prep). A config that fails to compile (e.g. shared memory) or is
wrong is listed as such. One markdown table per (pass, d), fastest first, then one line
per (pass, d) naming the best: the lowest mean of ours/SDPA over the seqlens.

    python packages/ds-attention/benchmarks/tune_tiles.py [--smoke]

It swaps ``ds_attention.kernels.flash._tiles`` per candidate. ``--smoke`` runs tiny
shapes on CPU in the Triton interpreter only to prove the script works.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics


def parse():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--seqlens", type=int, nargs="+", default=[4096, 16384],
                   help="the first is swept, the others time only the finalists")  # fmt: skip
    p.add_argument("--tokens", type=int, default=65536, help="batch * seqlen")
    p.add_argument("--hidden", type=int, default=2048, help="heads = hidden // head_dim")
    p.add_argument("--finalists", type=int, default=3)
    p.add_argument("--passes", nargs="+", default=["fwd", "bwd"], choices=["fwd", "bwd"])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--smoke", action="store_true", help="tiny CPU run through the interpreter")
    return p.parse_args()


ARGS = parse()
if ARGS.smoke:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import machine, median_ms, table  # noqa: E402
from ds_attention.kernels import flash  # noqa: E402
from ds_attention.validate import make_mask_spec  # noqa: E402

DEVICE = "cpu" if ARGS.smoke else "cuda"
DTYPE = torch.float32 if ARGS.smoke else torch.bfloat16
DEFAULT_TILES = flash._tiles
# Max abs error allowed, as a fraction of the reference's largest magnitude: a few bf16
# roundings (2^-8 each) pass, a wrong tile (a missed or doubled key block) does not.
TOL = {"fwd": 2e-2, "bwd": 5e-2}

# (BLOCK_M, BLOCK_N, num_warps, num_stages). Forward: FA2-style Triton on H100 likes
# 128-row query tiles, 8 warps at d=128, 4 at d=64, 2-4 stages. Backward: dk/dv wants
# many keys per program (BLOCK_N) and dq many queries (BLOCK_M), hence the lopsided pairs.
CANDIDATES = {
    ("fwd", 64): [(64, 64, 4, 3), (64, 64, 4, 4), (128, 64, 4, 3), (128, 64, 4, 4),
                  (128, 32, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 128, 4, 3),
                  (128, 128, 4, 2)],
    ("fwd", 128): [(64, 64, 8, 3), (64, 64, 4, 3), (128, 64, 8, 2), (128, 64, 8, 3),
                   (128, 64, 8, 4), (128, 128, 8, 2), (128, 128, 8, 3), (128, 32, 8, 3),
                   (128, 64, 4, 3)],
    ("bwd", 64): [(64, 32, 4, 3), (64, 64, 4, 3), (32, 64, 4, 3), (64, 32, 4, 2),
                  (128, 32, 4, 3), (32, 128, 4, 3), (64, 64, 8, 3), (128, 64, 8, 2),
                  (64, 128, 8, 2)],
    ("bwd", 128): [(64, 32, 8, 3), (64, 64, 8, 2), (64, 64, 8, 3), (32, 64, 4, 3),
                   (64, 32, 4, 3), (128, 32, 8, 2), (32, 128, 8, 2), (128, 64, 8, 2),
                   (64, 128, 8, 2)],
}  # fmt: skip
if ARGS.smoke:  # the interpreter wants small tiles; d = 16 and 32 here
    ARGS.head_dims, ARGS.seqlens, ARGS.tokens, ARGS.hidden = [16, 32], [32, 64], 64, 64
    ARGS.repeats, ARGS.finalists = 1, 1
    small = [(16, 16, 4, 3), (32, 16, 4, 2), (16, 32, 4, 3)]
    CANDIDATES = {(p, d): small for p in ("fwd", "bwd") for d in ARGS.head_dims}


def patched_tiles(cand, backward: bool):
    """A stand-in for flash._tiles: ``cand`` for one pass, the default for the other;
    a block layout still caps the tiles at its block_size, as in _tiles."""

    def tiles(d_qk, d_v, block_size, bwd):
        if bwd != backward:
            return DEFAULT_TILES(d_qk, d_v, block_size, bwd)
        bm, bn, warps, stages = cand
        if block_size is not None:
            bm, bn = min(bm, block_size), min(bn, block_size)
        return bm, bn, warps, stages

    return tiles


@contextlib.contextmanager
def swapped(**attrs):
    """Sets attributes of the flash module for the duration (a monkeypatch)."""
    old = {name: getattr(flash, name) for name in attrs}
    for name, value in attrs.items():
        setattr(flash, name, value)
    try:
        yield
    finally:
        for name, value in old.items():
            setattr(flash, name, value)


class _Skip:
    """A kernel that does not run: ``kernel[grid](...)`` is a no-op."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


class Problem:
    """q, k, v, dout (batch, seqlen, heads, d) and SDPA's out and grads in that layout."""

    def __init__(self, d: int, s: int):
        b, h = max(1, ARGS.tokens // s), max(1, ARGS.hidden // d)
        g = torch.Generator(device="cpu").manual_seed(0)
        self.q, self.k, self.v, self.do = (
            torch.randn(b, s, h, d, generator=g).to(DEVICE, DTYPE) for _ in range(4)
        )
        self.scale = d**-0.5
        self.pb = flash._Problem(self.q, self.k, self.v, make_mask_spec(self.q, self.k, self.v))
        with torch.no_grad():
            self.o, self.lse = flash._forward(self.q, self.k, self.v, self.pb, self.scale)
        self.leaves = [t.detach().clone().requires_grad_(True) for t in (self.q, self.k, self.v)]
        self.graph = self.sdpa(*self.leaves)  # kept: sdpa_bwd reruns its backward
        self.sdpa_out, self.sdpa_grads = self.graph.detach(), self.sdpa_bwd()

    @staticmethod
    def sdpa(q, k, v):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        t = (x.transpose(1, 2) for x in (q, k, v))  # SDPA wants (batch, heads, seqlen, d)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION if DEVICE == "cuda" else SDPBackend.MATH):
            return F.scaled_dot_product_attention(*t, is_causal=True).transpose(1, 2)

    def sdpa_bwd(self):
        return torch.autograd.grad(self.graph, self.leaves, self.do, retain_graph=True)

    def ours(self, which):
        if which == "fwd":
            return lambda: flash._forward(self.q, self.k, self.v, self.pb, self.scale)[0]
        args = (self.do, self.q, self.k, self.v, self.o, self.lse, self.pb, self.scale)
        return lambda: flash._backward(*args)

    def sdpa_ms(self, which):
        if which == "fwd":
            with torch.no_grad():
                return median_ms(lambda: self.sdpa(self.q, self.k, self.v), ARGS.repeats)
        return median_ms(self.sdpa_bwd, ARGS.repeats)

    def error(self, which, got) -> float:
        """Max abs error over out (or dq, dk, dv) as a fraction of the reference's max."""
        want = [self.sdpa_out] if which == "fwd" else self.sdpa_grads
        got = [got] if which == "fwd" else got
        return max(
            ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item()
            for a, b in zip(got, want)
        )


def measure(which, cand, prob: Problem, split: bool) -> dict:
    """Checks and times one candidate; with ``split``, the backward kernels alone too."""
    row = {"cand": cand}
    with swapped(_tiles=patched_tiles(cand, which == "bwd")):
        try:
            got = prob.ours(which)()  # compiles; a shared-memory overflow raises here
            row["err"] = prob.error(which, got)
        except Exception as exc:  # report, do not hide, a config that cannot run
            row["fail"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:90]}"
            return row
        if row["err"] > TOL[which]:
            row["fail"] = f"wrong: error {row['err']:.3g} > {TOL[which]}"
            return row
        row["ms"] = median_ms(prob.ours(which), ARGS.repeats)
        if split:
            fn = prob.ours("bwd")
            with swapped(flash_bwd_dkdv_kernel=_Skip(), flash_bwd_dq_kernel=_Skip()):
                prep = median_ms(fn, ARGS.repeats)
            with swapped(flash_bwd_dq_kernel=_Skip()):
                row["dkdv"] = median_ms(fn, ARGS.repeats) - prep
            with swapped(flash_bwd_dkdv_kernel=_Skip()):
                row["dq"] = median_ms(fn, ARGS.repeats) - prep
    return row


def name(cand, default) -> str:
    bm, bn, w, st = cand
    return f"{bm}x{bn} w{w} s{st}" + (" (default)" if cand == default else "")


def sweep(which: str, d: int):
    default = DEFAULT_TILES(d, d, None, which == "bwd")
    cands = list(dict.fromkeys([default, *CANDIDATES[(which, d)]]))
    s0, rest = ARGS.seqlens[0], ARGS.seqlens[1:]
    prob = Problem(d, s0)
    sdpa = {s0: prob.sdpa_ms(which)}
    rows = [measure(which, c, prob, which == "bwd") for c in cands]
    for r in rows:
        r[s0] = r.get("ms")
    ok = sorted((r for r in rows if "ms" in r), key=lambda r: r["ms"])
    finalists = [r for r in ok if r in ok[: ARGS.finalists] or r["cand"] == default]
    del prob
    for s in rest:
        prob = Problem(d, s)
        sdpa[s] = prob.sdpa_ms(which)
        for r in finalists:
            again = measure(which, r["cand"], prob, False)
            r[s], r["fail"] = again.get("ms"), again.get("fail")
            r["err"] = max(r["err"], again.get("err", 0.0))
        del prob
    report(which, d, default, rows, ok, finalists, sdpa)


def report(which, d, default, rows, ok, finalists, sdpa):
    seqs = ARGS.seqlens
    head = ["config"] + [f"s={s} ms, SDPA/ours" for s in seqs]
    head += ["dk/dv ms", "dq ms"] if which == "bwd" else []
    lines = []
    for r in ok + [r for r in rows if "ms" not in r]:
        cells = [name(r["cand"], default)]
        cells += [f"{r[s]:.3f}, {sdpa[s] / r[s]:.2f}x" if r.get(s) else "-" for s in seqs]
        if which == "bwd":
            cells += [f"{r['dkdv']:.3f}", f"{r['dq']:.3f}"] if "ms" in r else ["-", "-"]
        err = f"max err {r['err']:.2g}" if "err" in r else ""
        lines.append([*cells, r.get("fail") or err])
    sdpa_txt = ", ".join(f"s={s} {t:.3f} ms" for s, t in sdpa.items())
    title = "forward" if which == "fwd" else "backward (dk/dv + dq kernels)"
    print(f"\n### {title}, head_dim {d}, heads {max(1, ARGS.hidden // d)}; SDPA {sdpa_txt}\n")
    print(table([*head, "check (err / ref max)"], lines), flush=True)
    full = [r for r in finalists if all(r.get(s) for s in seqs) and not r.get("fail")]
    if not full:
        BEST.append(f"best {which} d={d}: none ran correctly")
        return
    best = min(full, key=lambda r: statistics.mean(r[s] / sdpa[s] for s in seqs))
    speed = ", ".join(f"{sdpa[s] / best[s]:.2f}x SDPA at {s}" for s in seqs)
    line = f"best {which} d={d}: {best['cand']} ({speed}; default {default})"
    if which == "bwd":
        dkdv = min(ok, key=lambda r: r["dkdv"])["cand"]
        dq = min(ok, key=lambda r: r["dq"])["cand"]
        line += f"; alone at s={seqs[0]}, dk/dv kernel {dkdv}, dq kernel {dq}"
    BEST.append(line)


BEST: list[str] = []


def main():
    if not ARGS.smoke and not torch.cuda.is_available():
        raise SystemExit("tune_tiles.py needs a CUDA device (or --smoke for a CPU dry run)")
    print(f"Machine: {machine()}; {DTYPE}; dense causal; median of {ARGS.repeats}")
    print("config: BLOCK_MxBLOCK_N, num_warps, num_stages; tuples below in that order.")
    for which in ARGS.passes:
        for d in ARGS.head_dims:
            sweep(which, d)
    print()
    print("\n".join(BEST))


if __name__ == "__main__":
    main()
