"""The persistent compile cache: a second process hits and gives the same tokens; a hit runs on
the live module's weights; anything that determines the program changes the key; a damaged entry
is rebuilt; concurrent writers both succeed; the off switches and an unwritable directory."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import turbofx
from turbofx.compiler import compile_cache
from turbofx.compiler.driver import Options

ROOT = Path(__file__).resolve().parent.parent

# one fresh process: a tiny llama (seed from argv) generates greedily through turbofx and eagerly
_CHILD = r"""
import json, sys
import turbofx, torch
torch.set_num_threads(1)
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(int(sys.argv[1]))
cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
m = LlamaForCausalLM(cfg).eval()
ids = torch.tensor([[1, 5, 9, 3]])
out = turbofx.generate(m, ids, max_new_tokens=1)
ref = m.generate(ids, max_new_tokens=1, do_sample=False)
print(json.dumps({"tokens": out.sequences.tolist(), "eager": ref.tolist(),
                  "cache": {k: r.cache.status for k, r in out.reports.items()},
                  "report": str(out.reports["prefill"])}))
"""


def _env(cache_dir: Path) -> dict:
    env = dict(os.environ, TURBOFX_CACHE_DIR=str(cache_dir), TURBOFX_COMPILE_CACHE="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return env


def _child(cache_dir: Path, seed: int = 0) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _CHILD, str(seed)], env=_env(cache_dir), cwd=str(ROOT),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(p: subprocess.Popen) -> dict:
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def _entries(cache_dir: Path) -> list[Path]:
    return sorted(p for p in (cache_dir / "programs").glob("*/*") if not p.name.startswith("."))


def test_concurrent_cold_processes_then_a_fresh_process_hits(tmp_path):
    a, b = _child(tmp_path), _child(tmp_path)  # two processes fill the same empty cache at once
    ra, rb = _result(a), _result(b)
    for r in (ra, rb):
        assert r["tokens"] == r["eager"]
    assert ra["tokens"] == rb["tokens"]
    assert len(_entries(tmp_path)) == 2  # prefill and decode programs; no temporary directory left
    assert not [p for p in (tmp_path / "programs").glob("*/.*")]
    warm = _result(_child(tmp_path))
    assert warm["cache"] == {"prefill": "hit", "decode": "hit"}
    assert warm["tokens"] == ra["tokens"] == warm["eager"]
    assert "compile cache: hit" in warm["report"]


# -- in-process: the cache is on disk, so a second compile of an equal model hits here too ----------

def _model(seed: int = 0, **cfg):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**{**dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256),
                            **cfg})
    return LlamaForCausalLM(config).eval()


IDS = torch.tensor([[1, 5, 9, 3]])


def _compile(model, ids=IDS, **options):
    return turbofx.compile(model, (ids,), {"use_cache": False}, **options)


def _check(model, compiled, ids=IDS):
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        out = compiled(ids, use_cache=False).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    return out


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TURBOFX_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TURBOFX_COMPILE_CACHE", "1")
    return tmp_path


def test_a_hit_runs_on_the_live_modules_weights(cache_dir):
    a = _model(0)
    ca = _compile(a)
    assert ca.turbofx_report.cache.status == "miss"
    out_a = _check(a, ca)
    b = _model(1)  # same architecture, other weights
    cb = _compile(b)
    assert cb.turbofx_report.cache.status == "hit"
    assert cb.turbofx_report.passes == [] and cb.turbofx_report.layouts  # no passes ran; layouts reported
    out_b = _check(b, cb)
    assert not torch.allclose(out_a, out_b)
    # the hit re-pointed b's q/k/v at rows of the joined weight, as a cold compile does: an in-place
    # update of the module is seen by the program
    with torch.no_grad():
        b.model.layers[0].self_attn.q_proj.weight.mul_(2)
    _check(b, cb)


def test_what_determines_the_program_changes_the_key(cache_dir):
    def key(model, ids=IDS, **opts):
        return compile_cache.key_of(model, (ids,), {"use_cache": False}, Options.make(**opts), "cpu-interpret")

    base = key(_model(0))
    assert key(_model(1)) == base  # weights are not in the key
    assert key(_model(0, rms_norm_eps=1e-5)) != base  # a config value
    assert key(_model(0).to(torch.float64)) != base  # a dtype
    assert key(_model(0), attention=False) != base  # an option
    assert key(_model(0), ids=torch.tensor([[1, 5, 9]])) != base  # an example shape
    assert key(_model(0), ids=IDS.int()) != base  # an example dtype
    # and end to end: a model with another config value compiles afresh
    _compile(_model(0))
    assert _compile(_model(0, rms_norm_eps=1e-5)).turbofx_report.cache.status == "miss"


@pytest.mark.parametrize("damage", ["kernel", "program", "truncate-meta"])
def test_a_damaged_entry_is_rebuilt(cache_dir, damage, caplog):
    _compile(_model(0))
    [entry] = _entries(cache_dir)
    if damage == "kernel":
        k = sorted((entry / "kernels").glob("*.py"))[0]
        k.write_text(k.read_text() + "\n# edited\n")
    elif damage == "program":
        p = entry / "program.json"
        p.write_text(p.read_text().replace('"steps"', '"Steps"', 1))
    else:
        m = entry / "meta.json"
        m.write_bytes(m.read_bytes()[:100])
    model = _model(2)
    with caplog.at_level(logging.WARNING, logger="turbofx.compiler"):
        compiled = _compile(model)
    assert compiled.turbofx_report.cache.status == "miss"
    assert "damaged" in caplog.text
    _check(model, compiled)
    again = _compile(_model(3))  # the entry was rebuilt: valid again
    assert again.turbofx_report.cache.status == "hit"


def test_off_switches(cache_dir, monkeypatch):
    cm = _compile(_model(0), compile_cache=False)
    assert cm.turbofx_report.cache.status == "skipped" and "compile_cache=False" in cm.turbofx_report.cache.reason
    monkeypatch.setenv("TURBOFX_COMPILE_CACHE", "0")
    cm = _compile(_model(0))
    assert cm.turbofx_report.cache.status == "skipped"
    assert "cache" in str(cm.turbofx_report)
    assert _entries(cache_dir) == []
    monkeypatch.setenv("TURBOFX_COMPILE_CACHE", "1")
    assert _compile(_model(0), verify="kernels").turbofx_report.cache.status == "skipped"
    assert _entries(cache_dir) == []


def test_unwritable_cache_dir_warns_and_compiles(cache_dir):
    (cache_dir / "programs").write_text("not a directory")
    model = _model(0)
    with pytest.warns(RuntimeWarning, match="compile cache"):
        compiled = _compile(model)
    assert compiled.turbofx_report.cache.status == "skipped"
    _check(model, compiled)


class _WithConstant(torch.nn.Module):
    """A lifted constant (not reachable by name: stored in the entry) next to a tied weight."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(4, 4, bias=False)
        self.b = torch.nn.Linear(4, 4, bias=False)
        self.b.weight = self.a.weight  # tied: one tensor under two names

    def forward(self, x):
        return self.b(self.a(x)) * torch.tensor([1.0, 2.0, 3.0, 4.0])


def test_lifted_constants_are_stored_and_tied_weights_stay_tied(cache_dir):
    x = torch.randn(2, 4)
    first = _WithConstant()
    turbofx.compile(first, (x,))
    second = _WithConstant()
    hit = turbofx.compile(second, (x,))
    assert hit.turbofx_report.cache.status == "hit"
    with torch.no_grad():
        torch.testing.assert_close(hit(x), second(x))
        second.a.weight.mul_(3)  # the tied weight is the live one under both names
        torch.testing.assert_close(hit(x), second(x))
