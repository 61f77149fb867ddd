"""Artifacts never lose data and load only what was written (issue 8, items 1 and 6).

Writing: the output directory is checked before compiling; only new/empty directories or (with
overwrite=True) existing artifacts are replaced, atomically, under a lock. Loading: the sealed
manifest covers every file, only listed kernels run, impossible devices are refused. The kernel
cache verifies what it reads and survives an unwritable cache directory.
"""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import turbofx
from turbofx.compiler import artifact
from turbofx.errors import ArtifactError

ROOT = Path(__file__).resolve().parents[1]


class Tiny(torch.nn.Module):
    def __init__(self, scale: float = 2.0):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)
        self.scale = scale

    def forward(self, x):
        return torch.relu(self.lin(x)) * self.scale + 1


X = torch.randn(2, 8)


@pytest.fixture(scope="module")
def compiled():
    return turbofx.compile(Tiny(), (X,))


@pytest.fixture
def no_compile(monkeypatch):
    """Fail the test if anything gets as far as compiling: the checks must come first."""
    from turbofx.compiler import driver

    def refuse(*a, **k):
        raise AssertionError("compiled before checking the output directory")

    monkeypatch.setattr(driver, "compile", refuse)


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# ---- what export refuses, before compiling -------------------------------------------------

@pytest.mark.parametrize("where", ["", ".", "cwd", "..", "/", "home"])
def test_refuses_cwd_its_ancestors_home_and_root(tmp_path, monkeypatch, no_compile, where):
    work = tmp_path / "work"
    work.mkdir()
    (work / "mine.txt").write_text("precious")
    monkeypatch.chdir(work)
    out = {"cwd": str(work), "home": str(Path.home())}.get(where, where)
    with pytest.raises(ArtifactError, match="output_dir"):
        turbofx.export(Tiny(), (X,), output_dir=out)
    assert (work / "mine.txt").read_text() == "precious"


def test_refuses_a_file(tmp_path, no_compile):
    f = tmp_path / "notes.txt"
    f.write_text("precious")
    with pytest.raises(ArtifactError, match="is a file"):
        turbofx.export(Tiny(), (X,), output_dir=f)
    assert f.read_text() == "precious"


def test_refuses_a_non_empty_directory_that_is_not_an_artifact(tmp_path, no_compile):
    d = tmp_path / "photos"
    d.mkdir()
    (d / "cat.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(ArtifactError, match="not a turbofx artifact") as e:
        turbofx.export(Tiny(), (X,), output_dir=d, overwrite=True)  # not even with overwrite
    assert str(d) in str(e.value)
    assert (d / "cat.jpg").read_bytes() == b"\xff\xd8"


def test_a_lone_meta_json_is_not_an_artifact(tmp_path, no_compile):
    d = tmp_path / "project"
    d.mkdir()
    (d / "meta.json").write_text('{"author": "me"}')
    with pytest.raises(ArtifactError, match="not a turbofx artifact"):
        turbofx.export(Tiny(), (X,), output_dir=d, overwrite=True)
    assert (d / "meta.json").exists()


def test_refuses_a_parent_that_is_a_file(tmp_path, no_compile):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ArtifactError, match="is a file"):
        turbofx.export(Tiny(), (X,), output_dir=tmp_path / "f" / "art")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_refuses_an_unwritable_parent(tmp_path, no_compile):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(ArtifactError, match="not writable"):
            turbofx.export(Tiny(), (X,), output_dir=ro / "art")
    finally:
        ro.chmod(0o700)


def test_generation_export_checks_first(tmp_path, no_compile):
    from turbofx.compiler.generation import export_generation

    d = tmp_path / "src"
    d.mkdir()
    (d / "main.py").write_text("print('hi')")
    with pytest.raises(ArtifactError, match="not a turbofx artifact"):
        export_generation(torch.nn.Linear(2, 2), torch.ones(1, 4, dtype=torch.long), d)
    assert (d / "main.py").exists()


