"""turbofx.Engine: continuous batching over a paged KV cache.

Requests arrive and finish at any time. Each ``step()`` is one scheduler iteration:

1. retire cancelled requests (their pages go back to the free list);
2. give every running request the pages its next tokens need — the decodes first; when pages run
   out, preempt the newest running request (its pages are freed and it is recomputed later from its
   prompt plus the tokens it already produced: greedy results are unchanged, nothing streamed is
   taken back) — never fail or corrupt a running one;
3. admit waiting requests, oldest first, while batch slots (``max_batch_size``), the token budget
   (``max_num_tokens``) and free pages allow; a prompt longer than the budget is prefilled in
   chunks over several steps;
4. pack every scheduled token — prompt chunks and single decode tokens — into one variable-length
   batch without padding between sequences and run the compiled ``PagedDecoder`` program once;
5. sample each request whose chunk reached its last token (greedy, or its own seeded generator
   with temperature / top-k / top-p), stream the token, retire finished requests (EOS, max tokens).

Invariant: a request's key/value rows 0..computed-1 are in its pages and nowhere else; the
allocator's free list plus the running requests' pages are every page (``PageAllocator.check``).

Shapes: the program is compiled once before serving, dynamic in the number of packed tokens T;
the sequence dimension is always ``max_batch_size`` and the block table ``max_pages_per_seq`` wide,
so a decode-only step padded to a power-of-two T replays one CUDA graph per bucket on GPUs.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from turbofx.compiler.paged_decoder import PagedDecoder
from turbofx.errors import GenerationError, TurbofxError
from turbofx.runtime.paged import SCRATCH_PAGE, PageAllocator, SequencePages

log = logging.getLogger("turbofx.engine")


class EngineFull(TurbofxError):
    """The engine's queue holds ``max_waiting`` requests (or it is shutting down): retry later."""


@dataclass
class EngineStats:
    steps: int = 0
    tokens: int = 0  # tokens generated
    prefill_tokens: int = 0  # prompt tokens computed (recomputed ones included)
    decode_tokens: int = 0
    padded_tokens: int = 0  # token slots run only to fill a bucket
    preemptions: int = 0
    compile_seconds: float = 0.0


@dataclass
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None


