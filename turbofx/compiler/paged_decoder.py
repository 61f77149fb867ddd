"""PagedDecoder: a Hugging Face causal LM as one packed, variable-length step over a paged KV cache.

``forward(input_ids [1, T], position_ids [1, T], slot_mapping [T], block_table [S, W], query_start
[S + 1], seq_lens [S], logits_indices [S])`` runs T tokens of up to S sequences in one batch with
no padding between them (prefill chunks and decode tokens mixed), writes each token's keys/values
into the cache row ``slot_mapping[t]`` of the flattened ``[num_pages * page_size]`` cache, and
returns the logits of rows ``logits_indices`` ([S, vocab]).

How the model is made to do that, without touching its source:
* its cache argument is a ``PagedCache`` whose ``update`` writes the new K/V rows into this
  module's page buffers (``index_copy_``: capture sees buffer mutations) and hands the whole page
  buffers to attention;
* its attention implementation is switched, for the duration of the call, to ``turbofx_paged``
  (registered with transformers' ``AttentionInterface``), which calls ``turbofx::paged_attention``
  with this step's block table, query starts and lengths;
* the attention mask is a prepared 4-D placeholder, which transformers passes through as is:
  causality, windows and sequence boundaries come from the paged op's metadata.
Attention features the op does not have (attention sinks, non-causal layers) are refused with a
``GenerationError``, never dropped.
"""
from __future__ import annotations

import contextlib
import inspect
import threading

import torch

from turbofx.runtime import ops as _ops  # noqa: F401  (registers torch.ops.turbofx.paged_attention)

from turbofx.errors import GenerationError

ATTN_IMPLEMENTATION = "turbofx_paged"
_step = threading.local()  # the metadata of the step being run (or traced) on this thread


class PagedCache:
    """What the model receives as its KV cache: ``update`` writes into the decoder's pages."""

    is_compileable = False
    is_sliding = ()

    def __init__(self, decoder: "PagedDecoder", slot_mapping: torch.Tensor):
        self.decoder = decoder
        self.slot_mapping = slot_mapping

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        k_pages = getattr(self.decoder, f"key_pages_{layer_idx}")
        v_pages = getattr(self.decoder, f"value_pages_{layer_idx}")
        for pages, new in ((k_pages, key_states), (v_pages, value_states)):
            rows = new[0].transpose(0, 1).to(pages.dtype)  # [T, kv_heads, head_dim]
            pages.view(-1, *pages.shape[2:]).index_copy_(0, self.slot_mapping, rows)
        return k_pages, v_pages

    def get_seq_length(self, layer_idx: int = 0) -> int:
        raise GenerationError("the paged cache has no single sequence length: PagedDecoder passes position_ids")


class _ProbeCache:
    """Learns each layer's K/V shape and dtype from one eager step (``update`` is a pass-through)."""

    is_compileable = False
    is_sliding = ()

    def __init__(self):
        self.layers: dict[int, tuple] = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.layers[layer_idx] = (key_states.shape[1], key_states.shape[-1], value_states.shape[-1],
                                  key_states.dtype, key_states.device)
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


_REFUSED_KWARGS = ("s_aux", "sinks")


def _paged_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                             sliding_window=None, softcap=None, **kwargs):
    """transformers attention function: query [1, H, T, D]; key/value are the page buffers."""
    step = getattr(_step, "current", None)
    if step is None:
        raise GenerationError("the turbofx_paged attention implementation runs only inside PagedDecoder")
    name = type(module).__name__
    for k in _REFUSED_KWARGS:
        if kwargs.get(k) is not None:
            raise GenerationError(f"{name} uses attention {k!r}, which turbofx's paged attention does not "
                                  "implement: serve this model with turbofx.generate or eager transformers")
    if getattr(module, "is_causal", True) is False:
        raise GenerationError(f"{name} is not causal; the serving engine runs causal decoders only")
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    out = torch.ops.turbofx.paged_attention(
        query[0].transpose(0, 1), key, value, step.block_table, step.query_start, step.seq_lens, scale,
        int(sliding_window or 0), float(softcap or 0.0))
    return out[None], None  # [1, T, H, D], as transformers' attention functions return


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, _paged_attention_forward)
    try:  # transformers builds a mask per implementation; the paged op needs none
        from transformers.masking_utils import AttentionMaskInterface

        AttentionMaskInterface.register(ATTN_IMPLEMENTATION, lambda *a, **k: None)
    except ImportError:
        pass


