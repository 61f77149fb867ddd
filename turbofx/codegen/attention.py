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

from turbofx.codegen.target import Target

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
