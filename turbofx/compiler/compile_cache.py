"""Persistent compile cache: a second process compiling the same model loads the compiled program
instead of re-running torch.export, the passes and codegen.

Invariant: an entry is used only when everything that determines the program is equal — the key
is the sha256 of a canonical record of the module's classes (and their source files), every
submodule's simple attributes and config, every parameter's and buffer's name, shape, dtype,
device, layout in memory and aliasing, the example inputs' structure, shapes, dtypes and devices,
the options that shape the program, the detected target, turbofx's own source, every .py file of
a user package that defines a module class (its helpers shape the program too; transformers' code
outside the model's class files is covered by its version), the library versions and the
``TURBOFX_*`` settings. Anything that cannot be put in the record means no caching
(the reason is recorded). Weights are never stored in, or trusted from, the cache: each state
tensor of the program is rebuilt from the live module by its recipe — ``ModuleTensor`` (the
module's own parameter/buffer, so mutable buffers such as KV caches stay shared), ``Joined``
(layout's ``_join`` over module tensors, re-pointing them as a cold compile does) or ``Stored``
(a lifted constant, whose value follows from code and config, both in the key). A recipe the live
module cannot satisfy is a miss.

Entries are artifact directories (``artifact.write_into``, no weights) at
``<root>/programs/<key[:2]>/<key>/``, written into a temporary sibling and renamed into place, so
readers never see a partial entry and of two concurrent writers one wins and the other discards its
copy. A damaged entry (digest, JSON, missing file, failed load) is logged, removed and rebuilt. An
unwritable cache directory is a warning; compiling goes on uncached.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("turbofx.compiler")

# settings that change where or whether entries are kept, or only what is logged, not the program
_ENV_NOT_IN_KEY = {"TURBOFX_CACHE_DIR", "TURBOFX_COMPILE_CACHE", "TURBOFX_LOG"}
_OPTIONS_IN_KEY = ("target", "dynamic", "attention", "disable", "cudagraphs", "mode")
_SIMPLE = (int, float, str, bool, type(None))


@dataclass(frozen=True)
class ModuleTensor:
    """State recipe: the live module's parameter or buffer ``name`` (the tensor itself)."""

    name: str


@dataclass(frozen=True)
class Stored:
    """State recipe: a lifted constant stored in the entry (its value follows from code + config)."""


@dataclass
class CacheRecord:
    """What the compile cache did for one compile: hit, miss (compiled and stored), skipped (not
    cacheable or off, with the reason)."""

    status: str  # "hit" | "miss" | "skipped"
    reason: str = ""
    key: str = ""  # first 12 hex digits of the key
    seconds: float = 0.0  # key + lookup (+ store on a miss)
    passes: str = ""  # on a hit: the cold compile's pass summary

    def __str__(self) -> str:
        key = f" {self.key}" if self.key else ""
        why = f" ({self.reason})" if self.reason else ""
        return f"compile cache: {self.status}{key}{why}, {self.seconds:.2f}s"


class Uncacheable(Exception):
    """Something that determines the program cannot be put in the key (the message says what)."""


# -- where, and whether ------------------------------------------------------------------------

def root() -> Path:
    """``$TURBOFX_CACHE_DIR/programs`` (the kernel cache's root), else under ``$XDG_CACHE_HOME/turbofx``
    or ``~/.cache/turbofx``."""
    if os.environ.get("TURBOFX_CACHE_DIR"):
        base = Path(os.environ["TURBOFX_CACHE_DIR"])
    elif os.environ.get("XDG_CACHE_HOME"):
        base = Path(os.environ["XDG_CACHE_HOME"]) / "turbofx"
    else:
        base = Path.home() / ".cache" / "turbofx"
    return base / "programs"


def skip_reason(opts) -> str | None:
    """Why this compile must not use the cache, or None."""
    if getattr(opts, "compile_cache", True) is False:
        return "compile_cache=False"
    if os.environ.get("TURBOFX_COMPILE_CACHE", "").strip().lower() in ("0", "false", "off", "no"):
        return "TURBOFX_COMPILE_CACHE=0"
    if opts.verify:
        return f"verify={opts.verify!r} checks a fresh compile"
    if opts.dump_dir or os.environ.get("TURBOFX_DUMP"):
        return "dump_dir writes each stage of a fresh compile"
    if opts.max_rewrites is not None:
        return "max_rewrites bisects a fresh compile"
    if opts.quantize is not None:
        return "quantized programs are not cached yet"
    return None


