"""Door 2: turbofx.compile + turbofx.explain (what was fused, what runs as ATen, and why).

    python examples/compile_and_explain.py

turbofx.compile captures with torch.export and returns an nn.Module with the same call
signature; explain() is the report of what the compiler did.
"""
import torch
import torch.nn.functional as F

import turbofx


class Attention(torch.nn.Module):
    """Self-attention with a softmax written out by hand: turbofx recognises it as attention."""

    def __init__(self, dim: int = 64, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.out = torch.nn.Linear(dim, dim)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-1, -2)) / (d // self.heads) ** 0.5
        y = F.softmax(scores, dim=-1) @ v
        return self.out(F.gelu(y.transpose(1, 2).reshape(b, s, d)))


def main() -> None:
    torch.manual_seed(0)
    model = Attention().eval()
    x = torch.randn(2, 16, 64)
    compiled = turbofx.compile(model, (x,))
    report = turbofx.explain(compiled)
    print(report)
    kinds = sorted({k.kind for k in report.kernels})
    print(f"generated kernel kinds: {kinds}")
    with torch.no_grad():
        expected, got = model(x), compiled(x)
    ok = torch.allclose(got, expected, atol=1e-4, rtol=1e-4) and "attention" in kinds
    print(f"max abs diff: {(got - expected).abs().max().item():.2e}")
    print(f"matches eager: {ok}")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
