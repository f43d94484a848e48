"""Triton backward kernels (FlashAttention-2 split: dk/dv per key tile, dq per query tile).

dk/dv: one program owns BLOCK_N keys of one document and one kv head, loops
over the GROUP query heads that read that kv head (GQA without repeating K/V
and without atomics), and over the query tiles that can see its keys:
  full / sink keys  every later query (causal) or every query
  window            queries [n0, n_last + W)
  MoBA              key tiles never straddle a block (tile = block b, part t),
                    every query tile is tested for owning/selecting b
dq: the forward's key iteration (`q_tile_loop`) with IS_DQ=True.
Both read lse (log2 units, +inf for rows with no visible key) and
delta = rowsum(dO * O), computed beforehand in torch.

Legend: M = BLOCK_M query rows, N = BLOCK_N key rows, DP = padded head dim,
KP = selected-block slots.
"""
import triton
import triton.language as tl

from .triton_fwd import _dot, program_coords, q_tile_loop, tile_is_dense, visible


@triton.jit
def _dkdv_tile(dk, dv, k, v, qbase, dobase, lse_ptr, delta_ptr, sqs, sds, q0, n0, khi, offs_n,
               kin, L, offs_d, dmask, qk_scale, window, sink, own, hit,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
               FULL: tl.constexpr, WINDOW: tl.constexpr, HAS_SINK: tl.constexpr,
               MOBA: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    offs_m = q0 + tl.arange(0, BLOCK_M)
    qm = offs_m < L
    q = tl.load(qbase + offs_m[:, None] * sqs + offs_d[None, :],
                mask=qm[:, None] & dmask[None, :], other=0.0)  # [M, DP]
    do = tl.load(dobase + offs_m[:, None] * sds + offs_d[None, :],
                 mask=qm[:, None] & dmask[None, :], other=0.0)
    lse = tl.load(lse_ptr + offs_m, mask=qm, other=float("inf"))
    delta = tl.load(delta_ptr + offs_m, mask=qm, other=0.0)
    p_t = tl.math.exp2(_dot(k, tl.trans(q), PREC, UPCAST) * qk_scale - lse[None, :])  # [N, M]
    dense = tile_is_dense(n0, n0, khi, q0, window, sink, BLOCK_M, BLOCK_N,
                          CAUSAL, FULL, WINDOW, HAS_SINK, MOBA) & (q0 + BLOCK_M <= L)
    if not dense:
        ok = kin[:, None] & visible(offs_m[None, :], offs_n[:, None], L, window, sink, own, hit,
                                    CAUSAL, FULL, WINDOW, HAS_SINK, MOBA)
        p_t = tl.where(ok, p_t, 0.0)
    dv += _dot(p_t.to(do.dtype), do, PREC, UPCAST)
    ds_t = p_t * (_dot(v, tl.trans(do), PREC, UPCAST) - delta[None, :])
    dk += _dot(ds_t.to(q.dtype), q, PREC, UPCAST)
    return dk, dv


@triton.jit
def _dkdv_head(dk, dv, k, v, qbase, dobase, lse_ptr, delta_ptr, sel_ptr, sqs, sds, n0, khi, blk,
               offs_n, kin, L, offs_d, dmask, qk_scale, window, sink, bs,
               KP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               CAUSAL: tl.constexpr, FULL: tl.constexpr, WINDOW: tl.constexpr,
               HAS_SINK: tl.constexpr, MOBA: tl.constexpr, PREC: tl.constexpr,
               UPCAST: tl.constexpr):
    """Accumulate one query head's contribution to the key tile [n0, khi)."""
    q_lo = 0
    if CAUSAL:
        q_lo = n0
    n_last = tl.minimum(n0 + BLOCK_N, khi) - 1
    if MOBA:
        for q0 in range(q_lo, L, BLOCK_M):
            offs_m = q0 + tl.arange(0, BLOCK_M)
            sel = tl.load(sel_ptr + offs_m[:, None] * KP + tl.arange(0, KP)[None, :],
                          mask=(offs_m < L)[:, None], other=-1)  # [M, KP]
            own = (offs_m // bs == blk) & (offs_m < L)
            hit = tl.sum((sel == blk).to(tl.int32), 1) > 0
            need = tl.max((own | hit).to(tl.int32), 0) > 0
            if WINDOW:
                need = need | (q0 < n_last + window)
            if HAS_SINK:
                need = need | (n0 < sink)
            if need:
                dk, dv = _dkdv_tile(dk, dv, k, v, qbase, dobase, lse_ptr, delta_ptr, sqs, sds, q0,
                                    n0, khi, offs_n, kin, L, offs_d, dmask, qk_scale, window,
                                    sink, own[None, :], hit[None, :], BLOCK_M, BLOCK_N, CAUSAL,
                                    FULL, WINDOW, HAS_SINK, MOBA, PREC, UPCAST)
    else:
        q_hi = L
        if not FULL:
            q_hi = q_lo
            if WINDOW:
                q_hi = tl.minimum(L, n_last + window)
            if HAS_SINK:
                q_hi = tl.where(n0 < sink, L, q_hi)
        for q0 in range(q_lo, q_hi, BLOCK_M):
            dk, dv = _dkdv_tile(dk, dv, k, v, qbase, dobase, lse_ptr, delta_ptr, sqs, sds, q0, n0,
                                khi, offs_n, kin, L, offs_d, dmask, qk_scale, window, sink,
                                offs_n, offs_n, BLOCK_M, BLOCK_N, CAUSAL, FULL, WINDOW, HAS_SINK,
                                MOBA, PREC, UPCAST)
    return dk, dv


@triton.jit
def sparse_attn_bwd_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA, SEL, CU,
                         sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sdb, sdh, sds,
                         S, n_docs, Hkv, GROUP, qk_scale, sm_scale, window, sink, bs, len_bucket,
                         HEAD_DIM: tl.constexpr, DP: tl.constexpr, KP: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         CAUSAL: tl.constexpr, FULL: tl.constexpr, WINDOW: tl.constexpr,
                         HAS_SINK: tl.constexpr, MOBA: tl.constexpr,
                         PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Grid (key tiles, B * Hkv * n_docs); DK/DV contiguous like K; DO strided like Q's layout."""
    b, hk, start, L = program_coords(CU, n_docs, Hkv)
    t = tl.program_id(0)
    blk = t * 0
    if MOBA:  # tile t = part (t % tpb) of block (t // tpb): a tile never straddles blocks
        tpb = tl.cdiv(bs, BLOCK_N)
        blk = t // tpb
        n0 = blk * bs + (t % tpb) * BLOCK_N
        khi = tl.minimum(blk * bs + bs, L)
    else:
        n0 = t * BLOCK_N
        khi = L
    if n0 < khi:
        b64, hk64, st64 = b.to(tl.int64), hk.to(tl.int64), start.to(tl.int64)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, DP)
        dmask = offs_d < HEAD_DIM
        kin = offs_n < khi
        kv_mask = kin[:, None] & dmask[None, :]
        koff = b64 * skb + hk64 * skh + st64 * sks + offs_n[:, None] * sks + offs_d[None, :]
        voff = b64 * svb + hk64 * svh + st64 * svs + offs_n[:, None] * svs + offs_d[None, :]
        k = tl.load(K + koff, mask=kv_mask, other=0.0)  # [N, DP]
        v = tl.load(V + voff, mask=kv_mask, other=0.0)
        dk = tl.zeros([BLOCK_N, DP], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, DP], dtype=tl.float32)
        for g in range(0, GROUP):
            h64 = hk64 * GROUP + g
            row = (b64 * (Hkv * GROUP) + h64) * S + st64  # first row of this doc in LSE/DELTA
            dk, dv = _dkdv_head(dk, dv, k, v, Q + b64 * sqb + h64 * sqh + st64 * sqs,
                                DO + b64 * sdb + h64 * sdh + st64 * sds, LSE + row, DELTA + row,
                                SEL + row * KP, sqs, sds, n0, khi, blk, offs_n, kin, L, offs_d,
                                dmask, qk_scale, window, sink, bs, KP, BLOCK_M, BLOCK_N, CAUSAL,
                                FULL, WINDOW, HAS_SINK, MOBA, PREC, UPCAST)
        tl.store(DK + koff, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(DV + voff, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def sparse_attn_bwd_dq(Q, K, V, DO, DQ, LSE, DELTA, SEL, CU,
                       sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sdb, sdh, sds,
                       S, n_docs, Hq, GROUP, qk_scale, sm_scale, window, sink, bs, len_bucket,
                       HEAD_DIM: tl.constexpr, DP: tl.constexpr, KP: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       CAUSAL: tl.constexpr, FULL: tl.constexpr, WINDOW: tl.constexpr,
                       HAS_SINK: tl.constexpr, MOBA: tl.constexpr,
                       PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Grid (cdiv(max doc len, M), B * Hq * n_docs); DQ has Q's strides."""
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
        dooff = b64 * sdb + h64 * sdh + st64 * sds + offs_m[:, None] * sds + offs_d[None, :]
        do = tl.load(DO + dooff, mask=qmask, other=0.0)
        row = (b64 * Hq + h64) * S + st64
        lse = tl.load(LSE + row + offs_m, mask=offs_m < L, other=float("inf"))
        delta = tl.load(DELTA + row + offs_m, mask=offs_m < L, other=0.0)
        sel = offs_m[:, None] < 0
        if MOBA:
            sel = tl.load(SEL + (row + offs_m[:, None]) * KP + tl.arange(0, KP)[None, :],
                          mask=(offs_m < L)[:, None], other=-1)
        dq = tl.zeros([BLOCK_M, DP], dtype=tl.float32)
        kbase = K + b64 * skb + kh64 * skh + st64 * sks
        vbase = V + b64 * svb + kh64 * svh + st64 * svs
        dq, lse, delta = q_tile_loop(dq, lse, delta, q, do, kbase, vbase, sks, svs, offs_m, m0, L,
                                     offs_d, dmask, sel, qk_scale, window, sink, bs, BLOCK_M,
                                     BLOCK_N, CAUSAL, FULL, WINDOW, HAS_SINK, MOBA, True,
                                     PREC, UPCAST)
        tl.store(DQ + qoff, (dq * sm_scale).to(DQ.dtype.element_ty), mask=qmask)