def test_cli_refuses_before_loading_the_model(tmp_path):
    d = tmp_path / "src"
    d.mkdir()
    (d / "main.py").write_text("print('hi')")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "turbofx.compiler.cli", "export", "qwen2", "--output-dir", str(d),
                        "--overwrite"], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "not a turbofx artifact" in r.stderr and "loading" not in r.stderr  # refused before the model loaded
    assert "Traceback" not in r.stderr
    assert (d / "main.py").exists()


# ---- what export writes, and how it replaces -----------------------------------------------

def test_replaces_an_artifact_only_with_overwrite(tmp_path):
    out = tmp_path / "art"
    turbofx.export(Tiny(2.0), (X,), output_dir=out)
    first = turbofx.load(out)(X)
    with pytest.raises(ArtifactError, match="overwrite=True"):
        turbofx.export(Tiny(3.0), (X,), output_dir=out)
    torch.testing.assert_close(turbofx.load(out)(X), first)
    model = Tiny(3.0)
    turbofx.export(model, (X,), output_dir=out, overwrite=True)
    torch.testing.assert_close(turbofx.load(out)(X), model(X))
    assert _leftovers(tmp_path) == []  # no temporary, old or lock file left beside it


def test_creates_missing_parents_and_fills_an_empty_directory(tmp_path, compiled):
    deep = artifact.save(compiled, tmp_path / "a" / "b" / "art")
    assert (deep / "meta.json").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    artifact.save(compiled, empty)
    torch.testing.assert_close(turbofx.load(empty)(X), compiled(X))


@pytest.mark.parametrize("umask,mode", [(0o022, 0o755), (0o077, 0o700), (0o002, 0o775)])
def test_directory_permissions_follow_the_umask(tmp_path, compiled, umask, mode):
    old = os.umask(umask)
    try:
        out = artifact.save(compiled, tmp_path / "art")
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == mode
    assert (out / "kernels").stat().st_mode & 0o777 == mode
    assert (out / "meta.json").stat().st_mode & 0o777 == mode & 0o666


def test_symlink_output_dir_writes_the_real_directory(tmp_path, compiled):
    real = tmp_path / "disk" / "art"
    real.mkdir(parents=True)
    link = tmp_path / "art"
    link.symlink_to(real)
    artifact.save(compiled, link)
    assert link.is_symlink() and (real / "meta.json").is_file()
    torch.testing.assert_close(turbofx.load(link)(X), compiled(X))
    other = tmp_path / "home_dir"
    other.mkdir()
    (other / "thesis.tex").write_text("x")
    (tmp_path / "bad").symlink_to(other)
    with pytest.raises(ArtifactError, match="not a turbofx artifact"):
        artifact.save(compiled, tmp_path / "bad", overwrite=True)
    assert (other / "thesis.tex").exists()


@pytest.mark.parametrize("exc", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()])
def test_failed_or_interrupted_write_keeps_the_old_artifact(tmp_path, compiled, monkeypatch, exc):
    import safetensors.torch

    out = artifact.save(compiled, tmp_path / "art")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    def fail(*a, **k):
        raise exc

    monkeypatch.setattr(safetensors.torch, "save_file", fail)
    expected = ArtifactError if isinstance(exc, OSError) else KeyboardInterrupt
    with pytest.raises(expected) as e:
        artifact.save(compiled, out, overwrite=True)
    if expected is ArtifactError:
        assert "No space left" in str(e.value)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert _leftovers(tmp_path) == []
    torch.testing.assert_close(turbofx.load(out)(X), compiled(X))


