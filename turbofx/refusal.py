"""Refusals as data: why a pass or a kernel family did not take something.

A ``Refusal`` has a stable short ``code`` that tests, tools and reports can match on (the prose in
``detail`` may be reworded at any time) and a human ``detail``. ``str(refusal)`` is
``"code: detail"``, the form ``explain`` prints.

Codes in use (keep them stable; add new ones here):

- any producer: ``rewrite-budget`` (``max_rewrites`` spent), ``dtype`` (a dtype no template does).
- canonicalize: ``output-aliases-input`` (a no-op feeding an output straight from an input stays).
- attention: ``dropout``, ``rank`` (q, k, v not ``[B, H, S, D]``), ``head-dims-differ``,
  ``head-dim-too-large``, ``mask`` (rank or dtype), ``causal-top-left`` (SDPA's ``is_causal`` with
  Sq != Sk).
- attention_prologue: ``one-sided-cache-write``, ``positions-differ``, ``rows-not-queries``,
  ``cache-read-early``.
- fusion (joining or merging regions): ``would-cycle``, ``region-view``, ``shape-differs``,
  ``domain-differs``, ``cat-of-region-value``, ``row-broadcast``, ``row-from-full``.
- pointwise / reduction templates (``codegen/ops.py``): ``no-template``, ``not-tensor``,
  ``cat-mixed``, ``copy-args``, ``device-transfer``, ``copy-source``, ``memory-format``,
  ``pow-exponent``, ``argument-kind``, ``scalar-reduction``, ``not-last-dim``, ``integer-max-min``,
  ``size-1-dim``.
- GEMM family (``codegen/gemm.py``): ``strides``, ``batch-broadcast``, ``swiglu-odd-n``.
- quantize pass: ``weights-are-inputs``, ``not-state``, ``filtered``, ``lm-head``, ``weight-shared``,
  ``not-float``, ``no-native-blocks``, ``quantize-failed``.
- GEMM family, quantized weights: ``fp8-target`` (FP8 on a GPU without it).
- matmul pass: ``act-quant`` (W8A8 weight without quantized rows), ``alpha-beta`` (addmm scaled), ``bias-shape``, ``reshape`` (the result's dims cannot be
  reached from A's without a reshape of symbolic size).
- layout pass: ``weights-are-inputs`` (torch.compile door), ``not-state``, ``not-2d``, ``weight-shared``,
  ``bias-not-state``, ``dtype-differs``, ``device-differs``, ``k-differs``, ``mixed-bias``,
  ``shared-storage``, ``layout-view``, ``output-layout``.
- verify=kernels: ``kernel-mismatch`` (a region replaced by its ATen ops, a GEMM by its op's reference).

No code starts with ``view`` or ``tuple``: lowering and reports take extern reasons starting
with those words for free aliases.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Refusal:
    code: str  # stable short id, e.g. "shape-differs", "would-cycle", "dtype"
    detail: str  # for people: what was refused and why

    def __post_init__(self) -> None:
        if not self.code or self.code != self.code.strip().lower() or " " in self.code:
            raise ValueError(f"a refusal code is a short lower-case id without spaces, got {self.code!r}")

    def __str__(self) -> str:
        return f"{self.code}: {self.detail}"

    def within(self, context: str) -> Refusal:
        """The same refusal with ``context`` in front of its detail (the code is kept)."""
        return Refusal(self.code, f"{context}: {self.detail}")


@dataclass(frozen=True)
class Refused:
    """One refusal a pass recorded: the graph node it concerns and why."""

    node: str  # the FX node's name
    refusal: Refusal

    @property
    def code(self) -> str:
        return self.refusal.code

    def __str__(self) -> str:
        return f"{self.node}: {self.refusal}"
