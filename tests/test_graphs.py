"""CUDA/HIP graph replay of compiled steps (GPU tests capture and replay for real)."""
from __future__ import annotations

import pytest
import torch

import turbofx
from tests.test_mutation import RunningCache
from turbofx.compiler.models import make_tiny_model


def test_cpu_runs_directly_and_says_so_once():
    m = RunningCache()
    cm = turbofx.compile(m, (torch.zeros(4),), cudagraphs=True)
    for _ in range(3):
        cm(torch.randn(4))
    notes = turbofx.explain(cm).runtime_notes
    assert len(notes) == 1 and "graph replay off" in notes[0]
    assert int(m.pos) == 3


@pytest.mark.gpu
def test_replay_with_in_place_state_matches_eager():
    eager, src = RunningCache().cuda(), RunningCache().cuda()
    cm = turbofx.compile(src, (torch.zeros(4, device="cuda"),), cudagraphs=True)
    for _ in range(5):
        x = torch.randn(4, device="cuda")
        torch.testing.assert_close(cm(x), eager(x))
    torch.testing.assert_close(src.cache, eager.cache)
    assert int(src.pos) == 5  # each call ran the step exactly once (warm-up is the first call)
    assert cm._runner.replays == 4
    assert any("captured" in n for n in turbofx.explain(cm).runtime_notes)


@pytest.mark.gpu
def test_outputs_survive_later_replays():
    class Double(torch.nn.Module):
        def forward(self, x):
            return x * 2 + 1

    cm = turbofx.compile(Double(), (torch.zeros(8, device="cuda"),), cudagraphs=True)
    xs = [torch.full((8,), float(i), device="cuda") for i in range(4)]
    outs = [cm(x) for x in xs]
    for x, o in zip(xs, outs):
        torch.testing.assert_close(o, x * 2 + 1)


@pytest.mark.gpu
def test_generate_replays_the_decode_step():
    model = make_tiny_model("llama").cuda()
    ids = torch.randint(3, 120, (2, 6), device="cuda")
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    out = turbofx.generate(model, ids, 6)
    assert torch.equal(out.sequences, ref)
    notes = out.reports["decode"].runtime_notes
    assert any("captured" in n for n in notes) and not any("failed" in n for n in notes), notes


@pytest.mark.gpu
def test_hf_generate_reduce_overhead_replays_graphs():
    from transformers import CompileConfig

    from turbofx.compiler import backend

    torch._dynamo.reset()
    model = make_tiny_model("llama").cuda()
    ids = torch.randint(3, 120, (1, 6), device="cuda")
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=8, do_sample=False, cache_implementation="static")
        out = model.generate(ids, max_new_tokens=8, do_sample=False, cache_implementation="static",
                             compile_config=CompileConfig(backend="turbofx"))  # mode="reduce-overhead"
    assert torch.equal(out, ref)
    notes = [n for r in backend.reports_of(model) for n in r.runtime_notes]
    assert any("captured" in n for n in notes) and not any("failed" in n for n in notes), notes
    torch._dynamo.reset()
