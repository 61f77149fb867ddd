"""Artifacts: ``export`` writes a self-contained directory, ``load`` runs it without model source.

Layout: ``program.json`` (the Program: steps over buffers), ``kernels/*.py`` (Triton sources),
``weights.safetensors`` (parameters, buffers, constants; shared tensors stored once),
``meta.json`` (format, versions, target, call signature, the sha256 of every other file, and a
digest of itself), ``graph.txt`` (the optimised graph, for people), ``tokenizer/`` (optional).

Writing never removes anything turbofx did not create: the output directory must be new, empty,
or (with ``overwrite=True``) an artifact; it is checked before compiling. The artifact is written
into a temporary sibling under a lock and swapped in, so a failed or interrupted export leaves the
previous artifact as it was and no temporary directory behind, and of two concurrent writers one
wins and the other gets ``ArtifactError``. Loading verifies every listed file and runs only the
listed kernel sources.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from turbofx.errors import ArtifactError

# 3: meta.json / generation.json carry a digest of themselves; only listed kernels are loaded.
# 4: state may hold weights the layout pass joined (e.g. q/k/v as one tensor; "layouts" in meta.json
# and program.json): an older artifact's program reads the separate weights.
FORMAT = 5  # 5: turbofx::gemm takes quantized weights (b_scale, b_min) and meta.json records the quantization
MANIFESTS = ("meta.json", "generation.json")  # a forward artifact's, a generation artifact's


def _versions() -> dict:
    import triton
    import transformers

    return {"torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__}


def _major_minor(v: str) -> str:
    return ".".join(v.split("+")[0].split(".")[:2])


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _spec_dump(spec) -> str | None:
    """Pytree specs as torch's JSON form (types by registered name, e.g. HF ModelOutputs)."""
    import torch.utils._pytree as pytree

    return None if spec is None else pytree.treespec_dumps(spec)


def _spec_load(s):
    import importlib

    import torch.utils._pytree as pytree

    if s is None:
        return None

    def types(node):
        if isinstance(node, dict):
            if isinstance(node.get("type"), str):
                yield node["type"]
            for v in node.values():
                yield from types(v)
        elif isinstance(node, list):
            for v in node:
                yield from types(v)

    for t in set(types(json.loads(s))):  # importing a type's module registers it with pytree
        try:
            importlib.import_module(t.rsplit(".", 1)[0])
        except ImportError as e:
            raise ArtifactError(f"the artifact returns {t}, whose module cannot be imported here ({e})") from None
    return pytree.treespec_loads(s)


def _expected_json(expected: list) -> list:
    out = []
    for e in expected:
        if e["kind"] == "tensor":
            out.append({"kind": "tensor", "shape": e["shape"], "dtype": str(e["dtype"]).removeprefix("torch."),
                        "device": str(e["device"])})
        else:
            out.append({"kind": "value", "value": e["value"]})
    return out