class _Step:
    def __init__(self, block_table, query_start, seq_lens):
        self.block_table, self.query_start, self.seq_lens = block_table, query_start, seq_lens


@contextlib.contextmanager
def _paged_attention(model: torch.nn.Module, step: _Step):
    """Run ``model`` with the paged attention implementation and ``step``'s metadata."""
    configs = {id(m.config): m.config for m in model.modules() if hasattr(getattr(m, "config", None), "_attn_implementation")}
    saved = {k: c._attn_implementation for k, c in configs.items()}
    _step.current = step
    try:
        for c in configs.values():
            c._attn_implementation = ATTN_IMPLEMENTATION
        yield
    finally:
        _step.current = None
        for k, c in configs.items():
            c._attn_implementation = saved[k]


def _mask_placeholder(device) -> torch.Tensor:
    """A prepared 4-D mask: transformers' mask builders return it as is (no cache queries); the
    paged attention ignores it (its metadata says what each row sees)."""
    return torch.ones((1, 1, 1, 1), dtype=torch.bool, device=device)


def _device_of(model: torch.nn.Module) -> torch.device:
    t = next(model.parameters(), None)
    return t.device if t is not None else torch.device("cpu")


class PagedDecoder(torch.nn.Module):
    """``model`` with a paged KV cache of ``num_pages`` pages (page 0 included) of ``page_size``
    rows per layer, owned as buffers (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, num_pages: int, page_size: int):
        super().__init__()
        _register()
        self.model = model
        params = inspect.signature(model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.logits_to_keep = "logits_to_keep" in params
        self.page_size = page_size
        probe = _ProbeCache()
        ids = torch.zeros((1, 1), dtype=torch.long, device=_device_of(model))
        name = type(model).__name__
        try:
            with torch.no_grad():
                out = model(input_ids=ids, position_ids=torch.zeros_like(ids), use_cache=True,
                            attention_mask=_mask_placeholder(ids.device), **{self.cache_kw: probe})
        except Exception as e:
            raise GenerationError(f"{name} could not run one step with a custom KV cache ({type(e).__name__}: "
                                  f"{str(e)[:300]}); the serving engine needs a transformers causal LM whose "
                                  "attention layers call cache.update") from e
        if getattr(out, "logits", None) is None:
            raise GenerationError(f"{name} returned no logits: the serving engine needs a causal LM")
        if not probe.layers:
            raise GenerationError(f"{name} wrote nothing to its KV cache: the serving engine cannot page it")
        self.num_layers = max(probe.layers) + 1
        missing = sorted(set(range(self.num_layers)) - set(probe.layers))
        if missing:
            raise GenerationError(f"{name}'s layers {missing} use no KV cache of their own (shared KV?): "
                                  "not supported by the serving engine yet")
        self.kv_heads = {i: v[0] for i, v in probe.layers.items()}
        for i, (hkv, dk, dv, dtype, device) in sorted(probe.layers.items()):
            self.register_buffer(f"key_pages_{i}", torch.zeros((num_pages, page_size, hkv, dk), dtype=dtype,
                                                                device=device), persistent=False)
            self.register_buffer(f"value_pages_{i}", torch.zeros((num_pages, page_size, hkv, dv), dtype=dtype,
                                                                  device=device), persistent=False)

    def cache_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for n, b in self.named_buffers(recurse=False)
                   if n.startswith(("key_pages_", "value_pages_")))

    def forward(self, input_ids, position_ids, slot_mapping, block_table, query_start, seq_lens, logits_indices):
        cache = PagedCache(self, slot_mapping)
        kwargs = {self.cache_kw: cache, "use_cache": True, "attention_mask": _mask_placeholder(input_ids.device),
                  "position_ids": position_ids}
        if self.logits_to_keep:
            kwargs["logits_to_keep"] = logits_indices
        with _paged_attention(self.model, _Step(block_table, query_start, seq_lens)):
            out = self.model(input_ids=input_ids, **kwargs)
        logits = out.logits[0]
        if not self.logits_to_keep:
            logits = logits.index_select(0, logits_indices)
        return logits.clone()
