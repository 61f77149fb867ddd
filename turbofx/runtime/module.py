"""CompiledModule: an nn.Module that runs a Program with the original call signature."""
from __future__ import annotations

import contextlib

import logging
import re
from typing import Any

import torch
import torch.utils._pytree as pytree

from turbofx.errors import InputMismatchError, TurbofxError
from turbofx.runtime.guards import Evaluator, ShapeGuards, bindings
from turbofx.runtime.program import Program

log = logging.getLogger("turbofx.runtime")


def describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"Tensor(shape={list(x.shape)}, dtype={x.dtype}, device={x.device})"
    return repr(x)


INFERENCE_ONLY = ("turbofx programs are inference-only: they compute no gradients. Use "
                  "torch.compile(model, backend='turbofx') to train, or call the compiled module under "
                  "torch.no_grad() / torch.inference_mode()")


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype and a.device == b.device)


class _InferenceOnly(torch.autograd.Function):
    """Connects a call's outputs to the inputs and parameters that require grad, so that
    ``backward()`` through them raises instead of silently producing partial gradients (the
    program's kernels are invisible to autograd)."""

    @staticmethod
    def forward(ctx, run, *deps):
        outs = run()
        ctx.mark_non_differentiable(*[o for o in outs if isinstance(o, torch.Tensor) and not o.is_floating_point()])
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        raise TurbofxError(INFERENCE_ONLY)


