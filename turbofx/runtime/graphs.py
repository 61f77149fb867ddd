"""CUDA/HIP graph replay of a compiled step.

The step (a Program plus its in-place write-backs) is captured once per input-shape signature,
lazily, into one memory pool shared by all captures. Inputs marked static (weights, KV caches,
counters: the compiled module's own state) are used in place; the others are copied into static
buffers before each replay. In-place mutation of static tensors inside the graph is ordinary.
Outputs are cloned out of the graph's buffers so a later replay cannot overwrite what a caller
holds. A case that cannot be captured runs eagerly, and the reason is recorded once.
On a CPU target there is nothing to capture: the step runs directly (said once).
"""
from __future__ import annotations

import logging
from typing import Callable

import torch

log = logging.getLogger("turbofx.runtime")

MAX_GRAPHS = 32  # distinct input shapes captured before new shapes run eagerly


class GraphRunner:
    def __init__(self, step: Callable[[list], list], static: list[bool], notes: list[str]):
        self.step = step
        self.static = static  # per input: used in place (True) or copied into a static buffer
        self.notes = notes  # shown by explain()
        self.graphs: dict[tuple, tuple] = {}
        self.failed: dict[tuple, str] = {}
        self.pool = None
        self.warm: set[tuple] = set()
        self.replays = 0
        self._said_cpu = False

    def _signature(self, inputs: list) -> tuple:
        return tuple((tuple(x.shape), x.dtype, x.device) if isinstance(x, torch.Tensor) else ("v", x) for x in inputs)

    def __call__(self, inputs: list) -> list:
        devices = {x.device.type for x in inputs if isinstance(x, torch.Tensor)}
        if devices - {"cuda"} or not devices:
            if not self._said_cpu:
                self._said_cpu = True
                self._note(f"graph replay off: inputs on {sorted(devices) or 'no device'} (a GPU feature); "
                           "the program runs directly")
            return self.step(inputs)
        key = self._signature(inputs)
        if key in self.failed:
            return self.step(inputs)
        if key not in self.graphs and key not in self.warm:
            # first call of a shape: runs eagerly for real (JIT compiles, allocator settles); the
            # next call captures. Each call executes the step exactly once (counters stay right).
            self.warm.add(key)
            out = self.step(inputs)
            torch.cuda.synchronize()
            return out
        if key not in self.graphs:
            if len(self.graphs) >= MAX_GRAPHS:
                self._fail(key, f"more than {MAX_GRAPHS} input shapes: new shapes run without graphs")
                return self.step(inputs)
            try:
                self.graphs[key] = self._capture(inputs)
            except Exception as e:  # e.g. a host sync or a data-dependent size inside the step
                self._fail(key, f"capture failed ({type(e).__name__}: {str(e)[:200]}); running eagerly")
                torch.cuda.synchronize()
                return self.step(inputs)
        graph, static_in, static_out = self.graphs[key]
        for buf, x, is_static in zip(static_in, inputs, self.static):
            if isinstance(x, torch.Tensor) and not is_static and buf.data_ptr() != x.data_ptr():
                buf.copy_(x)
        graph.replay()
        self.replays += 1
        return [o.clone() if isinstance(o, torch.Tensor) else o for o in static_out]

    def _capture(self, inputs: list):
        static_in = [x if (is_static or not isinstance(x, torch.Tensor)) else x.clone()
                     for x, is_static in zip(inputs, self.static)]
        torch.cuda.synchronize()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            static_out = self.step(static_in)
        self._note(f"captured a graph for input shapes {[tuple(x.shape) for x in inputs if isinstance(x, torch.Tensor)][:4]}")
        return graph, static_in, static_out

    def _fail(self, key, why: str) -> None:
        self.failed[key] = why
        self._note(why)

    def _note(self, msg: str) -> None:
        log.info(msg)
        self.notes.append(msg)
