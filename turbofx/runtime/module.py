"""CompiledModule: an nn.Module that runs a Program with the original call signature."""
from __future__ import annotations

import logging
from typing import Any

import torch
import torch.utils._pytree as pytree

from turbofx.errors import InputMismatchError
from turbofx.runtime.program import Program

log = logging.getLogger("turbofx.runtime")


def describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"Tensor(shape={list(x.shape)}, dtype={x.dtype}, device={x.device})"
    return repr(x)


class CompiledModule(torch.nn.Module):
    """Calls like the module it was compiled from and returns the same structure.

    ``plan`` is, per graph input, ``["user", k]`` (k-th flat user input) or ``["state", key]``;
    ``expected`` describes each flat user input (tensor rank/dtype/device and static dims, or the
    exact value of a non-tensor input the graph was specialised on); ``mutations`` maps a program
    output index to the state key or user input it writes back in place.
    """

    def __init__(self, program: Program, state: dict[str, torch.Tensor], plan: list, expected: list,
                 names: list[str], in_spec, out_spec, mutations: dict[int, list], n_user_outputs: int,
                 report: Any = None):
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

    def _step(self, graph_inputs: list) -> list:
        """One call: the Program, then its buffer mutations written back in place."""
        outs = self._program(graph_inputs)
        users = [graph_inputs[i] for i, (kind, _) in enumerate(self._plan) if kind == "user"]
        for i, (kind, key) in self._mutations.items():
            dst = self._state[key] if kind == "state" else users[key]
            dst.copy_(outs[i])
        return [o for i, o in enumerate(outs) if i not in self._mutations]

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
                elif any(e is not None and e != s for e, s in zip(exp["shape"], x.shape)):
                    problems.append(f"shape {['*' if e is None else e for e in exp['shape']]}, got {list(x.shape)}")
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
        return out

    def forward(self, *args, **kwargs):
        if self._in_spec is not None:
            flat, spec = pytree.tree_flatten((args, kwargs))
            if spec != self._in_spec:
                raise InputMismatchError(
                    f"inputs are structured differently from the example: expected {self._in_spec}, got {spec}")
        else:
            flat = list(args)
        flat = self._check(flat)
        graph_inputs = [flat[k] if kind == "user" else self._state[k] for kind, k in self._plan]
        user = self._runner(graph_inputs) if self._runner is not None else self._step(graph_inputs)
        if self._out_spec is None:
            return user
        return pytree.tree_unflatten(user, self._out_spec)
