"""Door 1: turbofx as a torch.compile backend.

    python examples/torch_compile_backend.py

Dynamo captures the model, AOTAutograd lowers it to ATen, turbofx compiles that graph into
Triton kernels (on a machine without a GPU they run in Triton's interpreter: slow, but the same
kernels). ``import turbofx`` registers the backend when the package is not pip-installed.
"""
import torch

import turbofx  # noqa: F401  (registers backend="turbofx")


class Block(torch.nn.Module):
    """RMSNorm -> MLP with a SwiGLU gate -> residual: a transformer block's feed-forward half."""

    def __init__(self, dim: int = 64, hidden: int = 128):
        super().__init__()
        self.norm = torch.nn.RMSNorm(dim)
        self.gate, self.up = torch.nn.Linear(dim, hidden), torch.nn.Linear(dim, hidden)
        self.down = torch.nn.Linear(hidden, dim)

    def forward(self, x):
        h = self.norm(x)
        return x + self.down(torch.nn.functional.silu(self.gate(h)) * self.up(h))


def main() -> None:
    torch.manual_seed(0)
    model = Block().eval()
    x = torch.randn(2, 8, 64)
    compiled = torch.compile(model, backend="turbofx")
    with torch.no_grad():
        expected, got = model(x), compiled(x)
    report = turbofx.explain(compiled)
    print(report)
    ok = torch.allclose(got, expected, atol=1e-4, rtol=1e-4)
    print(f"max abs diff: {(got - expected).abs().max().item():.2e}")
    print(f"matches eager: {ok}")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
