"""Flash-attention forward kernel (Triton): online softmax over only the visible key tiles.

One program computes ``BLOCK_M`` query rows of one (sequence, head). It visits the key
tiles that the causal / window bounds allow (computed from the tile's first and last
query position), or, with a block-sparse layout, only the key blocks listed for its
query block. Masked tiles are never loaded. Layout: q (batch, seqlen, heads, d),
row-major with unit stride on head_dim; lse (batch, heads, seqlen) float32.
"""

import triton
import triton.language as tl


@triton.jit
def _dot(a, b, DOT_F32: tl.constexpr, PREC: tl.constexpr):
    # The CPU interpreter computes bf16 dots wrongly; DOT_F32 upcasts there only.
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _fwd_tile(
    acc,
    l_i,
    m_i,
    q,
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
    kt = tl.load(
        k_base + offs_n[None, :].to(tl.int64) * stride_ks + offs_dqk[:, None],
        mask=(offs_n[None, :] < len_k) & (offs_dqk[:, None] < d_qk),
        other=0.0,
    )
    v = tl.load(
        v_base + offs_n[:, None].to(tl.int64) * stride_vs + offs_dv[None, :],
        mask=(offs_n[:, None] < len_k) & (offs_dv[None, :] < d_v),
        other=0.0,
    )
    s = _dot(q, kt, DOT_F32, PREC) * scale_log2
    valid = offs_n[None, :] < len_k
    if HAS_LEFT:
        valid = valid & (offs_n[None, :] >= pos[:, None] - window_left)
    if HAS_RIGHT:
        valid = valid & (offs_n[None, :] <= pos[:, None] + window_right)
    s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row with nothing visible yet keeps m = -inf; shift by 0 there to avoid inf - inf.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_F32, PREC)
    return acc, l_i, m_new


@triton.jit
def flash_fwd_kernel(
    Q,
    K,
    V,
    Out,
    LSE,
    CU_Q,
    CU_K,
    KV_IDX,
    KV_CNT,
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
    stride_ob,
    stride_os,
    stride_oh,
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
        q_base = Q + b64 * stride_qb + h * stride_qh + q_start * stride_qs
        k_base = K + b64 * stride_kb + h_kv * stride_kh + k_start * stride_ks
        v_base = V + b64 * stride_vb + h_kv * stride_vh + k_start * stride_vs
        q = tl.load(
            q_base + offs_m[:, None].to(tl.int64) * stride_qs + offs_dqk[None, :],
            mask=(offs_m[:, None] < len_q) & (offs_dqk[None, :] < d_qk),
            other=0.0,
        )
        pos = offs_m + (len_k - len_q)
        first = m0 + len_k - len_q
        last = tl.minimum(m0 + BLOCK_M, len_q) - 1 + len_k - len_q
        k_lo = 0
        k_hi = len_k
        if HAS_LEFT:
            k_lo = tl.maximum(first - window_left, 0)
        if HAS_RIGHT:
            k_hi = tl.minimum(last + window_right + 1, len_k)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        if HAS_BLOCKS:
            qb = m0 // MASK_BLOCK
            cnt = tl.load(KV_CNT + b64 * stride_cb + h * stride_ch + qb)
            idx_base = KV_IDX + b64 * stride_ib + h * stride_ih + qb * stride_iq
            for t in range(0, cnt):
                kb = tl.load(idx_base + t)
                for sub in range(0, MASK_BLOCK // BLOCK_N):
                    start_n = kb * MASK_BLOCK + sub * BLOCK_N
                    if (start_n < k_hi) & (start_n + BLOCK_N > k_lo):
                        acc, l_i, m_i = _fwd_tile(
                            acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs,
                            start_n, pos, len_k, d_qk, d_v, window_left, window_right,
                            scale_log2, HAS_LEFT, HAS_RIGHT, BLOCK_N, BLOCK_DQK, BLOCK_DV,
                            DOT_F32, PREC,
                        )  # fmt: skip
        else:
            for start_n in range((k_lo // BLOCK_N) * BLOCK_N, k_hi, BLOCK_N):
                acc, l_i, m_i = _fwd_tile(
                    acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs,
                    start_n, pos, len_k, d_qk, d_v, window_left, window_right,
                    scale_log2, HAS_LEFT, HAS_RIGHT, BLOCK_N, BLOCK_DQK, BLOCK_DV,
                    DOT_F32, PREC,
                )  # fmt: skip
        empty = l_i == 0.0
        l_safe = tl.where(empty, 1.0, l_i)
        out = acc / l_safe[:, None]
        lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
        o_base = Out + b64 * stride_ob + h * stride_oh + q_start * stride_os
        tl.store(
            o_base + offs_m[:, None].to(tl.int64) * stride_os + offs_dv[None, :],
            out.to(Out.dtype.element_ty),
            mask=(offs_m[:, None] < len_q) & (offs_dv[None, :] < d_v),
        )
        lse_base = LSE + b64 * stride_lb + h * stride_lh + q_start
        tl.store(lse_base + offs_m, lse, mask=offs_m < len_q)