# -- the key -------------------------------------------------------------------------------------

_file_sha: dict[tuple[str, float], str] = {}
_own_sha: str | None = None


def _source_sha(cls: type) -> str:
    try:
        path = inspect.getsourcefile(cls)
    except TypeError:
        path = None
    if path is None or not os.path.isfile(path):
        raise Uncacheable(f"no source file for {cls.__module__}.{cls.__qualname__}")
    stamp = (path, os.path.getmtime(path))
    if stamp not in _file_sha:
        _file_sha[stamp] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return _file_sha[stamp]


def _turbofx_sha() -> str:
    global _own_sha
    if _own_sha is None:
        pkg = Path(__file__).resolve().parent.parent
        h = hashlib.sha256()
        for p in sorted(pkg.rglob("*.py")):
            h.update(p.relative_to(pkg).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
        _own_sha = h.hexdigest()
    return _own_sha


def _simple(v: Any) -> Any:
    """``v`` as JSON if it is a simple value (or a tuple/list of them); raises Uncacheable otherwise."""
    if isinstance(v, float) and v != v:
        return "nan"
    if isinstance(v, _SIMPLE):
        return v
    if isinstance(v, (torch.dtype, torch.device)):
        return str(v)
    if isinstance(v, (tuple, list)):
        return [type(v).__name__, [_simple(x) for x in v]]
    raise Uncacheable(type(v).__name__)


def _attributes(m: torch.nn.Module) -> dict:
    out = {}
    for k, v in sorted(vars(m).items()):
        if k.startswith("_") or callable(v) and not hasattr(v, "to_json_string"):
            continue
        if hasattr(v, "to_json_string"):  # HF configs
            try:
                out[k] = [v.to_json_string(use_diff=False), getattr(v, "_attn_implementation", None)]
            except Exception as e:
                raise Uncacheable(f"{type(m).__name__}.{k} cannot be serialized ({type(e).__name__})") from None
            continue
        try:
            out[k] = _simple(v)
        except Uncacheable:
            pass  # not a setting (e.g. a cache object): its tensors are buffers, in the key
    return out


def _package_sha(top: str) -> str | None:
    """sha256 over every .py file of the package ``top`` (its helpers shape the program too: a
    forward may call a function defined in another file); None for a single-file module."""
    mod = sys.modules.get(top)
    paths = list(getattr(mod, "__path__", []) or [])
    if not paths:
        return None
    h = hashlib.sha256()
    for base in paths:
        for p in sorted(Path(base).rglob("*.py")):
            stamp = (str(p), p.stat().st_mtime)
            if stamp not in _file_sha:
                _file_sha[stamp] = hashlib.sha256(p.read_bytes()).hexdigest()
            h.update(f"{p.relative_to(base).as_posix()}:{_file_sha[stamp]};".encode())
    return h.hexdigest()


# libraries whose code outside the model classes is covered by their version in the key
_VERSIONED = ("torch", "builtins", "transformers", "turbofx")


def _classes(module: torch.nn.Module) -> list:
    seen: dict[str, str] = {}
    packages: dict[str, str | None] = {}
    for m in module.modules():
        for cls in type(m).__mro__:
            top = cls.__module__.split(".")[0]
            if top in ("torch", "builtins"):
                continue  # torch's own code is covered by its version
            name = f"{cls.__module__}.{cls.__qualname__}"
            if name not in seen:
                seen[name] = _source_sha(cls)
            if top not in _VERSIONED and top not in packages:
                packages[top] = _package_sha(top)
    return sorted(seen.items()) + sorted(packages.items(), key=lambda kv: kv[0])


def _tensors(module: torch.nn.Module) -> list:
    out, storages = [], {}
    named = [("p", n, t) for n, t in module.named_parameters(remove_duplicate=False)]
    named += [("b", n, t) for n, t in module.named_buffers(remove_duplicate=False)]
    first: dict[int, str] = {}
    for kind, name, t in named:
        # aliasing and memory layout change what layout may join (tied or already-joined weights)
        ptr = t.untyped_storage().data_ptr() if t.device.type != "meta" else id(t)
        group = storages.setdefault(ptr, len(storages))
        out.append([kind, name, list(t.shape), str(t.dtype), str(t.device), bool(t.requires_grad),
                    list(t.stride()), int(t.storage_offset()), group, first.setdefault(id(t), name)])
    return out


def _inputs(args: tuple, kwargs: dict) -> list:
    import torch.utils._pytree as pytree

    leaves, spec = pytree.tree_flatten((args, kwargs))
    out = [str(spec)]
    for x in leaves:
        if isinstance(x, torch.Tensor):
            out.append(["tensor", list(x.shape), str(x.dtype), str(x.device), bool(x.requires_grad)])
        else:
            try:
                out.append(["value", _simple(x)])
            except Uncacheable:
                raise Uncacheable(f"an example input is a {type(x).__name__}") from None
    return out


def _version(dist: str) -> str | None:
    """An installed distribution's version without importing it (transformers takes ~1 s to import)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def key_of(module: torch.nn.Module, args: tuple, kwargs: dict, opts, target: str) -> str:
    """The sha256 key of everything that determines the program; raises Uncacheable."""
    return hashlib.sha256(key_text(module, args, kwargs, opts, target).encode()).hexdigest()


def key_text(module: torch.nn.Module, args: tuple, kwargs: dict, opts, target: str) -> str:
    """The canonical JSON record the key hashes (for people: diff two of them to see why a miss)."""
    import triton

    record = {
        "root": f"{type(module).__module__}.{type(module).__qualname__}",
        "classes": _classes(module),
        "attributes": [[n, type(m).__qualname__, _attributes(m)] for n, m in module.named_modules(remove_duplicate=False)],
        "tensors": _tensors(module),
        "inputs": _inputs(args, kwargs),
        "options": {k: _simple(getattr(opts, k)) for k in _OPTIONS_IN_KEY},
        "target": target,
        "turbofx": _turbofx_sha(),
        "versions": [torch.__version__, triton.__version__, _version("transformers"), sys.version],
        "env": sorted((k, v) for k, v in os.environ.items()
                      if (k.startswith("TURBOFX_") and k not in _ENV_NOT_IN_KEY) or k == "TRITON_INTERPRET"),
    }
    try:
        return json.dumps(record, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise Uncacheable(f"the key record is not JSON ({e})") from None


# -- recipes ---------------------------------------------------------------------------------------

def _live(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    live = dict(module.named_parameters(remove_duplicate=False))
    live.update(module.named_buffers(remove_duplicate=False))
    return live


def origins(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Before the passes: each captured state key -> ModuleTensor (the module's own tensor under that
    name) or Stored (a lifted constant)."""
    live = _live(module)
    return {k: ModuleTensor(k) if live.get(k) is t else Stored() for k, t in state.items()}


def recipes(captured, origin: dict[str, Any], state: dict[str, torch.Tensor]) -> dict[str, dict]:
    """The recipe of every state tensor of the finished program, as JSON; raises Uncacheable."""
    from turbofx.passes.layout import Joined

    out = {}
    for k, t in state.items():
        r = captured.recipes.get(k) if k in captured.recipes else origin.get(k)
        meta = {"shape": list(t.shape), "dtype": str(t.dtype)}
        if isinstance(r, ModuleTensor):
            out[k] = {"kind": "module", "name": r.name, **meta}
        elif isinstance(r, Stored):
            out[k] = {"kind": "stored", **meta}
        elif isinstance(r, Joined):
            if not all(isinstance(origin.get(s), ModuleTensor) for s in r.keys):
                raise Uncacheable(f"{k} joins tensors that are not the module's own")
            out[k] = {"kind": "joined", "keys": [origin[s].name for s in r.keys], **meta}
        else:
            raise Uncacheable(f"state {k} was made by a pass without a recipe")
    return out


def _rebuild(module: torch.nn.Module, rec: dict[str, dict]) -> dict[str, torch.Tensor] | None:
    """The program's state from the live module by recipe (stored constants come from the entry);
    None if a recipe cannot be met. Every check runs before any join re-points a weight."""
    from turbofx.passes.layout import _join

    live = _live(module)

    def fits(t, r) -> bool:
        return t is not None and list(t.shape) == r["shape"] and str(t.dtype) == r["dtype"]

    for k, r in rec.items():
        if r["kind"] == "module" and not fits(live.get(r["name"]), r):
            return None
        if r["kind"] == "joined":
            srcs = [live.get(n) for n in r["keys"]]
            if any(s is None for s in srcs) or sum(int(s.shape[0]) for s in srcs) != r["shape"][0]:
                return None
    state = {}
    for k, r in rec.items():
        if r["kind"] == "module":
            state[k] = live[r["name"]]
        elif r["kind"] == "joined":
            state[k], _ = _join([live[n] for n in r["keys"]])
    return state


# -- entries ---------------------------------------------------------------------------------------

def _entry(key: str) -> Path:
    return root() / key[:2] / key


def _discard(d: Path, why: str) -> None:
    log.warning("turbofx compile cache: entry %s is damaged (%s); removing it and compiling again", d, why)
    try:
        aside = Path(tempfile.mkdtemp(prefix=f".{d.name}.bad-", dir=d.parent))
        os.replace(d, aside)  # out of the way at once, so no reader picks it up half-removed
        shutil.rmtree(aside, ignore_errors=True)
    except OSError:
        shutil.rmtree(d, ignore_errors=True)


def lookup(key: str, module: torch.nn.Module) -> tuple[Any, str]:
    """(the cached CompiledModule for ``key`` over ``module``'s live tensors, the cold compile's pass
    summary), or (None, why it missed)."""
    from turbofx.compiler.artifact import load, read_meta, verify_files
    from turbofx.errors import TurbofxError

    d = _entry(key)
    if not d.is_dir():
        return None, "no entry"
    try:
        meta = read_meta(d)  # sealed: the recipes cannot have been edited
        verify_files(d, meta["files"], "meta.json")  # before any join re-points the module's weights
        extra = meta["extra"]["compile_cache"]
        if extra.get("key") != key:
            raise TurbofxError("the entry is for another key")
        state = _rebuild(module, extra["recipes"])
        if state is None:
            return None, "the live module does not match the entry's state recipes"
        compiled = load(d, shared_state=state)
    except Exception as e:  # anything wrong with an entry means: not trusted, rebuilt
        _discard(d, f"{type(e).__name__}: {str(e)[:300]}")
        return None, "damaged entry rebuilt"
    rep = compiled.turbofx_report
    rep.target = extra.get("target", rep.target)
    return compiled, extra.get("passes", "")


def store(key: str, module: torch.nn.Module, captured, origin: dict, compiled, report) -> str:
    """Write the entry for ``key``; returns "" or why it was not stored (never raises)."""
    from turbofx.compiler.artifact import write_into

    try:
        rec = recipes(captured, origin, compiled._state)
    except Uncacheable as e:
        return str(e)
    stored = {k for k, r in rec.items() if r["kind"] == "stored"}
    extra = {"compile_cache": {"key": key, "recipes": rec, "target": report.target,
                               "passes": "; ".join(p.summary() for p in report.passes)}}
    d = _entry(key)
    tmp = None
    try:
        d.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=d.parent))
        write_into(tmp, compiled, extra=extra, stored=stored)
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, d)
        except OSError:
            if not d.is_dir():
                raise
            return ""  # another process stored the same key first: its entry is as good
    except OSError as e:
        log.warning("turbofx compile cache: cannot write %s (%s); compiling without the cache", d, e.strerror or e)
        import warnings

        warnings.warn(f"turbofx: the compile cache {root()} is not writable ({e.strerror or e}); compiled "
                      "without it (set TURBOFX_CACHE_DIR to a writable directory, or TURBOFX_COMPILE_CACHE=0)",
                      RuntimeWarning, stacklevel=4)
        return f"cache dir not writable ({e.strerror or e})"
    except Exception as e:  # the cache must never fail a compile that succeeded
        log.warning("turbofx compile cache: could not store %s (%s: %s)", d, type(e).__name__, e)
        return f"{type(e).__name__} while writing the entry"
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return ""