class RequestHandle:
    """One request: its tokens as they come (``iter``), its result, ``cancel()``."""

    def __init__(self, request_id: int, prompt_ids: list[int], max_new_tokens: int, sampling: Sampling,
                 eos: set[int], on_token=None):
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.max_new_tokens = max_new_tokens
        self.sampling = sampling
        self.eos = eos
        self.on_token = on_token
        self.tokens: list[int] = []
        self.finished = False
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.submit_time = time.perf_counter()
        self.first_token_time: float | None = None
        self.token_times: list[float] = []
        self._cancel = False
        self._cond = threading.Condition()
        self._generator = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None

    def cancel(self) -> None:
        """Stop generating; the engine frees the request's pages at its next step."""
        self._cancel = True

    @property
    def cancelled(self) -> bool:
        return self._cancel

    def result(self, timeout: float | None = None) -> list[int]:
        """The generated tokens once finished (blocks; another thread or ``engine.start()`` must be
        stepping). A request that failed raises its error."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.finished, timeout):
                raise TimeoutError(f"request {self.request_id} did not finish within {timeout} s")
        if self.finish_reason == "error":
            raise GenerationError(f"request {self.request_id} failed: {self.error}")
        return list(self.tokens)

    def __iter__(self):
        i = 0
        while True:
            with self._cond:
                self._cond.wait_for(lambda: len(self.tokens) > i or self.finished)
                new, done = self.tokens[i:], self.finished  # finishing comes after the last token
            yield from new
            i += len(new)
            if done:
                return

    # -- engine side (under the engine's lock) --
    def _emit(self, token: int) -> None:
        now = time.perf_counter()
        with self._cond:
            self.tokens.append(token)
            self.token_times.append(now)
            if self.first_token_time is None:
                self.first_token_time = now
            self._cond.notify_all()
        if self.on_token is not None:
            self.on_token(self, token)

    def _finish(self, reason: str, error: str | None = None) -> None:
        with self._cond:
            self.finished, self.finish_reason, self.error = True, reason, error
            self._cond.notify_all()
        if self.on_token is not None:
            self.on_token(self, None)


@dataclass
class _Sequence:
    handle: RequestHandle
    pages: SequencePages
    computed: int = 0  # tokens whose keys/values are in the cache
    admitted: int = 0  # admission order (preemption takes the newest)

    @property
    def tokens(self) -> list[int]:
        return self.handle.prompt_ids + self.handle.tokens


@dataclass
class _Chunk:
    seq: _Sequence
    start: int  # first token position of this chunk
    count: int

    @property
    def samples(self) -> bool:
        return self.start + self.count == len(self.seq.tokens)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class Engine:
    """Serve ``model`` (a transformers causal LM) to many requests at once.

    ``max_batch_size`` sequences run per step, at most ``max_num_tokens`` tokens per step (prompt
    chunks + decodes); the KV cache has ``num_pages`` pages of ``page_size`` tokens per layer
    (default: enough for every slot to reach ``max_seq_len``). ``max_seq_len`` (default: the
    model's ``max_position_embeddings``, capped at 4096) bounds prompt + generated tokens.
    ``max_waiting`` requests may queue; more raise ``EngineFull``. ``compile=False`` runs the same
    scheduler over the eager model (the reference). Other keywords are turbofx compile options."""

    def __init__(self, model: torch.nn.Module, max_batch_size: int = 8, max_num_tokens: int = 256,
                 page_size: int = 16, num_pages: int | None = None, max_seq_len: int | None = None,
                 max_waiting: int = 256, quantize=None, compile: bool = True, **options):
        for name, value, low in (("max_batch_size", max_batch_size, 1), ("max_num_tokens", max_num_tokens, 1),
                                 ("page_size", page_size, 1), ("max_waiting", max_waiting, 0)):
            if not _is_int(value) or value < low:
                raise GenerationError(f"{name} must be an int >= {low}, got {value!r}")
        if getattr(model, "config", None) is None:
            raise GenerationError(f"turbofx.Engine takes a transformers causal LM, got a {type(model).__name__}")
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        if max_seq_len is None:
            max_seq_len = min(getattr(config, "max_position_embeddings", None) or 4096, 4096)
        if not _is_int(max_seq_len) or max_seq_len < 2:
            raise GenerationError(f"max_seq_len must be an int >= 2, got {max_seq_len!r}")
        self.model = model
        self.max_batch_size = max_batch_size
        self.max_num_tokens = max(max_num_tokens, max_batch_size)  # every running decode fits a step
        self.page_size = page_size
        self.max_seq_len = max_seq_len
        self.max_waiting = max_waiting
        self.pages_per_seq = -(-max_seq_len // page_size)
        if num_pages is None:
            num_pages = max_batch_size * self.pages_per_seq
        if not _is_int(num_pages) or num_pages < 1:
            raise GenerationError(f"num_pages must be an int >= 1, got {num_pages!r}")
        self.allocator = PageAllocator(num_pages, page_size)
        self.vocab = getattr(config, "vocab_size", None)
        gen = getattr(model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None) if gen is not None else None
        self.default_eos = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        self.stats = EngineStats()
        self._ids = itertools.count()
        self._admissions = itertools.count()
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._closing = False
        self._stop = False
        self.device = next(model.parameters()).device
        with torch.no_grad():
            self.decoder = PagedDecoder(model, num_pages + 1, page_size).eval()  # + the scratch page
        self.options = dict(options, quantize=quantize) if quantize is not None else dict(options)
        self.program = self.decoder
        if compile:
            t0 = time.perf_counter()
            self.program = self._compile()
            self.stats.compile_seconds = time.perf_counter() - t0

    # ---------------------------------------------------------------- compile
    def _example_tokens(self) -> int:
        """A token count for capture that equals no other dim (shape-equal dims would be traced as one)."""
        taken = {self.max_batch_size, self.max_batch_size + 1, self.pages_per_seq, self.page_size,
                 self.allocator.num_pages + 1, self.vocab or 0}
        taken |= {int(d) for b in self.decoder.buffers() for d in b.shape}
        taken |= {int(d) for p in self.model.parameters() for d in p.shape}
        return next(t for t in itertools.count(5) if t not in taken)

    def _compile(self):
        from turbofx.compiler.driver import compile as tfx_compile

        t = self._example_tokens()
        args = self._inputs([], t)
        with torch.no_grad():
            program = tfx_compile(self.decoder, args, dynamic=True, **self.options)
            with program.without_graphs():
                program(*args)  # every kernel loaded and run once before serving
            # decode buckets: the second call of a shape captures its CUDA graph (GPU targets)
            replays = 2 if getattr(program, "_runner", None) is not None else 1
            for t in self.decode_buckets():
                for _ in range(replays):
                    program(*self._inputs([], t))
        self._reset_cache()
        return program

    def _reset_cache(self) -> None:
        for b in self.decoder.buffers(recurse=False):
            b.zero_()

    # ---------------------------------------------------------------- requests
    def submit(self, prompt_ids, max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, seed: int | None = None, eos_token_id=None, on_token=None) -> RequestHandle:
        """Queue a request; returns its handle at once (see ``RequestHandle``)."""
        ids = self._check_prompt(prompt_ids)
        if not _is_int(max_new_tokens) or max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        if len(ids) + max_new_tokens > self.max_seq_len:
            raise GenerationError(f"prompt of {len(ids)} tokens + max_new_tokens={max_new_tokens} exceeds the "
                                  f"engine's max_seq_len={self.max_seq_len}: shorten them or build the Engine "
                                  "with a larger max_seq_len")
        if self.allocator.pages_for(len(ids) + max_new_tokens) > self.allocator.num_pages:
            raise GenerationError(f"prompt + max_new_tokens ({len(ids) + max_new_tokens} tokens) needs more pages "
                                  f"than the whole cache has ({self.allocator.num_pages} of {self.page_size}): "
                                  "build the Engine with more num_pages")
        from turbofx.compiler.generation import _check_sampling, _token_set

        _check_sampling(temperature > 0 if isinstance(temperature, (int, float)) else False, temperature, top_k,
                        top_p, seed)
        eos = _token_set(eos_token_id, "eos_token_id", self.vocab) if eos_token_id is not None else self.default_eos
        if on_token is not None and not callable(on_token):
            raise GenerationError(f"on_token must be callable(handle, token), got {type(on_token).__name__}")
        with self._lock:
            if self._closing:
                raise EngineFull("the engine is shutting down and accepts no new requests")
            if len(self._waiting) >= self.max_waiting:
                raise EngineFull(f"{len(self._waiting)} requests are waiting (max_waiting={self.max_waiting}): "
                                 "retry later")
            h = RequestHandle(next(self._ids), ids, max_new_tokens, Sampling(float(temperature), top_k,
                                                                              float(top_p), seed), eos, on_token)
            self._waiting.append(_Sequence(h, SequencePages(h.request_id)))
            self._wake.notify_all()
        return h

    def _check_prompt(self, prompt_ids) -> list[int]:
        if isinstance(prompt_ids, torch.Tensor):
            if prompt_ids.dim() != 1 or prompt_ids.dtype.is_floating_point or prompt_ids.dtype == torch.bool:
                raise GenerationError(f"prompt_ids must be a 1-D integer tensor or a list of ints, got "
                                      f"{prompt_ids.dtype} of shape {list(prompt_ids.shape)}")
            prompt_ids = prompt_ids.tolist()
        if not isinstance(prompt_ids, (list, tuple)) or not all(_is_int(x) for x in prompt_ids):
            raise GenerationError(f"prompt_ids must be a list of token ids (ints), got {type(prompt_ids).__name__}")
        if not prompt_ids:
            raise GenerationError("prompt_ids is empty: pass at least one token (e.g. the BOS id)")
        bad = [x for x in prompt_ids if x < 0 or (self.vocab is not None and x >= self.vocab)]
        if bad:
            raise GenerationError(f"prompt ids {bad[:5]} are outside the vocabulary (0..{(self.vocab or 0) - 1})")
        return list(prompt_ids)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def has_work(self) -> bool:
        return bool(self._waiting or self._running)

    # ---------------------------------------------------------------- scheduling
    def step(self) -> int:
        """One scheduler iteration (see the module docstring); returns the tokens generated."""
        with self._lock:
            self._retire_cancelled()
            chunks = self._schedule()
            if not chunks:
                return 0
            try:
                logits = self._run(chunks)
            except Exception as e:  # a failed step fails its requests, not the engine
                log.exception("engine step failed")
                for c in chunks:
                    self._retire(c.seq, "error", f"{type(e).__name__}: {e}")
                return 0
            return self._sample(chunks, logits)

    def run_until_done(self) -> None:
        while self.has_work:
            self.step()

    def _retire(self, seq: _Sequence, reason: str, error: str | None = None) -> None:
        seq.pages.release(self.allocator)
        if seq in self._running:
            self._running.remove(seq)
        else:
            try:
                self._waiting.remove(seq)
            except ValueError:
                pass
        seq.handle._finish(reason, error)

    def _retire_cancelled(self) -> None:
        for seq in [s for s in itertools.chain(self._running, self._waiting) if s.handle.cancelled]:
            self._retire(seq, "cancelled")

    def _preempt(self, seq: _Sequence) -> None:
        """Free ``seq``'s pages and queue it first, to be recomputed from its tokens so far."""
        seq.pages.release(self.allocator)
        seq.computed = 0
        self._running.remove(seq)
        self._waiting.appendleft(seq)
        self.stats.preemptions += 1
        log.info("preempted request %d (out of KV pages)", seq.handle.request_id)

    def _schedule(self) -> list[_Chunk]:
        budget = self.max_num_tokens
        chunks: list[_Chunk] = []
        # running requests first, oldest first: decodes (1 token) and unfinished prefill chunks
        for seq in sorted(self._running, key=lambda s: s.admitted):
            if seq not in self._running:
                continue  # preempted below for an older request
            want = min(len(seq.tokens) - seq.computed, budget)
            if want <= 0:
                continue
            while True:
                try:
                    seq.pages.ensure(self.allocator, seq.computed + want)
                    break
                except TurbofxError:
                    victim = max(self._running, key=lambda s: s.admitted)
                    chunks = [c for c in chunks if c.seq is not victim]
                    self._preempt(victim)
                    if victim is seq:
                        break
            if seq in self._running:
                chunks.append(_Chunk(seq, seq.computed, want))
                budget -= want
        # then admit waiting requests while slots, tokens and pages allow
        while self._waiting and budget > 0 and len(self._running) < self.max_batch_size:
            seq = self._waiting[0]
            want = min(len(seq.tokens) - seq.computed, budget)
            free_tokens = self.allocator.num_free * self.page_size
            want = min(want, free_tokens)
            if want <= 0:
                break
            seq.pages.ensure(self.allocator, seq.computed + want)
            self._waiting.popleft()
            seq.admitted = next(self._admissions)
            self._running.append(seq)
            chunks.append(_Chunk(seq, seq.computed, want))
            budget -= want
        return chunks

    # ---------------------------------------------------------------- one step
    def _inputs(self, chunks: list[_Chunk], pad_to: int | None = None) -> tuple:
        """The PagedDecoder inputs of ``chunks``, padded with scratch tokens to ``pad_to`` tokens."""
        s, w, ps = self.max_batch_size, self.pages_per_seq, self.page_size
        ids, pos, slots = [], [], []
        block_table = torch.full((s, w), SCRATCH_PAGE, dtype=torch.int32)
        query_start, seq_lens, last = [0], [], []
        for r, c in enumerate(chunks):
            toks = c.seq.tokens
            for p in range(c.start, c.start + c.count):
                ids.append(toks[p])
                pos.append(p)
                slots.append(c.seq.pages.slot(p, ps))
            block_table[r, :len(c.seq.pages.pages)] = torch.tensor(c.seq.pages.pages, dtype=torch.int32)
            query_start.append(len(ids))
            seq_lens.append(c.start + c.count)
            last.append(len(ids) - 1)
        real = len(ids)
        total = max(pad_to or 0, real)
        scratch = SCRATCH_PAGE * ps
        ids += [0] * (total - real)
        pos += [0] * (total - real)
        slots += [scratch + i % ps for i in range(total - real)]
        query_start += [real] * (s - len(chunks))
        seq_lens += [0] * (s - len(chunks))
        last += [0] * (s - len(chunks))
        dev = self.device
        return (torch.tensor([ids], device=dev), torch.tensor([pos], device=dev), torch.tensor(slots, device=dev),
                block_table.to(dev), torch.tensor(query_start, dtype=torch.int32, device=dev),
                torch.tensor(seq_lens, dtype=torch.int32, device=dev), torch.tensor(last, device=dev))

    def decode_buckets(self) -> list[int]:
        """Token counts decode-only steps run with (powers of two from 2 up to max_batch_size's)."""
        top = self._bucket(self.max_batch_size, True)
        return [1 << i for i in range(1, top.bit_length())]

    def _bucket(self, tokens: int, decode_only: bool) -> int:
        """Token count a step runs with: at least 2 (sizes 0 and 1 are specialised by capture);
        decode-only steps go to the next power of two, so each bucket is one CUDA graph."""
        if decode_only:
            return max(2, 1 << (tokens - 1).bit_length())
        return max(2, tokens)

    def _run(self, chunks: list[_Chunk]) -> torch.Tensor:
        real = sum(c.count for c in chunks)
        decode_only = all(c.count == 1 and c.start == len(c.seq.tokens) - 1 and c.start > 0 for c in chunks)
        total = self._bucket(real, decode_only)
        # decode-only steps have one shape per bucket: graph replay on GPUs; mixed steps run directly
        graphs = decode_only or not hasattr(self.program, "without_graphs")
        with torch.no_grad(), (contextlib.nullcontext() if graphs else self.program.without_graphs()):
            logits = self.program(*self._inputs(chunks, total))
        self.stats.steps += 1
        self.stats.padded_tokens += total - real
        for c in chunks:
            c.seq.computed += c.count
            if decode_only:
                self.stats.decode_tokens += 1
            else:
                self.stats.prefill_tokens += c.count
        return logits

    def _sample(self, chunks: list[_Chunk], logits: torch.Tensor) -> int:
        from turbofx.compiler.generation import _pick

        made = 0
        for r, c in enumerate(chunks):
            if not c.samples:
                continue
            h = c.seq.handle
            sp = h.sampling
            row = logits[r:r + 1]
            token = int(_pick(row, sp.temperature > 0, sp.temperature or 1.0, sp.top_k, sp.top_p, h._generator)[0])
            h._emit(token)
            made += 1
            self.stats.tokens += 1
            if token in h.eos:
                self._retire(c.seq, "stop")
            elif len(h.tokens) >= h.max_new_tokens:
                self._retire(c.seq, "length")
        return made

    # ---------------------------------------------------------------- background serving
    def start(self) -> None:
        """Step in a background thread whenever there is work (for servers and streaming)."""
        with self._lock:
            if self._thread is not None:
                return
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="turbofx-engine", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._lock:
                self._wake.wait_for(lambda: self._stop or self.has_work)
                if self._stop:
                    return
            self.step()

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Accept no new requests; finish the queued and running ones (``drain``) or cancel them.
        Requests still unfinished after ``timeout`` seconds are cancelled."""
        with self._lock:
            self._closing = True
            if not drain:
                for seq in list(self._running) + list(self._waiting):
                    seq.handle.cancel()
            self._wake.notify_all()
        deadline = None if timeout is None else time.monotonic() + timeout
        if self._thread is None:
            while self.has_work and (deadline is None or time.monotonic() < deadline):
                self.step()
        else:
            while self.has_work and (deadline is None or time.monotonic() < deadline):
                time.sleep(0.01)
        with self._lock:
            for seq in list(self._running) + list(self._waiting):
                seq.handle.cancel()
            self._retire_cancelled()
            self._stop = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