class CompiledModule(torch.nn.Module):
    """Calls like the module it was compiled from and returns the same structure.

    ``plan`` is, per graph input, ``["user", k]`` (k-th flat user input) or ``["state", key]``;
    ``expected`` describes each flat user input (tensor rank/dtype/device and dims: an int for a
    static dim, the Python source of its size expression for a symbolic one, None for any; or the
    exact value of a non-tensor input the graph was specialised on); ``guards`` are the conditions
    on those sizes the program was captured under; ``mutations`` maps a program output index to
    the state key or user input it writes back in place.
    """

    def __init__(self, program: Program, state: dict[str, torch.Tensor], plan: list, expected: list,
                 names: list[str], in_spec, out_spec, mutations: dict[int, list], n_user_outputs: int,
                 report: Any = None, guards: ShapeGuards | None = None):
        super().__init__()
        self._program = program
        self._state = dict(state)
        for i, (key, t) in enumerate(state.items()):
            self.register_buffer(f"_s{i}", t, persistent=False)
        self._plan = plan
        self._expected = expected
        self._names = names
        self._in_spec = in_spec
        self._out_spec = out_spec
        self._mutations = mutations
        self._n_user_outputs = n_user_outputs
        self.turbofx_report = report
        self._runner = None
        self._guards = guards or ShapeGuards()
        self._bindings = bindings([e["shape"] if e["kind"] == "tensor" else None for e in expected])
        self._eval = Evaluator()
        self._user_mutations = sorted((i, key) for i, (kind, key) in mutations.items() if kind == "user")

    def _check_quantized_sources(self) -> None:
        """The program holds quantized copies of some of the model's weights: an update of those
        weights since compiling (load_state_dict, an optimizer step) would be silently ignored."""
        report = self.turbofx_report
        for ref, version in getattr(report, "quantized_sources", ()):
            t = ref()
            if t is not None and t._version != version:
                raise TurbofxError("weights turbofx quantized when compiling were changed since (load_state_dict or "
                                   "another in-place update): this program holds their old quantized values. "
                                   "Compile again (turbofx.compile / turbofx.generate recompiles by itself)")

    def state_bytes(self) -> int:
        """Bytes of the module state the program holds (weights, quantized or not; buffers), each
        storage counted once (joined weights and their views share one)."""
        seen: dict[int, int] = {}
        for t in self._state.values():
            s = t.untyped_storage()
            seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
        return sum(seen.values())

    def _step(self, graph_inputs: list) -> list:
        """One call: the Program, then its buffer mutations written back in place. Returns the user
        outputs followed by the new values of mutated user inputs (the caller writes those into the
        tensors it was given: under graph replay ``graph_inputs`` are static copies)."""
        outs = self._program(graph_inputs)
        for i, (kind, key) in self._mutations.items():
            if kind == "state" and not _same_memory(self._state[key], outs[i]):  # updated in place already
                self._state[key].copy_(outs[i])
        return [o for i, o in enumerate(outs) if i not in self._mutations] + [outs[i] for i, _ in self._user_mutations]

    def enable_graphs(self, notes: list) -> None:
        """Replay calls through CUDA/HIP graphs (state tensors used in place)."""
        from turbofx.runtime.graphs import GraphRunner

        self._runner = GraphRunner(self._step, [kind == "state" for kind, _ in self._plan], notes)

    def _check(self, flat: list) -> list:
        if len(flat) != len(self._expected):
            raise InputMismatchError(f"expected {len(self._expected)} inputs ({', '.join(self._names)}), got {len(flat)}")
        out = []
        for x, exp, name in zip(flat, self._expected, self._names):
            if exp["kind"] == "tensor":
                if not isinstance(x, torch.Tensor):
                    raise InputMismatchError(f"{name}: expected a tensor, got {describe(x)}")
                problems = []
                if x.dim() != len(exp["shape"]):
                    problems.append(f"rank {len(exp['shape'])}, got rank {x.dim()}")
                elif any(isinstance(e, int) and e != s for e, s in zip(exp["shape"], x.shape)):
                    problems.append(f"shape {[e if isinstance(e, int) else '*' for e in exp['shape']]}, got {list(x.shape)}")
                if x.dtype != exp["dtype"]:
                    problems.append(f"dtype {exp['dtype']}, got {x.dtype}")
                if x.device.type != exp["device"].type:
                    problems.append(f"device {exp['device']}, got {x.device}")
                if problems:
                    raise InputMismatchError(f"{name}: expected " + "; expected ".join(problems)
                                             + " (recompile for other inputs)")
                out.append(x if x.is_contiguous() else x.contiguous())
            else:
                if isinstance(x, torch.Tensor) or x != exp["value"]:
                    raise InputMismatchError(f"{name}: the graph was specialised on {exp['value']!r}, got {describe(x)}")
                out.append(x)
        if self._bindings:
            self._check_sizes(flat)
        return out

    def _check_sizes(self, flat: list) -> None:
        """The shape guards: dims that must equal other inputs' sizes, and the ranges and
        assertions the program was captured under (a call outside them would run a program traced
        for other sizes)."""
        env = {sym: flat[k].shape[d] for sym, k, d in self._bindings}
        where = {sym: f"{self._names[k]}.shape[{d}]" for sym, k, d in self._bindings}

        def sizes(text: str) -> str:
            used = [s for s in env if re.search(rf"\b{s}\b", text)]
            return ", ".join(f"{s} = {where[s]} = {env[s]}" for s in used)

        hint = ("; recompile for these sizes (turbofx.compile with an example of them, or static "
                "shapes)")
        for x, exp, name in zip(flat, self._expected, self._names):
            if exp["kind"] != "tensor":
                continue
            for d, e in enumerate(exp["shape"]):
                if isinstance(e, str) and where.get(e) != f"{name}.shape[{d}]":
                    want = self._eval(e, env)
                    if want != x.shape[d]:
                        raise InputMismatchError(
                            f"{name}.shape[{d}] is {x.shape[d]}, but the program requires it to equal {e} = {want} "
                            f"({sizes(e)}): the inputs' sizes must agree as in the example" + hint)
        for g in self._guards.ranges:
            v = self._eval(g.expr, env)
            if v < g.lo or (g.hi is not None and v > g.hi):
                allowed = f"[{g.lo}, {'inf' if g.hi is None else g.hi}]"
                what = f"{where[g.expr]} = {v}" if g.expr in where else f"size {g.text} = {v} ({sizes(g.expr)})"
                why = (" (torch.export specialises sizes 0 and 1: compile another program from an example "
                       "of that size)" if v in (0, 1) else " (the model branches on this size)")
                raise InputMismatchError(f"{what} is outside the range {allowed} the program was compiled for"
                                         + why + hint)
        for g in self._guards.asserts:
            if not self._eval(g.expr, env):
                raise InputMismatchError(f"the program requires {g.text}, which fails for {sizes(g.expr)}" + hint)

    def _check_aliasing(self, flat: list) -> None:
        """Inputs updated in place must not share memory with another input: eager would let the
        other input see the update, the compiled program reads every input as it was."""
        tensors = [(n, x) for n, x in zip(self._names, flat) if isinstance(x, torch.Tensor) and x.numel()]
        mutated = [(self._names[k], flat[k]) for _, k in self._user_mutations]
        mutated += [(f"the module's {key}", self._state[key]) for kind, key in self._mutations.values()
                    if kind == "state"]
        for mname, m in mutated:
            if not isinstance(m, torch.Tensor) or not m.numel():
                continue
            ptr = m.untyped_storage().data_ptr()
            for name, x in tensors:
                if name != mname and x.untyped_storage().data_ptr() == ptr:
                    raise InputMismatchError(
                        f"{name} shares memory with {mname}, which the model updates in place: the compiled "
                        f"program reads {name} as it was before the update (eager would not); pass separate "
                        f"tensors (e.g. {name}.clone())")

    @contextlib.contextmanager
    def without_graphs(self):
        """Calls inside run the Program directly, not through graph replay: for shapes seen once
        (a serving engine's mixed prefill/decode steps), which would only fill the graph pool."""
        saved, self._graphs_off = getattr(self, "_graphs_off", False), True
        try:
            yield
        finally:
            self._graphs_off = saved

    def _call(self, graph_inputs: list) -> list:
        if self._runner is not None and not getattr(self, "_graphs_off", False):
            return self._runner(graph_inputs)
        return self._step(graph_inputs)

    def forward(self, *args, **kwargs):
        if self._in_spec is not None:
            flat, spec = pytree.tree_flatten((args, kwargs))
            if spec != self._in_spec:
                raise InputMismatchError(
                    f"inputs are structured differently from the example: expected {self._in_spec}, got {spec}")
        else:
            flat = list(args)
        given = flat
        self._check_quantized_sources()
        flat = self._check(flat)
        if self._mutations:
            self._check_aliasing(given)
        graph_inputs = [flat[k] if kind == "user" else self._state[k] for kind, k in self._plan]
        deps = []
        if torch.is_grad_enabled():
            deps = [t for t in list(self._state.values()) + given if isinstance(t, torch.Tensor) and t.requires_grad]
        if deps:
            outs = list(_InferenceOnly.apply(lambda: self._call(graph_inputs), *deps))
        else:
            outs = self._call(graph_inputs)
        n = len(outs) - len(self._user_mutations)
        user, updates = outs[:n], outs[n:]
        for (_, k), new in zip(self._user_mutations, updates):
            given[k].copy_(new)  # the caller's tensor, also when the program ran on a contiguous copy
        if self._out_spec is None:
            return user
        return pytree.tree_unflatten(user, self._out_spec)
