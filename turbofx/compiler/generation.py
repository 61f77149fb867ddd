"""turbofx.generate: compiled prefill + compiled decode step over a static KV cache.

The cache is HF's ``StaticCache`` registered as buffers of a small wrapper module, so capture sees
its in-place updates as buffer mutations and the compiled programs write the cache in place.
Prefill is compiled per prompt-length bucket, the decode step once per batch bucket (one token
per sequence). Batches use left padding: pad slots stay in the cache but are masked out and
positions skip them.
Works with transformers 5.17 (``past_key_values=``, ``cache_position=``) and 5.24+ (``cache=``).
"""
from __future__ import annotations

import inspect
import logging
import math
import time
from dataclasses import dataclass, field

import torch

from turbofx.errors import GenerationError

from turbofx.runtime.module import describe

log = logging.getLogger("turbofx.generate")
_CACHE_KEYS = ("key_cache_", "value_cache_", "cumulative_length_")  # StaticDecoder's buffer names


class StaticDecoder(torch.nn.Module):
    """``model`` with a StaticCache owned as buffers: forward(ids, cache_position, mask, positions)
    writes the new keys/values at ``cache_position`` and returns the last position's logits."""

    def __init__(self, model: torch.nn.Module, batch_size: int, max_cache_len: int):
        super().__init__()
        from transformers import StaticCache

        self.model = model
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.cache = StaticCache(config=config, max_cache_len=max_cache_len)
        _full_length_layers(self.cache, max_cache_len)
        params = inspect.signature(model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.pass_cache_position = "cache_position" in params
        self._allocate_by_probe(batch_size)
        for i, layer in enumerate(self.cache.layers):
            self.register_buffer(f"key_cache_{i}", layer.keys, persistent=False)
            self.register_buffer(f"value_cache_{i}", layer.values, persistent=False)
            if hasattr(layer, "cumulative_length"):  # transformers >= 5.24 tracks the length itself
                self.register_buffer(f"cumulative_length_{i}", layer.cumulative_length, persistent=False)
        self.reset()

    def _allocate_by_probe(self, batch_size: int) -> None:
        """Let every cache layer allocate itself from one eager one-token step, as HF's StaticCache
        does lazily: each layer then holds exactly the key/value heads, head sizes, dtype and device
        the model's attention writes. Config fields guess these differently per architecture
        (falcon's multi-query attention keeps 1 KV head and has no ``num_key_value_heads``)."""
        name = type(self.model).__name__
        ids = torch.zeros((batch_size, 1), dtype=torch.long, device=_device_of(self.model))
        try:
            with torch.no_grad():
                out = self._run(ids, torch.arange(1, device=ids.device), None, torch.zeros_like(ids))
        except Exception as e:
            raise GenerationError(
                f"{name} could not run one step with transformers' StaticCache ({type(e).__name__}: "
                f"{str(e)[:500]}); turbofx.generate needs a causal LM that supports a static KV cache "
                "(model.generate(..., cache_implementation='static') should work with it)") from e
        if getattr(out, "logits", None) is None:
            raise GenerationError(f"{name} returned no logits: turbofx.generate needs a causal LM "
                                  "(e.g. AutoModelForCausalLM), not a base model or encoder")
        empty = [i for i, layer in enumerate(self.cache.layers) if getattr(layer, "keys", None) is None]
        if empty:
            raise GenerationError(f"{name} wrote no keys/values into layers {empty} of the static KV cache; "
                                  "turbofx.generate cannot cache this architecture (use model.generate)")

    def _run(self, input_ids, cache_position, attention_mask, position_ids):
        kwargs = {self.cache_kw: self.cache, "use_cache": True, "attention_mask": attention_mask,
                  "position_ids": position_ids}
        if self.pass_cache_position:
            kwargs["cache_position"] = cache_position
        return self.model(input_ids=input_ids, **kwargs)

    def reset(self) -> None:
        """Empty the cache (through the buffers: after a capture the layers may hold traced ones)."""
        for name, t in self.named_buffers(recurse=False):
            if name.startswith(_CACHE_KEYS):
                t.zero_()

    def forward(self, input_ids, cache_position, attention_mask, position_ids):
        # Point the cache at this module's buffers as seen now: under capture they are the traced
        # buffers, so the cache writes become buffer mutations instead of constants.
        for i, layer in enumerate(self.cache.layers):
            layer.keys = getattr(self, f"key_cache_{i}")
            layer.values = getattr(self, f"value_cache_{i}")
            if hasattr(layer, "cumulative_length"):
                layer.cumulative_length = getattr(self, f"cumulative_length_{i}")
                layer.cumulative_length.copy_(cache_position[0])
        out = self._run(input_ids, cache_position, attention_mask, position_ids)
        return out.logits[:, -1, :].clone()  # a view of an intermediate would not export


def _device_of(model: torch.nn.Module) -> torch.device:
    t = next(model.parameters(), None)
    return t.device if t is not None else torch.device("cpu")


def _full_length_layers(cache, max_cache_len: int) -> None:
    """Replace sliding-window cache layers by full-length ones. A sliding layer tracks its length in
    a Python int, which a captured program freezes at its trace-time value (wrong positions and
    masks from the second decode step on), and rolls its keys once full. A full-length layer keeps
    every position and the model's sliding-window mask still limits what each query sees: same
    results, a longer cache for those layers."""
    from transformers.cache_utils import StaticLayer

    for i, layer in enumerate(cache.layers):
        if getattr(layer, "is_sliding", False):
            cache.layers[i] = StaticLayer(max_cache_len=max_cache_len)


@dataclass
class GenerateResult:
    sequences: torch.Tensor  # [B, prompt + new] (left padding kept), int64
    new_tokens: torch.Tensor  # [B, new], int64
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
    """The next token per row: argmax, or a sample (temperature > 0, top_k >= 0, 0 < top_p <= 1 were
    checked by generate)."""
    if not do_sample:
        return logits.argmax(-1)
    logits = logits.float() / temperature
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


def next_bucket(n: int, buckets: list[int] | None, multiple: int = 1, what: str = "size",
                option: str = "buckets") -> int:
    """The smallest declared bucket holding ``n`` (default: next power of two / multiple).
    ``what`` and ``option`` name the quantity and the argument in errors."""
    if buckets:
        fits = [x for x in sorted(buckets) if x >= n]
        if not fits:
            raise GenerationError(f"{what} {n} is larger than every declared bucket {sorted(buckets)}: "
                                  f"add a bucket >= {n} to {option}")
        return fits[0]
    if multiple > 1:
        return -(-n // multiple) * multiple
    return 1 << max(n - 1, 0).bit_length()


def _placement(model: torch.nn.Module) -> tuple:
    """What compiled programs of ``model`` depend on beyond input shapes: which tensor objects hold
    the weights and their dtype/device. Programs read the parameters live (in-place updates such as
    load_state_dict are seen); a dtype/device conversion or a replaced parameter is not."""
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    return tuple((name, id(t), t.dtype, t.device) for name, t in tensors)


class _Engine:
    """Compiled programs of one model, reused across generate calls: a StaticDecoder (cache) per
    (batch bucket, cache length), a prefill program per prompt bucket, one decode step each. All
    of them belong to one placement of the model's weights (see ``_placement``)."""

    def __init__(self, model: torch.nn.Module, options: dict):
        self.model = model
        self.options = options
        self.placement: tuple | None = None
        self.decoders: dict[tuple, StaticDecoder] = {}
        self.programs: dict[tuple, object] = {}

    def follow_model(self) -> None:
        """Drop caches and programs built for weights the model no longer has (after model.half(),
        model.to(device) or a replaced parameter): they would read wrong-typed or stale tensors.
        Quantized programs hold copies of the weights: with ``quantize``, an in-place update
        (load_state_dict) also recompiles."""
        now = _placement(self.model)
        if self.options.get("quantize") is not None:
            now += tuple(t._version for t in self.model.parameters())
        if now != self.placement:
            if self.placement is not None:
                log.info("%s's weights changed dtype, device or identity: recompiling", type(self.model).__name__)
            self.decoders.clear()
            self.programs.clear()
            self.placement = now

    def decoder(self, batch: int, cache_len: int) -> StaticDecoder:
        key = (batch, cache_len)
        if key not in self.decoders:
            self.decoders[key] = StaticDecoder(self.model, batch, cache_len).eval()
        return self.decoders[key]

    def program(self, kind: str, decoder: StaticDecoder, args: tuple):
        from turbofx.compiler.driver import compile as tfx_compile

        # shapes, then every input's dtype and device (an int32 or bf16 input is another program)
        key = (kind, id(decoder), *(tuple(a.shape) for a in args), tuple((a.dtype, a.device) for a in args))
        if key not in self.programs:
            log.info("compiling the %s step for shapes %s", kind, [tuple(a.shape) for a in args])
            self.programs[key] = tfx_compile(decoder, args, **self.options)
        return self.programs[key]


class _Engines(dict):
    """{options key: _Engine}, kept on the model itself (``model._turbofx_engines``) so compiled
    programs live exactly as long as the model: a global map keyed by the model would be held
    alive by the engines' own references to it. Copies and pickles of the model start empty."""

    def __deepcopy__(self, memo):
        return _Engines()

    def __reduce__(self):
        return (_Engines, ())


def _engine(model: torch.nn.Module, options: dict) -> _Engine:
    per_model = model.__dict__.get("_turbofx_engines")
    if not isinstance(per_model, _Engines):
        per_model = _Engines()
        object.__setattr__(model, "_turbofx_engines", per_model)
    key = repr(sorted(options.items()))
    if key not in per_model:
        per_model[key] = _Engine(model, options)
    return per_model[key]


# -- argument checks: each misuse is one GenerationError saying what to pass instead ------------

def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_model(model) -> None:
    if not isinstance(model, torch.nn.Module) or getattr(model, "config", None) is None:
        raise GenerationError(
            f"turbofx.generate takes a Hugging Face causal LM (e.g. AutoModelForCausalLM.from_pretrained(...)), "
            f"got a {type(model).__name__} without a .config; for other modules use turbofx.compile")


def _vocab_size(model: torch.nn.Module) -> int | None:
    """Rows of the input embedding (what an id indexes), else the config's vocab_size."""
    try:
        emb = model.get_input_embeddings()
        if isinstance(getattr(emb, "num_embeddings", None), int):
            return emb.num_embeddings
    except Exception:  # not every model implements it; the config is the fallback
        pass
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    size = getattr(config, "vocab_size", None)
    return size if _is_int(size) else None


def _token_ids(input_ids, model: torch.nn.Module, vocab: int | None) -> torch.Tensor:
    """input_ids as an int64 [batch, seq] tensor on the model's device, every id in the vocabulary
    (an id outside it would be read out of bounds by the compiled embedding)."""
    if not isinstance(input_ids, torch.Tensor):
        raise GenerationError(f"input_ids must be a torch tensor [batch, seq], got {type(input_ids).__name__} "
                              "(e.g. torch.tensor([ids]) or tokenizer(..., return_tensors='pt').input_ids)")
    if input_ids.dim() != 2:
        raise GenerationError(f"input_ids must be [batch, seq], got shape {list(input_ids.shape)}"
                              + ("; pass ids[None] for one sequence" if input_ids.dim() == 1 else ""))
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise GenerationError(f"input_ids must hold integer token ids, got {input_ids.dtype} "
                              "(token ids from a tokenizer, not embeddings or logits)")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise GenerationError(f"input_ids is empty (shape {list(input_ids.shape)}): pass at least one token per "
                              "sequence, e.g. the tokenizer's bos_token_id")
    device = _device_of(model)
    if input_ids.device != device:
        raise GenerationError(f"input_ids are on {input_ids.device} but the model is on {device}: "
                              f"pass input_ids.to('{device}')")
    ids = input_ids.long()  # lossless from every integer dtype; the programs take int64 like HF
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or (vocab is not None and hi >= vocab):
        raise GenerationError(f"input_ids hold ids from {lo} to {hi}, outside the vocabulary "
                              f"(0..{vocab - 1 if vocab is not None else '?'}): wrong tokenizer for this model?")
    return ids


def _prompt_mask(attention_mask, ids: torch.Tensor) -> torch.Tensor:
    """The attention mask as int64 0/1, checked: ids' shape and device, left padding only, at least
    one token per row."""
    if attention_mask is None:
        return torch.ones_like(ids)
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != ids.shape:
        got = list(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise GenerationError(f"attention_mask must be a tensor shaped like input_ids {list(ids.shape)}, got {got}")
    if attention_mask.device != ids.device:
        raise GenerationError(f"attention_mask is on {attention_mask.device}, input_ids on {ids.device}: "
                              "put them on the same device")
    if attention_mask.dtype.is_complex or not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise GenerationError("attention_mask must hold only 0 (padding) and 1 (token)")
    mask = attention_mask.long()
    if bool((mask[:, 1:] < mask[:, :-1]).any()):
        raise GenerationError("attention_mask must pad on the left only (0s before 1s): "
                              "use tokenizer.padding_side = 'left'")
    empty = (mask.sum(-1) == 0).nonzero().flatten().tolist()
    if empty:
        raise GenerationError(f"attention_mask rows {empty} have no tokens (all 0): give each sequence at least one")
    return mask


def _check_count(name: str, value, minimum: int) -> None:
    if not _is_int(value) or value < minimum:
        raise GenerationError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_sampling(do_sample, temperature, top_k, top_p, seed) -> None:
    if not isinstance(do_sample, bool):
        raise GenerationError(f"do_sample must be True or False, got {do_sample!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
            or temperature < 0 or (do_sample and temperature == 0):
        raise GenerationError(f"temperature must be a number > 0, got {temperature!r}"
                              + (" (for greedy decoding pass do_sample=False)" if do_sample else ""))
    if not _is_int(top_k) or top_k < 0:
        raise GenerationError(f"top_k must be an int >= 0 (0 = no top-k filter), got {top_k!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise GenerationError(f"top_p must be in (0, 1] (1 = no nucleus filter), got {top_p!r}")
    if seed is not None and not _is_int(seed):
        raise GenerationError(f"seed must be an int or None, got {seed!r}")


def _token_set(value, name: str, vocab: int | None) -> set[int]:
    """eos_token_id as a set of ids: None, an id, a list/tuple/set of ids or an integer tensor."""
    if isinstance(value, torch.Tensor) and not value.dtype.is_floating_point and value.dim() <= 1:
        value = value.tolist()
    items = [] if value is None else [value] if _is_int(value) else value
    if not isinstance(items, (list, tuple, set)) or not all(_is_int(x) for x in items):
        raise GenerationError(f"{name} must be a token id (int) or a list of them, got {value!r}")
    bad = [x for x in items if x < 0 or (vocab is not None and x >= vocab)]
    if bad:
        raise GenerationError(f"{name} {bad} outside the vocabulary (0..{vocab - 1 if vocab else '?'})")
    return set(items)


def _check_buckets(buckets, name: str) -> None:
    if buckets is not None and (not isinstance(buckets, (list, tuple)) or not all(_is_int(x) and x > 0 for x in buckets)):
        raise GenerationError(f"{name} must be a list of positive ints, got {buckets!r}")


@torch.no_grad()
def generate(model: torch.nn.Module, input_ids: torch.Tensor, max_new_tokens: int = 32,
             attention_mask: torch.Tensor | None = None, do_sample: bool = False, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, seed: int | None = None, eos_token_id: int | list | None = None,
             pad_token_id: int | None = None, max_cache_len: int | None = None, compile: bool = True,
             batch_buckets: list[int] | None = None, seq_buckets: list[int] | None = None,
             **options) -> GenerateResult:
    """Generate with a static KV cache; prefill and the decode step run as turbofx programs.

    ``input_ids`` is an integer [batch, seq] tensor (a 1-D tensor is refused: pass ``ids[None]``);
    int32 and other integer dtypes are converted to int64, and the results are int64 like HF's.
    ``attention_mask`` (1 = token, 0 = left padding; int, bool or float 0/1) enables batches of
    different lengths.
    Shapes go to buckets so programs are reused: the batch is padded to the next batch bucket
    (default powers of two) with copies of the first row, the prompt is left-padded to the next
    sequence bucket (default multiples of 16), the cache to a multiple of 64; an explicit
    ``max_cache_len`` must hold the prompt bucket plus ``max_new_tokens``. Compiled programs
    are kept per model for later calls; they read the model's parameters live (load_state_dict
    is seen) and are rebuilt after a dtype/device change. ``max_new_tokens=0`` returns no new
    tokens without compiling. ``compile=False`` runs the same loop eagerly (the reference the
    compiled path must equal). Misuse raises ``GenerationError`` saying what to pass instead.
    """
    _check_model(model)
    vocab = _vocab_size(model)
    ids = _token_ids(input_ids, model, vocab)
    mask = _prompt_mask(attention_mask, ids)
    _check_count("max_new_tokens", max_new_tokens, 0)
    _check_sampling(do_sample, temperature, top_k, top_p, seed)
    eos = _token_set(eos_token_id, "eos_token_id", vocab)
    if pad_token_id is not None and not _is_int(pad_token_id):
        raise GenerationError(f"pad_token_id must be one token id (int), got {pad_token_id!r}")
    pad = pad_token_id if pad_token_id is not None else (min(eos) if eos else 0)
    _token_set(pad, "pad_token_id", vocab)  # in the vocabulary: pad slots are embedded too
    _check_buckets(batch_buckets, "batch_buckets")
    _check_buckets(seq_buckets, "seq_buckets")
    if max_cache_len is not None:
        _check_count("max_cache_len", max_cache_len, 1)
    if max_new_tokens == 0:
        return GenerateResult(ids.clone(), ids[:, :0].clone())

    b, s = ids.shape
    device = ids.device
    bp = next_bucket(b, batch_buckets, what="batch size", option="batch_buckets")
    sp = next_bucket(s, seq_buckets, multiple=16, what="prompt length", option="seq_buckets")
    need = sp + max_new_tokens
    if max_cache_len is not None and need > max_cache_len:
        # the compiled cache write has no bounds check: positions past the cache would be lost
        raise GenerationError(
            f"max_cache_len={max_cache_len} is too short: a prompt of {s} tokens runs as a bucket of {sp}, "
            f"plus max_new_tokens={max_new_tokens} needs {need} cache positions; pass max_cache_len={need} "
            "or more, or leave it unset to size the cache automatically")
    cache_len = max_cache_len or next_bucket(need, None, multiple=64)
    padded = torch.full((bp, sp), pad, dtype=torch.long, device=device)
    padded_mask = torch.zeros((bp, sp), dtype=torch.long, device=device)
    padded[:b, sp - s:], padded_mask[:b, sp - s:] = ids, mask
    padded[b:], padded_mask[b:] = padded[0], padded_mask[0]  # batch padding: copies of the first row, dropped at the end

    engine = _engine(model, options)
    engine.follow_model()
    decoder = engine.decoder(bp, cache_len)
    decoder.reset()
    prefill_args = prompt_inputs(padded, padded_mask, cache_len)
    _, cache_pos, step_mask, positions = prefill_args
    decode_args = (padded[:, :1], cache_pos[:1] + sp, step_mask, positions[:, -1:] + 1)

    t0 = time.perf_counter()
    reports = {}
    if compile:
        prefill = engine.program("prefill", decoder, prefill_args)
        decode = engine.program("decode", decoder, decode_args)
        reports = {"prefill": prefill.turbofx_report, "decode": decode.turbofx_report}
    else:
        prefill = decode = decoder
    compile_s = time.perf_counter() - t0

    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    res = decode_loop(prefill, decode, prefill_args, b, max_new_tokens, do_sample, temperature, top_k, top_p,
                      generator, eos, pad)
    res.sequences = torch.cat([ids, res.new_tokens], dim=1)
    res.compile_seconds, res.reports = compile_s, reports
    return res


def decode_loop(prefill, decode, prefill_args: tuple, b: int, max_new_tokens: int, do_sample: bool = False,
                temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, generator=None,
                eos: set | None = None, pad: int = 0) -> GenerateResult:
    """Prefill once, then one decode step per token over the static cache (rows ≥ b are padding).
    ``max_new_tokens`` <= 0 runs nothing and returns [b, 0] new tokens."""
    ids, cache_pos, step_mask, positions = prefill_args
    bp, sp = ids.shape
    device = ids.device
    if max_new_tokens <= 0:
        new = torch.zeros((b, 0), dtype=torch.long, device=device)
        return GenerateResult(new, new)
    t1 = time.perf_counter()
    logits = prefill(*prefill_args)
    prefill_s = time.perf_counter() - t1
    tokens = []
    done = torch.zeros(bp, dtype=torch.bool, device=device)
    done[b:] = True  # padding rows never hold the loop open
    eos_t = torch.tensor(sorted(eos), device=device) if eos else None
    last_pos = positions[:, -1:]
    t2 = time.perf_counter()
    for step in range(max_new_tokens):
        nxt = _pick(logits, do_sample, temperature, top_k, top_p, generator)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        tokens.append(nxt)
        if eos_t is not None:
            done = done | torch.isin(nxt, eos_t)
        if bool(done[:b].all()) or step == max_new_tokens - 1:
            break
        last_pos = last_pos + 1
        logits = decode(nxt[:, None], cache_pos[:1] * 0 + sp + step, step_mask, last_pos)
    decode_s = time.perf_counter() - t2
    new = torch.stack(tokens, dim=1)[:b]
    return GenerateResult(new, new, prefill_s, decode_s, 0.0, len(tokens))


def prompt_inputs(ids: torch.Tensor, mask: torch.Tensor, cache_len: int) -> tuple:
    """(ids, cache positions, mask over the whole cache, position ids) for a left-padded prompt."""
    bp, sp = ids.shape
    step_mask = torch.ones((bp, cache_len), dtype=mask.dtype, device=ids.device)
    step_mask[:, :sp] = mask  # slots after the prompt: hidden by causality until written
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, torch.arange(sp, device=ids.device), step_mask, positions


def export_generation(model: torch.nn.Module, example_ids: torch.Tensor, output_dir, max_cache_len: int = 256,
                      target: str | None = None, extra: dict | None = None, overwrite: bool = False,
                      tokenizer=None, quantize=None):
    """Write a generation artifact: prefill (prompt length symbolic) and the decode step over one
    exported KV cache; the decode artifact holds weights and cache, prefill shares them.
    ``output_dir`` is checked before compiling, as for ``turbofx.export`` (``overwrite=True``
    replaces an existing artifact)."""
    from turbofx.compiler.artifact import FORMAT, atomic_dir, check_output_dir, file_digests, save, seal
    from turbofx.compiler.driver import compile as tfx_compile

    out = check_output_dir(output_dir, overwrite)
    decoder = StaticDecoder(model, 1, max_cache_len).eval()
    args = prompt_inputs(example_ids, torch.ones_like(example_ids), max_cache_len)
    step = (example_ids[:, :1], args[1][:1] + example_ids.shape[1], args[2], args[3][:, -1:] + 1)
    with torch.no_grad():
        prefill = tfx_compile(decoder, args, target=target, dynamic=True, cudagraphs=False, quantize=quantize)
        decode = tfx_compile(decoder, step, target=target, cudagraphs=False, quantize=quantize)
    decoder.reset()
    with atomic_dir(out, overwrite) as tmp:
        save(decode, tmp / "decode", extra=extra)
        save(prefill, tmp / "prefill", shares_weights_with="../decode")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp / "tokenizer"))
        # decode/ and prefill/ are covered by their own meta.json; this lists the rest
        files = file_digests(tmp, skip=("decode", "prefill", "generation.json"))
        info = {**(extra or {}), "max_cache_len": max_cache_len}
        (tmp / "generation.json").write_text(seal({"format": FORMAT, "info": info, "files": files}))
    return out


class LoadedGeneration:
    """Prefill and decode programs loaded from a generation artifact, sharing one KV cache."""

    def __init__(self, path, device: str | None = None):
        from turbofx.compiler.artifact import artifact_dir, load, read_sealed, verify_files
        from turbofx.errors import ArtifactError

        d = artifact_dir(path)
        if not (d / "generation.json").exists() and (d / "meta.json").exists():
            raise ArtifactError(f"{d} is a forward artifact, not a generation one: load it with turbofx.load")
        doc = read_sealed(d / "generation.json", d)
        verify_files(d, doc["files"], "generation.json")
        self.info = doc["info"]
        self.decode = load(d / "decode", device=device)
        self.prefill = load(d / "prefill", device=device, shared_state=self.decode._state)

    def generate(self, ids: torch.Tensor, max_new_tokens: int) -> GenerateResult:
        from turbofx.errors import GenerationError

        cache_len = self.info["max_cache_len"]
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] == 0 \
                or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise GenerationError(f"a generation artifact takes integer token ids of shape [1, n >= 1], got "
                                  f"{describe(ids)}")
        ids = ids.long()
        vocab = self.info.get("vocab_size")
        if vocab is not None and bool(((ids < 0) | (ids >= vocab)).any()):
            raise GenerationError(f"token ids must lie in [0, {vocab}) (the model's vocabulary)")
        if ids.shape[1] + max_new_tokens > cache_len:
            from turbofx.errors import TurbofxError

            raise TurbofxError(f"prompt of {ids.shape[1]} tokens + {max_new_tokens} new exceeds the cache "
                               f"({cache_len}); re-export with a larger --max-cache-len")
        for key, t in self.decode._state.items():  # start from an empty cache
            if key.startswith(_CACHE_KEYS):
                t.zero_()
        eos = self.info.get("eos_token_id")
        eos = set(eos if isinstance(eos, list) else ([eos] if eos is not None else []))
        # The prefill program is dynamic in the prompt length, and torch.export specialises lengths
        # 0 and 1 (its guards refuse them): a one-token prompt is exactly one decode step at slot 0.
        prefill = self.decode if ids.shape[1] == 1 else self.prefill
        res = decode_loop(prefill, self.decode, prompt_inputs(ids, torch.ones_like(ids), cache_len), ids.shape[0],
                          max_new_tokens, eos=eos, pad=min(eos) if eos else 0)
        res.sequences = torch.cat([ids, res.new_tokens], dim=1)
        return res


def load_generation(path, device: str | None = None) -> LoadedGeneration:
    return LoadedGeneration(path, device)