def _dir_mode() -> int:
    """The mode ``mkdir`` gives a new directory under the current umask (mkdtemp uses 0700)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o777 & ~mask


def seal(doc: dict) -> str:
    """``doc`` as JSON with a ``digest`` of its canonical form, so that the manifest itself is
    covered: an edited or damaged manifest no longer matches its digest."""
    body = {k: v for k, v in doc.items() if k != "digest"}
    return json.dumps({**body, "digest": _digest(body)}, indent=1)


def _digest(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read_sealed(path: Path, artifact: Path) -> dict:
    """A manifest written by ``seal``: refused if missing, not JSON, of another format, or altered."""
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{artifact} is not a turbofx artifact (no {path.name}); create one with "
                            "`turbofx export`") from None
    except (OSError, ValueError) as e:  # ValueError: JSON and UTF-8 decoding errors
        raise ArtifactError(f"{path} is corrupt ({e}); re-export the model") from None
    if not isinstance(doc, dict):
        raise ArtifactError(f"{path} is corrupt (not a JSON object); re-export the model")
    if doc.get("format") != FORMAT:
        raise ArtifactError(f"{artifact} has artifact format {doc.get('format')}, this turbofx reads format "
                            f"{FORMAT}; re-export")
    if doc.get("digest") != _digest({k: v for k, v in doc.items() if k != "digest"}):
        raise ArtifactError(f"{path} was altered or is corrupt (its digest does not match); re-export the model")
    return doc


def file_digests(root: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """sha256 of every file under ``root`` by relative path, except the top-level names in ``skip``."""
    return {p.relative_to(root).as_posix(): _sha(p) for p in sorted(root.rglob("*"))
            if p.is_file() and p.relative_to(root).parts[0] not in skip}


def verify_files(d: Path, files: dict, manifest: str) -> None:
    """Every file listed in ``manifest`` is there with its digest; nothing unlisted is in kernels/."""
    for rel, digest in files.items():
        f = d / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute() or not f.is_file() or _sha(f) != digest:
            raise ArtifactError(f"{d}: {rel} is missing or corrupt (checksum mismatch); re-export the model")
    if (d / "kernels").is_dir():
        for p in sorted((d / "kernels").rglob("*")):
            rel = p.relative_to(d).as_posix()
            if p.is_file() and rel not in files:
                raise ArtifactError(f"{d}: {rel} is not listed in {manifest}; turbofx runs only the kernels it wrote. "
                                    "Remove the file or re-export the model")


def _json_object(p: Path) -> dict | None:
    try:
        doc = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def is_artifact(d: Path) -> bool:
    """Whether ``d`` holds a turbofx artifact (of any format), i.e. something ``overwrite=True`` may
    replace: a meta.json with format and file list, or a generation.json over such a decode/."""
    meta = _json_object(d / "meta.json")
    if meta is not None and "format" in meta and "files" in meta:
        return True
    return _json_object(d / "generation.json") is not None and is_artifact(d / "decode")


def check_output_dir(output_dir: str | os.PathLike | None, overwrite: bool = False) -> Path:
    """Refuse, before any compiling, an output directory that writing an artifact would lose data
    in or cannot create; return it resolved (symlinks followed: the checks apply to the real
    directory). Missing parent directories are fine: they are created when the artifact is written."""
    if output_dir is None or not str(output_dir).strip():
        raise ArtifactError("output_dir is empty: name a new directory for the artifact, e.g. 'my_model_artifact'")
    try:
        out = Path(output_dir).resolve()
        cwd, home = Path.cwd().resolve(), Path.home().resolve()
    except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop (Python < 3.13)
        raise ArtifactError(f"output_dir {str(output_dir)!r} cannot be resolved ({e})") from None
    if cwd == out or out in cwd.parents:
        raise ArtifactError(f"output_dir {str(output_dir)!r} is the current directory or one above it ({out}); "
                            "an artifact replaces its whole directory: name a new subdirectory")
    if out == Path(out.anchor) or home == out or out in home.parents:
        raise ArtifactError(f"output_dir {str(output_dir)!r} is {out}, the filesystem root or your home directory "
                            "(or above it); name a new subdirectory")
    if out.exists():
        if not out.is_dir():
            raise ArtifactError(f"output_dir {out} is a file; an artifact is a directory: name a new one")
        if any(out.iterdir()):
            if not is_artifact(out):
                raise ArtifactError(f"output_dir {out} is a non-empty directory that is not a turbofx artifact; "
                                    "turbofx will not replace it: name a new or empty directory")
            if not overwrite:
                raise ArtifactError(f"output_dir {out} already holds a turbofx artifact; pass overwrite=True "
                                    "(CLI: --overwrite) to replace it, or name another directory")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ArtifactError(f"cannot create {out}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ArtifactError(f"cannot create {out}: {parent} is not writable")
    return out


@contextlib.contextmanager
def _writer_lock(out: Path):
    """Hold an exclusive lock on ``out``'s sibling lock file; a second writer fails at once."""
    import fcntl

    lock = out.parent / f".{out.name}.lock"
    busy = ArtifactError(f"another process is writing {out} right now; wait for it to finish or name "
                         "another directory")
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise ArtifactError(f"cannot write {out}: cannot create the lock file {lock} ({e.strerror or e})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            same = os.stat(lock)
        except (BlockingIOError, FileNotFoundError):
            raise busy from None
        if (same.st_dev, same.st_ino) != (os.fstat(fd).st_dev, os.fstat(fd).st_ino):
            raise busy  # the previous holder removed the file we opened: whoever holds the new one goes first
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                os.unlink(lock)  # while still held, so no one can lock this file after us
    finally:
        os.close(fd)


def _swap(new: Path, out: Path) -> None:
    """Move ``new`` to ``out``; an existing ``out`` is moved aside first and put back if that fails,
    then removed."""
    if not out.exists() or not any(out.iterdir()):
        os.replace(new, out)  # rename onto nothing or onto an empty directory
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    try:
        os.replace(out, old)
    except BaseException:
        old.rmdir()
        raise
    try:
        os.replace(new, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(output_dir: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary sibling of ``output_dir`` to write an artifact into; on success it
    replaces ``output_dir`` (see ``check_output_dir`` for what may be replaced), on any failure or
    interrupt it is removed and ``output_dir`` stays as it was. Put only writing in the body: an
    ``OSError`` there (disk full, permissions) becomes an ``ArtifactError``."""
    out = check_output_dir(output_dir, overwrite)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ArtifactError(f"cannot create {out.parent} ({e.strerror or e})") from None
    with _writer_lock(out):
        check_output_dir(out, overwrite)  # again: it may have changed while the model compiled
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        except OSError as e:
            raise ArtifactError(f"cannot write {out} ({e.strerror or e})") from None
        try:
            yield tmp
            os.chmod(tmp, _dir_mode())
            _swap(tmp, out)
        except OSError as e:
            raise ArtifactError(f"could not write the artifact {out} ({e.strerror or e}); nothing there was "
                                "changed") from e
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful swap


def save(compiled, output_dir: str | os.PathLike, extra: dict | None = None, overwrite: bool = False,
         shares_weights_with: str | None = None, tokenizer=None) -> Path:
    """Write ``compiled`` (a CompiledModule) to ``output_dir`` atomically. With
    ``shares_weights_with`` (a sibling artifact's relative path) no weights are written: ``load``
    takes them from that artifact (e.g. prefill and decode programs over one KV cache). A
    ``tokenizer`` (anything with ``save_pretrained``) is stored in ``tokenizer/``."""
    with atomic_dir(output_dir, overwrite) as tmp:
        write_into(tmp, compiled, extra=extra, shares_weights_with=shares_weights_with, tokenizer=tokenizer)
    return Path(output_dir).resolve()


def write_into(tmp: Path, compiled, extra: dict | None = None, shares_weights_with: str | None = None,
               tokenizer=None, stored: set[str] | None = None) -> None:
    """Write the artifact files of ``compiled`` into the (new, empty) directory ``tmp``, sealed
    meta.json last. ``stored``: only these state keys go into weights.safetensors and ``load``
    takes the others from ``shared_state`` (the compile cache stores no weights)."""
    from safetensors.torch import save_file

    prog = compiled._program
    (tmp / "kernels").mkdir()
    for name, src in prog.sources.items():
        (tmp / "kernels" / f"{name}.py").write_text(src)
    (tmp / "program.json").write_text(json.dumps(prog.d))
    tensors, aliases, seen = {}, {}, {}
    for key, t in compiled._state.items():
        if stored is not None and key not in stored:
            continue
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if ident in seen:
            aliases[key] = seen[ident]
        else:
            seen[ident] = key
            tensors[key] = t.detach().to("cpu").contiguous()
    if shares_weights_with is None and (stored is None or tensors):
        save_file(tensors, str(tmp / "weights.safetensors"))
    report = compiled.turbofx_report
    (tmp / "graph.txt").write_text(str(report) if report is not None else "")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
    meta = {
        "format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "versions": _versions(),
        "target": prog.d.get("target"), "plan": compiled._plan, "expected": _expected_json(compiled._expected),
        "names": compiled._names, "in_spec": _spec_dump(compiled._in_spec), "out_spec": _spec_dump(compiled._out_spec),
        "mutations": {str(k): v for k, v in compiled._mutations.items()},
        "n_user_outputs": compiled._n_user_outputs, "aliases": aliases, "files": file_digests(tmp),
        "state_devices": {k: str(t.device) for k, t in compiled._state.items()}, "extra": extra or {},
        "kernels": [dataclasses.asdict(k) for k in report.kernels] if report is not None else [],
        "shares_weights_with": shares_weights_with,
        "stored": None if stored is None else sorted(k for k in compiled._state if k in stored),
        "guards": compiled._guards.to_json(),  # shape guards: ranges and assertions on input sizes
        "layouts": prog.d.get("layouts", []),  # weights joined at compile time (for people and tools)
        "quantization": prog.d.get("quantization"),  # the config and the weights it quantized, or None
    }
    (tmp / "meta.json").write_text(seal(meta))


def export(module: torch.nn.Module, example_args: tuple = (), example_kwargs: dict | None = None,
           output_dir: str | os.PathLike = "turbofx_artifact", extra: dict | None = None, overwrite: bool = False,
           tokenizer=None, **options) -> Path:
    """Compile ``module`` and write the artifact directory; returns its path. ``output_dir`` must be
    new or empty, or an artifact to replace with ``overwrite=True``; it is checked before compiling."""
    from turbofx.compiler.driver import compile as tfx_compile

    out = check_output_dir(output_dir, overwrite)
    compiled = tfx_compile(module, example_args, example_kwargs, **options)
    return save(compiled, out, extra=extra, overwrite=overwrite, tokenizer=tokenizer)


def artifact_dir(path: str | os.PathLike) -> Path:
    d = Path(path)
    if not d.exists():
        raise ArtifactError(f"{d} does not exist; create an artifact with `turbofx export`")
    if not d.is_dir():
        raise ArtifactError(f"{d} is a file; an artifact is the directory `turbofx export` writes")
    return d


def read_meta(path: str | os.PathLike) -> dict:
    d = artifact_dir(path)
    if not (d / "meta.json").exists() and (d / "generation.json").exists():
        raise ArtifactError(f"{d} is a generation artifact: load it with "
                            "turbofx.compiler.generation.load_generation (or `turbofx run`)")
    return read_sealed(d / "meta.json", d)


def _device(d: Path, device, backend: str | None, state_devices: dict) -> None:
    """Refuse a ``device`` the artifact cannot run on: its kernels were generated, and its
    buffers placed, for the device it was exported on."""
    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ArtifactError(f"device={device!r} is not a device ({e}); use e.g. 'cpu' or 'cuda'") from None
    kind = "cpu" if backend == "cpu-interpret" else "cuda"
    if dev.type != kind:
        raise ArtifactError(f"{d} was exported for {backend}, whose kernels run on {kind}; it cannot be loaded "
                            f"onto {dev}: re-export it for that device (--target)")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ArtifactError(f"{d}: device={device!r}, but this machine has no GPU")
        exported = {torch.device(v) for v in state_devices.values() if v.startswith("cuda")}
        if dev.index is not None and exported and {e.index for e in exported} != {dev.index}:
            raise ArtifactError(f"{d} was exported on {sorted(map(str, exported))}; loading onto {dev} is not "
                                "supported: re-export on that GPU")

def load(path: str | os.PathLike, device: str | None = None, shared_state: dict | None = None):
    """Load an artifact directory into a CompiledModule (no model source needed). An artifact
    that shares another's weights takes ``shared_state`` (that artifact's loaded ``_state``).
    ``device`` checks where it will run: an artifact runs on the device it was exported for, and
    any other (or one this machine lacks) is an ``ArtifactError``."""
    from safetensors.torch import load_file

    from turbofx.runtime.kernels import SourceMismatch, load_kernel
    from turbofx.runtime.module import CompiledModule
    from turbofx.runtime.program import Program

    d = artifact_dir(path)
    meta = read_meta(d)
    now = _versions()
    for lib in ("torch", "triton"):
        if _major_minor(meta["versions"][lib]) != _major_minor(now[lib]):
            raise ArtifactError(f"{d} was exported with {lib} {meta['versions'][lib]}, this is {lib} {now[lib]}; "
                                "re-export it with the installed versions")
    verify_files(d, meta["files"], "meta.json")
    stored = meta.get("stored")  # None: every state tensor is in weights.safetensors (or shared)
    if (meta.get("shares_weights_with") or stored is not None) and shared_state is None:
        raise ArtifactError(f"{d} shares the weights of {meta.get('shares_weights_with') or 'its model'}: load "
                            "that one and pass its state (turbofx.load(path, shared_state=other._state))")
    try:
        prog_d = json.loads((d / "program.json").read_text())
        weights = None if meta.get("shares_weights_with") or (stored is not None and not stored) else \
            load_file(str(d / "weights.safetensors"))
    except Exception as e:
        raise ArtifactError(f"{d}: cannot read program or weights ({e}); re-export the model") from e
    target = prog_d.get("target", {})
    interpret = target.get("backend") == "cpu-interpret"
    if not interpret and not torch.cuda.is_available():
        raise ArtifactError(f"{d} was exported for {target.get('backend')} {target.get('arch')}; this machine has no GPU")
    _device(d, device, target.get("backend"), meta["state_devices"])
    kernels, sources = {}, {}
    for rel, digest in meta["files"].items():  # only the listed kernels, and only as verified
        p = d / rel
        if p.parent.name != "kernels" or p.parent.parent != d or p.suffix != ".py":
            continue
        try:
            kernels[p.stem] = load_kernel(p, p.stem, interpret, sha256=digest)
        except SourceMismatch:
            raise ArtifactError(f"{d}: {rel} changed while it was loaded; load again or re-export") from None
        sources[p.stem] = p.read_text()
    program = Program(prog_d, kernels)
    program.sources = sources
    if stored is not None:  # the stored keys from the file, the others from shared_state
        missing = set(meta["state_devices"]) - set(shared_state) - set(stored)
        if missing:
            raise ArtifactError(f"{d}: the shared state lacks {sorted(missing)[:5]}")
        state = {}
        for key, dev in meta["state_devices"].items():
            if key in stored:
                state[key] = weights[meta["aliases"].get(key, key)].to(dev)
            else:
                state[key] = shared_state[key]
    elif weights is None:
        missing = set(meta["state_devices"]) - set(shared_state)
        if missing:
            raise ArtifactError(f"{d}: the shared state lacks {sorted(missing)[:5]}")
        state = {k: shared_state[k] for k in meta["state_devices"]}
    else:
        state = {}
        for key, dev in meta["state_devices"].items():
            src = meta["aliases"].get(key, key)
            state[key] = weights[src].to(dev)  # where it was exported: the program allocates there too
        for key, src in meta["aliases"].items():
            state[key] = state[src]
    expected = [
        {"kind": "tensor", "shape": e["shape"], "dtype": getattr(torch, e["dtype"]), "device": torch.device(e["device"])}
        if e["kind"] == "tensor" else e for e in meta["expected"]
    ]
    from turbofx.codegen.lower import KernelRecord
    from turbofx.compiler.driver import Report

    from turbofx.passes.layout import WeightLayout

    report = Report(target=f"{target.get('backend')} {target.get('arch')} (loaded from {d})",
                    kernels=[KernelRecord(**k) for k in meta.get("kernels", [])],
                    layouts=[WeightLayout(**w) for w in meta.get("layouts", [])])
    quant = meta.get("quantization")
    if quant is not None:  # what was quantized at export (the config's filter, if custom, is not restored)
        from turbofx.passes.quantize import QuantizedLayer
        from turbofx.quant import config_from_json, parse

        try:
            report.quantization = config_from_json(quant["config"])
        except TurbofxError:  # a custom filter is not stored: say which scheme, without it
            report.quantization = parse(str(quant["config"].get("scheme")))
        report.quantized = [QuantizedLayer(**{**q, "layers": tuple(q["layers"]), "shape": tuple(q["shape"])})
                            for q in quant["layers"]]
    from turbofx.runtime.guards import ShapeGuards

    cm = CompiledModule(program, state, meta["plan"], expected, meta["names"], _spec_load(meta["in_spec"]),
                        _spec_load(meta["out_spec"]), {int(k): v for k, v in meta["mutations"].items()},
                        meta["n_user_outputs"], report, guards=ShapeGuards.from_json(meta.get("guards")))
    cm.turbofx_meta = meta
    return cm
