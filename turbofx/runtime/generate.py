"""Greedy generation over a logits function (no KV cache yet: each step runs the whole prefix)."""
from __future__ import annotations

import sys
import time
from typing import Callable

import torch


def logits_of(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (list, tuple)):
        return out[0]
    raise TypeError(f"cannot find logits in {type(out).__name__}")


@torch.no_grad()
def greedy(call: Callable[[torch.Tensor], object], input_ids: torch.Tensor, max_new_tokens: int,
           eos_token_id: int | None = None, label: str = "", progress: bool = True) -> tuple[list[int], float]:
    """Append ``max_new_tokens`` argmax tokens (stopping at EOS); returns (new tokens, seconds)."""
    ids = input_ids
    new: list[int] = []
    t0 = time.perf_counter()
    for step in range(max_new_tokens):
        nxt = int(logits_of(call(ids))[0, -1].argmax())
        new.append(nxt)
        if progress:
            sys.stderr.write(f"\r  {label} token {step + 1}/{max_new_tokens} ({time.perf_counter() - t0:.1f}s)")
            sys.stderr.flush()
        if eos_token_id is not None and nxt == eos_token_id:
            break
        ids = torch.cat([ids, torch.tensor([[nxt]], dtype=ids.dtype, device=ids.device)], dim=1)
    if progress:
        sys.stderr.write("\n")
    return new, time.perf_counter() - t0
