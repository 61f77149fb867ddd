"""GPU checks (skipped without a GPU): real Triton compilation and launches, bf16 models."""
from __future__ import annotations

import pytest
import torch

import turbofx
from turbofx.compiler.models import example_inputs, make_tiny_model

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_bf16_model_equals_eager_on_gpu(name):
    model = make_tiny_model(name, dtype=torch.bfloat16).cuda()
    args, kwargs = example_inputs(name, batch=2, seq=16)
    args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)
    with torch.no_grad():
        ref = model(*args, **kwargs).logits
        ref32 = model.float()(*args, **kwargs).logits
        model.to(torch.bfloat16)
        cm = turbofx.compile(model, args, kwargs)
        out = cm(*args, **kwargs).logits
    report = turbofx.explain(cm)
    assert report.target.startswith(("cuda", "hip"))
    assert {"rmsnorm", "activation"} <= {k.label for k in report.generated}
    # kernels compute in fp32 internally: no further from fp32 than eager bf16 is (plus slack)
    assert (out.float() - ref32).abs().max() <= 2 * (ref.float() - ref32).abs().max() + 1e-2
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)


def test_softmax_kernel_on_gpu():
    class M(torch.nn.Module):
        def forward(self, x):
            return torch.softmax(x * 0.5, dim=-1)

    x = torch.randn(64, 1000, device="cuda", dtype=torch.float16)
    cm = turbofx.compile(M(), (x,))
    torch.testing.assert_close(cm(x), M()(x), rtol=2e-3, atol=2e-3)
    assert any(k.label == "softmax" for k in turbofx.explain(cm).generated)


def test_dynamic_seq_on_gpu():
    model = make_tiny_model("llama").cuda()
    args, kwargs = example_inputs("llama", batch=1, seq=8)
    ids = args[0].cuda()
    with torch.no_grad():
        cm = turbofx.compile(model, (ids,), kwargs, dynamic=True)
        for n in (5, 8, 13):
            x = torch.randint(0, 100, (1, n), device="cuda")
            torch.testing.assert_close(cm(x, **kwargs).logits, model(x, **kwargs).logits, rtol=1e-3, atol=1e-3)
