"""Shape guards, size 0, in-place updates of inputs, inference-only autograd, lifted constants."""
from __future__ import annotations

import copy

import pytest
import torch

import turbofx
from turbofx.errors import InputMismatchError, TurbofxError


class Branch(torch.nn.Module):
    def forward(self, x):
        return x * 2 if x.shape[1] > 4 else x * 3


class Add(torch.nn.Module):
    def forward(self, a, b):
        return a + b


class SoftmaxSum(torch.nn.Module):
    def forward(self, x):
        return torch.softmax(x, -1) + x.sum(-1, keepdim=True)


class Inplace(torch.nn.Module):
    def forward(self, x):
        x.add_(1)
        return x * 2


class Alias(torch.nn.Module):
    def forward(self, a, b):
        a.add_(1)
        return a + b


class Const(torch.nn.Module):
    def forward(self, x):
        return x + torch.tensor([1.0, 2.0])


def test_branch_on_size_is_guarded():
    cm = turbofx.compile(Branch(), (torch.randn(2, 8),), dynamic=True)
    x = torch.randn(2, 6)
    torch.testing.assert_close(cm(x), x * 2)
    with pytest.raises(InputMismatchError, match=r"x.shape\[1\] = 3 .*range \[5, inf\].*recompile"):
        cm(torch.randn(2, 3))


def test_inputs_sharing_a_dim_must_agree():
    cm = turbofx.compile(Add(), (torch.randn(2, 6), torch.randn(2, 6)), dynamic=True)
    a, b = torch.randn(3, 7), torch.randn(3, 7)
    torch.testing.assert_close(cm(a, b), a + b)
    with pytest.raises(InputMismatchError, match=r"b.shape\[1\] is 5.*a.shape\[1\]"):
        cm(torch.randn(2, 6), torch.randn(2, 5))


def test_guards_survive_export_and_load(tmp_path):
    cm = turbofx.compile(Branch(), (torch.randn(2, 8),), dynamic=True)
    loaded = turbofx.load(turbofx.compiler.artifact.save(cm, tmp_path / "a"))
    x = torch.randn(3, 9)
    torch.testing.assert_close(loaded(x), x * 2)
    with pytest.raises(InputMismatchError, match="range"):
        loaded(torch.randn(2, 3))


def test_size_zero_dynamic_is_refused_clearly():
    cm = turbofx.compile(SoftmaxSum(), (torch.randn(3, 4),), dynamic=True)
    with pytest.raises(InputMismatchError, match="specialises sizes 0 and 1"):
        cm(torch.randn(0, 4))


@pytest.mark.parametrize("shape", [(3, 0), (0, 5)])
def test_size_zero_static_matches_eager(shape):
    x = torch.randn(*shape)
    cm = turbofx.compile(SoftmaxSum(), (x,))
    out = cm(x)
    ref = SoftmaxSum()(x)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref)


def test_inplace_update_of_non_contiguous_input_reaches_caller():
    cm = turbofx.compile(Inplace(), (torch.zeros(3, 2),))
    base = torch.zeros(2, 3)
    out = cm(base.t())
    torch.testing.assert_close(out, torch.full((3, 2), 2.0))
    torch.testing.assert_close(base, torch.ones(2, 3))


def test_aliased_inputs_with_inplace_update_are_refused():
    cm = turbofx.compile(Alias(), (torch.zeros(3), torch.zeros(3)))
    x = torch.zeros(3)
    with pytest.raises(InputMismatchError, match="shares memory"):
        cm(x, x)
    torch.testing.assert_close(x, torch.zeros(3))  # refused before anything ran
    a, b = torch.zeros(3), torch.zeros(3)
    torch.testing.assert_close(cm(a, b), torch.ones(3))


def test_backward_through_turbofx_compile_is_refused():
    m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
    cm = turbofx.compile(m, (torch.randn(2, 4),))
    x = torch.randn(2, 4)
    out = cm(x)  # forward in grad mode still works
    torch.testing.assert_close(out, m(x), rtol=1e-4, atol=1e-4)
    with pytest.raises(TurbofxError, match="inference-only"):
        out.sum().backward()
    assert m[0].weight.grad is None  # never partial gradients
    with torch.no_grad():
        assert not cm(x).requires_grad


def test_torch_compile_lifts_tensor_constants():
    torch._dynamo.reset()
    opt = torch.compile(Const(), backend="turbofx")
    x = torch.randn(3, 2)
    with torch.no_grad():
        torch.testing.assert_close(opt(x), x + torch.tensor([1.0, 2.0]))
    torch._dynamo.reset()


def test_torch_compile_training_grads_match_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))
    ref = copy.deepcopy(model)
    x = torch.randn(3, 8)
    torch.compile(model, backend="turbofx")(x).pow(2).sum().backward()
    ref(x).pow(2).sum().backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-4)
    torch._dynamo.reset()


def test_torch_compile_trains_a_tiny_llama_with_eager_gradients():
    """A training call (inputs require grad) runs AOTAutograd's ATen graphs: gradients equal eager's,
    and explain says the graph was not compiled to turbofx kernels (they gave wrong gradients)."""
    from turbofx.compiler.models import example_inputs, make_tiny_model

    torch._dynamo.reset()
    model = make_tiny_model("llama")
    ref = copy.deepcopy(model)
    args, kw = example_inputs("llama", batch=1, seq=4)
    opt = torch.compile(model, backend="turbofx")
    opt(*args, **kw).logits.sum().backward()
    ref(*args, **kw).logits.sum().backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")
    assert "training graph" in str(turbofx.explain(opt))
    torch._dynamo.reset()
