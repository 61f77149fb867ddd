"""A fusion region: the nodes one generated kernel computes."""
from __future__ import annotations

from dataclasses import dataclass, field

import sympy
import torch.fx as fx

from turbofx.codegen.indexing import same_shape, shape_of


@dataclass(eq=False)
class Region:
    """Nodes computed by one kernel over one iteration domain.

    ``pointwise``: every node has shape ``full``. ``reduction``: ``full = rows + [C]``; every node
    is either full or a row value (shape ``rows`` or ``rows + [1]``), and each reduction folds the
    last dim of a full value into a row value (a persistent row kernel).
    """

    id: int
    kind: str
    full: tuple[sympy.Expr, ...]
    nodes: list[fx.Node] = field(default_factory=list)
    members: set[fx.Node] = field(default_factory=set)

    @property
    def rows(self) -> tuple[sympy.Expr, ...]:
        return self.full[:-1] if self.kind == "reduction" else self.full

    def add(self, node: fx.Node) -> None:
        self.nodes.append(node)
        self.members.add(node)

    def is_full(self, node: fx.Node) -> bool:
        return same_shape(shape_of(node), self.full)

    def is_row(self, node: fx.Node) -> bool:
        if self.kind != "reduction":
            return False
        s = shape_of(node)
        return same_shape(s, self.rows) or same_shape(s, self.rows + (1,))

    def inputs(self) -> list[fx.Node]:
        seen: dict[fx.Node, None] = {}
        for n in self.nodes:
            for a in n.all_input_nodes:
                if a not in self.members:
                    seen.setdefault(a)
        return list(seen)

    def outputs(self) -> list[fx.Node]:
        return [n for n in self.nodes if any(u not in self.members for u in n.users)]

    def label(self) -> str:
        """A readable name for what the region computes, from the ops it holds."""
        ops = {str(n.target).split(".")[1] if "." in str(n.target) else str(n.target) for n in self.nodes}
        if {"amax", "exp", "sum"} <= ops and ("div" in ops or "log" in ops):
            return "log_softmax" if "log" in ops else "softmax"
        if "rsqrt" in ops and "mean" in ops:
            return "layernorm" if "sub" in ops else "rmsnorm"
        if self.kind == "reduction":
            return "reduction"
        if ops & {"sigmoid", "gelu", "tanh", "relu", "silu", "erf"}:
            return "activation"
        if ops <= {"add", "sub", "mul", "div", "_to_copy", "clone", "neg"}:
            return "elementwise"
        return "pointwise"
