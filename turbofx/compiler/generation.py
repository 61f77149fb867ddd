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
import time
import weakref
from dataclasses import dataclass, field

import torch

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
        kwargs = {self.cache_kw: self.cache, "use_cache": True, "attention_mask": attention_mask,
                  "position_ids": position_ids}
        if self.pass_cache_position:
            kwargs["cache_position"] = cache_position
        out = self.model(input_ids=input_ids, **kwargs)
        return out.logits[:, -1, :].clone()  # a view of an intermediate would not export


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


def next_bucket(n: int, buckets: list[int] | None, multiple: int = 1) -> int:
    """The smallest declared bucket holding ``n`` (default: next power of two / multiple)."""
    if buckets:
        fits = [x for x in sorted(buckets) if x >= n]
        if not fits:
            from turbofx.errors import TurbofxError

            raise TurbofxError(f"{n} is larger than every declared bucket {sorted(buckets)}")
        return fits[0]
    if multiple > 1:
        return -(-n // multiple) * multiple
    return 1 << max(n - 1, 0).bit_length()


class _Engine:
    """Compiled programs of one model, reused across generate calls: a StaticDecoder (cache) per
    (batch bucket, cache length), a prefill program per prompt bucket, one decode step each."""

    def __init__(self, model: torch.nn.Module, options: dict):
        self.model = model
        self.options = options
        self.decoders: dict[tuple, StaticDecoder] = {}
        self.programs: dict[tuple, object] = {}

    def decoder(self, batch: int, cache_len: int) -> StaticDecoder:
        key = (batch, cache_len)
        if key not in self.decoders:
            self.decoders[key] = StaticDecoder(self.model, batch, cache_len).eval()
        return self.decoders[key]

    def program(self, kind: str, decoder: StaticDecoder, args: tuple):
        from turbofx.compiler.driver import compile as tfx_compile

        key = (kind, id(decoder)) + tuple(tuple(a.shape) for a in args)
        if key not in self.programs:
            log.info("compiling the %s step for shapes %s", kind, [tuple(a.shape) for a in args])
            self.programs[key] = tfx_compile(decoder, args, **self.options)
        return self.programs[key]


_engines: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {options key: _Engine}


def _engine(model: torch.nn.Module, options: dict) -> _Engine:
    per_model = _engines.setdefault(model, {})
    key = repr(sorted(options.items()))
    if key not in per_model:
        per_model[key] = _Engine(model, options)
    return per_model[key]


@torch.no_grad()
def generate(model: torch.nn.Module, input_ids: torch.Tensor, max_new_tokens: int = 32,
             attention_mask: torch.Tensor | None = None, do_sample: bool = False, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, seed: int | None = None, eos_token_id: int | list | None = None,
             pad_token_id: int | None = None, max_cache_len: int | None = None, compile: bool = True,
             batch_buckets: list[int] | None = None, seq_buckets: list[int] | None = None,
             **options) -> GenerateResult:
    """Generate with a static KV cache; prefill and the decode step run as turbofx programs.

    ``attention_mask`` (1 = token, 0 = left padding) enables batches of different lengths.
    Shapes go to buckets so programs are reused: the batch is padded to the next batch bucket
    (default powers of two) with copies of the first row, the prompt is left-padded to the next
    sequence bucket (default multiples of 16), the cache to a multiple of 64. Compiled programs
    are kept per model for later calls. ``compile=False`` runs the same loop eagerly (the
    reference the compiled path must equal).
    """
    b, s = input_ids.shape
    device = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape or bool((attention_mask[:, 1:] < attention_mask[:, :-1]).any()):
        from turbofx.errors import TurbofxError

        raise TurbofxError("attention_mask must match input_ids and pad on the left only (0s before 1s)")
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    pad = pad_token_id if pad_token_id is not None else (min(eos) if eos else 0)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None

    bp, sp = next_bucket(b, batch_buckets), next_bucket(s, seq_buckets, multiple=16)
    cache_len = max_cache_len or next_bucket(sp + max_new_tokens, None, multiple=64)
    ids = torch.full((bp, sp), pad, dtype=input_ids.dtype, device=device)
    mask = torch.zeros((bp, sp), dtype=attention_mask.dtype, device=device)
    ids[:b, sp - s:], mask[:b, sp - s:] = input_ids, attention_mask
    ids[b:], mask[b:] = ids[0], mask[0]  # batch padding: copies of the first row, dropped at the end

    engine = _engine(model, options)
    decoder = engine.decoder(bp, cache_len)
    decoder.reset()
    prefill_args = prompt_inputs(ids, mask, cache_len)
    _, cache_pos, step_mask, positions = prefill_args
    decode_args = (ids[:, :1], cache_pos[:1] + sp, step_mask, positions[:, -1:] + 1)

    t0 = time.perf_counter()
    reports = {}
    if compile:
        prefill = engine.program("prefill", decoder, prefill_args)
        decode = engine.program("decode", decoder, decode_args)
        reports = {"prefill": prefill.turbofx_report, "decode": decode.turbofx_report}
    else:
        prefill = decode = decoder
    compile_s = time.perf_counter() - t0

    res = decode_loop(prefill, decode, prefill_args, b, max_new_tokens, do_sample, temperature, top_k, top_p,
                      generator, eos, pad)
    res.sequences = torch.cat([input_ids, res.new_tokens], dim=1)
    res.compile_seconds, res.reports = compile_s, reports
    return res


def decode_loop(prefill, decode, prefill_args: tuple, b: int, max_new_tokens: int, do_sample: bool = False,
                temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, generator=None,
                eos: set | None = None, pad: int = 0) -> GenerateResult:
    """Prefill once, then one decode step per token over the static cache (rows ≥ b are padding)."""
    ids, cache_pos, step_mask, positions = prefill_args
    bp, sp = ids.shape
    device = ids.device
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
                      tokenizer=None):
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
        prefill = tfx_compile(decoder, args, target=target, dynamic=True, cudagraphs=False)
        decode = tfx_compile(decoder, step, target=target, cudagraphs=False)
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
        cache_len = self.info["max_cache_len"]
        if ids.shape[1] + max_new_tokens > cache_len:
            from turbofx.errors import TurbofxError

            raise TurbofxError(f"prompt of {ids.shape[1]} tokens + {max_new_tokens} new exceeds the cache "
                               f"({cache_len}); re-export with a larger --max-cache-len")
        for key, t in self.decode._state.items():  # start from an empty cache
            if key.startswith(_CACHE_KEYS):
                t.zero_()
        eos = self.info.get("eos_token_id")
        eos = set(eos if isinstance(eos, list) else ([eos] if eos is not None else []))
        res = decode_loop(self.prefill, self.decode, prompt_inputs(ids, torch.ones_like(ids), cache_len), ids.shape[0],
                          max_new_tokens, eos=eos, pad=min(eos) if eos else 0)
        res.sequences = torch.cat([ids, res.new_tokens], dim=1)
        return res


def load_generation(path, device: str | None = None) -> LoadedGeneration:
    return LoadedGeneration(path, device)
