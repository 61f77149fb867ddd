"""Long differential fuzz run: random small graphs (tests/fuzzgen.py) compiled with turbofx and
compared with eager. Prints counts by outcome and writes every bug (crash / mismatch) with its
case description to a JSON lines file.

    PYTHONPATH=. python scripts/fuzz.py --graphs 5000 --seed 0 --out /tmp/fuzz.jsonl
"""
from __future__ import annotations

import argparse
import collections
import json
import random
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.fuzzgen import gen_case, run_case  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--graphs", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="fuzz_failures.jsonl")
    ap.add_argument("--max-seconds", type=float, default=float("inf"))
    a = ap.parse_args()
    warnings.filterwarnings("ignore")
    counts: collections.Counter = collections.Counter()
    t0 = time.time()
    with open(a.out, "a") as f:
        for k in range(a.graphs):
            if time.time() - t0 > a.max_seconds:
                break
            seed = a.seed + k
            case = gen_case(random.Random(seed))
            o = run_case(case)
            counts[o.status] += 1
            if o.is_bug or o.status == "refused":
                f.write(json.dumps({"seed": seed, "status": o.status, "case": case.describe(),
                                    "detail": o.detail[:4000]}) + "\n")
                f.flush()
            if (k + 1) % 50 == 0:
                print(f"{k + 1} graphs {time.time() - t0:.0f}s {dict(counts)}", flush=True)
    print(f"done: {sum(counts.values())} graphs in {time.time() - t0:.0f}s: {dict(counts)}", flush=True)


if __name__ == "__main__":
    main()
