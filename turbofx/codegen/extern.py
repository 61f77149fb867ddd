"""The extern family: an ATen call the Program makes as it is (views, gathers, ops without a
template), each with the reason no template took it."""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from turbofx.codegen import family
from turbofx.codegen import indexing as ix
from turbofx.errors import CodegenError
from turbofx.passes.reinplace import INPLACE
from turbofx.runtime.exprs import _resolve, decode_arg, resolve_op

aten = torch.ops.aten
_MATMULS = {"aten::mm.default", "aten::addmm.default", "aten::bmm.default", "aten::baddbmm.default",
            "aten::linear.default"}


@dataclass
class ExternStep:
    op: str
    args: Any  # JSON template
    kwargs: Any
    out: int
    node: str = ""
    reason: str = ""


def op_name(target) -> str:
    if target is operator.getitem:
        return "getitem"
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}::{target._schema.name.split('::')[1]}.{target._overloadname}"
    raise CodegenError(f"cannot call {target!r} from a Program")


def extern_reason(n: fx.Node, refusals: dict[str, str]) -> str:
    if ix.is_view(n):
        return "view (alias, no copy)"
    if n.target is aten.embedding.default:
        return "embedding gather through ATen"
    if n.target is operator.getitem:
        return "tuple element"
    return refusals.get(n.name, "no kernel template")


class ExternFamily(family.Family):
    step_types = ("extern",)
    fallback = True

    def claims(self, unit) -> bool:
        return isinstance(unit, fx.Node)

    def lower(self, n: fx.Node, lc: family.LowerContext) -> dict:
        inplace = n in lc.inplace
        reason = "cache update in place (its write-back is then free)" if inplace else extern_reason(n, lc.refusals)
        op = op_name(INPLACE[n.target] if inplace else n.target)
        step = {"type": "extern", "op": op, "args": lc.template(list(n.args)),
                "kwargs": lc.template(dict(n.kwargs))["$kw"], "out": lc.slot[n], "node": n.name, "reason": reason}
        lc.define(n, n.all_input_nodes)
        # outputs of aliasing ops (views, getitem of tuples) share their inputs' storage
        aliasing = n.target is operator.getitem or inplace or (
            isinstance(n.target, torch._ops.OpOverload) and any(r.alias_info is not None for r in n.target._schema.returns))
        roots = {lc.storage_root[lc.slot[a]] for a in n.all_input_nodes
                 if a in lc.slot and lc.slot[a] in lc.storage_root}
        if aliasing and roots:
            lc.share_storage(lc.slot[n], roots)
        lc.records.append(family.KernelRecord(n.name, "extern", op, [n.name], reason))
        return step

    def runner(self, s: dict, kernels: dict):
        es = ExternStep(**{k: v for k, v in s.items() if k != "type"})
        op = resolve_op(es.op)
        args = decode_arg(es.args)
        kwargs = {k: decode_arg(v) for k, v in es.kwargs.items()}
        out = es.out

        def run(values: list, env: dict) -> None:
            values[out] = op(*_resolve(args, values, env), **_resolve(kwargs, values, env))

        return family.bind(run, es, self)

    def cost(self, es: ExternStep, values: list, env: dict, ledger):
        from turbofx.compiler.roofline import StepCost, _footprint, _tensors
        from turbofx.errors import TurbofxError

        args = _resolve(decode_arg(es.args), values, env)
        kwargs = {k: _resolve(decode_arg(v), values, env) for k, v in es.kwargs.items()}
        try:
            out = resolve_op(es.op)(*args, **kwargs)
        except Exception as e:  # noqa: BLE001  (an op without a meta kernel: say which)
            raise TurbofxError(f"the roofline's shape-only run could not evaluate step {es.node or es.op} ({es.op}) "
                               f"on meta tensors: {type(e).__name__}: {str(e).splitlines()[0][:200]}. This is a "
                               "turbofx bug or an op without a meta kernel; profile a smaller program or report it"
                               ) from None
        values[es.out] = out
        if es.op == "getitem" or es.reason.startswith(("view", "tuple")):
            return StepCost(es.node or es.op, "alias", 0, 0, 0, 0)
        ins = _tensors(args) + _tensors(kwargs)
        outs = _tensors(out)
        if es.op in _MATMULS:
            return StepCost(es.op, "matmul", ledger.reads(ins), sum(map(_footprint, outs)), _matmul_flops(es.op, args), 1)
        if es.op == "aten::embedding.default":  # a gather: the rows read are the rows written
            w, idx = args[0], args[1]
            rows = sum(map(_footprint, outs))
            return StepCost(es.op, "extern", ledger.reads([w], rows) + ledger.reads([idx]), rows, 0, 1)
        if es.op == "turbofx::dequant_rows.default":  # a quantized gather: only the named rows of q / scale / min are read
            tables, idx = [t for t in args[:3] if isinstance(t, torch.Tensor)], args[3]
            share = idx.numel() / max(tables[0].shape[0], 1)
            read = sum(ledger.reads([t], int(_footprint(t) * share)) for t in tables)
            return StepCost(es.op, "extern", read + ledger.reads([idx]), sum(map(_footprint, outs)), 0, 1)
        packet = es.op.split("::", 1)[-1].split(".", 1)[0]
        if packet.endswith("_") and ins:  # in place into arg 0: the other arguments are what is written
            dst, rest = ins[0], ins[1:]
            written = min(_footprint(dst), max(map(_footprint, rest), default=_footprint(dst)))
            return StepCost(es.op, "extern", ledger.reads(rest), written, 0, 1)
        numel = sum(t.numel() for t in outs)
        return StepCost(es.op, "extern", ledger.reads(ins), sum(map(_footprint, outs)), numel, 1)


def _matmul_flops(op: str, args: list) -> int:
    if op == "aten::addmm.default" or op == "aten::baddbmm.default":
        args = args[1:]
    a, b = args[0], args[1]
    if op == "aten::linear.default":  # b is [N, K]
        return 2 * a.numel() * b.shape[0]
    return 2 * a.numel() * b.shape[-1]  # [.., M, K] @ [.., K, N]


family.register(ExternFamily())
