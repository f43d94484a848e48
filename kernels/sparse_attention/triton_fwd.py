"""Triton forward kernel (FlashAttention-2: online softmax, lse kept for backward).

One program owns BLOCK_M queries of one document, one query head. It visits
only key ranges that can hold visible keys, so cost follows S x (window or
selected blocks) rather than S^2:
  full     [0, hi)                       hi = last query + 1 (causal) or doc end
  window   [m0 - W + 1, hi)
  sinks    [0, sink) below that range
  MoBA     block by block: a block is visited when some query in the tile
           owns or selected it (or the window/sinks need it); inside a
           block every key shares one block index, so the MoBA test is a
           per-query vector, not a per-element comparison.
The same iteration (`q_tile_loop`) drives the dq kernel in triton_bwd.py.
Positions inside kernels are relative to the document start; pointers get an
int64 document base. Scores are kept in log2 units (exp2, lse in log2).

Legend: M = BLOCK_M query rows, N = BLOCK_N key columns, DP = head dim padded
to a power of two, KP = selected-block slots (moba_topk - 1, padded).
"""
import triton
import triton.language as tl


@triton.jit
def _dot(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:  # the CPU interpreter multiplies bf16 bit patterns as integers
        r = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        r = tl.dot(a, b, input_precision=PREC)
    return r


@triton.jit
def visible(i, j, L, window, sink, own, hit,
            CAUSAL: tl.constexpr, FULL: tl.constexpr, WINDOW: tl.constexpr,
            HAS_SINK: tl.constexpr, MOBA: tl.constexpr):
    """DESIGN's rule for query i / key j (broadcastable doc-relative positions).

    own/hit: does the query own / did it select the key's block (MoBA only).
    """
    ok = (i < L) & (j < L)
    if CAUSAL:
        ok = ok & (j <= i)
    if not FULL:
        vis = j < 0
        if WINDOW:
            vis = vis | (j > i - window)
        if HAS_SINK:
            vis = vis | (j < sink)
        if MOBA:
            vis = vis | own | hit
        ok = ok & vis
    return ok


@triton.jit
def tile_is_dense(n0, klo, khi, m0, window, sink, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  CAUSAL: tl.constexpr, FULL: tl.constexpr, WINDOW: tl.constexpr,
                  HAS_SINK: tl.constexpr, MOBA: tl.constexpr):
    """True when every (query row, key) pair of the tile is visible: skip the mask."""
    dense = (n0 >= klo) & (n0 + BLOCK_N <= khi)
    if CAUSAL:
        dense = dense & (n0 + BLOCK_N - 1 <= m0)
    if MOBA:
        dense = dense & (n0 < 0)
    elif not FULL:
        ok = n0 < 0
        if WINDOW:
            ok = ok | (n0 > m0 + BLOCK_M - 1 - window)
        if HAS_SINK:
            ok = ok | (n0 + BLOCK_N <= sink)
        dense = dense & ok
    return dense


@triton.jit
def _load_kv_tile(kbase, vbase, sks, svs, n0, klo, khi, offs_d, dmask, BLOCK_N: tl.constexpr):
    """Keys/values n0..n0+N of one document (zeros outside [klo, khi)): offs_n, kin, k, v [N, DP]."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    kin = (offs_n >= klo) & (offs_n < khi)
    k = tl.load(kbase + offs_n[:, None] * sks + offs_d[None, :],
                mask=kin[:, None] & dmask[None, :], other=0.0)
    v = tl.load(vbase + offs_n[:, None] * svs + offs_d[None, :],
                mask=kin[:, None] & dmask[None, :], other=0.0)
    return offs_n, kin, k, v


@triton.jit
def _fwd_tile(acc, m_i, l_i, q, kbase, vbase, sks, svs, n0, klo, khi, offs_m, m0, L, offs_d,
              dmask, qk_scale, window, sink, own, hit,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
              FULL: tl.constexpr, WINDOW: tl.constexpr, HAS_SINK: tl.constexpr,
              MOBA: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    offs_n, kin, k, v = _load_kv_tile(kbase, vbase, sks, svs, n0, klo, khi, offs_d, dmask, BLOCK_N)
    qk = _dot(q, tl.trans(k), PREC, UPCAST) * qk_scale  # [M, N], log2 units
    if not tile_is_dense(n0, klo, khi, m0, window, sink, BLOCK_M, BLOCK_N,
                         CAUSAL, FULL, WINDOW, HAS_SINK, MOBA):
        ok = kin[None, :] & visible(offs_m[:, None], offs_n[None, :], L, window, sink, own, hit,
                                    CAUSAL, FULL, WINDOW, HAS_SINK, MOBA)
        qk = tl.where(ok, qk, float("-inf"))
    # m_i starts at -1e30 (finite), so fully masked rows give p = 0, alpha = 1
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    p = tl.math.exp2(qk - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PREC, UPCAST)
    return acc, m_new, l_i


@triton.jit
def _dq_tile(dq, lse, delta, q, do, kbase, vbase, sks, svs, n0, klo, khi, offs_m, m0, L, offs_d,
             dmask, qk_scale, window, sink, own, hit,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
             FULL: tl.constexpr, WINDOW: tl.constexpr, HAS_SINK: tl.constexpr,
             MOBA: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    offs_n, kin, k, v = _load_kv_tile(kbase, vbase, sks, svs, n0, klo, khi, offs_d, dmask, BLOCK_N)
    qk = _dot(q, tl.trans(k), PREC, UPCAST) * qk_scale
    p = tl.math.exp2(qk - lse[:, None])  # [M, N] softmax probabilities
    if not tile_is_dense(n0, klo, khi, m0, window, sink, BLOCK_M, BLOCK_N,
                         CAUSAL, FULL, WINDOW, HAS_SINK, MOBA):
        ok = kin[None, :] & visible(offs_m[:, None], offs_n[None, :], L, window, sink, own, hit,
                                    CAUSAL, FULL, WINDOW, HAS_SINK, MOBA)
        p = tl.where(ok, p, 0.0)
    dp = _dot(do, tl.trans(v), PREC, UPCAST)
    ds = p * (dp - delta[:, None])
    dq += _dot(ds.to(k.dtype), k, PREC, UPCAST)
    return dq, lse, delta


@triton.jit
def _tile(acc, r0, r1, q, do, kbase, vbase, sks, svs, n0, klo, khi, offs_m, m0, L, offs_d, dmask,
          qk_scale, window, sink, own, hit, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
          CAUSAL: tl.constexpr, FULL: tl.constexpr, WINDOW: tl.constexpr,
          HAS_SINK: tl.constexpr, MOBA: tl.constexpr, IS_DQ: tl.constexpr,
          PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Forward (acc, m_i, l_i) or dq (dq, lse, delta) update for keys [n0, n0 + N)."""
    if IS_DQ:
        acc, r0, r1 = _dq_tile(acc, r0, r1, q, do, kbase, vbase, sks, svs, n0, klo, khi, offs_m,
                               m0, L, offs_d, dmask, qk_scale, window, sink, own, hit, BLOCK_M,
                               BLOCK_N, CAUSAL, FULL, WINDOW, HAS_SINK, MOBA, PREC, UPCAST)
    else:
        acc, r0, r1 = _fwd_tile(acc, r0, r1, q, kbase, vbase, sks, svs, n0, klo, khi, offs_m,
                                m0, L, offs_d, dmask, qk_scale, window, sink, own, hit, BLOCK_M,
                                BLOCK_N, CAUSAL, FULL, WINDOW, HAS_SINK, MOBA, PREC, UPCAST)
    return acc, r0, r1


@triton.jit
def q_tile_loop(acc, r0, r1, q, do, kbase, vbase, sks, svs, offs_m, m0, L, offs_d, dmask, sel,
                qk_scale, window, sink, bs, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                CAUSAL: tl.constexpr, FULL: tl.constexpr, WINDOW: tl.constexpr,
                HAS_SINK: tl.constexpr, MOBA: tl.constexpr, IS_DQ: tl.constexpr,
                PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Visit every key range the query tile [m0, m0 + M) may see (see module doc)."""
    m1 = tl.minimum(m0 + BLOCK_M, L)
    hi = L
    if CAUSAL:
        hi = m1
    if MOBA:
        qblk = offs_m // bs
        for b in range(0, tl.cdiv(hi, bs)):
            blo = b * bs
            bhi = tl.minimum(blo + bs, hi)
            own = (qblk == b) & (offs_m < L)  # [M]
            hit = tl.sum((sel == b).to(tl.int32), 1) > 0  # [M]; sel [M, KP]
            need = tl.max((own | hit).to(tl.int32), 0) > 0
            if WINDOW:
                need = need | (bhi > m0 - window + 1)
            if HAS_SINK:
                need = need | (blo < sink)
            if need:
                for n0 in range(blo, bhi, BLOCK_N):
                    acc, r0, r1 = _tile(acc, r0, r1, q, do, kbase, vbase, sks, svs, n0, blo, bhi,
                                        offs_m, m0, L, offs_d, dmask, qk_scale, window, sink,
                                        own[:, None], hit[:, None], BLOCK_M, BLOCK_N, CAUSAL,
                                        FULL, WINDOW, HAS_SINK, MOBA, IS_DQ, PREC, UPCAST)
    else:
        lo = 0
        if not FULL:
            lo = hi
            if WINDOW:
                lo = tl.maximum(m0 - window + 1, 0)
            if HAS_SINK:
                sink_hi = tl.minimum(sink, lo)
                for n0 in range(0, sink_hi, BLOCK_N):
                    acc, r0, r1 = _tile(acc, r0, r1, q, do, kbase, vbase, sks, svs, n0, 0, sink_hi,
                                        offs_m, m0, L, offs_d, dmask, qk_scale, window, sink,
                                        offs_m, offs_m, BLOCK_M, BLOCK_N, CAUSAL, FULL, WINDOW,
                                        HAS_SINK, MOBA, IS_DQ, PREC, UPCAST)
        for n0 in range(lo, hi, BLOCK_N):
            acc, r0, r1 = _tile(acc, r0, r1, q, do, kbase, vbase, sks, svs, n0, lo, hi, offs_m,
                                m0, L, offs_d, dmask, qk_scale, window, sink, offs_m, offs_m,
                                BLOCK_M, BLOCK_N, CAUSAL, FULL, WINDOW, HAS_SINK, MOBA, IS_DQ,
                                PREC, UPCAST)
    return acc, r0, r1


@triton.jit
def program_coords(CU, n_docs, n_heads):
    """(batch, head, doc start, doc length) of this program; axis 1 = (b, h, doc)."""
    pid = tl.program_id(1)
    doc = pid % n_docs
    h = (pid // n_docs) % n_heads
    b = pid // (n_docs * n_heads)
    start = tl.load(CU + doc)
    return b, h, start, tl.load(CU + doc + 1) - start


@triton.jit
def sparse_attn_fwd(Q, K, V, O, LSE, SEL, CU,
                    sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sob, soh, sos,
                    S, n_docs, Hq, GROUP, qk_scale, window, sink, bs, len_bucket,
                    HEAD_DIM: tl.constexpr, DP: tl.constexpr, KP: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    CAUSAL: tl.constexpr, FULL: tl.constexpr, WINDOW: tl.constexpr,
                    HAS_SINK: tl.constexpr, MOBA: tl.constexpr,
                    PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Grid (cdiv(max doc len, M), B * Hq * n_docs). LSE/SEL are contiguous [B, Hq, S(, KP)]."""
    b, h, start, L = program_coords(CU, n_docs, Hq)
    m0 = tl.program_id(0) * BLOCK_M
    if m0 < L:
        b64, h64, st64 = b.to(tl.int64), h.to(tl.int64), start.to(tl.int64)
        kh64 = (h // GROUP).to(tl.int64)  # GQA: the kv head this query head reads
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, DP)
        dmask = offs_d < HEAD_DIM
        qmask = (offs_m < L)[:, None] & dmask[None, :]
        qoff = b64 * sqb + h64 * sqh + st64 * sqs + offs_m[:, None] * sqs + offs_d[None, :]
        q = tl.load(Q + qoff, mask=qmask, other=0.0)
        row = (b64 * Hq + h64) * S + st64  # flat index of the doc's first row in LSE / SEL
        sel = offs_m[:, None] < 0
        if MOBA:
            offs_k = tl.arange(0, KP)
            sel = tl.load(SEL + (row + offs_m[:, None]) * KP + offs_k[None, :],
                          mask=(offs_m < L)[:, None], other=-1)
        acc = tl.zeros([BLOCK_M, DP], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        kbase = K + b64 * skb + kh64 * skh + st64 * sks
        vbase = V + b64 * svb + kh64 * svh + st64 * svs
        acc, m_i, l_i = q_tile_loop(acc, m_i, l_i, q, q, kbase, vbase, sks, svs, offs_m, m0, L,
                                    offs_d, dmask, sel, qk_scale, window, sink, bs, BLOCK_M,
                                    BLOCK_N, CAUSAL, FULL, WINDOW, HAS_SINK, MOBA, False,
                                    PREC, UPCAST)
        seen = l_i > 0.0  # rows with no visible key: out = 0, lse = +inf (p = 0 in backward)
        out = acc / tl.where(seen, l_i, 1.0)[:, None]
        lse = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("inf"))
        tl.store(O + b64 * sob + h64 * soh + st64 * sos + offs_m[:, None] * sos + offs_d[None, :],
                 out.to(O.dtype.element_ty), mask=qmask)
        tl.store(LSE + row + offs_m, lse, mask=offs_m < L)
