"""ModuleState: how passes read and replace the module state a captured graph takes as inputs.

A captured graph takes the module's parameters, buffers and constants as placeholders (the export
door; the torch.compile door passes weights as ordinary call inputs and knows only its lifted
constants). Three things describe them and must agree, because lowering, ``input_plan``,
``CompiledModule``, artifacts and ``turbofx.generate`` all read them:

* the graph's placeholders, in graph order;
* ``CapturedGraph.inputs``: one ``InputSpec`` per placeholder, in the same order and with the
  placeholder's name; a state placeholder's spec names its state key (``target``);
* ``CapturedGraph.state``: state key -> the tensor a call reads (the module's own Parameter
  objects for the export door, so in-place updates such as ``load_state_dict`` are seen).

Invariant (every method keeps it): the i-th placeholder is described by ``inputs[i]``; every
non-user spec's target is a key of ``state``; a key added by a pass is read by exactly one
placeholder; and, in verify mode, ``example_inputs[i]`` is the value of the i-th placeholder.
Passes change state only through this object (``add``, ``drop``), never by editing those three
directly.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx

if TYPE_CHECKING:
    from turbofx.compiler.capture import CapturedGraph, InputSpec


class ModuleState:
    """State placeholders of one captured graph (see the module docstring for the invariant).

    ``ModuleState()`` (no graph) knows no state: ``value`` is None for everything and ``add``
    refuses. ``example_inputs`` is the verify-mode list of placeholder values, updated in place."""

    def __init__(self, captured: "CapturedGraph | None" = None, example_inputs: list[Any] | None = None):
        self._captured = captured
        self._examples = example_inputs

    @property
    def known(self) -> bool:
        """Whether any placeholder of this graph is module state (false for the torch.compile door
        without constants, and for a context built without a captured graph)."""
        return self._captured is not None and any(s.kind != "user" for s in self._captured.inputs)

    def spec(self, node: Any) -> "InputSpec | None":
        """The InputSpec of a placeholder node (None for anything else)."""
        if self._captured is None or not isinstance(node, fx.Node) or node.op != "placeholder":
            return None
        return next((s for s in self._captured.inputs if s.name == node.name), None)

    def key(self, node: Any) -> str | None:
        """The state key a placeholder reads, or None when it is a call input (or not a placeholder)."""
        s = self.spec(node)
        return s.target if s is not None and s.kind != "user" and s.target in self._captured.state else None

    def is_call_input(self, node: Any) -> bool:
        """Whether ``node`` is a placeholder fed by the caller at each call (not module state)."""
        s = self.spec(node)
        return s is not None and s.kind == "user"

    def is_frozen(self, node: Any) -> bool:
        """Whether ``node`` is a call input the backend froze as state for quantization (kind
        "frozen": passed by every call and checked unchanged; only the quantize pass replaces it)."""
        s = self.spec(node)
        return s is not None and s.kind == "frozen"

    def value(self, node: Any) -> torch.Tensor | None:
        """The tensor a state placeholder reads at each call; None when ``node`` is not state (a call
        input, as weights are through the torch.compile door, or not a placeholder)."""
        k = self.key(node)
        return None if k is None else self._captured.state[k]

    def keys(self) -> set[str]:
        return set(self._captured.state) if self._captured is not None else set()

    def add(self, key: str, tensor: torch.Tensor, like: fx.Node, recipe: Any = None) -> fx.Node:
        """A new state placeholder reading ``tensor`` under ``key``, placed right after ``like`` (a
        state placeholder: the new spec takes its kind). Its ``meta["val"]`` is a static FakeTensor of
        the graph's fake mode. ``recipe`` (a frozen dataclass, e.g. ``layout.Joined``) says how to
        rebuild ``tensor`` from the live module, so the compile cache can reuse the program; without
        one the program is not cached. Returns the new placeholder."""
        from torch._guards import detect_fake_mode
        from torch._subclasses.fake_tensor import FakeTensorMode

        like_spec = self.spec(like)
        if like_spec is None or like_spec.kind == "user":
            raise ValueError(f"ModuleState.add: {like} is not a state placeholder")
        c = self._captured
        if key in c.state:
            raise ValueError(f"ModuleState.add: state key {key!r} exists already")
        from turbofx.compiler.capture import InputSpec

        g = c.gm.graph
        with g.inserting_after(like):
            node = g.placeholder(_placeholder_name(key))
        mode = detect_fake_mode([like.meta.get("val")]) or FakeTensorMode()
        node.meta["val"] = mode.from_tensor(tensor, static_shapes=True)
        i = c.inputs.index(like_spec)
        c.inputs.insert(i + 1, InputSpec(like_spec.kind, node.name, key))
        c.state[key] = tensor
        if recipe is not None:
            c.recipes[key] = recipe
        if self._examples is not None:
            self._examples.insert(i + 1, tensor)
        return node

    def drop(self, node: fx.Node) -> None:
        """Remove a state placeholder nothing reads any more, with its spec, and its state entry
        unless another placeholder reads the same key (the tensor is then no longer held)."""
        s = self.spec(node)
        if s is None or s.kind == "user":
            raise ValueError(f"ModuleState.drop: {node} is not a state placeholder")
        if node.users:
            raise ValueError(f"ModuleState.drop: {node} is still read by {list(node.users)}")
        c = self._captured
        i = c.inputs.index(s)
        c.gm.graph.erase_node(node)
        del c.inputs[i]
        if self._examples is not None:
            del self._examples[i]
        if s.target is not None and not any(o.target == s.target and o.kind != "user" for o in c.inputs):
            c.state.pop(s.target, None)


def _placeholder_name(key: str) -> str:
    return "p_" + "".join(ch if ch.isalnum() else "_" for ch in key)
