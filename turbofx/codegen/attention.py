"""Attention kernel template: a streaming (online-softmax) kernel over KV tiles.

One program computes BLOCK_M query rows of one (batch, head): running max, running sum and a
rescaled accumulator over BLOCK_N-key tiles, so the [Sq, Sk] score matrix never exists. Causal
and sliding-window tiles outside the visible band are skipped; grouped-query heads read their
shared KV head directly. Rows with no visible key produce zeros. Variants (mask kind, causal,
window, softcap, upcast for the interpreter) are constexpr flags of one source. The cached
variant's prologue rotates Q (RoPE) as it loads it and, for decode, writes the new K/V rows into the
cache before the key loop reads it (``tfx_kv_write`` does that write on its own for prefill).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from turbofx.codegen import family
from turbofx.codegen import indexing as ix
from turbofx.codegen.target import Target
from turbofx.runtime import ops as _ops  # noqa: F401  (registers torch.ops.turbofx.*)
from turbofx.runtime.exprs import _compile_expr, _eval, pow2 as _pow2

NAME = "tfx_attention_fwd"

SOURCE = '''import triton
import triton.language as tl


@triton.jit
def _online_softmax_step(s, keep, v, m_i, l_i, acc, MASKED: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    # One KV tile: scores to log2 units (exp2 is one instruction), new running max, rescale the
    # running sum and accumulator, add this tile's p @ v. A row with nothing visible keeps m = -inf.
    if MASKED:
        s = tl.where(keep, s * 1.4426950408889634, float("-inf"))
    else:
        s = s * 1.4426950408889634
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    if UPCAST:
        acc = acc * alpha[:, None] + tl.dot(p, v)
    elif IEEE:
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _kv_tiles(q, m_i, l_i, acc, K, V, M, lo, hi, qpos, mrow, m_ok, offs_d, d_ok, skn, skd, svn, svd, smn,
              SK, shift, scale, softcap, window, MASKED: tl.constexpr, HAS_MASK: tl.constexpr,
              MASK_BOOL: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
              UPCAST: tl.constexpr, IEEE: tl.constexpr, BLOCK_N: tl.constexpr):
    # Key tiles [lo, hi) of one (batch, KV head) (K, V, M at their bases; row i is query qpos[i], its
    # mask row at M + mrow[i]). MASKED=False: the caller knows every key is visible to every row, so
    # no bounds, causal or window masks are computed.
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < SK
        if MASKED:
            k = tl.load(K + offs_n[None, :] * skn + offs_d[:, None] * skd, mask=n_ok[None, :] & d_ok[:, None], other=0.0)
            v = tl.load(V + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        else:
            k = tl.load(K + offs_n[None, :] * skn + offs_d[:, None] * skd, mask=d_ok[:, None], other=0.0)
            v = tl.load(V + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=d_ok[None, :], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        if IEEE:  # fp32 inputs: full precision, not TF32
            s = tl.dot(q, k, input_precision="ieee") * scale
        else:
            s = tl.dot(q, k) * scale
        if SOFTCAP:
            s = softcap * (2.0 / (1.0 + tl.exp(-2.0 * s / softcap)) - 1.0)
        if MASKED:
            keep = m_ok[:, None] & n_ok[None, :]
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= qpos[:, None] + shift)
            if WINDOW:
                keep = keep & (offs_n[None, :] > qpos[:, None] + shift - window)
            if HAS_MASK:
                mk = tl.load(M + mrow[:, None] + offs_n[None, :] * smn, mask=m_ok[:, None] & n_ok[None, :], other=0)
                if MASK_BOOL:
                    keep = keep & (mk != 0)
                else:
                    s = s + mk.to(tl.float32)
        else:
            keep = m_ok[:, None]  # unused
        m_i, l_i, acc = _online_softmax_step(s, keep, v, m_i, l_i, acc, MASKED, UPCAST, IEEE)
    return m_i, l_i, acc


@triton.jit
def _rows(X, row_off, pos, row_ok, sd, C, S, scr, scd, offs_d, D, RD, ROPE: tl.constexpr):
    # Rows of X (row i at X + row_off[i]); with ROPE, the first RD dims rotated on the way in
    # (half-split form, x·cos + rotate_half(x)·sin with the cos/sin rows of positions pos; dims
    # past RD pass through), rounded to X's dtype like the model.
    ok = row_ok[:, None] & (offs_d < D)[None, :]
    x = tl.load(X + row_off[:, None] + offs_d[None, :] * sd, mask=ok, other=0.0)
    if ROPE:
        half = RD // 2
        rot = ok & (offs_d < RD)[None, :]
        turned = tl.where(offs_d < half, offs_d + half, offs_d - half)
        xr = tl.load(X + row_off[:, None] + turned[None, :] * sd, mask=rot, other=0.0).to(tl.float32)
        xr = tl.where((offs_d < half)[None, :], -xr, xr)
        c = tl.load(C + pos[:, None] * scr + offs_d[None, :] * scd, mask=rot, other=1.0).to(tl.float32)
        s = tl.load(S + pos[:, None] * scr + offs_d[None, :] * scd, mask=rot, other=0.0).to(tl.float32)
        x = (x.to(tl.float32) * c + xr * s).to(x.dtype)
    return x


@triton.jit
def _write_new_kv(K, V, KN, VN, POS, C, S, j0, lo, hi, skn, skd, svn, svd, sknn, sknd, svnn, svnd, scr, scd,
                  S_NEW, D, RD, ROPE_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # New rows j0 .. j0 + BLOCK_N of K/V (K rotated) stored at their cache positions, those in [lo, hi).
    offs_j = j0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    pos = tl.load(POS + offs_j, mask=offs_j < S_NEW, other=-1).to(tl.int64)
    ok = (offs_j < S_NEW) & (pos >= lo) & (pos < hi)
    store_ok = ok[:, None] & (offs_d < D)[None, :]
    kn = _rows(KN, offs_j * sknn, offs_j, ok, sknd, C, S, scr, scd, offs_d, D, RD, ROPE_K)
    tl.store(K + pos[:, None] * skn + offs_d[None, :] * skd, kn.to(K.dtype.element_ty), mask=store_ok)
    vn = _rows(VN, offs_j * svnn, offs_j, ok, svnd, C, S, scr, scd, offs_d, D, RD, False)
    tl.store(V + pos[:, None] * svn + offs_d[None, :] * svd, vn.to(V.dtype.element_ty), mask=store_ok)


@triton.jit
def tfx_kv_write(K, V, KN, VN, POS, C, S, skb, skh, skn, skd, svb, svh, svn, svd,
                 sknb, sknh, sknn, sknd, svnb, svnh, svnn, svnd, scb, scr, scd, HKV, S_NEW, SK, D, RD,
                 ROPE_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # The cache write on its own (prefill: many query tiles would each repeat it in their prologue).
    bh = tl.program_id(1).to(tl.int64)
    b = bh // HKV
    hk = bh % HKV
    _write_new_kv(K + b * skb + hk * skh, V + b * svb + hk * svh, KN + b * sknb + hk * sknh, VN + b * svnb + hk * svnh,
                  POS, C + b * scb, S + b * scb, tl.program_id(0) * BLOCK_N, 0, SK, skn, skd, svn, svd,
                  sknn, sknd, svnn, svnd, scr, scd, S_NEW, D, RD, ROPE_K, BLOCK_N, BLOCK_D)


@triton.jit
def tfx_attention_fwd(Q, K, V, M, O, PO, PL, KN, VN, POS, C, S,
                      sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                      smb, smh, smm, smn, sob, soh, som, sod,
                      sknb, sknh, sknn, sknd, svnb, svnh, svnn, svnd, scb, scr, scd,
                      H, GROUPS, G, SQ, SK, D, S_NEW, RD, scale, softcap, window, n_splits,
                      HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, CAUSAL: tl.constexpr,
                      WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, SPLIT: tl.constexpr,
                      IEEE: tl.constexpr, ROPE_Q: tl.constexpr, ROPE_K: tl.constexpr, WRITE_KV: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # A program owns G query heads of one KV head (G = GROUPS: decode-like shapes pack the whole
    # group, so K/V tiles are read once per KV head, not once per query head; else G = 1). Its
    # rows run over those G heads × SQ queries, head-major; BLOCK_M of them per program.
    pid_m = tl.program_id(0)
    bg = tl.program_id(1).to(tl.int64)  # 64-bit offsets: caches can pass 2**31 elements
    split = tl.program_id(2)
    b = bg // (H // G)
    h0 = (bg % (H // G)) * G
    hk = h0 // GROUPS
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = rows < G * SQ
    qpos = rows % SQ  # each row's query index and head
    h = h0 + rows // SQ
    d_ok = offs_d < D
    q = _rows(Q + b * sqb, h * sqh + qpos * sqm, qpos, m_ok, sqd, C + b * scb, S + b * scb, scr, scd, offs_d, D, RD,
              ROPE_Q)
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    shift = SK - SQ  # query i sits at key position i + shift
    q_first = tl.min(tl.where(m_ok, qpos, SQ), 0)
    q_last = tl.max(tl.where(m_ok, qpos, 0), 0)
    hi = SK
    if CAUSAL:
        hi = tl.minimum(SK, q_last + 1 + shift)
    lo = 0
    if WINDOW:
        lo = tl.maximum(0, q_first + shift - window + 1)
        lo = (lo // BLOCK_N) * BLOCK_N
    if WRITE_KV:  # prologue: every new row goes into the cache first (each program of this KV head
        # writes the same values; decode has one or a few rows), then the cache is read once
        for j0 in range(0, S_NEW, BLOCK_N):
            _write_new_kv(K + b * skb + hk * skh, V + b * svb + hk * svh, KN + b * sknb + hk * sknh,
                          VN + b * svnb + hk * svnh, POS, C + b * scb, S + b * scb, j0, 0, SK, skn, skd, svn, svd,
                          sknn, sknd, svnn, svnd, scr, scd, S_NEW, D, RD, ROPE_K, BLOCK_N, BLOCK_D)
        tl.debug_barrier()
    M = M + b * smb
    mrow = h * smh + qpos * smm
    if HAS_MASK:  # narrow [lo, hi) to the keys the mask lets some row see: a static cache masks its
        # unwritten slots, an explicit causal mask its upper triangle (bool False / additive -inf)
        seen_lo = tl.full([], 0, tl.int32) + hi  # tensors from the start: loop-carried types must not change
        seen_hi = tl.full([], 0, tl.int32) + lo
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            ok = m_ok[:, None] & (offs_n < SK)[None, :]
            mk = tl.load(M + mrow[:, None] + offs_n[None, :] * smn, mask=ok, other=0)
            if MASK_BOOL:
                seen = ok & (mk != 0)
            else:
                seen = ok & (mk.to(tl.float32) != float("-inf"))
            col = tl.max(seen.to(tl.int32), 0) > 0
            seen_lo = tl.minimum(seen_lo, tl.min(tl.where(col, offs_n, hi), 0))
            seen_hi = tl.maximum(seen_hi, tl.max(tl.where(col, offs_n + 1, lo), 0))
        lo = seen_lo // BLOCK_N * BLOCK_N  # stays on the key-tile grid; nothing seen: lo >= hi
        hi = seen_hi
    if SPLIT:  # flash-decoding: this program covers one chunk (whole key tiles) of what is visible
        chunk = tl.cdiv(tl.cdiv(tl.maximum(hi - lo, 0), n_splits), BLOCK_N) * BLOCK_N
        lo = lo + split * chunk
        hi = tl.minimum(hi, lo + chunk)
    # Only the tiles at the edges of the visible band need masks: [lo, full_lo) meets the window's
    # lower edge, [full_hi, hi) the causal diagonal or the end of the keys; every key in between is
    # visible to every row of this query tile. An explicit mask tensor is read on every tile.
    full_lo = lo
    full_hi = lo
    if not HAS_MASK:
        if WINDOW:  # the first key the last query of the tile still sees
            full_lo = tl.minimum(lo + tl.cdiv(tl.maximum(q_last + shift - window + 1 - lo, 0), BLOCK_N) * BLOCK_N, hi)
        visible = tl.minimum(hi, SK)
        if CAUSAL:  # the last key the first query of the tile sees
            visible = tl.minimum(visible, q_first + shift + 1)
        full_hi = tl.maximum(full_lo, full_lo + (visible - full_lo) // BLOCK_N * BLOCK_N)
    K = K + b * skb + hk * skh
    V = V + b * svb + hk * svh
    m_i, l_i, acc = _kv_tiles(q, m_i, l_i, acc, K, V, M, lo, full_lo, qpos, mrow, m_ok, offs_d, d_ok, skn, skd, svn, svd,
                              smn, SK, shift, scale, softcap, window, True, HAS_MASK, MASK_BOOL, CAUSAL, WINDOW,
                              SOFTCAP, UPCAST, IEEE, BLOCK_N)
    m_i, l_i, acc = _kv_tiles(q, m_i, l_i, acc, K, V, M, full_lo, full_hi, qpos, mrow, m_ok, offs_d, d_ok, skn, skd, svn,
                              svd, smn, SK, shift, scale, softcap, window, False, HAS_MASK, MASK_BOOL, CAUSAL,
                              WINDOW, SOFTCAP, UPCAST, IEEE, BLOCK_N)
    m_i, l_i, acc = _kv_tiles(q, m_i, l_i, acc, K, V, M, full_hi, hi, qpos, mrow, m_ok, offs_d, d_ok, skn, skd, svn, svd,
                              smn, SK, shift, scale, softcap, window, True, HAS_MASK, MASK_BOOL, CAUSAL, WINDOW,
                              SOFTCAP, UPCAST, IEEE, BLOCK_N)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    if SPLIT:  # partial result and its log-sum-exp; the combine kernel weighs the chunks
        row = ((b * H + h) * n_splits + split) * SQ + qpos
        tl.store(PO + row[:, None] * BLOCK_D + offs_d[None, :], out, mask=m_ok[:, None])
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(tl.where(l_i == 0.0, 1.0, l_i)))
        tl.store(PL + row, lse, mask=m_ok)
    else:
        tl.store(O + b * sob + (h * soh + qpos * som)[:, None] + offs_d[None, :] * sod,
                 out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


@triton.jit
def tfx_attention_combine(PO, PL, O, sob, soh, som, sod, H, SQ, D, n_splits,
                          BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < SQ
    rows = (bh * n_splits + offs_s[None, :]) * SQ + offs_m[:, None]
    lse = tl.load(PL + rows, mask=m_ok[:, None] & (offs_s[None, :] < n_splits), other=float("-inf"))
    top = tl.max(lse, 1)
    top = tl.where(top == float("-inf"), 0.0, top)
    w = tl.exp2(lse - top[:, None])  # lse in log2 units, as the forward kernel wrote it
    total = tl.sum(w, 1)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for sp in range(0, n_splits):
        part = tl.load(PO + ((bh * n_splits + sp) * SQ + offs_m)[:, None] * BLOCK_D + offs_d[None, :],
                       mask=m_ok[:, None], other=0.0)
        ws = tl.sum(tl.where(offs_s[None, :] == sp, w, 0.0), 1)
        acc += ws[:, None] * part
    out = acc / tl.where(total == 0.0, 1.0, total)[:, None]
    tl.store(O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod,
             out.to(O.dtype.element_ty), mask=m_ok[:, None] & (offs_d[None, :] < D))


@triton.jit
def tfx_attention_varlen(Q, K, V, O, ROW_LO, ROW_HI, TILES, sqt, sqh, sqd, skt, skh, skd, svt, svh, svd,
                         sot, soh, sod, H, GROUPS, T, D, scale,
                         UPCAST: tl.constexpr, IEEE: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # Packed variable-length batch: a tile is BLOCK_M consecutive packed rows, so several short
    # sequences share one tile; each row sees keys [ROW_LO, ROW_HI) of its own sequence. Tiles run
    # in the host's longest-work-first order (TILES) to keep blocks balanced.
    tile = tl.load(TILES + tl.program_id(0))
    h = tl.program_id(1).to(tl.int64)
    hk = h // GROUPS
    offs_m = tile.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n0 = tl.arange(0, BLOCK_N)
    m_ok = offs_m < T
    d_ok = offs_d < D
    row_lo = tl.load(ROW_LO + offs_m, mask=m_ok, other=T)
    row_hi = tl.load(ROW_HI + offs_m, mask=m_ok, other=0)
    lo = (tl.min(row_lo, 0) // BLOCK_N) * BLOCK_N
    hi = tl.max(row_hi, 0)
    q = tl.load(Q + offs_m[:, None] * sqt + h * sqh + offs_d[None, :] * sqd, mask=m_ok[:, None] & d_ok[None, :],
                other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < T
        k = tl.load(K + offs_n[None, :] * skt + hk * skh + offs_d[:, None] * skd, mask=n_ok[None, :] & d_ok[:, None],
                    other=0.0)
        v = tl.load(V + offs_n[:, None] * svt + hk * svh + offs_d[None, :] * svd, mask=n_ok[:, None] & d_ok[None, :],
                    other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        if IEEE:
            s = tl.dot(q, k, input_precision="ieee") * scale
        else:
            s = tl.dot(q, k) * scale
        keep = m_ok[:, None] & (offs_n[None, :] >= row_lo[:, None]) & (offs_n[None, :] < row_hi[:, None])
        m_i, l_i, acc = _online_softmax_step(s, keep, v, m_i, l_i, acc, True, UPCAST, IEEE)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(O + offs_m[:, None] * sot + h * soh + offs_d[None, :] * sod, out.to(O.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])
'''

COMBINE = "tfx_attention_combine"
KV_WRITE = "tfx_kv_write"
VARLEN = "tfx_attention_varlen"


def blocks(target: Target, head_dim: int, elem_size: int = 2) -> dict:
    """Tile sizes per target and dtype (the interpreter wants few, large programs; a GPU tile
    must fit shared memory: fp32 and head dim 256 take smaller query tiles)."""
    d = max(16, 1 << (head_dim - 1).bit_length())
    common = {"BLOCK_D": d, "sm_count": target.sm_count, "interpret": target.interpret,
              "IEEE": elem_size == 4 and not target.interpret}
    if target.interpret:
        return {**common, "BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 1, "UPCAST": True, "IEEE": False}
    if target.backend == "hip":
        return {**common, "BLOCK_M": 64, "BLOCK_N": 32 if elem_size == 4 else 64, "num_warps": 4, "UPCAST": False}
    if elem_size == 4 or d > 128:  # fp32 tiles at 4 warps spill registers (ptxas); 8 warps hold them
        return {**common, "BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 8, "UPCAST": False}
    cc = int(target.arch[2:] or 0)
    big = cc >= 80
    # sm8x has fewer registers to spare than sm90+: 128x64 tiles at head dim 128 spill (ptxas), 128x32 do not
    block_n = 32 if 80 <= cc < 90 and d >= 128 else 64
    return {**common, "BLOCK_M": 128 if big else 64, "BLOCK_N": block_n, "num_warps": 8 if big else 4, "UPCAST": False}


# ---------------------------------------------------------------- the family: lowering, launchers, cost
# turbofx::attention / cached_attention (steps of type "attention") and varlen_attention.

ATTENTION_OP = torch.ops.turbofx.attention.default
CACHED_OP = torch.ops.turbofx.cached_attention.default
VARLEN_OP = torch.ops.turbofx.varlen_attention.default


def _val_int(s) -> int:
    return s if isinstance(s, int) else s.node.hint


def attention_args(n: fx.Node):
    """The attention a node computes (``AttentionArgs``); for a cached one, k and v are the caches
    (updated by the step before its attention reads them)."""
    from turbofx.runtime.op_args import AttentionArgs, CachedAttentionArgs

    return CachedAttentionArgs.of(n).attention() if n.target is CACHED_OP else AttentionArgs.of(n)


class AttentionFamily(family.Family):
    """Streaming attention, optionally with its decoder-step prologue (RoPE, KV-cache write)."""

    step_types = ("attention",)

    def claims(self, unit) -> bool:
        return isinstance(unit, fx.Node) and unit.target in (ATTENTION_OP, CACHED_OP)

    def lower(self, n: fx.Node, lc: family.LowerContext) -> dict:
        slot = lc.slot
        from turbofx.runtime.op_args import CachedAttentionArgs

        att = attention_args(n)
        q, k, v, mask = att.q, att.k, att.v, att.mask
        for name in (NAME, COMBINE):
            lc.add_source(name, SOURCE)
        ov = n.meta["val"][0] if n.target is CACHED_OP else n.meta["val"]
        step = {
            "type": "attention", "kernel": NAME, "combine": COMBINE,
            "q": slot[q], "k": slot[k], "v": slot[v],
            "mask": slot[mask] if mask is not None else None, "out": slot[n],
            "shape": [ix.pyexpr(ix.to_expr(e)) for e in ov.shape],
            "stride": [ix.pyexpr(ix.to_expr(e)) for e in ov.stride()],
            "scale": att.scale, "causal": att.causal, "window": att.window, "softcap": att.softcap,
            "blocks": blocks(lc.target, int(_val_int(ov.shape[-1])), ov.element_size()),
            "node": n.name}
        reads = [q, k, v, mask]
        inplace = n in lc.inplace
        if n.target is CACHED_OP:
            c = CachedAttentionArgs.of(n)
            lc.add_source(KV_WRITE, SOURCE)
            step["cache"] = {
                "k_new": slot[c.k_new], "v_new": slot[c.v_new], "positions": slot[c.positions],
                "cos": slot[c.cos] if c.cos is not None else None, "sin": slot[c.sin] if c.sin is not None else None,
                "rope_q": c.rope_q, "rope_k": c.rope_k, "inplace": inplace, "kv_write": KV_WRITE}
            reads += [c.k_new, c.v_new, c.positions, c.cos, c.sin]
        lc.define(n, reads)
        if n.target is CACHED_OP and inplace:  # the step's value holds the caches themselves
            lc.share_storage(slot[n], {lc.storage_root[slot[att.k]], lc.storage_root[slot[att.v]]})
        if n.target is ATTENTION_OP:
            lc.records.append(family.KernelRecord(NAME, "attention", "attention", [n.name]))
        else:
            c = CachedAttentionArgs.of(n)
            rope = "+rope" if c.rope_q or c.rope_k else ""
            where = "in place" if inplace else "into copies (the graph reads the old caches too)"
            lc.records.append(family.KernelRecord(NAME, "attention", f"attention{rope}+cache write", [n.name],
                                           f"new K/V rows written into the caches {where}"))
        return step

    def runner(self, s: dict, kernels: dict):
        run = _attention_launcher(s, kernels[s["kernel"]], kernels[s["combine"]],
                                  kernels.get(s.get("cache", {}).get("kv_write")))
        return family.bind(run, s, self)

    def reads(self, s: dict) -> list[int]:
        slots = [s["q"], s["k"], s["v"], s["mask"]]
        if s.get("cache"):
            c = s["cache"]
            slots += [c["k_new"], c["v_new"], c["positions"], c["cos"], c["sin"]]
        return [i for i in slots if i is not None]

    def writes(self, s: dict) -> list[int]:
        return [s["out"]]

    def cost(self, s: dict, values: list, env: dict, ledger):
        from turbofx.compiler.roofline import StepCost, _footprint, meta_output

        q, k, v = values[s["q"]], values[s["k"]], values[s["v"]]
        out = meta_output(s, env, q.dtype)
        reads = [q, k, v] + ([values[s["mask"]]] if s.get("mask") is not None else [])
        written = _footprint(out)
        launches = 1
        b, h, sq, d = q.shape
        flops = 4 * b * h * sq * k.shape[2] * d  # QK^T and PV over every key (the mask is not a shape)
        cache = s.get("cache")
        if cache is not None:
            new = [values[cache[n]] for n in ("k_new", "v_new", "positions", "cos", "sin") if cache[n] is not None]
            reads += new
            written += _footprint(new[0]) + _footprint(new[1])  # the new rows stored into the caches
            launches += sq > 16  # more than a few rows: a separate cache-write kernel first
            if not cache["inplace"]:
                k, v = k.clone(), v.clone()
                written += _footprint(k) + _footprint(v)
            values[s["out"]] = (out, k, v)
        else:
            values[s["out"]] = out
        return StepCost("attention" + ("+cache write" if cache is not None else ""), "attention",
                        ledger.reads(reads), written, flops, launches)


class VarlenFamily(family.Family):
    """Attention over a packed variable-length batch (cu_seqlens)."""

    step_types = ("varlen_attention",)

    def claims(self, unit) -> bool:
        return isinstance(unit, fx.Node) and unit.target is VARLEN_OP

    def lower(self, n: fx.Node, lc: family.LowerContext) -> dict:
        from turbofx.runtime.op_args import VarlenAttentionArgs

        va = VarlenAttentionArgs.of(n)
        q, k, v, cu = va.q, va.k, va.v, va.cu_seqlens
        lc.add_source(VARLEN, SOURCE)
        ov = n.meta["val"]
        slot = lc.slot
        step = {
            "type": "varlen_attention", "kernel": VARLEN, "q": slot[q], "k": slot[k],
            "v": slot[v], "cu_seqlens": slot[cu], "out": slot[n], "scale": va.scale, "causal": va.causal,
            "shape": [ix.pyexpr(e) for e in ix.shape_of(n)], "stride": [ix.pyexpr(e) for e in ix.strides_of(n)],
            "blocks": blocks(lc.target, int(_val_int(ov.shape[-1])), ov.element_size()),
            "node": n.name}
        lc.define(n, [q, k, v, cu])
        lc.records.append(family.KernelRecord(VARLEN, "attention", "varlen_attention", [n.name]))
        return step

    def runner(self, s: dict, kernels: dict):
        return family.bind(_varlen_launcher(s, kernels[s["kernel"]]), s, self)

    def reads(self, s: dict) -> list[int]:
        return [s["q"], s["k"], s["v"], s["cu_seqlens"]]

    def writes(self, s: dict) -> list[int]:
        return [s["out"]]

    def cost(self, s: dict, values: list, env: dict, ledger):
        from turbofx.compiler.roofline import StepCost, _footprint, meta_output

        q, k, v = values[s["q"]], values[s["k"]], values[s["v"]]
        out = meta_output(s, env, q.dtype)
        t, h, d = q.shape
        values[s["out"]] = out  # packed rows: the key ranges are data; the full square as a bound
        return StepCost(s["kernel"], "attention", ledger.reads([q, k, v, values[s["cu_seqlens"]]]), _footprint(out),
                        4 * h * t * t * d, 1)


def _attention_launcher(s: dict, fn, combine, kv_write=None):
    """Streaming attention: grid (query tiles, batch × heads, key splits); strides read at run
    time. Few query tiles on a large cache split the keys (flash-decoding) and a second kernel
    combines the chunks by their log-sum-exp. With a fused cache write (``s["cache"]``) the new
    rows are rotated and stored by the attention kernel's prologue when there is one query
    tile (decode), by one write kernel before it otherwise (prefill); the step's value is then
    (out, k cache, v cache), updated in place when the graph writes the caches back."""
    shape = [_compile_expr(e) for e in s["shape"]]
    stride = [_compile_expr(e) for e in s["stride"]]
    blocks = dict(s["blocks"])
    num_warps = blocks.pop("num_warps")
    sm_count = blocks.pop("sm_count")
    interpret = blocks.pop("interpret")
    flags = dict(CAUSAL=bool(s["causal"]), WINDOW=s["window"] > 0, SOFTCAP=s["softcap"] > 0)
    qi, ki, vi, mi, oi = s["q"], s["k"], s["v"], s["mask"], s["out"]
    cache = s.get("cache")

    def run(values: list, env: dict) -> None:
        q, k, v = values[qi], values[ki], values[vi]
        out = torch.empty_strided([_eval(c, env) for c in shape], [_eval(c, env) for c in stride],
                                  dtype=q.dtype, device=q.device)
        b, h, sq, d = q.shape
        sk = k.shape[2]
        mask = values[mi] if mi is not None else None
        m = mask.expand(b, h, sq, sk) if mask is not None else q
        m_strides = m.stride() if mask is not None else (0, 0, 0, 0)
        groups = h // k.shape[1]
        # few queries per KV head (decode): one program takes the whole group of query heads,
        # so each K/V tile is read once per KV head
        g = groups if groups > 1 and sq * groups <= blocks["BLOCK_M"] else 1
        block_m = min(blocks["BLOCK_M"], max(16, _pow2(g * sq)))
        q_tiles = -(-(g * sq) // block_m)
        if cache is not None:
            if not cache["inplace"]:  # the graph still reads the old caches: update copies
                k, v = k.clone(), v.clone()
            new = _new_rows(values, cache, b, sq, d)
            # decode: the attention kernel's prologue writes the few new rows (each program of
            # a KV head repeats that small write); more rows: one write kernel first
            prologue = q_tiles == 1 and sq <= 16
            if not prologue:
                kn, vn, pos, c, sn = new["tensors"]
                kv_write[(-(-sq // blocks["BLOCK_N"]), b * k.shape[1])](
                    k, v, kn, vn, pos, c, sn, *k.stride(), *v.stride(), *kn.stride(), *vn.stride(),
                    *new["cos_strides"], k.shape[1], sq, sk, d, new["rope_dims"], ROPE_K=cache["rope_k"],
                    BLOCK_N=blocks["BLOCK_N"], BLOCK_D=blocks["BLOCK_D"], num_warps=num_warps)
            values[oi] = (out, k, v)
            extra = new["tensors"] + new["strides"]
            rope_dims = new["rope_dims"]
            cache_flags = dict(ROPE_Q=cache["rope_q"], ROPE_K=cache["rope_k"], WRITE_KV=prologue)
        else:
            values[oi] = out
            extra = (q,) * 5 + (0,) * 11
            rope_dims = 0
            cache_flags = dict(ROPE_Q=False, ROPE_K=False, WRITE_KV=False)
        splits = attention_splits(sm_count, b * (h // g) * q_tiles, sk, blocks["BLOCK_N"], interpret=interpret)
        if splits > 1:
            po = torch.empty(b * h * splits * sq, blocks["BLOCK_D"], dtype=torch.float32, device=q.device)
            pl = torch.empty(b * h * splits * sq, dtype=torch.float32, device=q.device)
        else:
            po = pl = q
        kw = dict(blocks, BLOCK_M=block_m)
        fn[(q_tiles, b * (h // g), splits)](
            q, k, v, m, out, po, pl, *extra[:5], *q.stride(), *k.stride(), *v.stride(), *m_strides,
            *out.stride(), *extra[5:], h, groups, g, sq, sk, d, sq, rope_dims, float(s["scale"]),
            float(s["softcap"]), int(s["window"]), splits, HAS_MASK=mask is not None,
            MASK_BOOL=mask is not None and mask.dtype == torch.bool, SPLIT=splits > 1,
            num_warps=num_warps, **flags, **cache_flags, **kw)
        if splits > 1:
            combine_m = min(blocks["BLOCK_M"], max(16, _pow2(sq)))
            combine[(-(-sq // combine_m), b * h)](po, pl, out, *out.stride(), h, sq, d, splits, BLOCK_M=combine_m,
                                      BLOCK_D=blocks["BLOCK_D"], BLOCK_S=_pow2(splits), num_warps=num_warps)

    return run



def _varlen_launcher(s: dict, fn):
    """Packed variable-length attention: per-row key ranges from cu_seqlens, tiles of
    consecutive rows scheduled longest-work-first."""
    shape = [_compile_expr(e) for e in s["shape"]]
    stride = [_compile_expr(e) for e in s["stride"]]
    blocks = {k: v for k, v in s["blocks"].items() if k not in ("num_warps", "sm_count", "interpret")}
    num_warps = s["blocks"]["num_warps"]
    qi, ki, vi, ci, oi = s["q"], s["k"], s["v"], s["cu_seqlens"], s["out"]
    causal = bool(s["causal"])

    def run(values: list, env: dict) -> None:
        q, k, v, cu = values[qi], values[ki], values[vi], values[ci]
        out = torch.empty_strided([_eval(c, env) for c in shape], [_eval(c, env) for c in stride],
                                  dtype=q.dtype, device=q.device)
        values[oi] = out
        t, h, d = q.shape
        if t == 0:
            return
        cu = cu.to(device=q.device, dtype=torch.int64)
        lengths = cu[1:] - cu[:-1]
        seq = torch.repeat_interleave(torch.arange(len(lengths), device=q.device), lengths)
        rows = torch.arange(t, device=q.device)
        row_lo = cu[:-1][seq].to(torch.int32)
        row_hi = (rows + 1 if causal else cu[1:][seq]).to(torch.int32)
        bm = blocks["BLOCK_M"]
        n_tiles = -(-t // bm)
        pad = n_tiles * bm - t
        lo_t = torch.nn.functional.pad(row_lo, (0, pad), value=t).view(n_tiles, bm).amin(1)
        hi_t = torch.nn.functional.pad(row_hi, (0, pad), value=0).view(n_tiles, bm).amax(1)
        tiles = torch.argsort(hi_t - lo_t, descending=True).to(torch.int32)  # longest work first
        fn[(n_tiles, h)](q, k, v, out, row_lo, row_hi, tiles, *q.stride(), *k.stride(), *v.stride(),
                         *out.stride(), h, h // k.shape[1], t, d, float(s["scale"]), num_warps=num_warps,
                         **blocks)

    return run



def _new_rows(values: list, cache: dict, b: int, s_new: int, d: int) -> dict:
    """A fused cache write's new K/V rows, positions and RoPE tables as kernel arguments: cos and
    sin viewed as [B, S_new, rotary dims] with one set of strides (copied when theirs differ)."""
    kn, vn = values[cache["k_new"]], values[cache["v_new"]]
    pos = values[cache["positions"]]
    pos = pos if pos.stride(0) == 1 else pos.contiguous()
    if cache["cos"] is None:
        c = sn = kn
        cos_strides, rope_dims = (0, 0, 0), 0
    else:
        c = values[cache["cos"]].expand(b, 1, s_new, -1)[:, 0]
        sn = values[cache["sin"]].expand(b, 1, s_new, -1)[:, 0]
        if c.stride() != sn.stride():
            c, sn = c.contiguous(), sn.contiguous()
        cos_strides, rope_dims = c.stride(), c.shape[-1]
    return {"tensors": (kn, vn, pos, c, sn), "cos_strides": cos_strides, "rope_dims": rope_dims,
            "strides": (*kn.stride(), *vn.stride(), *cos_strides)}


def attention_splits(sm_count: int, programs: int, sk: int, block_n: int, interpret: bool = False) -> int:
    """How many key chunks: enough for ~2 programs per SM when (batch × heads × query tiles)
    programs cannot fill the GPU, each chunk at least 4 key tiles. ``TURBOFX_ATTENTION_SPLITS``
    forces a number (tests use it to check that results do not depend on it)."""
    import os

    forced = os.environ.get("TURBOFX_ATTENTION_SPLITS")
    if forced:
        return max(1, min(int(forced), -(-sk // block_n)))
    if interpret or programs >= sm_count or sk < 8 * block_n:
        return 1
    return max(1, min(-(-2 * sm_count // programs), sk // (4 * block_n), 128))



family.register(AttentionFamily())
family.register(VarlenFamily())
