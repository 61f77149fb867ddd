"""turbofx.generate: compiled prefill + compiled decode step over a static KV cache.

The cache is HF's ``StaticCache`` registered as buffers of a small wrapper module, so capture sees
its in-place updates as buffer mutations and the compiled programs write the cache in place.
Prefill is compiled per prompt length, the decode step once (one token per sequence). Batches
use left padding: pad slots stay in the cache but are masked out and positions skip them.
Works with transformers 5.17 (``past_key_values=``, ``cache_position=``) and 5.24+ (``cache=``).
"""
from __future__ import annotations

import inspect
import logging
import time
from dataclasses import dataclass, field

import torch

log = logging.getLogger("turbofx.generate")


class StaticDecoder(torch.nn.Module):
    """``model`` with a StaticCache owned as buffers: forward(ids, cache_position, mask, positions)
    writes the new keys/values at ``cache_position`` and returns the last position's logits."""

    def __init__(self, model: torch.nn.Module, batch_size: int, max_cache_len: int):
        super().__init__()
        from transformers import StaticCache

        self.model = model
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.cache = StaticCache(config=config, max_cache_len=max_cache_len)
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        device = next(model.parameters()).device
        self.cache.early_initialization(batch_size, heads, head_dim, model.dtype, device)
        for i, layer in enumerate(self.cache.layers):
            self.register_buffer(f"key_cache_{i}", layer.keys, persistent=False)
            self.register_buffer(f"value_cache_{i}", layer.values, persistent=False)
            if hasattr(layer, "cumulative_length"):  # transformers >= 5.24 tracks the length itself
                self.register_buffer(f"cumulative_length_{i}", layer.cumulative_length, persistent=False)
        params = inspect.signature(model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.pass_cache_position = "cache_position" in params

    def reset(self) -> None:
        for layer in self.cache.layers:
            layer.keys.zero_()
            layer.values.zero_()
            if hasattr(layer, "cumulative_length"):
                layer.cumulative_length.zero_()

    def forward(self, input_ids, cache_position, attention_mask, position_ids):
        # Point the cache at this module's buffers as seen now: under capture they are the traced
        # buffers, so the cache writes become buffer mutations instead of constants.
        for i, layer in enumerate(self.cache.layers):
            layer.keys = getattr(self, f"key_cache_{i}")
            layer.values = getattr(self, f"value_cache_{i}")
            if hasattr(layer, "cumulative_length"):
                layer.cumulative_length = getattr(self, f"cumulative_length_{i}")
                layer.cumulative_length.copy_(cache_position[0])
        kwargs = {self.cache_kw: self.cache, "use_cache": True, "attention_mask": attention_mask,
                  "position_ids": position_ids}
        if self.pass_cache_position:
            kwargs["cache_position"] = cache_position
        out = self.model(input_ids=input_ids, **kwargs)
        return out.logits[:, -1, :].clone()  # a view of an intermediate would not export


@dataclass
class GenerateResult:
    sequences: torch.Tensor  # [B, prompt + new] (left padding kept)
    new_tokens: torch.Tensor  # [B, new]
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    compile_seconds: float = 0.0
    steps: int = 0
    reports: dict = field(default_factory=dict)

    @property
    def decode_tokens_per_second(self) -> float:
        b = self.new_tokens.shape[0]
        return b * max(self.steps - 1, 0) / self.decode_seconds if self.decode_seconds else 0.0


def _pick(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int, top_p: float,
          generator: torch.Generator | None) -> torch.Tensor:
    if not do_sample:
        return logits.argmax(-1)
    logits = logits.float() / max(temperature, 1e-5)
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


@torch.no_grad()
def generate(model: torch.nn.Module, input_ids: torch.Tensor, max_new_tokens: int = 32,
             attention_mask: torch.Tensor | None = None, do_sample: bool = False, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, seed: int | None = None, eos_token_id: int | list | None = None,
             pad_token_id: int | None = None, max_cache_len: int | None = None, compile: bool = True,
             **options) -> GenerateResult:
    """Generate with a static KV cache; prefill and the decode step run as turbofx programs.

    ``attention_mask`` (1 = token, 0 = left padding) enables batches of different lengths.
    ``compile=False`` runs the same loop eagerly (the reference the compiled path must equal).
    """
    from turbofx.compiler.driver import compile as tfx_compile

    b, s = input_ids.shape
    device = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape or bool((attention_mask[:, 1:] < attention_mask[:, :-1]).any()):
        from turbofx.errors import TurbofxError

        raise TurbofxError("attention_mask must match input_ids and pad on the left only (0s before 1s)")
    max_cache_len = max_cache_len or s + max_new_tokens
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    pad = pad_token_id if pad_token_id is not None else (min(eos) if eos else 0)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    decoder = StaticDecoder(model, b, max_cache_len).eval()
    decoder.reset()

    full_mask = torch.zeros(b, max_cache_len, dtype=attention_mask.dtype, device=device)
    full_mask[:, :s] = attention_mask
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    cache_pos = torch.arange(s, device=device)
    step_mask = full_mask.clone()
    step_mask[:, s:] = 1  # future slots: hidden by causality until written

    t0 = time.perf_counter()
    prefill_args = (input_ids, cache_pos, step_mask, positions)
    decode_args = (input_ids[:, :1], cache_pos[:1] + s, step_mask, positions[:, -1:] + 1)
    reports = {}
    if compile:
        prefill = tfx_compile(decoder, prefill_args, **options)
        decode = tfx_compile(decoder, decode_args, **options)
        decoder.reset()  # capture ran on fake tensors, but be certain the cache starts empty
        reports = {"prefill": prefill.turbofx_report, "decode": decode.turbofx_report}
    else:
        prefill = decode = decoder
    compile_s = time.perf_counter() - t0

    t1 = time.perf_counter()
    logits = prefill(*prefill_args)
    prefill_s = time.perf_counter() - t1
    tokens = []
    done = torch.zeros(b, dtype=torch.bool, device=device)
    last_pos = positions[:, -1:]
    t2 = time.perf_counter()
    for step in range(max_new_tokens):
        nxt = _pick(logits, do_sample, temperature, top_k, top_p, generator)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        tokens.append(nxt)
        done = done | torch.isin(nxt, torch.tensor(sorted(eos), device=device)) if eos else done
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        last_pos = last_pos + 1
        logits = decode(nxt[:, None], cache_pos[:1] * 0 + s + step, step_mask, last_pos)
    decode_s = time.perf_counter() - t2
    new = torch.stack(tokens, dim=1)
    return GenerateResult(torch.cat([input_ids, new], dim=1), new, prefill_s, decode_s, compile_s, len(tokens), reports)
