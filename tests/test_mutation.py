"""Buffer mutation: functionalised by capture, applied in place by the runtime after each call."""
from __future__ import annotations

import torch

import turbofx


class RunningCache(torch.nn.Module):
    """A toy KV-cache: writes the new row at a position counter, bumps the counter, reads all."""

    def __init__(self, n: int = 6, d: int = 4):
        super().__init__()
        self.register_buffer("cache", torch.zeros(n, d))
        self.register_buffer("pos", torch.zeros((), dtype=torch.long))
        self.register_buffer("total", torch.zeros(d))

    def forward(self, x):
        self.cache.index_copy_(0, self.pos.view(1), x.view(1, -1))
        self.pos.add_(1)
        self.total.mul_(0.5).add_(x)
        return (self.cache * 2).sum(0) + torch.relu(self.total)


def test_mutated_buffers_match_eager_after_n_steps():
    eager, compiled_src = RunningCache(), RunningCache()
    xs = [torch.randn(4) for _ in range(5)]
    cm = turbofx.compile(compiled_src, (torch.zeros(4),))
    compiled_src.load_state_dict(eager.state_dict())  # the example call did not run the model
    for x in xs:
        ref = eager(x)
        out = cm(x)
        torch.testing.assert_close(out, ref)
    torch.testing.assert_close(compiled_src.cache, eager.cache)
    torch.testing.assert_close(compiled_src.total, eager.total)
    assert int(compiled_src.pos) == int(eager.pos) == 5


def test_mutated_buffers_through_torch_compile():
    """Dynamo/AOT put the write-back in the graph as copy_ nodes nothing reads: they must run."""
    torch._dynamo.reset()
    eager, compiled_src = RunningCache(), RunningCache()
    opt = torch.compile(compiled_src, backend="turbofx")
    with torch.no_grad():
        for _ in range(4):
            x = torch.randn(4)
            torch.testing.assert_close(opt(x), eager(x))
    torch.testing.assert_close(compiled_src.cache, eager.cache)
    torch.testing.assert_close(compiled_src.total, eager.total)
    assert int(compiled_src.pos) == 4
    torch._dynamo.reset()
