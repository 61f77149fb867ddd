"""Artifact round trip (fresh process, no model source), corruption, version mismatch, atomicity."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import turbofx
from turbofx.compiler.models import example_inputs, make_tiny_model
from turbofx.compiler.artifact import seal
from turbofx.errors import ArtifactError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    model = make_tiny_model("llama")
    args, kwargs = example_inputs("llama", batch=2, seq=8)
    out = tmp_path_factory.mktemp("art") / "llama"
    turbofx.export(model, args, kwargs, output_dir=out)
    with torch.no_grad():
        ref = model(*args, **kwargs).logits
    torch.save({"args": args, "kwargs": kwargs, "ref": ref}, out.parent / "io.pt")
    return out


def test_round_trip_in_fresh_process(artifact):
    # The child imports neither transformers' model code nor the factory: only turbofx.load.
    code = textwrap.dedent(f"""
        import sys, torch, turbofx
        io = torch.load({str(artifact.parent / 'io.pt')!r}, weights_only=False)
        cm = turbofx.load({str(artifact)!r})
        out = cm(*io["args"], **io["kwargs"])
        torch.testing.assert_close(out.logits, io["ref"], rtol=1e-3, atol=1e-3)
        print("OK", type(out).__name__, sorted(m for m in sys.modules if m.startswith("transformers.models.llama")))
    """)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "OK CausalLMOutputWithPast" in r.stdout
    assert "modeling_llama" not in r.stdout  # ran without the model's source


def test_layout(artifact):
    names = {p.name for p in artifact.iterdir()}
    assert {"program.json", "meta.json", "weights.safetensors", "kernels"} <= names
    meta = json.loads((artifact / "meta.json").read_text())
    assert meta["versions"]["torch"] == torch.__version__
    assert any(p.suffix == ".py" for p in (artifact / "kernels").iterdir())


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_corrupt_weights_raise(artifact, tmp_path):
    bad = _copy(artifact, tmp_path / "bad")
    w = bad / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[-10:] = b"\x00" * 10
    w.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="corrupt"):
        turbofx.load(bad)


def test_corrupt_meta_raises(artifact, tmp_path):
    bad = _copy(artifact, tmp_path / "bad")
    (bad / "meta.json").write_text("{ not json")
    with pytest.raises(ArtifactError, match="corrupt"):
        turbofx.load(bad)


def test_version_mismatch_raises(artifact, tmp_path):
    bad = _copy(artifact, tmp_path / "old")
    meta = json.loads((bad / "meta.json").read_text())
    meta["versions"]["torch"] = "1.13.0"
    (bad / "meta.json").write_text(seal(meta))  # as another turbofx would have written it
    with pytest.raises(ArtifactError, match="torch 1.13.0"):
        turbofx.load(bad)


def test_older_format_raises(artifact, tmp_path):
    from turbofx.compiler.artifact import FORMAT

    bad = _copy(artifact, tmp_path / "older")
    meta = json.loads((bad / "meta.json").read_text())
    meta["format"] = FORMAT - 1  # its kernels take other arguments than this runtime passes
    (bad / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="re-export"):
        turbofx.load(bad)


def test_not_an_artifact(tmp_path):
    with pytest.raises(ArtifactError, match="not a turbofx artifact"):
        turbofx.load(tmp_path)


def test_failed_export_leaves_nothing(tmp_path):
    class Bad(torch.nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: export refuses
                return x + 1
            return x - 1

    out = tmp_path / "never"
    with pytest.raises(turbofx.TurbofxError):
        turbofx.export(Bad(), (torch.randn(3),), output_dir=out)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", ["generation", "forward"])
def test_cli_export_and_run(tmp_path, kind):
    """`turbofx export` then `turbofx run` in fresh processes: greedy tokens equal eager generate
    (generation: prefill + decode over the exported KV cache; forward: one dynamic program)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = tmp_path / "cli_art"
    r = subprocess.run([sys.executable, "-m", "turbofx.compiler.cli", "export", "qwen2", "--output_dir", str(out),
                        "--kind", kind], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "generation.json").is_file() == (kind == "generation")
    r = subprocess.run([sys.executable, "-m", "turbofx.compiler.cli", "run", str(out), "--prompt", "hello there",
                        "--max-new-tokens", "3"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "tokens" in r.stdout
    got = [int(t) for t in r.stdout.splitlines()[0].split()]  # no tokenizer for tiny models: token ids
    model = make_tiny_model("qwen2")
    ids = torch.tensor([[b % model.config.vocab_size for b in b"hello there"]])
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=3, do_sample=False)[0, ids.shape[1]:].tolist()
    assert got == ref, (got, ref)
    if kind == "generation":  # a one-token prompt (the dynamic prefill refuses length 1): the decode program
        r = subprocess.run([sys.executable, "-m", "turbofx.compiler.cli", "run", str(out), "--prompt", "h",
                            "--max-new-tokens", "3"], capture_output=True, text=True, env=env, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        ids = torch.tensor([[b"h"[0] % model.config.vocab_size]])
        with torch.no_grad():
            ref = model.generate(ids, max_new_tokens=3, do_sample=False)[0, 1:].tolist()
        assert [int(t) for t in r.stdout.splitlines()[0].split()] == ref
