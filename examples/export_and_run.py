"""Door 3: turbofx.export, then turbofx.load and run in a fresh process (no model code there).

    python examples/export_and_run.py [OUTPUT_DIR]

The artifact directory holds the program, the kernel sources, the weights and a checksummed
manifest; loading it needs neither the model's class nor a recompile.
"""
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import turbofx

RUN_IN_FRESH_PROCESS = """
import sys, torch, turbofx
d = sys.argv[1]
compiled = turbofx.load(d + "/artifact")
x, expected = torch.load(d + "/input.pt"), torch.load(d + "/expected.pt")
got = compiled(x)
print(f"loaded: {turbofx.explain(compiled).target}")
print(f"fresh process matches eager: {torch.allclose(got, expected, atol=1e-4, rtol=1e-4)}")
"""


def main() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.LayerNorm(64),
                                torch.nn.Linear(64, 16)).eval()
    x = torch.randn(4, 32)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(sys.argv[1] if len(sys.argv) > 1 else tmp)
        path = turbofx.export(model, (x,), output_dir=d / "artifact")
        print(f"exported to {path}: {sorted(p.name for p in Path(path).iterdir())}")
        with torch.no_grad():
            torch.save(x, d / "input.pt")
            torch.save(model(x), d / "expected.pt")
        done = subprocess.run([sys.executable, "-c", RUN_IN_FRESH_PROCESS, str(d)], capture_output=True, text=True)
        print(done.stdout.strip())
        if done.returncode:
            print(done.stderr[-3000:], file=sys.stderr)
    raise SystemExit(0 if done.returncode == 0 and "matches eager: True" in done.stdout else 1)


if __name__ == "__main__":
    main()
