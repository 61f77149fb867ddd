"""Each script in examples/ (one per door into turbofx) runs as a user would run it, in a process of
its own, and prints the check it made itself ("matches eager: True") before exiting 0."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = {
    "torch_compile_backend.py": ["matches eager: True"],
    "compile_and_explain.py": ["generated kernel kinds:", "attention", "matches eager: True"],
    "export_and_run.py": ["exported to", "fresh process matches eager: True"],
    "generate.py": ["new tokens:", "matches eager: True"],
}


def test_every_example_is_tested():
    assert sorted(p.name for p in (ROOT / "examples").glob("*.py")) == sorted(EXAMPLES)


@pytest.mark.parametrize("script", sorted(EXAMPLES))
def test_example_runs(script):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(ROOT / "examples" / script)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    for needle in EXAMPLES[script]:
        assert needle in done.stdout, done.stdout[-4000:]
