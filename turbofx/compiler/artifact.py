"""Artifacts: ``export`` writes a self-contained directory, ``load`` runs it without model source.

Layout: ``program.json`` (the Program: steps over buffers), ``kernels/*.py`` (Triton sources),
``weights.safetensors`` (parameters, buffers, constants; shared tensors stored once),
``meta.json`` (format, versions, target, call signature, checksums of every file), ``graph.txt``
(the optimised graph, for people). Written into a temporary sibling and renamed into place, so a
failed export leaves nothing behind.
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

FORMAT = 2  # 2: attention steps call the kernel with packed query heads, RoPE and cache-write arguments


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


@contextlib.contextmanager
def atomic_dir(output_dir: str | os.PathLike):
    """Yield a temporary sibling of ``output_dir``; on success it replaces ``output_dir``, on any
    failure it is removed, so a failed export leaves nothing half-written."""
    out = Path(output_dir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save(compiled, output_dir: str | os.PathLike, extra: dict | None = None, overwrite: bool = True,
         shares_weights_with: str | None = None) -> Path:
    """Write ``compiled`` (a CompiledModule) to ``output_dir`` atomically. With
    ``shares_weights_with`` (a sibling artifact's relative path) no weights are written: ``load``
    takes them from that artifact (e.g. prefill and decode programs over one KV cache)."""
    from safetensors.torch import save_file

    out = Path(output_dir).resolve()
    if out.exists() and not overwrite:
        raise ArtifactError(f"{out} exists; pass overwrite=True or choose another --output-dir")
    with atomic_dir(out) as tmp:
        prog = compiled._program
        (tmp / "kernels").mkdir()
        for name, src in prog.sources.items():
            (tmp / "kernels" / f"{name}.py").write_text(src)
        (tmp / "program.json").write_text(json.dumps(prog.d))
        tensors, aliases, seen = {}, {}, {}
        for key, t in compiled._state.items():
            ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
            if ident in seen:
                aliases[key] = seen[ident]
            else:
                seen[ident] = key
                tensors[key] = t.detach().to("cpu").contiguous()
        if shares_weights_with is None:
            save_file(tensors, str(tmp / "weights.safetensors"))
        report = compiled.turbofx_report
        (tmp / "graph.txt").write_text(str(report) if report is not None else "")
        files = {p.relative_to(tmp).as_posix(): _sha(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        meta = {
            "format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "versions": _versions(),
            "target": prog.d.get("target"), "plan": compiled._plan, "expected": _expected_json(compiled._expected),
            "names": compiled._names, "in_spec": _spec_dump(compiled._in_spec), "out_spec": _spec_dump(compiled._out_spec),
            "mutations": {str(k): v for k, v in compiled._mutations.items()},
            "n_user_outputs": compiled._n_user_outputs, "aliases": aliases, "files": files,
            "state_devices": {k: str(t.device) for k, t in compiled._state.items()}, "extra": extra or {},
            "kernels": [dataclasses.asdict(k) for k in report.kernels] if report is not None else [],
            "shares_weights_with": shares_weights_with,
            "guards": compiled._guards.to_json(),  # shape guards (h2): ranges and assertions on input sizes
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    return out


def export(module: torch.nn.Module, example_args: tuple = (), example_kwargs: dict | None = None,
           output_dir: str | os.PathLike = "turbofx_artifact", extra: dict | None = None, **options) -> Path:
    """Compile ``module`` and write the artifact directory; returns its path."""
    from turbofx.compiler.driver import compile as tfx_compile

    compiled = tfx_compile(module, example_args, example_kwargs, **options)
    return save(compiled, output_dir, extra=extra)


def read_meta(path: str | os.PathLike) -> dict:
    d = Path(path)
    try:
        meta = json.loads((d / "meta.json").read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{d} is not a turbofx artifact (no meta.json); create one with `turbofx export`") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{d}/meta.json is corrupt ({e}); re-export the model") from None
    if meta.get("format") != FORMAT:
        raise ArtifactError(f"{d} has artifact format {meta.get('format')}, this turbofx reads format {FORMAT}; re-export")
    return meta


def load(path: str | os.PathLike, device: str | None = None, shared_state: dict | None = None):
    """Load an artifact directory into a CompiledModule (no model source needed). An artifact
    that shares another's weights takes ``shared_state`` (that artifact's loaded ``_state``)."""
    from safetensors.torch import load_file

    from turbofx.runtime.kernels import load_kernel
    from turbofx.runtime.module import CompiledModule
    from turbofx.runtime.program import Program

    d = Path(path)
    meta = read_meta(d)
    now = _versions()
    for lib in ("torch", "triton"):
        if _major_minor(meta["versions"][lib]) != _major_minor(now[lib]):
            raise ArtifactError(f"{d} was exported with {lib} {meta['versions'][lib]}, this is {lib} {now[lib]}; "
                                "re-export it with the installed versions")
    for rel, digest in meta["files"].items():
        f = d / rel
        if not f.is_file() or _sha(f) != digest:
            raise ArtifactError(f"{d}: {rel} is missing or corrupt (checksum mismatch); re-export the model")
    if meta.get("shares_weights_with") and shared_state is None:
        raise ArtifactError(f"{d} shares the weights of {meta['shares_weights_with']}: load that one and pass "
                            "its state (turbofx.load(path, shared_state=other._state))")
    try:
        prog_d = json.loads((d / "program.json").read_text())
        weights = None if meta.get("shares_weights_with") else load_file(str(d / "weights.safetensors"))
    except Exception as e:
        raise ArtifactError(f"{d}: cannot read program or weights ({e}); re-export the model") from e
    target = prog_d.get("target", {})
    interpret = target.get("backend") == "cpu-interpret"
    if not interpret and not torch.cuda.is_available():
        raise ArtifactError(f"{d} was exported for {target.get('backend')} {target.get('arch')}; this machine has no GPU")
    kernels = {p.stem: load_kernel(p, p.stem, interpret) for p in sorted((d / "kernels").glob("*.py"))}
    program = Program(prog_d, kernels)
    program.sources = {p.stem: p.read_text() for p in (d / "kernels").glob("*.py")}
    if weights is None:
        missing = set(meta["state_devices"]) - set(shared_state)
        if missing:
            raise ArtifactError(f"{d}: the shared state lacks {sorted(missing)[:5]}")
        state = {k: shared_state[k] for k in meta["state_devices"]}
    else:
        state = {}
        for key, dev in meta["state_devices"].items():
            src = meta["aliases"].get(key, key)
            state[key] = weights[src].to(device or dev)
        for key, src in meta["aliases"].items():
            state[key] = state[src]
    expected = [
        {"kind": "tensor", "shape": e["shape"], "dtype": getattr(torch, e["dtype"]), "device": torch.device(e["device"])}
        if e["kind"] == "tensor" else e for e in meta["expected"]
    ]
    from turbofx.codegen.lower import KernelRecord
    from turbofx.compiler.driver import Report

    report = Report(target=f"{target.get('backend')} {target.get('arch')} (loaded from {d})",
                    kernels=[KernelRecord(**k) for k in meta.get("kernels", [])])
    from turbofx.runtime.guards import ShapeGuards

    cm = CompiledModule(program, state, meta["plan"], expected, meta["names"], _spec_load(meta["in_spec"]),
                        _spec_load(meta["out_spec"]), {int(k): v for k, v in meta["mutations"].items()},
                        meta["n_user_outputs"], report, guards=ShapeGuards.from_json(meta.get("guards")))
    cm.turbofx_meta = meta
    return cm
