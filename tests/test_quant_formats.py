"""turbofx.quant: quantizers vs the fp64 reference, configs, and the raw GGUF reader."""
from __future__ import annotations

import sys

import pytest
import torch

from turbofx.errors import QuantizationError
from turbofx.quant import (Float8Dynamic, Float8WeightOnly, GGUFNative, Int4WeightOnly, Int8Dynamic, Int8WeightOnly,
                           QuantizedWeight, cat_rows, config_from_json, default_filter, dequantize, parse,
                           quantize_activations, quantize_fp8, quantize_int4, quantize_int8)
from turbofx.quant.weights import pack_uint4, unpack_uint4

QUANTIZERS = {
    "int8": quantize_int8,
    "int4-g32": lambda w: quantize_int4(w, 32),
    "int4-g16-rtn": lambda w: quantize_int4(w, 16, search=False),
    "fp8": quantize_fp8,
    "fp8-fnuz": lambda w: quantize_fp8(w, "fp8_e4m3fnuz"),
}


def _weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * 0.05


def _per_element_scale(qw: QuantizedWeight) -> torch.Tensor:
    n, k = qw.shape
    s = qw.scale.double()
    return s[:, None].expand(n, k) if qw.fmt.group_size == 0 else s.repeat_interleave(qw.fmt.group_size, 1)[:, :k]


def test_int8_error_at_most_half_a_step():
    w = _weight(33, 70)
    qw = quantize_int8(w)
    assert qw.q.dtype == torch.int8 and qw.scale.dtype == torch.float32 and qw.scale.shape == (33,)
    assert qw.fmt.group_size == 0 and qw.fmt.act is None and qw.min is None
    assert int(qw.q.abs().max()) <= 127
    err = (dequantize(qw) - w.double()).abs()
    assert bool((err <= _per_element_scale(qw) * (0.5 + 1e-6)).all())
    assert torch.allclose(qw.scale.double(), w.double().abs().amax(1) / 127, rtol=1e-6)


