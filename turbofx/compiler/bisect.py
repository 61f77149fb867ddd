"""Bisect a miscompile to the one rewrite that causes it (LLVM's opt-bisect over the rewrite budget).

The model is compiled with ``max_rewrites=N`` for a binary search over N: the smallest N whose
compiled output differs from eager beyond tolerance names rewrite N (its pass and node) as the
culprit. Assumes the model's forward is a function of its inputs (no state carried between calls)
and that a prefix of the rewrites that is right stays right (as opt-bisect does).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch

from turbofx.errors import BisectError
from turbofx.passes.manager import Rewrite

log = logging.getLogger("turbofx.bisect")

_TOLERANCE = {torch.float16: (2e-2, 2e-2), torch.bfloat16: (5e-2, 5e-2)}  # else (1e-3, 1e-3)


@dataclass
class Trial:
    """One compile under a budget and how far its output is from eager."""

    max_rewrites: int | None
    rewrites_made: int
    wrong: bool
    max_abs_error: float


@dataclass
class BisectResult:
    verdict: str  # "agrees": nothing to bisect | "base": wrong with no rewrite at all | "rewrite": culprit found
    total_rewrites: int
    culprit: Rewrite | None
    max_abs_error: float  # of the first wrong compile found (the culprit's, or the full one's)
    trials: list[Trial]

    def __str__(self) -> str:
        if self.verdict == "agrees":
            return (f"no miscompile: the compiled output agrees with eager ({self.total_rewrites} rewrites, "
                    f"max abs error {self.max_abs_error:.3g})")
        if self.verdict == "base":
            return ("the output is wrong even with max_rewrites=0 (no pass rewrote anything): the culprit is "
                    "a single-op kernel; compile with verify='kernels' to find and replace it")
        return (f"culprit: {self.culprit} (max_rewrites={self.culprit.index - 1} is right, "
                f"{self.culprit.index} is wrong: max abs error {self.max_abs_error:.3g}; "
                f"{len(self.trials)} compiles over {self.total_rewrites} rewrites)")


def _leaves(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, dict):  # ModelOutput is an OrderedDict
        return [t for v in x.values() for t in _leaves(v)]
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in _leaves(v)]
    return []


def _error(ref: list[torch.Tensor], out: list[torch.Tensor]) -> tuple[bool, float]:
    from turbofx.compiler.verify import max_abs_error

    if len(ref) != len(out):
        return True, float("inf")
    wrong, worst = False, 0.0
    for r, o in zip(ref, out):
        err = max_abs_error(o, r)
        worst = max(worst, err)
        if r.dtype.is_floating_point:
            rtol, atol = _TOLERANCE.get(r.dtype, (1e-3, 1e-3))
            ok = o.shape == r.shape and torch.allclose(o.detach().to(r.dtype), r.detach(), rtol=rtol, atol=atol,
                                                       equal_nan=True)
        else:
            ok = err == 0.0
        wrong = wrong or not ok
    return wrong, worst


def _copies(x):
    if isinstance(x, torch.Tensor):
        return x.clone()
    if isinstance(x, (tuple, list)):
        return type(x)(_copies(a) for a in x)
    if isinstance(x, dict):
        return {k: _copies(v) for k, v in x.items()}
    return x


def bisect(module: torch.nn.Module, example_args: tuple = (), example_kwargs: dict | None = None,
           on_trial: Callable[[Trial], None] | None = None, **options) -> BisectResult:
    """Find the rewrite that makes ``turbofx.compile(module, ...)`` differ from eager on these inputs."""
    from turbofx.compiler.driver import compile as tfx_compile
    from turbofx.compiler.driver import explain

    if "max_rewrites" in options:
        raise BisectError("bisect sets max_rewrites itself: leave it out (and unset TURBOFX_MAX_REWRITES)")
    if not isinstance(example_args, (tuple, list)):
        example_args = (example_args,)
    example_kwargs = dict(example_kwargs or {})
    options.setdefault("cudagraphs", False)
    with torch.no_grad():
        ref = _leaves(module(*_copies(tuple(example_args)), **_copies(example_kwargs)))
    trials: list[Trial] = []

    def trial(n: int | None) -> tuple[Trial, list[Rewrite]]:
        compiled = tfx_compile(module, tuple(example_args), example_kwargs, max_rewrites=n, **options)
        with torch.no_grad():
            out = _leaves(compiled(*_copies(tuple(example_args)), **_copies(example_kwargs)))
        wrong, err = _error(ref, out)
        rewrites = explain(compiled).rewrites
        t = Trial(n, len(rewrites), wrong, err)
        log.info("max_rewrites=%s: %d rewrites, %s (max abs error %.3g)", n, len(rewrites),
                 "wrong" if wrong else "right", err)
        trials.append(t)
        if on_trial is not None:
            on_trial(t)
        return t, rewrites

    full, rewrites = trial(None)
    total = len(rewrites)
    if not full.wrong:
        return BisectResult("agrees", total, None, full.max_abs_error, trials)
    base, _ = trial(0)
    if base.wrong:
        return BisectResult("base", total, None, base.max_abs_error, trials)
    lo, hi, hi_trial, hi_rewrites = 0, total, full, rewrites  # right at lo, wrong at hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        t, r = trial(mid)
        if t.wrong:
            hi, hi_trial, hi_rewrites = mid, t, r
        else:
            lo = mid
    if len(hi_rewrites) < hi:
        raise BisectError(f"the passes made {len(hi_rewrites)} rewrites under max_rewrites={hi}, fewer than "
                          "the budget: the rewrites are not the same from one compile to the next (turbofx bug)")
    return BisectResult("rewrite", total, hi_rewrites[hi - 1], hi_trial.max_abs_error, trials)
