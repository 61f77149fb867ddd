"""The roofline profile's arithmetic on hand-countable programs, and the decode-structure benchmark."""
from __future__ import annotations

import json

import pytest
import torch

import turbofx
from turbofx.compiler import roofline


def _compile(m, args):
    return turbofx.compile(m, args, target="cpu-interpret", cudagraphs=False)


def test_linear_bytes_and_flops_by_hand():
    m, k, n = 4, 16, 8
    lin = torch.nn.Linear(k, n)
    x = torch.randn(m, k)
    cost = roofline.profile(_compile(lin, (x,)), x)
    weight, bias, inp, out = n * k * 4, n * 4, m * k * 4, m * n * 4
    assert cost.counts() == {"gemm": 1}  # a GEMM-family kernel
    assert cost.totals.bytes_read == weight + bias + inp
    assert cost.totals.bytes_written == out
    assert cost.totals.flops == 2 * m * n * k
    assert cost.totals.launches == 1
    assert cost.ideal_bytes == weight + bias  # the parameters, read once; activations negligible
    assert cost.ratio == pytest.approx((weight + bias + inp + out) / (weight + bias))


def test_predict_is_the_roofline_sum():
    lin = torch.nn.Linear(16, 8, bias=False)
    x = torch.randn(4, 16)
    cost = roofline.profile(_compile(lin, (x,)), x)
    gpu = roofline.GpuSpec("test", hbm_bytes_per_s=1e3, matmul_flops_per_s=1e12, per_launch_s=1.0)
    t = cost.totals
    assert roofline.predict(cost, gpu) == pytest.approx(t.bytes / 1e3 + 1.0)  # memory bound + one launch
    assert set(roofline.GPUS) == {"H100", "H200", "B200", "MI300X"}
    assert "model" in cost.summary()
    with pytest.raises(turbofx.TurbofxError, match="unknown GPU"):
        roofline.predict(cost, "H1OO")


class _Pointwise(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.randn(1, 32))

    def forward(self, x):
        return torch.relu(x * self.scale)  # the [1, 32] buffer is broadcast over the rows


def test_pointwise_broadcast_is_read_once():
    x = torch.randn(8, 32)
    cost = roofline.profile(_compile(_Pointwise(), (x,)), x)
    work = [s for s in cost.steps if s.kind != "alias"]
    assert [s.kind for s in work] == ["pointwise"]
    assert work[0].bytes_read == 8 * 32 * 4 + 32 * 4  # x, and the broadcast buffer once
    assert work[0].bytes_written == 8 * 32 * 4
    assert cost.ideal_bytes == 32 * 4


def test_profile_refuses_wrong_inputs_and_foreign_modules():
    lin = torch.nn.Linear(16, 8)
    c = _compile(lin, (torch.randn(4, 16),))
    with pytest.raises(turbofx.InputMismatchError):
        roofline.profile(c, torch.randn(4, 15))
    with pytest.raises(turbofx.TurbofxError, match="turbofx.compile"):
        roofline.profile(lin, torch.randn(4, 16))
    assert roofline.measure_steps(c, torch.randn(4, 16)) is None or torch.cuda.is_available()


def test_decode_structure_benchmark_quick(tmp_path):
    from benchmarks import decode_structure

    path = tmp_path / "ds.json"
    rows = decode_structure.main(["--quick", "--json", str(path)])
    (r,) = rows
    # a Llama decoder layer is 5 steps: QKV (+ its RMSNorm) | attention (+ RoPE + cache write) | O + residual |
    # RMSNorm + gate/up + SwiGLU | down + residual; no matmul is left to ATen
    assert r.extern_matmuls_per_layer == 0 and r.steps_per_layer["attention"] == 1
    assert sum(r.steps_per_layer.values()) == 5 and r.steps_per_layer["gemm"] == 4, r.steps_per_layer
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**decode_structure.TINY))
    weights = sum(p.numel() for p in model.parameters()) * 2  # bf16, tied embedding counted once
    cfg = decode_structure.TINY
    kv = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * 64 * cfg["head_dim"] * 2  # 64 slots
    assert r.ideal_bytes == pytest.approx(weights + kv, rel=1e-3)  # (+ tiny cache-length counters)
    assert r.ratio >= 1.0
    assert set(r.predicted_ms) == set(roofline.GPUS) and all(ms > 0 for ms in r.predicted_ms.values())
    saved = json.loads(path.read_text())
    assert saved["rows"][0]["steps_total"] == r.steps_total