@pytest.mark.parametrize("k,group", [(100, 32), (37, 16), (64, 64), (5, 128)])
def test_int4_rtn_error_at_most_half_a_step_ragged_and_odd_k(k, group):
    w = _weight(9, k, seed=k)
    qw = quantize_int4(w, group, search=False)
    assert qw.q.dtype == torch.uint8 and qw.q.shape == (9, (k + 1) // 2)
    assert qw.scale.shape == qw.min.shape == (9, -(-k // group)) and qw.scale.dtype == torch.float32
    assert qw.fmt.storage == "uint4" and qw.fmt.has_min and qw.fmt.zero == 0
    values = unpack_uint4(qw.q, k)
    assert int(values.max()) <= 15
    if k % 2:  # the pad nibble of an odd K is zero
        assert int((qw.q[:, -1] >> 4).max()) == 0
    err = (dequantize(qw) - w.double()).abs()
    assert bool((err <= _per_element_scale(qw) * (0.5 + 1e-5)).all())


@pytest.mark.parametrize("scheme", sorted(QUANTIZERS))
def test_empty_weights(scheme):
    for shape in ((0, 8), (3, 0)):
        qw = QUANTIZERS[scheme](torch.zeros(shape))
        assert dequantize(qw).shape == shape


def test_pack_unpack_uint4_order():
    vals = torch.tensor([[1, 2, 3, 4, 5]])
    packed = pack_uint4(vals)
    assert packed.tolist() == [[1 | 2 << 4, 3 | 4 << 4, 5]]  # k = 2j low nibble, 2j + 1 high
    assert unpack_uint4(packed, 5).tolist() == vals.tolist()


@pytest.mark.parametrize("storage,largest,sub_step", [("fp8_e4m3", 448.0, 2.0 ** -9), ("fp8_e4m3fnuz", 240.0, 2.0 ** -10)])
def test_fp8_relative_error(storage, largest, sub_step):
    w = _weight(17, 48)
    qw = quantize_fp8(w, storage)
    assert qw.q.dtype == qw.fmt.dtype and qw.fmt.storage == storage
    assert torch.allclose(qw.scale.double(), w.double().abs().amax(1) / largest, rtol=1e-6)
    err = (dequantize(qw) - w.double()).abs()
    # 3 mantissa bits: half an ulp is 2^-4 relative; below the normal range, half a subnormal step
    bound = w.double().abs() * 2.0 ** -4 + _per_element_scale(qw) * sub_step / 2
    assert bool((err <= bound * (1 + 1e-6)).all())
    assert bool(torch.isfinite(dequantize(qw)).all())


@pytest.mark.parametrize("scheme", sorted(QUANTIZERS))
def test_zero_rows_groups_and_constant_groups_are_exact(scheme):
    w = _weight(6, 40)
    w[1] = 0.0  # an all-zero row
    w[3, :16] = 0.0  # an all-zero group (int4 g16 / the first half of g32)
    w[4, 16:32] = 0.25  # a constant group
    qw = QUANTIZERS[scheme](w)
    for t in qw.tensors().values():
        if t.dtype.is_floating_point and t.dtype.itemsize >= 2:
            assert bool(torch.isfinite(t).all())
    deq = dequantize(qw)
    assert bool((deq[1] == 0).all())
    if qw.fmt.group_size == 16:
        assert bool((deq[3, :16] == 0).all()) and bool((deq[4, 16:32] == 0.25).all())


@pytest.mark.parametrize("scheme", sorted(QUANTIZERS))
def test_bad_weights_are_refused(scheme):
    fn = QUANTIZERS[scheme]
    w = _weight(4, 32)
    w[2, 5] = float("nan")
    with pytest.raises(QuantizationError, match="NaN/inf"):
        fn(w)
    w[2, 5] = float("inf")
    with pytest.raises(QuantizationError, match="NaN/inf"):
        fn(w)
    with pytest.raises(QuantizationError, match="2-D"):
        fn(torch.ones(2, 3, 4))
    with pytest.raises(QuantizationError, match="float"):
        fn(torch.ones(4, 32, dtype=torch.int32))


def test_half_precision_weights_quantize():
    w = _weight(8, 64).to(torch.bfloat16)
    for fn in QUANTIZERS.values():
        qw = fn(w)
        assert (dequantize(qw) - w.double()).abs().max() < 0.02


def _heavy_tailed(n: int, k: int) -> torch.Tensor:
    torch.manual_seed(3)
    return torch.distributions.StudentT(torch.tensor(2.0)).sample((n, k)) * 0.02


@pytest.mark.parametrize("kind", ["normal", "heavy"])
def test_int4_search_never_worse_than_rtn(kind):
    w = _weight(64, 300, seed=1) if kind == "normal" else _heavy_tailed(64, 300)  # K ragged for g128
    for group in (32, 128):
        rtn = quantize_int4(w, group, search=False)
        found = quantize_int4(w, group, search=True)
        e_rtn = (dequantize(rtn) - w.double()) ** 2
        e_found = (dequantize(found) - w.double()) ** 2
        # per group too: the search keeps round-to-nearest wherever it does not beat it
        n_groups = -(-300 // group)
        pad = n_groups * group - 300
        per_rtn = torch.nn.functional.pad(e_rtn, (0, pad)).reshape(64, n_groups, group).sum(-1)
        per_found = torch.nn.functional.pad(e_found, (0, pad)).reshape(64, n_groups, group).sum(-1)
        assert bool((per_found <= per_rtn).all())
        assert e_found.mean() < 0.95 * e_rtn.mean()  # and it does find something on these


def test_int4_group_size_validated():
    for bad in (0, 1, 3, -2, 2.0, True, "64"):
        with pytest.raises(QuantizationError, match="group_size"):
            quantize_int4(_weight(2, 8), bad)
        with pytest.raises(QuantizationError, match="group_size"):
            Int4WeightOnly(group_size=bad)


def test_activation_quantization_reference_int8_rounds_half_away():
    x = torch.tensor([[127.0, 0.5, -0.5, 1.5, -2.5, 0.49999997, -126.5, 2.4999998],
                      [0.0] * 8])
    qx, scale = quantize_activations(x, "int8")
    assert scale.tolist() == [1.0, 1.0]  # 127 / 127, and the all-zero row's scale is 1
    assert qx.dtype == torch.int8
    assert qx[0].tolist() == [127, 1, -1, 2, -3, 0, -127, 2]
    assert qx[1].tolist() == [0] * 8
    # the scale is a division (not a reciprocal multiply) and x / scale rounds from fp32
    y = torch.randn(5, 33) * 3
    qy, sy = quantize_activations(y.to(torch.float16), "int8")
    yf = y.to(torch.float16).float()
    assert torch.equal(sy, yf.abs().amax(1) / 127.0)
    v = (yf / sy[:, None]).double()  # the fp32 quotient; + 0.5 is exact in fp64
    assert torch.equal(qy.double(), (torch.sign(v) * torch.floor(v.abs() + 0.5)).clamp(-127, 127))


@pytest.mark.parametrize("act,dtype,largest", [("fp8_e4m3", torch.float8_e4m3fn, 448.0),
                                               ("fp8_e4m3fnuz", torch.float8_e4m3fnuz, 240.0)])
def test_activation_quantization_reference_fp8(act, dtype, largest):
    x = torch.randn(4, 20)
    x[2] = 0
    qx, scale = quantize_activations(x, act)
    assert qx.dtype == dtype and scale[2] == 1.0
    expect_scale = x.abs().amax(1) / largest
    assert torch.equal(scale[[0, 1, 3]], expect_scale[[0, 1, 3]])
    assert torch.equal(qx.float(), (x / scale[:, None]).to(dtype).float())
    with pytest.raises(QuantizationError):
        quantize_activations(x, "int4")
    with pytest.raises(QuantizationError, match="NaN"):
        quantize_activations(torch.tensor([[float("nan"), 1.0]]), act)


@pytest.mark.parametrize("scheme", sorted(QUANTIZERS))
def test_select_rows_and_cat_rows(scheme):
    fn = QUANTIZERS[scheme]
    a, b = fn(_weight(5, 40, 1)), fn(_weight(3, 40, 2))
    joined = cat_rows([a, b])
    assert joined.shape == (8, 40)
    assert torch.equal(dequantize(joined), torch.cat([dequantize(a), dequantize(b)]))
    perm = [7, 0, 3, 3, 5]
    picked = joined.select_rows(perm)
    assert picked.shape == (5, 40) and torch.equal(dequantize(picked), dequantize(joined)[perm])
    assert joined.nbytes == a.nbytes + b.nbytes == sum(t.numel() * t.element_size() for t in joined.tensors().values())
    assert set(joined.tensors()) == ({"q", "scale", "min"} if joined.min is not None else {"q", "scale"})
    moved = joined.to("cpu")
    assert torch.equal(dequantize(moved), dequantize(joined))
    with pytest.raises(QuantizationError):
        joined.select_rows([8])
    with pytest.raises(QuantizationError, match="K must match"):
        cat_rows([a, fn(_weight(2, 42))])
    with pytest.raises(QuantizationError):
        cat_rows([])


def test_cat_rows_refuses_mixed_formats():
    with pytest.raises(QuantizationError, match="fmt"):
        cat_rows([quantize_int8(_weight(2, 32)), quantize_fp8(_weight(2, 32))])


def test_quantized_weight_checks_its_shapes():
    qw = quantize_int4(_weight(4, 10), 4)
    with pytest.raises(QuantizationError, match="q is"):
        QuantizedWeight(qw.fmt, qw.q[:, :2], qw.scale, qw.min, qw.shape)
    with pytest.raises(QuantizationError, match="min"):
        QuantizedWeight(qw.fmt, qw.q, qw.scale, None, qw.shape)
    with pytest.raises(QuantizationError, match="scale"):
        QuantizedWeight(qw.fmt, qw.q, qw.scale[:, :1], qw.min, qw.shape)


# -- configs -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,cls,name", [
    ("int8", Int8WeightOnly, "int8"), ("INT4", Int4WeightOnly, "int4-g128"), ("int4-g64", Int4WeightOnly, "int4-g64"),
    ("int4-g32-rtn", Int4WeightOnly, "int4-g32"), ("int4-search", Int4WeightOnly, "int4-g128-search"),
    ("W8A8", Int8Dynamic, "w8a8"), ("fp8", Float8WeightOnly, "fp8"),
    ("fp8-dynamic", Float8Dynamic, "fp8-dynamic"), (" gguf ", GGUFNative, "gguf"),
    ("fp8-fnuz", Float8WeightOnly, "fp8-fnuz"), ("fp8-g32", Float8WeightOnly, "fp8-g32")])
def test_parse_accepts(text, cls, name):
    config = parse(text)
    assert type(config) is cls and config.name == name and config.filter is None
    assert parse(config) is config


def test_parse_none_and_refusals():
    assert parse(None) is None
    for bad in ("int3", "int4-g", "int4-g63", "int4-g0", "q4_k", "fp16", "int8-g32", 8):
        with pytest.raises(QuantizationError) as info:
            parse(bad)
        if not str(bad).startswith("int4-g"):
            assert "int8" in str(info.value) and "w8a8" in str(info.value)  # lists the choices


def test_config_formats_and_quantize():
    w = _weight(4, 64)
    assert Int8WeightOnly().fmt.storage == "int8" and Int8Dynamic().fmt.act == "int8"
    assert Float8Dynamic().fmt.act == "fp8_e4m3" and Float8WeightOnly().fmt.act is None
    assert Int4WeightOnly(group_size=32).fmt.group_size == 32
    for config in (Int8WeightOnly(), Int4WeightOnly(group_size=32), Int8Dynamic(), Float8WeightOnly(),
                   Float8Dynamic()):
        qw = config.quantize(w)
        assert qw.fmt == config.fmt
    with pytest.raises(QuantizationError, match="GGUF"):
        GGUFNative().quantize(w)
    with pytest.raises(QuantizationError):
        Float8WeightOnly(storage="fp8_e5m2")
    with pytest.raises(QuantizationError, match="filter"):
        Int8WeightOnly(filter="q_proj")


def test_default_filter():
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.3.mlp.down_proj", "transformer.h.0.attn.c_attn"):
        assert default_filter(name)
    for name in ("lm_head", "model.lm_head", "embed_out", "model.output", "model.embed_tokens", "wte_embed"):
        assert not default_filter(name)
    config = Int8WeightOnly(filter=lambda n: n.endswith("q_proj"))
    assert config.applies_to("a.q_proj") and not config.applies_to("a.k_proj")
    assert Int8WeightOnly().applies_to("a.k_proj") and not Int8WeightOnly().applies_to("lm_head")


def test_to_json_round_trip_and_custom_filter():
    for config in (Int8WeightOnly(), Int4WeightOnly(group_size=64, search=False), Int8Dynamic(), Float8WeightOnly(),
                   Float8Dynamic(storage="fp8_e4m3fnuz"), GGUFNative()):
        record = config.to_json()
        assert record["version"] == 1 and record["filter"] is None
        assert config_from_json(record) == config
    keep = lambda n: "mlp" in n  # noqa: E731
    record = Int4WeightOnly(filter=keep).to_json()
    assert record["filter"] == "custom"
    with pytest.raises(QuantizationError, match="custom filter"):
        config_from_json(record)
    assert config_from_json(record, filter=keep) == Int4WeightOnly(filter=keep)
    for bad in ({**Int8WeightOnly().to_json(), "version": 99}, {"version": 1, "scheme": "int2"},
                {**Int8WeightOnly().to_json(), "group_size": 4}, "int8"):
        with pytest.raises(QuantizationError):
            config_from_json(bad)


# -- GGUF --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_1"])
def test_gguf_blocks_relaid_bit_exact(kind):
    gguf = pytest.importorskip("gguf")
    from turbofx.quant.gguf import _blocks_to_weight

    qtype = getattr(gguf.GGMLQuantizationType, kind)
    x = (torch.randn(6, 96) * 0.1).numpy()
    blocks = gguf.quants.quantize(x, qtype)
    qw = _blocks_to_weight(kind, blocks, 6, 96)
    theirs = torch.from_numpy(gguf.quants.dequantize(blocks, qtype).copy())
    assert torch.equal(dequantize(qw, torch.float32), theirs)
    assert qw.nbytes == blocks.nbytes  # same bits, same size
    assert qw.fmt.group_size == 32 and qw.scale.dtype == torch.float16
    assert qw.fmt.zero == (8 if kind == "Q4_0" else 0) and qw.fmt.has_min == (kind == "Q4_1")


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("gguf")
    from turbofx.compiler.models import find_smollm2_gguf, load_smollm2
    from turbofx.errors import ModelLoadError

    try:
        path = find_smollm2_gguf()
    except ModelLoadError as exc:
        pytest.skip(str(exc))
    model, _ = load_smollm2()
    return path, model


def test_gguf_smollm2_linear_weights_map_exactly(smollm2):
    from turbofx.quant.gguf import gguf_linear_weights

    path, model = smollm2
    weights, notes = gguf_linear_weights(path, model)
    linears = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert len(weights) == 210 and set(weights) <= linears and "lm_head.weight" not in weights
    params = dict(model.named_parameters())
    for name, qw in weights.items():
        assert qw.fmt.storage == "uint4" and qw.fmt.group_size == 32 and qw.fmt.has_min  # Q4_1
        assert torch.equal(dequantize(qw, torch.float32), params[name].detach())
    assert any("token_embd.weight (Q8_0)" in note and "lm_head" in note for note in notes)
    # the Q/K rows really are permuted (transformers undoes llama.cpp's RoPE layout)
    import gguf
    from turbofx.quant.gguf import _blocks_to_weight

    raw = next(t for t in gguf.GGUFReader(path).tensors if t.name == "blk.0.attn_q.weight")
    unpermuted = _blocks_to_weight("Q4_1", raw.data, 576, 576)
    q_proj = params["model.layers.0.self_attn.q_proj.weight"].detach()
    assert not torch.equal(dequantize(unpermuted, torch.float32), q_proj)

    # a model whose weights differ from the file's is caught, naming the tensor
    # (down_proj of layer 0: the file's first linear tensor, so the check fails fast)
    down = model.model.layers[0].mlp.down_proj.weight
    with torch.no_grad():
        old = down[0, 0].item()
        down[0, 0] += 0.01
    try:
        with pytest.raises(QuantizationError, match="blk.0.ffn_down.weight"):
            gguf_linear_weights(path, model)
    finally:
        with torch.no_grad():
            down[0, 0] = old


def test_gguf_corrupt_and_truncated_files(smollm2, tmp_path):
    from turbofx.quant.gguf import gguf_linear_weights

    path, model = smollm2
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file" * 100)
    truncated = tmp_path / "truncated.gguf"
    with open(path, "rb") as f:
        truncated.write_bytes(f.read(1 << 20))  # cut inside the metadata (the vocabulary)
    for bad in (garbage, truncated, tmp_path / "missing.gguf"):
        with pytest.raises(QuantizationError):
            gguf_linear_weights(bad, model)


def test_gguf_without_the_package(monkeypatch):
    from turbofx.quant import gguf as quant_gguf

    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` now raises ImportError
    with pytest.raises(QuantizationError, match="pip install gguf"):
        quant_gguf.gguf_linear_weights("x.gguf", torch.nn.Linear(2, 2))


def test_fp8_group_scales_bound_the_error_per_group():
    from turbofx.quant import quantize_fp8

    w = torch.randn(8, 70) * torch.logspace(-3, 1, 70)  # columns of very different sizes
    qw = quantize_fp8(w, group_size=32)
    assert qw.fmt.group_size == 32 and tuple(qw.scale.shape) == (8, 3)
    err = (dequantize(qw) - w.double()).abs()
    group_max = torch.nn.functional.pad(w.abs(), (0, 26)).reshape(8, 3, 32).amax(-1).repeat_interleave(32, 1)[:, :70]
    assert bool((err <= group_max.double() * 2 ** -4 + 1e-12).all())  # relative to each group's own range
    per_row = quantize_fp8(w)
    assert (dequantize(per_row) - w.double()).pow(2).sum() > err.pow(2).sum()


def test_joined_native_blocks_are_held_once():
    # the layout pass joins q/k/v weights; their attached blocks are joined too and each source's
    # entry becomes a view of the joined blocks (no second copy stays alive)
    from turbofx.quant import quantize_int4
    from turbofx.quant.native import attach, join_native, native_of

    ws = [torch.randn(8, 64), torch.randn(4, 64)]
    for w in ws:
        attach(w, quantize_int4(w, 32))
    before = [dequantize(native_of(w)) for w in ws]
    joined = torch.cat(ws)
    join_native(ws, joined)
    big = native_of(joined)
    assert big.shape == (12, 64) and torch.equal(dequantize(big), torch.cat(before))
    for w, ref in zip(ws, before):
        part = native_of(w)
        assert part.q.untyped_storage().data_ptr() == big.q.untyped_storage().data_ptr()
        assert torch.equal(dequantize(part), ref)
