"""Paged attention: the serving engine's packed step read through block tables, on the GPU alone.

``turbofx::paged_attention`` (runtime/ops.py: packed query rows, sequence s owning rows
query_start[s]:query_start[s+1] at key positions seq_lens[s]-n_s .. seq_lens[s]-1; key j of s at
page block_table[s, j // PS], slot j % PS) as one streaming online-softmax kernel.

Invariant: no host sync and a grid that depends only on tensor shapes, so a step is CUDA-graph
safe. The grid is (S, cdiv(T, QT), Hkv): program (s, t, hk) reads query_start[s], query_start[s+1]
and seq_lens[s] on the device and exits at once when its token tile t starts past the sequence's
n_s rows (most programs of a decode-heavy step do: an exit costs two loads). A program's BLOCK_M
rows are QT tokens × G query heads of KV head hk (token-major: row r is token r // G, head
hk·G + r % G), so each K/V tile is loaded once for the whole GQA group; decode (n_s = 1) fills a
tile with the group's heads instead of padding. KV tiles are BLOCK_N consecutive key positions,
each key's page looked up in the block table (any page size: a tile may span pages or a page
several tiles). Head dim, page size, group size and tokens per tile are constexprs (static in
the graph; a power-of-two page makes the page/slot split shifts). The key range is the causal band of the tile's rows (window: from the first row's
lowest visible key, on the tile grid); every tile is masked per row position (causal, window,
seq_len). Rows past query_start[S] and rows with no visible key come out as zeros (the output
is zero-filled first: one memset, graph safe). The online-softmax step is the attention family's
``_online_softmax_step`` (the source extends attention.SOURCE).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from turbofx.codegen import attention as _att
from turbofx.codegen import family
from turbofx.codegen import indexing as ix
from turbofx.runtime.exprs import _compile_expr, _eval, pow2 as _pow2

NAME = "tfx_paged_attention"
PAGED_OP = torch.ops.turbofx.paged_attention.default
MAX_HEAD_DIM = 256  # the attention family's tiles go up to 256 (fp32 / d > 128 take smaller ones)

SOURCE = _att.SOURCE + '''

@triton.jit
def tfx_paged_attention(Q, K, V, O, BT, QS, SL, sqt, sqh, sqd, skp, sks, skh, skd, svp, svs, svh, svd,
                        sot, soh, sod, sbs, sbw, scale, softcap, window, GROUPS: tl.constexpr,
                        QT: tl.constexpr, PS: tl.constexpr, D: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    tl.static_assert(BLOCK_M >= 16, "tl.dot needs at least 16 rows")
    tl.static_assert(BLOCK_N >= 16, "tl.dot needs at least 16 keys")
    tl.static_assert(BLOCK_D >= 16, "tl.dot needs at least 16 head dims")
    s = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    hk = tl.program_id(2).to(tl.int64)
    q_start = tl.load(QS + s)
    n = tl.load(QS + s + 1) - q_start
    if tile * QT >= n:  # past this sequence's rows (n = 0: an unused slot does nothing)
        return
    seq_len = tl.load(SL + s)
    rows = tl.arange(0, BLOCK_M)
    tok = tile * QT + rows // GROUPS  # the row's token within the sequence
    m_ok = (rows < QT * GROUPS) & (tok < n)
    h = hk * GROUPS + rows % GROUPS
    qpos = seq_len - n + tok  # its key position
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q_row = (q_start + tok).to(tl.int64)
    q = tl.load(Q + q_row[:, None] * sqt + h[:, None] * sqh + offs_d[None, :] * sqd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    p_first = tl.min(tl.where(m_ok, qpos, seq_len), 0)
    p_last = tl.max(tl.where(m_ok, qpos, -1), 0)
    hi = tl.minimum(seq_len, p_last + 1)
    lo = 0
    if WINDOW:
        lo = tl.maximum(0, p_first - window + 1) // BLOCK_N * BLOCK_N
    BT = BT + s * sbs
    K = K + hk * skh
    V = V + hk * svh
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < hi
        page = tl.load(BT + (offs_n // PS) * sbw, mask=n_ok, other=0).to(tl.int64)
        slot = (offs_n % PS).to(tl.int64)
        k = tl.load(K + (page * skp + slot * sks)[None, :] + offs_d[:, None] * skd,
                    mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        v = tl.load(V + (page * svp + slot * svs)[:, None] + offs_d[None, :] * svd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        if IEEE:  # fp32 inputs: full precision, not TF32
            sc = tl.dot(q, k, input_precision="ieee") * scale
        else:
            sc = tl.dot(q, k) * scale
        if SOFTCAP:
            sc = softcap * (2.0 / (1.0 + tl.exp(-2.0 * sc / softcap)) - 1.0)
        keep = m_ok[:, None] & n_ok[None, :] & (offs_n[None, :] <= qpos[:, None])
        if WINDOW:
            keep = keep & (offs_n[None, :] > qpos[:, None] - window)
        m_i, l_i, acc = _online_softmax_step(sc, keep, v, m_i, l_i, acc, True, UPCAST, IEEE)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(O + q_row[:, None] * sot + h[:, None] * soh + offs_d[None, :] * sod, out.to(O.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])
'''


def unsupported(q_val, k_val, v_val) -> str:
    """Why the kernel cannot run this node ("" when it can)."""
    if q_val.dim() != 3 or k_val.dim() != 4 or v_val.dim() != 4:
        return "paged attention with q not [T, H, D] or caches not [pages, page size, Hkv, D]"
    d, dk, dv = q_val.shape[-1], k_val.shape[-1], v_val.shape[-1]
    if not (isinstance(d, int) and isinstance(dk, int) and isinstance(dv, int)) or not d == dk == dv:
        return f"paged attention kernel needs one static head dim for q, K and V (got {d}, {dk}, {dv})"
    if d > MAX_HEAD_DIM:
        return f"paged attention kernel tiles head dims up to {MAX_HEAD_DIM} (got {d})"
    if not isinstance(k_val.shape[1], int):
        return "paged attention kernel needs a static page size (a constexpr: page offsets are shifts)"
    h, hkv = q_val.shape[1], k_val.shape[2]
    if not (isinstance(h, int) and isinstance(hkv, int)) or hkv == 0 or h % hkv:
        return f"paged attention kernel needs a static H that is a multiple of Hkv (got {h}, {hkv})"
    if not (q_val.dtype == k_val.dtype == v_val.dtype):
        return f"paged attention kernel needs one dtype for q, K and V (got {q_val.dtype}, {k_val.dtype}, {v_val.dtype})"
    return ""


def blocks(target, head_dim: int, elem_size: int) -> dict:
    """The attention family's tiles, with 32-key tiles on AMD (64 spill scalar registers on gfx942)
    and 16-key fp32 tiles on sm8x (32 spill there: the per-key page offsets take registers)."""
    b = _att.blocks(target, head_dim, elem_size)
    if target.backend == "hip":
        return dict(b, BLOCK_N=32)
    if not target.interpret and elem_size == 4 and target.arch.startswith("sm8"):
        return dict(b, BLOCK_N=16)
    return b


def tile_rows(block_m: int, groups: int, tokens: int, seqs: int) -> tuple[int, int]:
    """(BLOCK_M, QT): rows per program and the tokens they cover. From shapes only (graph safe):
    the mean tokens per sequence sizes the tile, so decode steps (one token each) get the
    smallest tile that holds the GQA group."""
    per_seq = max(1, -(-tokens // max(seqs, 1)))
    bm = min(max(block_m, _pow2(groups)), max(16, _pow2(groups * per_seq)))
    return bm, max(1, bm // groups)


class PagedAttentionFamily(family.Family):
    """``turbofx::paged_attention`` as one kernel launch (see the module docstring)."""

    step_types = ("paged_attention",)

    def claims(self, unit) -> bool:
        return isinstance(unit, fx.Node) and unit.target is PAGED_OP

    def lower(self, n: fx.Node, lc: family.LowerContext) -> dict:
        from turbofx.runtime.op_args import PagedAttentionArgs

        pa = PagedAttentionArgs.of(n)
        q_val, k_val, v_val = (a.meta["val"] for a in (pa.q, pa.k_cache, pa.v_cache))
        why = unsupported(q_val, k_val, v_val)
        if why:  # the extern call of the op's reference, with the reason in the report
            lc.refusals[n.name] = why
            return family.extern_family().lower(n, lc)
        lc.add_source(NAME, SOURCE)
        slot = lc.slot
        step = {
            "type": "paged_attention", "kernel": NAME, "q": slot[pa.q], "k_cache": slot[pa.k_cache],
            "v_cache": slot[pa.v_cache], "block_table": slot[pa.block_table], "query_start": slot[pa.query_start],
            "seq_lens": slot[pa.seq_lens], "out": slot[n], "scale": float(pa.scale), "window": int(pa.window),
            "softcap": float(pa.softcap),
            "shape": [ix.pyexpr(e) for e in ix.shape_of(n)], "stride": [ix.pyexpr(e) for e in ix.strides_of(n)],
            "blocks": blocks(lc.target, int(q_val.shape[-1]), q_val.element_size()),
            "node": n.name}
        lc.define(n, [pa.q, pa.k_cache, pa.v_cache, pa.block_table, pa.query_start, pa.seq_lens])
        extras = "".join(x for x, on in (("+window", pa.window > 0), ("+softcap", pa.softcap > 0)) if on)
        lc.records.append(family.KernelRecord(NAME, "attention", f"paged_attention{extras}", [n.name],
                                              "K/V read through the block table on the device (no host sync)"))
        return step

    def runner(self, s: dict, kernels: dict):
        return family.bind(_launcher(s, kernels[s["kernel"]]), s, self)

    def reads(self, s: dict) -> list[int]:
        return [s["q"], s["k_cache"], s["v_cache"], s["block_table"], s["query_start"], s["seq_lens"]]

    def writes(self, s: dict) -> list[int]:
        return [s["out"]]

    def cost(self, s: dict, values: list, env: dict, ledger):
        from turbofx.compiler.roofline import StepCost, _footprint, meta_output

        q, k, v = values[s["q"]], values[s["k_cache"]], values[s["v_cache"]]
        out = meta_output(s, env, q.dtype)
        values[s["out"]] = out
        t, h, d = q.shape
        keys = k.shape[0] * k.shape[1]  # the key ranges are data; every page as a bound
        reads = [q, k, v] + [values[s[x]] for x in ("block_table", "query_start", "seq_lens")]
        return StepCost(s["kernel"], "attention", ledger.reads(reads), _footprint(out), 4 * h * t * keys * d, 2)


def _launcher(s: dict, fn):
    """Grid (S, cdiv(T, QT), Hkv) from shapes; the output zero-filled first (padding rows)."""
    shape = [_compile_expr(e) for e in s["shape"]]
    stride = [_compile_expr(e) for e in s["stride"]]
    blocks = {k: v for k, v in s["blocks"].items() if k not in ("num_warps", "sm_count", "interpret")}
    num_warps = s["blocks"]["num_warps"]
    names = ("q", "k_cache", "v_cache", "block_table", "query_start", "seq_lens")
    slots = [s[x] for x in names]
    oi = s["out"]
    flags = dict(WINDOW=s["window"] > 0, SOFTCAP=s["softcap"] > 0)

    def run(values: list, env: dict) -> None:
        q, k, v, bt, qs, sl = (values[i] for i in slots)
        out = torch.empty_strided([_eval(c, env) for c in shape], [_eval(c, env) for c in stride],
                                  dtype=q.dtype, device=q.device)
        out.zero_()
        values[oi] = out
        t, h, d = q.shape
        seqs = bt.shape[0]
        if t == 0 or seqs == 0:
            return
        groups = h // k.shape[2]
        block_m, qt = tile_rows(blocks["BLOCK_M"], groups, t, seqs)
        fn[(seqs, -(-t // qt), k.shape[2])](
            q, k, v, out, bt, qs, sl, *q.stride(), *k.stride(), *v.stride(), *out.stride(), *bt.stride(),
            s["scale"], s["softcap"], s["window"], GROUPS=groups, QT=qt, PS=k.shape[1], D=d, num_warps=num_warps,
            **flags, **dict(blocks, BLOCK_M=block_m))

    return run


family.register(PagedAttentionFamily())
