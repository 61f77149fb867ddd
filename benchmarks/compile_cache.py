"""Compile-cache benchmark: SmolLM2's first token in a cold process vs a second (warm) process.

    python -m benchmarks.compile_cache [--json out.json]

Two fresh processes run one after the other against an empty temporary cache directory; each
loads SmolLM2-135M, tokenizes "The capital of France is" and times
``turbofx.generate(model, ids, max_new_tokens=1)`` from the call to its return (model loading is
not timed). The first compiles (and fills the cache), the second should load the program.
Goal: warm >= 10x faster than cold. The breakdown splits each time into getting the program ready
(generate's compile_seconds: capture + passes + codegen, or the cache lookup) and the first
token's own run (prefill_seconds).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

_CHILD = r"""
import json, time
import turbofx, torch
from turbofx.compiler.models import load_smollm2
model, tok = load_smollm2()
ids = tok("The capital of France is", return_tensors="pt").input_ids
t0 = time.perf_counter()
out = turbofx.generate(model, ids, max_new_tokens=1)
total = time.perf_counter() - t0
rep = out.reports["prefill"]
print(json.dumps({"seconds": total, "compile_s": out.compile_seconds, "prefill_s": out.prefill_seconds,
                  "cache": {k: str(r.cache) for k, r in out.reports.items()},
                  "cache_s": rep.cache.seconds if rep.cache else None,
                  "token": out.new_tokens.tolist()}))
"""


def _run(cache_dir: str) -> dict:
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, TURBOFX_CACHE_DIR=cache_dir, TURBOFX_COMPILE_CACHE="1",
               PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-c", _CHILD], env=env, cwd=root, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"child failed:\n{p.stderr[-3000:]}")
    row = json.loads(p.stdout.strip().splitlines()[-1])
    row["warnings"] = [line for line in p.stderr.splitlines() if "compile cache" in line][-5:]
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="turbofx-bench-cache-") as d:
        cold = _run(d)
        warm = _run(d)
    ratio = cold["seconds"] / warm["seconds"]
    print("| run | generate s | program ready s | first token run s | cache |\n|---|---:|---:|---:|---|")
    for name, r in (("cold", cold), ("warm", warm)):
        status = r["cache"]["prefill"].split(",")[0].removeprefix("compile cache: ")
        print(f"| {name} | {r['seconds']:.2f} | {r['compile_s']:.2f} | {r['prefill_s']:.2f} | {status} |")
    for name, r in (("cold", cold), ("warm", warm)):
        print(f"{name}: " + "; ".join(f"{k}: {v}" for k, v in r["cache"].items()) + "".join(
            f"\n  {w}" for w in r["warnings"]))
    print(f"\ncold {cold['seconds']:.2f} s, warm {warm['seconds']:.2f} s, ratio {ratio:.1f}x; same token: "
          f"{cold['token'] == warm['token']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"cold": cold, "warm": warm, "ratio": ratio}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