def test_failed_swap_puts_the_old_artifact_back(tmp_path, compiled, monkeypatch):
    out = artifact.save(compiled, tmp_path / "art")
    real_replace, calls = os.replace, []

    def replace(src, dst):  # the first rename (old aside) works, the second (new in) fails
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError(errno.EIO, "Input/output error")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(ArtifactError, match="Input/output error"):
        artifact.save(compiled, out, overwrite=True)
    monkeypatch.undo()
    assert len(calls) == 3  # aside, in (failed), back
    torch.testing.assert_close(turbofx.load(out)(X), compiled(X))
    assert _leftovers(tmp_path) == []


_WRITER = textwrap.dedent("""
    import sys, time, torch, turbofx
    from pathlib import Path
    from turbofx.compiler import artifact
    sys.path.insert(0, {tests!r})
    from test_artifact_safety import Tiny, X
    out, me, other, hold = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4] == "hold"
    compiled = turbofx.compile(Tiny(float(sys.argv[5])), (X,))
    deadline = time.time() + 120
    if hold:  # take the writer's lock, say so, and keep it until the other process has tried
        swap = artifact._swap

        def slow_swap(new, out):
            me.touch()
            while not Path(sys.argv[6]).exists() and time.time() < deadline:
                time.sleep(0.01)
            swap(new, out)

        artifact._swap = slow_swap
    else:
        me.touch()
        while not other.exists() and time.time() < deadline:  # start writing together
            time.sleep(0.01)
    try:
        artifact.save(compiled, out)
        print("WROTE")
    except turbofx.ArtifactError as e:
        print("REFUSED", e)
""")


