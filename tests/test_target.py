"""Target names: unknown ones are refused, a GPU target without a GPU is an error (never a quiet CPU
compile), an architecture name builds an offline target that compiles but refuses to run."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import turbofx
from turbofx.codegen.target import ARCHS, check_name, detect, offline
from turbofx.errors import TargetError

NO_GPU = not torch.cuda.is_available()


def _model():
    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU()), torch.randn(2, 8)


@pytest.mark.parametrize("name", ["nvidia", "sm90", "cuda:90", "cuda:sm75", "hip:sm90", "cuda:gfx942", "cpu2", "tpu"])
def test_unknown_names_are_refused_with_the_valid_forms(name):
    with pytest.raises(TargetError, match="valid:"):
        check_name(name)


def test_non_string_target_is_refused():
    m, x = _model()
    with pytest.raises(TargetError, match="string"):
        turbofx.compile(m, (x,), target=torch.device("cpu"))


@pytest.mark.parametrize("name, want", [(None, ""), ("auto", ""), (" CPU ", "cpu"), ("interpret", "cpu"),
                                        ("cpu-interpret", "cpu"), ("CUDA:SM90", "cuda:sm90"), ("hip", "hip")])
def test_names_normalise(name, want):
    assert check_name(name) == want


@pytest.mark.skipif(not NO_GPU, reason="checks the no-GPU refusal")
@pytest.mark.parametrize("name", ["cuda", "hip"])
def test_gpu_target_without_gpu_is_an_error(name):
    m, x = _model()
    with pytest.raises(TargetError, match="GPU"):
        turbofx.compile(m, (x,), target=name)


@pytest.mark.skipif(not NO_GPU, reason="checks the no-GPU refusal")
def test_env_gpu_target_without_gpu_is_an_error(monkeypatch):
    monkeypatch.setenv("TURBOFX_TARGET", "cuda")
    m, x = _model()
    with pytest.raises(TargetError, match="TURBOFX_TARGET"):
        turbofx.compile(m, (x,))


@pytest.mark.skipif(not NO_GPU, reason="an arch name is the real GPU when it is that one")
def test_offline_target_compiles_and_refuses_to_run():
    m, x = _model()
    c = turbofx.compile(m, (x,), target="cuda:sm90")
    assert "offline" in turbofx.explain(c).target
    with pytest.raises(TargetError, match="offline"):
        c(x)


@pytest.mark.parametrize("name", ["cuda:sm80", "cuda:sm90", "cuda:sm100", "hip:gfx942"])
def test_offline_targets_carry_the_arch_table(name):
    t = offline(name)
    info = ARCHS[t.arch]
    assert t.offline and (t.shared_mem, t.sm_count) == (info.shared_mem, info.sm_count)
    assert t.warp_size == (64 if name.startswith("hip") else 32)


def test_model_on_cpu_stays_on_the_interpreter_by_default():
    assert detect("cpu").interpret


@pytest.mark.parametrize("env, interp", [("cuda:sm90", None), ("bogus", "1" if NO_GPU else None),
                                         ("cpu", "1")])
def test_import_with_target_env_never_raises(env, interp):
    """torch imports turbofx through its backend registry: a bad TURBOFX_TARGET must not break that;
    an architecture name keeps Triton's interpreter off (real compiles); cpu turns it on."""
    code = "import os, turbofx; print(os.environ.get('TRITON_INTERPRET'))"
    e = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    e["TURBOFX_TARGET"] = env
    done = subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == str(interp)


def test_cli_refuses_a_bad_target_before_loading_anything():
    done = subprocess.run([sys.executable, "-m", "turbofx.compiler.cli", "export", "llama", "--output-dir",
                           "/nonexistent/x", "--target", "cuda:sm7"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--target" in done.stderr and "valid:" in done.stderr
    assert "loading" not in done.stderr


@pytest.mark.parametrize("triton_v, numpy_v, ok", [("3.6.0", "2.2.6", True), ("3.6.0", "2.3.0", False),
                                                   ("3.9.0", "2.4.6", True), ("3.6.0+git1", "2.4.1", False)])
def test_interpreter_refuses_triton36_with_new_numpy(triton_v, numpy_v, ok):
    from turbofx.codegen.target import check_interpreter_versions

    if ok:
        check_interpreter_versions(triton_v, numpy_v)
    else:
        with pytest.raises(TargetError, match="numpy < 2.3"):
            check_interpreter_versions(triton_v, numpy_v)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_gpu_target_is_refused_before_capture(monkeypatch):
    """A target this machine cannot provide fails before torch.export runs (no wasted capture)."""
    import turbofx.compiler.driver as driver

    def no_capture(*a, **k):
        raise AssertionError("capture ran before the target was checked")

    monkeypatch.setattr(driver, "capture_module", no_capture)
    with pytest.raises(TargetError, match="GPU"):
        turbofx.compile(torch.nn.Linear(2, 2), (torch.randn(1, 2),), target="cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_cli_refuses_a_missing_gpu_before_loading_anything():
    from turbofx.compiler.cli import main

    with pytest.raises(SystemExit) as e:
        main(["demo", "llama", "--target", "cuda"])
    assert e.value.code == 2
