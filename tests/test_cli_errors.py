"""One error, one line: the CLI's exit codes and messages, internal errors said as turbofx bugs,
Ctrl-C and closed pipes handled, and compile progress shown only on a terminal."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import turbofx
from turbofx.codegen import ops as codegen_ops
from turbofx.compiler import cli, driver
from turbofx.errors import CaptureError, TurbofxError, TurbofxInternalError

ROOT = Path(__file__).resolve().parents[1]
aten = torch.ops.aten


class _IdsChain(torch.nn.Module):
    """Token ids -> embedding -> exp -> matmul -> sigmoid: a model the CLI can feed a prompt."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(256, 8)
        self.w = torch.nn.Parameter(torch.randn(8, 8) * 0.3)

    def forward(self, ids):
        return torch.sigmoid(torch.exp(self.emb(ids)) @ self.w)


def ids_chain():  # a pkg.module:factory for `turbofx bisect tests.test_cli_errors:ids_chain`
    return _IdsChain()


def _stderr_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip() and not line.startswith("  ")]


def test_user_error_is_one_line_exit_2(capsys, tmp_path):
    code = cli.main(["run", str(tmp_path / "missing")])
    err = capsys.readouterr().err
    assert code == 2
    lines = _stderr_lines(err)
    assert len(lines) == 1 and lines[0].startswith("turbofx: error: "), err
    assert "Traceback" not in err


def test_unknown_model_is_one_line(capsys):
    assert cli.main(["bisect", "no_such_model"]) == 2
    err = capsys.readouterr().err
    assert "turbofx: error:" in err and "no_such_model" in err and "Traceback" not in err


def test_multiline_message_becomes_one_line(capsys, monkeypatch):
    def boom(a):
        raise TurbofxError("first line\nsecond line\n\n  third")

    monkeypatch.setattr(cli, "cmd_doctor", boom)
    assert cli.main(["doctor"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "turbofx: error: first line second line third"


def test_unexpected_exception_is_a_bug_exit_3(capsys, monkeypatch):
    monkeypatch.delenv("TURBOFX_LOG", raising=False)

    def boom(a):
        raise KeyError("oops")

    monkeypatch.setattr(cli, "cmd_doctor", boom)
    assert cli.main(["doctor"]) == 3
    err = capsys.readouterr().err
    assert len(_stderr_lines(err)) == 1 and "turbofx bug" in err and "KeyError" in err and "TURBOFX_LOG=debug" in err
    assert "Traceback" not in err


def test_traceback_only_under_debug(capsys, monkeypatch):
    def boom(a):
        raise KeyError("oops")

    monkeypatch.setattr(cli, "cmd_doctor", boom)
    monkeypatch.setenv("TURBOFX_LOG", "debug")
    assert cli.main(["doctor"]) == 3
    err = capsys.readouterr().err
    assert "Traceback" in err and "turbofx bug" in err


def test_internal_error_exits_3(capsys, monkeypatch):
    def boom(a):
        raise TurbofxInternalError("lowering failed", ValueError("x"))

    monkeypatch.setattr(cli, "cmd_doctor", boom)
    assert cli.main(["doctor"]) == 3
    assert capsys.readouterr().err.startswith("turbofx: turbofx bug: lowering failed")


def test_ctrl_c_is_clean(capsys, monkeypatch):
    def interrupted(a):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_doctor", interrupted)
    assert cli.main(["doctor"]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "turbofx: interrupted"


def test_broken_pipe_is_quiet():
    """`turbofx doctor | head -0`: stdout closed early, no traceback, non-zero exit."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    code = ("import sys\nfrom turbofx.compiler import cli\n"
            "def flood(a):\n    for _ in range(100000):\n        print('x' * 100)\n    return 0\n"
            "cli.cmd_doctor = flood\nsys.exit(cli.main(['doctor']))\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    p.stdout.read(10)
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 1
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_argparse_errors_still_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["bisect"])
    assert info.value.code == 2


def test_bisect_command_names_the_culprit(capsys, monkeypatch):
    right = codegen_ops.POINTWISE[aten.sigmoid.default]
    monkeypatch.setitem(codegen_ops.POINTWISE, aten.sigmoid.default, lambda n, a, k: f"(1.0 - {right(n, a, k)})")
    assert cli.main(["bisect", "tests.test_cli_errors:ids_chain", "--seq", "4"]) == 0
    out = capsys.readouterr()
    assert "culprit" in out.out and "fusion" in out.out and "sigmoid" in out.out, out
    assert "WRONG" in out.err and "right" in out.err


def test_internal_failure_in_compile_says_turbofx_bug(monkeypatch):
    def broken(*a, **k):
        raise KeyError("slot 7")

    monkeypatch.setattr(driver, "lower", broken)
    with pytest.raises(TurbofxInternalError) as info:
        turbofx.compile(torch.nn.Softmax(-1), (torch.randn(2, 3),))
    assert "turbofx bug" in str(info.value) and "TURBOFX_LOG=debug" in str(info.value)
    assert isinstance(info.value.__cause__, KeyError)


def test_users_model_failure_is_not_a_bug():
    class Bad(torch.nn.Module):
        def forward(self, x):
            raise ValueError("the user's own bug")

    with pytest.raises(CaptureError) as info:
        turbofx.compile(Bad(), (torch.randn(2),))
    assert not isinstance(info.value, TurbofxInternalError)


@pytest.mark.parametrize("bad", [lambda x: x, "model", None])
def test_compile_needs_a_module(bad):
    with pytest.raises(TurbofxError, match="nn.Module"):
        turbofx.compile(bad, (torch.randn(2),))


def test_example_kwargs_must_be_a_dict():
    with pytest.raises(TurbofxError, match="example_kwargs"):
        turbofx.compile(torch.nn.Softmax(-1), (torch.randn(2, 3),), [1, 2])


def test_progress_on_a_terminal(capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    turbofx.compile(torch.nn.Softmax(-1), (torch.randn(2, 3),))
    err = capsys.readouterr().err
    assert "turbofx: compiling Softmax" in err
    assert "capture" in err and "pass fusion" in err and "codegen tfx_" in err


def test_quiet_when_not_a_terminal(capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    turbofx.compile(torch.nn.Softmax(-1), (torch.randn(2, 3),))
    err = capsys.readouterr().err
    assert "turbofx: compiling" not in err and "\r" not in err


def test_quantize_flag_errors_are_one_line(capsys, tmp_path):
    # an unknown scheme fails before any model loads; gguf on a model without a GGUF file says what to use
    assert cli.main(["demo", "llama", "--quantize", "int3"]) == 2
    err = capsys.readouterr().err
    assert "turbofx: error: unknown quantization 'int3'" in err and "loading" not in err and "Traceback" not in err
    assert cli.main(["export", "llama", "--output-dir", str(tmp_path / "a"), "--quantize", "gguf"]) == 2
    err = capsys.readouterr().err
    assert "needs a model loaded from a GGUF file" in err and "Traceback" not in err
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())


def test_run_checks_the_artifacts_quantization(capsys, tmp_path):
    out = tmp_path / "art"
    assert cli.main(["export", "llama", "--output-dir", str(out), "--quantize", "int8", "--kind", "forward"]) == 0
    capsys.readouterr()
    assert cli.main(["run", str(out), "--quantize", "int4", "--max-new-tokens", "1"]) == 2
    err = capsys.readouterr().err
    assert "exported with quantize='int8', not 'int4-g128'" in err and "re-export with --quantize" in err
    assert cli.main(["run", str(out), "--quantize", "int8", "--max-new-tokens", "2"]) == 0
