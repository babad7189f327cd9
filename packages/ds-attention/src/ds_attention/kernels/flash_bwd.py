"""Flash-attention backward kernels (Triton), FA2 style, without atomics.

``flash_bwd_dkdv_kernel``: one program per (key tile, sequence, kv head) accumulates dk
and dv over every query head of its group and over the query tiles that can see the
key tile (the causal / window bounds, or the transposed block-sparse layout).
``flash_bwd_dq_kernel``: one program per (query tile, sequence, head) accumulates dq
over the same key tiles the forward visited. Both recompute P = exp(S - lse) from the
forward's log-sum-exp; ``LSE2`` is lse * log2(e) with +inf on rows that saw no key, so
their P is exactly 0. ``DELTA`` is rowsum(dO * O) in float32, (batch, heads, seqlen_q).
"""

import triton
import triton.language as tl

from ds_attention.kernels.flash_fwd import _dot


@triton.jit
def _dkdv_tile(
    dk,
    dv,
    k,
    v,
    q_base,
    do_base,
    lse_base,
    delta_base,
    stride_qs,
    stride_dos,
    start_m,
    offs_n,
    len_q,
    len_k,
    d_qk,
    d_v,
    window_left,
    window_right,
    scale_log2,
    HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_DQK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    DOT_F32: tl.constexpr,
    PREC: tl.constexpr,
):
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < len_q
    q = tl.load(
        q_base + offs_m[:, None].to(tl.int64) * stride_qs + offs_dqk[None, :],
        mask=row_ok[:, None] & (offs_dqk[None, :] < d_qk),
        other=0.0,
    )
    do = tl.load(
        do_base + offs_m[:, None].to(tl.int64) * stride_dos + offs_dv[None, :],
        mask=row_ok[:, None] & (offs_dv[None, :] < d_v),
        other=0.0,
    )
    lse2 = tl.load(lse_base + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
    pos = offs_m + (len_k - len_q)
    st = _dot(k, tl.trans(q), DOT_F32, PREC) * scale_log2  # (BLOCK_N, BLOCK_M)
    valid = (offs_n[:, None] < len_k) & row_ok[None, :]
    if HAS_LEFT:
        valid = valid & (offs_n[:, None] >= pos[None, :] - window_left)
    if HAS_RIGHT:
        valid = valid & (offs_n[:, None] <= pos[None, :] + window_right)
    pt = tl.where(valid, tl.exp2(st - lse2[None, :]), 0.0)
    dv += _dot(pt.to(do.dtype), do, DOT_F32, PREC)
    dpt = _dot(v, tl.trans(do), DOT_F32, PREC)
    dst = pt * (dpt - delta[None, :])
    dk += _dot(dst.to(q.dtype), q, DOT_F32, PREC)
    return dk, dv


@triton.jit
def flash_bwd_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    LSE2,
    DELTA,
    DK,
    DV,
    CU_Q,
    CU_K,
    Q_IDX,
    Q_CNT,
    scale,
    scale_log2,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_dob,
    stride_dos,
    stride_doh,
    stride_lb,
    stride_lh,
    stride_ib,
    stride_ih,
    stride_ik,
    stride_cb,
    stride_ch,
    seqlen_q,
    seqlen_k,
    kv_heads,
    groups,
    d_qk,
    d_v,
    window_left,
    window_right,
    IS_VARLEN: tl.constexpr,
    HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
    HAS_BLOCKS: tl.constexpr,
    MASK_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_DQK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    DOT_F32: tl.constexpr,
    PREC: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // kv_heads
    h_kv = pid_bh % kv_heads
    if IS_VARLEN:
        q_start = tl.load(CU_Q + b)
        len_q = tl.load(CU_Q + b + 1) - q_start
        k_start = tl.load(CU_K + b)
        len_k = tl.load(CU_K + b + 1) - k_start
    else:
        q_start = 0
        len_q = seqlen_q
        k_start = 0
        len_k = seqlen_k
    n0 = pid_n * BLOCK_N
    if n0 < len_k:
        b64 = b.to(tl.int64)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        offs_dqk = tl.arange(0, BLOCK_DQK)
        offs_dv = tl.arange(0, BLOCK_DV)
        col_ok = offs_n < len_k
        k_base = K + b64 * stride_kb + h_kv * stride_kh + k_start * stride_ks
        v_base = V + b64 * stride_vb + h_kv * stride_vh + k_start * stride_vs
        k = tl.load(
            k_base + offs_n[:, None].to(tl.int64) * stride_ks + offs_dqk[None, :],
            mask=col_ok[:, None] & (offs_dqk[None, :] < d_qk),
            other=0.0,
        )
        v = tl.load(
            v_base + offs_n[:, None].to(tl.int64) * stride_vs + offs_dv[None, :],
            mask=col_ok[:, None] & (offs_dv[None, :] < d_v),
            other=0.0,
        )
        # Query rows i whose position p = i + len_k - len_q can see a key of this tile.
        n_last = tl.minimum(n0 + BLOCK_N, len_k) - 1
        q_lo = 0
        q_hi = len_q
        if HAS_RIGHT:
            q_lo = tl.maximum(n0 - window_right - (len_k - len_q), 0)
        if HAS_LEFT:
            q_hi = tl.minimum(n_last + window_left - (len_k - len_q) + 1, len_q)
        dk = tl.zeros([BLOCK_N, BLOCK_DQK], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
        for g in range(0, groups):
            h = h_kv * groups + g
            q_base = Q + b64 * stride_qb + h * stride_qh + q_start * stride_qs
            do_base = DO + b64 * stride_dob + h * stride_doh + q_start * stride_dos
            lse_base = LSE2 + b64 * stride_lb + h * stride_lh + q_start
            delta_base = DELTA + b64 * stride_lb + h * stride_lh + q_start
            if HAS_BLOCKS:
                kb = n0 // MASK_BLOCK
                cnt = tl.load(Q_CNT + b64 * stride_cb + h * stride_ch + kb)
                idx_base = Q_IDX + b64 * stride_ib + h * stride_ih + kb * stride_ik
                for t in range(0, cnt):
                    qblk = tl.load(idx_base + t)
                    for sub in range(0, MASK_BLOCK // BLOCK_M):
                        start_m = qblk * MASK_BLOCK + sub * BLOCK_M
                        if (start_m < q_hi) & (start_m + BLOCK_M > q_lo):
                            dk, dv = _dkdv_tile(
                                dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                                stride_qs, stride_dos, start_m, offs_n, len_q, len_k,
                                d_qk, d_v, window_left, window_right, scale_log2,
                                HAS_LEFT, HAS_RIGHT, BLOCK_M, BLOCK_DQK, BLOCK_DV,
                                DOT_F32, PREC,
                            )  # fmt: skip
            else:
                for start_m in range((q_lo // BLOCK_M) * BLOCK_M, q_hi, BLOCK_M):
                    dk, dv = _dkdv_tile(
                        dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                        stride_qs, stride_dos, start_m, offs_n, len_q, len_k,
                        d_qk, d_v, window_left, window_right, scale_log2,
                        HAS_LEFT, HAS_RIGHT, BLOCK_M, BLOCK_DQK, BLOCK_DV,
                        DOT_F32, PREC,
                    )  # fmt: skip
        dk_base = DK + b64 * stride_kb + h_kv * stride_kh + k_start * stride_ks
        dv_base = DV + b64 * stride_vb + h_kv * stride_vh + k_start * stride_vs
        tl.store(
            dk_base + offs_n[:, None].to(tl.int64) * stride_ks + offs_dqk[None, :],
            (dk * scale).to(DK.dtype.element_ty),
            mask=col_ok[:, None] & (offs_dqk[None, :] < d_qk),
        )
        tl.store(
            dv_base + offs_n[:, None].to(tl.int64) * stride_vs + offs_dv[None, :],
            dv.to(DV.dtype.element_ty),
            mask=col_ok[:, None] & (offs_dv[None, :] < d_v),
        )


@triton.jit
def _dq_tile(
    dq,
    q,
    do,
    lse2,
    delta,
    k_base,
    v_base,
    stride_ks,
    stride_vs,
    start_n,
    pos,
    len_k,
    d_qk,
    d_v,
    window_left,
    window_right,
    scale_log2,
    HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_DQK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    DOT_F32: tl.constexpr,
    PREC: tl.constexpr,
):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = tl.load(
        k_base + offs_n[:, None].to(tl.int64) * stride_ks + offs_dqk[None, :],
        mask=(offs_n[:, None] < len_k) & (offs_dqk[None, :] < d_qk),
        other=0.0,
    )
    vt = tl.load(
        v_base + offs_n[None, :].to(tl.int64) * stride_vs + offs_dv[:, None],
        mask=(offs_n[None, :] < len_k) & (offs_dv[:, None] < d_v),
        other=0.0,
    )
    s = _dot(q, tl.trans(k), DOT_F32, PREC) * scale_log2
    valid = offs_n[None, :] < len_k
    if HAS_LEFT:
        valid = valid & (offs_n[None, :] >= pos[:, None] - window_left)
    if HAS_RIGHT:
        valid = valid & (offs_n[None, :] <= pos[:, None] + window_right)
    p = tl.where(valid, tl.exp2(s - lse2[:, None]), 0.0)
    dp = _dot(do, vt, DOT_F32, PREC)
    ds = p * (dp - delta[:, None])
    dq += _dot(ds.to(k.dtype), k, DOT_F32, PREC)
    return dq


@triton.jit
def flash_bwd_dq_kernel(
    Q,
    K,
    V,
    DO,
    LSE2,
    DELTA,
    DQ,
    CU_Q,
    CU_K,
    KV_IDX,
    KV_CNT,
    scale,
    scale_log2,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_dob,
    stride_dos,
    stride_doh,
    stride_lb,
    stride_lh,
    stride_ib,
    stride_ih,
    stride_iq,
    stride_cb,
    stride_ch,
    seqlen_q,
    seqlen_k,
    heads,
    groups,
    d_qk,
    d_v,
    window_left,
    window_right,
    IS_VARLEN: tl.constexpr,
    HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
    HAS_BLOCKS: tl.constexpr,
    MASK_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_DQK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    DOT_F32: tl.constexpr,
    PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // heads
    h = pid_bh % heads
    h_kv = h // groups
    if IS_VARLEN:
        q_start = tl.load(CU_Q + b)
        len_q = tl.load(CU_Q + b + 1) - q_start
        k_start = tl.load(CU_K + b)
        len_k = tl.load(CU_K + b + 1) - k_start
    else:
        q_start = 0
        len_q = seqlen_q
        k_start = 0
        len_k = seqlen_k
    m0 = pid_m * BLOCK_M
    if m0 < len_q:
        b64 = b.to(tl.int64)
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_dqk = tl.arange(0, BLOCK_DQK)
        offs_dv = tl.arange(0, BLOCK_DV)
        row_ok = offs_m < len_q
        q_base = Q + b64 * stride_qb + h * stride_qh + q_start * stride_qs
        do_base = DO + b64 * stride_dob + h * stride_doh + q_start * stride_dos
        k_base = K + b64 * stride_kb + h_kv * stride_kh + k_start * stride_ks
        v_base = V + b64 * stride_vb + h_kv * stride_vh + k_start * stride_vs
        q = tl.load(
            q_base + offs_m[:, None].to(tl.int64) * stride_qs + offs_dqk[None, :],
            mask=row_ok[:, None] & (offs_dqk[None, :] < d_qk),
            other=0.0,
        )
        do = tl.load(
            do_base + offs_m[:, None].to(tl.int64) * stride_dos + offs_dv[None, :],
            mask=row_ok[:, None] & (offs_dv[None, :] < d_v),
            other=0.0,
        )
        lse2 = tl.load(LSE2 + b64 * stride_lb + h * stride_lh + q_start + offs_m, mask=row_ok,
                       other=float("inf"))  # fmt: skip
        delta = tl.load(DELTA + b64 * stride_lb + h * stride_lh + q_start + offs_m, mask=row_ok,
                        other=0.0)  # fmt: skip
        pos = offs_m + (len_k - len_q)
        first = m0 + len_k - len_q
        last = tl.minimum(m0 + BLOCK_M, len_q) - 1 + len_k - len_q
        k_lo = 0
        k_hi = len_k
        if HAS_LEFT:
            k_lo = tl.maximum(first - window_left, 0)
        if HAS_RIGHT:
            k_hi = tl.minimum(last + window_right + 1, len_k)
        dq = tl.zeros([BLOCK_M, BLOCK_DQK], dtype=tl.float32)
        if HAS_BLOCKS:
            qb = m0 // MASK_BLOCK
            cnt = tl.load(KV_CNT + b64 * stride_cb + h * stride_ch + qb)
            idx_base = KV_IDX + b64 * stride_ib + h * stride_ih + qb * stride_iq
            for t in range(0, cnt):
                kb = tl.load(idx_base + t)
                for sub in range(0, MASK_BLOCK // BLOCK_N):
                    start_n = kb * MASK_BLOCK + sub * BLOCK_N
                    if (start_n < k_hi) & (start_n + BLOCK_N > k_lo):
                        dq = _dq_tile(
                            dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs,
                            start_n, pos, len_k, d_qk, d_v, window_left, window_right,
                            scale_log2, HAS_LEFT, HAS_RIGHT, BLOCK_N, BLOCK_DQK, BLOCK_DV,
                            DOT_F32, PREC,
                        )  # fmt: skip
        else:
            for start_n in range((k_lo // BLOCK_N) * BLOCK_N, k_hi, BLOCK_N):
                dq = _dq_tile(
                    dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs,
                    start_n, pos, len_k, d_qk, d_v, window_left, window_right,
                    scale_log2, HAS_LEFT, HAS_RIGHT, BLOCK_N, BLOCK_DQK, BLOCK_DV,
                    DOT_F32, PREC,
                )  # fmt: skip
        dq_base = DQ + b64 * stride_qb + h * stride_qh + q_start * stride_qs
        tl.store(
            dq_base + offs_m[:, None].to(tl.int64) * stride_qs + offs_dqk[None, :],
            (dq * scale).to(DQ.dtype.element_ty),
            mask=row_ok[:, None] & (offs_dqk[None, :] < d_qk),
        )