def _writers(tmp_path: Path, hold: bool) -> list[str]:
    script = tmp_path / "writer.py"
    script.write_text(_WRITER.format(tests=str(ROOT / "tests")))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out, a, b, done = tmp_path / "art", tmp_path / "a.ready", tmp_path / "b.ready", tmp_path / "done"
    first = subprocess.Popen([sys.executable, str(script), str(out), str(a), str(b), "hold" if hold else "race",
                              "2", str(done)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    second_args = [sys.executable, str(script), str(out), str(b), str(a), "race", "3", str(done)]
    second = subprocess.Popen(second_args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    second_out, second_err = second.communicate(timeout=300)
    done.touch()
    first_out, first_err = first.communicate(timeout=300)
    assert first.returncode == 0 and second.returncode == 0, (first_err[-2000:], second_err[-2000:])
    return [first_out, second_out]


def test_two_concurrent_writers_one_wins(tmp_path):
    outs = _writers(tmp_path, hold=False)
    assert sorted(o.split()[0] for o in outs) == ["REFUSED", "WROTE"], outs
    assert turbofx.load(tmp_path / "art")(X).shape == (2, 8)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".art")]


def test_a_writer_holding_the_lock_makes_the_other_fail(tmp_path):
    first, second = _writers(tmp_path, hold=True)
    assert first.startswith("WROTE"), first
    assert second.startswith("REFUSED") and "another process is writing" in second, second
    assert turbofx.load(tmp_path / "art")(X).shape == (2, 8)


# ---- what load accepts ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved(compiled, tmp_path_factory):
    return artifact.save(compiled, tmp_path_factory.mktemp("saved") / "art")


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_edited_meta_is_refused(saved, tmp_path):
    bad = _copy(saved, tmp_path / "bad")
    meta = json.loads((bad / "meta.json").read_text())
    meta["n_user_outputs"] = 0  # would silently return nothing
    (bad / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="altered"):
        turbofx.load(bad)


def test_unlisted_kernel_is_never_run(saved, tmp_path):
    bad = _copy(saved, tmp_path / "bad")
    marker = tmp_path / "ran"
    (bad / "kernels" / "zz_extra.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    with pytest.raises(ArtifactError, match="not listed"):
        turbofx.load(bad)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["edit_kernel", "delete_kernel", "truncate_program", "corrupt_weights"])
def test_damaged_files_are_refused(saved, tmp_path, damage):
    bad = _copy(saved, tmp_path / "bad")
    kernel = sorted((bad / "kernels").glob("*.py"))[0]
    if damage == "edit_kernel":
        kernel.write_text(kernel.read_text() + "\nraise SystemExit('ran an altered kernel')\n")
    elif damage == "delete_kernel":
        kernel.unlink()
    elif damage == "truncate_program":
        p = bad / "program.json"
        p.write_text(p.read_text()[:40])
    else:
        w = bad / "weights.safetensors"
        w.write_bytes(b"not safetensors")
    with pytest.raises(ArtifactError, match="missing or corrupt"):
        turbofx.load(bad)


def test_load_refuses_files_and_missing_paths(saved, tmp_path):
    with pytest.raises(ArtifactError, match="is a file"):
        turbofx.load(saved / "meta.json")
    with pytest.raises(ArtifactError, match="does not exist"):
        turbofx.load(tmp_path / "nope")


def test_load_refuses_a_device_it_cannot_honour(saved):
    with pytest.raises(ArtifactError, match="device"):
        turbofx.load(saved, device="potato")
    if not torch.cuda.is_available():  # a cpu-interpret artifact: its kernels run on the CPU only
        with pytest.raises(ArtifactError, match="cuda"):
            turbofx.load(saved, device="cuda")
        with pytest.raises(ArtifactError, match="cuda"):
            turbofx.load(saved, device=torch.device("cuda", 0))
        torch.testing.assert_close(turbofx.load(saved, device="cpu")(X), turbofx.load(saved)(X))


def test_load_tells_which_loader_a_generation_artifact_needs(saved, tmp_path):
    from turbofx.compiler.generation import load_generation

    gen = tmp_path / "gen"
    gen.mkdir()
    (gen / "generation.json").write_text("{}")
    with pytest.raises(ArtifactError, match="load_generation"):
        turbofx.load(gen)
    with pytest.raises(ArtifactError, match="forward artifact"):
        load_generation(saved)


# ---- the kernel cache ----------------------------------------------------------------------

def test_kernel_cache_rewrites_a_file_that_is_not_the_expected_source(tmp_path, monkeypatch):
    from turbofx.codegen import cache
    from turbofx.codegen.target import detect

    monkeypatch.setenv("TURBOFX_CACHE_DIR", str(tmp_path))
    model = Tiny(5.0)
    compiled = turbofx.compile(model, (X,))
    target = detect()
    sources = compiled._program.sources
    paths = [cache.kernel_path(n, s, target) for n, s in sources.items()]
    for p in paths:  # same name, other content: what a crash mid-write or an edit leaves
        p.write_text("raise SystemExit('stale cache file executed')\n")
    recompiled = turbofx.compile(model, (X,))  # finds the damaged files in the cache
    torch.testing.assert_close(recompiled(X + 1), model(X + 1))
    for p, src in zip(paths, sources.values()):
        assert p.read_text() == src


@pytest.mark.parametrize("kind", ["file", "readonly"])
def test_unwritable_kernel_cache_falls_back_with_one_warning(tmp_path, monkeypatch, kind):
    from turbofx.codegen import cache

    if kind == "file":
        bad = tmp_path / "cache"
        bad.write_text("not a directory")
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only directories")
        bad = tmp_path / "ro"
        bad.mkdir()
        bad.chmod(0o500)
    monkeypatch.setenv("TURBOFX_CACHE_DIR", str(bad))
    monkeypatch.setattr(cache, "_fallback", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for scale in (7.0, 11.0):  # two compiles with new kernels: one warning
            model = Tiny(scale)
            torch.testing.assert_close(turbofx.compile(model, (X,))(X), model(X))
    mine = [w for w in caught if "kernel cache" in str(w.message)]
    assert len(mine) == 1 and "not writable" in str(mine[0].message), [str(w.message) for w in caught]
    assert cache.cache_dir() != bad / "kernels" and any(cache.cache_dir().iterdir())
    if kind == "readonly":
        bad.chmod(0o700)
