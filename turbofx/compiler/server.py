"""``turbofx serve``: an OpenAI-compatible HTTP server over ``turbofx.Engine`` (Starlette + uvicorn).

Routes: ``GET /health``, ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``
(streaming as server-sent events, ``data: {json}`` per chunk then ``data: [DONE]``; the last chunk
carries ``usage``). ``max_tokens`` defaults to 16 on both endpoints (a truncated answer says
``finish_reason: "length"``); ``top_k`` is an extension; ``n`` must be 1.

Invariants:

- every request completes (its finish_reason is "stop" or "length"), or is cancelled
  (``handle.cancel()``: a client that disconnects, a stop string, a drain timeout) and the engine
  frees its pages at its next step; no path leaves a request running that nobody reads;
- no handler blocks the event loop: the engine steps on its own thread (``engine.start()``) and
  hands each token to the loop with ``loop.call_soon_threadsafe`` (its ``on_token`` runs under the
  engine's lock, so it does nothing else); draining waits in a worker thread;
- a request field is used, or refused with a 400 that names it: nothing is silently ignored
  (a field whose value is the no-op default, e.g. ``echo: false``, is accepted);
- streamed text never holds half a UTF-8 character or a prefix of a stop string: each step
  decodes all tokens so far and emits the new suffix, holding back text that ends in U+FFFD or
  in the start of a stop string; the concatenated stream equals the final text.

Errors have OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: 400 bad JSON,
fields or values (the engine's ``GenerationError`` message), 404, 405, 429 (``EngineFull``),
503 while draining, 500 when the engine failed the request (its message, never a traceback).
"""
from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from turbofx.compiler.serving import EngineFull
from turbofx.errors import GenerationError

DRAIN_TIMEOUT_S = 60.0

# Fields every endpoint takes, and the ones each refuses unless they hold their no-op value.
_COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream", "n", "user"}
_COMPLETION_FIELDS = _COMMON | {"prompt"}
_CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens"}
_NOOP = {"echo": (False,), "logprobs": (None, False), "best_of": (1,), "suffix": (None, ""),
         "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "logit_bias": (None, {}),
         "top_logprobs": (None, 0), "tools": (None, []), "tool_choice": (None, "none"),
         "response_format": (None, {"type": "text"}), "stream_options": (None,), "parallel_tool_calls": (None,),
         "functions": (None, []), "function_call": (None, "none")}


class ApiError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None, type_: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.type = type_ or {400: "invalid_request_error", 404: "not_found_error", 405: "invalid_request_error",
                              429: "rate_limit_error", 503: "service_unavailable"}.get(status, "server_error")

    def json(self) -> dict:
        return {"message": self.message, "type": self.type, "param": self.param, "code": self.status}


def _error_response(status: int, message: str, param: str | None = None, type_: str | None = None) -> JSONResponse:
    e = ApiError(status, message, param, type_)
    return JSONResponse({"error": e.json()}, status_code=e.status)


@dataclass
class Params:
    """One request's generation parameters, checked."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_fields(body: dict, allowed: set[str]) -> None:
    for name, value in body.items():
        if name in allowed:
            continue
        if name in _NOOP:
            if value in _NOOP[name]:
                continue
            raise ApiError(400, f"'{name}' is not supported by turbofx serve (got {value!r}); remove it", name)
        raise ApiError(400, f"unknown field '{name}'", name)


def _parse_common(body: dict, max_tokens_field: str = "max_tokens") -> dict:
    out = {}
    n = body.get("n", 1)
    if n != 1 or not _is_int(n):
        raise ApiError(400, f"'n' must be 1 (turbofx serve generates one choice per request), got {n!r}", "n")
    mt = body.get(max_tokens_field)
    mt = 16 if mt is None else mt  # null is OpenAI's "the default"
    if not _is_int(mt) or mt < 1:
        raise ApiError(400, f"'{max_tokens_field}' must be an integer >= 1, got {mt!r}", max_tokens_field)
    out["max_tokens"] = mt
    for name, default in (("temperature", 0.0), ("top_p", 1.0)):
        v = body.get(name, default)
        v = default if v is None else v
        if not _is_num(v):
            raise ApiError(400, f"'{name}' must be a number, got {v!r}", name)
        out[name] = float(v)
    top_k = body.get("top_k", 0)
    top_k = 0 if top_k is None else top_k
    if not _is_int(top_k) or top_k < 0:
        raise ApiError(400, f"'top_k' must be an integer >= 0, got {top_k!r}", "top_k")
    out["top_k"] = top_k
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise ApiError(400, f"'seed' must be an integer, got {seed!r}", "seed")
    out["seed"] = seed
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, f"'stop' must be a non-empty string or a list of them, got {body.get('stop')!r}", "stop")
    out["stop"] = stop
    stream = body.get("stream")
    stream = False if stream is None else stream
    if not isinstance(stream, bool):
        raise ApiError(400, f"'stream' must be true or false, got {stream!r}", "stream")
    out["stream"] = stream
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise ApiError(400, f"'user' must be a string, got {user!r}", "user")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(400, f"'model' must be a string, got {model!r}", "model")
    return out


def _ids(x) -> list[int]:
    """apply_chat_template / encode may answer a list, a BatchEncoding or a tensor."""
    if hasattr(x, "keys"):
        x = x["input_ids"]
    if hasattr(x, "tolist"):
        x = x.tolist()
    if x and isinstance(x[0], list):  # a batch of one
        x = x[0]
    return [int(t) for t in x]


class Detokenizer:
    """Incremental text of a token stream: ``add`` returns the text that is safe to emit now."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, stop
        self.tokens: list[int] = []
        self.emitted = 0  # characters of the text already emitted
        self.text = ""
        self.stopped = False

    def _decode(self) -> str:
        return self.tokenizer.decode(self.tokens, skip_special_tokens=True)

    def add(self, token: int) -> str:
        self.tokens.append(token)
        self.text = self._decode()
        hits = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
        if hits:  # the earliest stop string ends the text
            self.text, self.stopped = self.text[:min(hits)], True
        if self.stopped:
            return self._take(len(self.text))
        end = len(self.text)
        if self.text.endswith("\ufffd"):  # half a UTF-8 character (or a real U+FFFD: shown when the next arrives)
            end = len(self.text.rstrip("\ufffd"))
        head = self.text[:end]
        for s in self.stop:  # a stop string may be starting: hold it back
            for k in range(min(len(s) - 1, len(head)), 0, -1):
                if head.endswith(s[:k]):
                    end = min(end, len(head) - k)
                    break
        return self._take(end)

    def finish(self) -> str:
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        if end <= self.emitted:
            return ""
        piece, self.emitted = self.text[self.emitted:end], end
        return piece


@dataclass
class _Usage:
    prompt_tokens: int
    completion_tokens: int

    def json(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


class Server:
    """The app's state: the engine, the tokenizer, the draining flag."""

    def __init__(self, engine, tokenizer, model_name: str, drain_timeout: float = DRAIN_TIMEOUT_S):
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.drain_timeout = drain_timeout
        self.draining = False
        self.created = int(time.time())
        eos = set(getattr(engine, "default_eos", set()) or set())
        tok_eos = getattr(tokenizer, "eos_token_id", None)
        if _is_int(tok_eos):
            eos.add(tok_eos)
        self.eos = sorted(eos) or None

    async def drain(self) -> None:
        """Refuse new requests (503), let the running ones finish, stop the engine's thread."""
        self.draining = True
        await asyncio.to_thread(self.engine.shutdown, True, self.drain_timeout)

    # ------------------------------------------------------------------ requests
    async def _body(self, request: Request, allowed: set[str]) -> dict:
        if self.draining:
            raise ApiError(503, "the server is shutting down and accepts no new requests")
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
        _check_fields(body, allowed)
        return body

    def _submit(self, p: Params, loop: asyncio.AbstractEventLoop):
        queue: asyncio.Queue = asyncio.Queue()

        def on_token(_handle, token) -> None:  # engine thread, under its lock: hand over and return
            try:
                loop.call_soon_threadsafe(queue.put_nowait, token)
            except RuntimeError:  # the loop is closed: nobody is reading any more
                _handle.cancel()

        try:
            handle = self.engine.submit(p.prompt_ids, max_new_tokens=p.max_tokens, temperature=p.temperature,
                                        top_k=p.top_k, top_p=p.top_p, seed=p.seed, eos_token_id=self.eos,
                                        on_token=on_token)
        except EngineFull as e:
            if self.draining:
                raise ApiError(503, "the server is shutting down and accepts no new requests") from None
            raise ApiError(429, str(e)) from None
        except GenerationError as e:
            raise ApiError(400, str(e)) from None
        return handle, queue

    async def _pieces(self, p: Params, request: Request):
        """Yields (text, None) while generating, then ("", finish_reason, usage). Cancels the
        request when the client goes away, a stop string matches, or the consumer stops."""
        loop = asyncio.get_running_loop()
        handle, queue = self._submit(p, loop)
        watcher = asyncio.create_task(_watch_disconnect(request, handle, queue))
        detok = Detokenizer(self.tokenizer, p.stop)
        try:
            while True:
                token = await queue.get()
                if token is None:
                    break
                if detok.stopped:
                    continue
                piece = detok.add(token)
                if detok.stopped:
                    handle.cancel()  # the engine frees its pages at its next step
                if piece:
                    yield piece, None, None
            if handle.finish_reason == "error":
                raise ApiError(500, f"generation failed: {handle.error}", type_="server_error")
            if handle.finish_reason == "cancelled" and not detok.stopped:
                raise ApiError(503, "the request was cancelled (client gone or server shutting down)")
            tail = detok.finish()
            if tail:
                yield tail, None, None
            reason = "stop" if detok.stopped or handle.finish_reason == "stop" else handle.finish_reason
            yield "", reason, _Usage(len(p.prompt_ids), len(handle.tokens))
        finally:
            watcher.cancel()
            if not handle.finished:
                handle.cancel()

    async def _respond(self, p: Params, request: Request, chat: bool) -> JSONResponse | StreamingResponse:
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        pieces = self._pieces(p, request)
        if not p.stream:
            text, reason, usage = [], None, None
            try:
                async for piece, reason, usage in pieces:
                    text.append(piece)
            finally:
                await pieces.aclose()
            content = "".join(text)
            choice = ({"index": 0, "message": {"role": "assistant", "content": content}} if chat
                      else {"index": 0, "text": content})
            choice.update(finish_reason=reason, logprobs=None)
            return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion",
                                 "created": created, "model": self.model_name, "choices": [choice],
                                 "usage": usage.json()})
        # Streaming: submit now (so 400/429 are answered as errors, before the 200 of the stream).
        first = await pieces.__anext__()
        return StreamingResponse(self._sse(first, pieces, rid, created, chat), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    async def _sse(self, first, pieces, rid: str, created: int, chat: bool):
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str | None, reason, usage=None, role: bool = False) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
                choice = {"index": 0, "delta": delta}
            else:
                choice = {"index": 0, "text": text or ""}
            choice.update(finish_reason=reason, logprobs=None)
            out = {"id": rid, "object": obj, "created": created, "model": self.model_name, "choices": [choice]}
            if usage is not None:
                out["usage"] = usage.json()
            return f"data: {json.dumps(out)}\n\n"

        try:
            if chat:
                yield chunk(None, None, role=True)
            item = first
            while True:
                text, reason, usage = item
                if reason is not None:
                    yield chunk(None if chat else "", reason, usage)
                    break
                yield chunk(text, None)
                try:
                    item = await pieces.__anext__()
                except StopAsyncIteration:
                    break
            yield "data: [DONE]\n\n"
        except ApiError as e:  # after the 200: the error travels as an event
            yield f"data: {json.dumps({'error': e.json()})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            await pieces.aclose()

    # ------------------------------------------------------------------ routes
    async def health(self, request: Request) -> JSONResponse:
        if self.draining:
            return _error_response(503, "the server is shutting down")
        return JSONResponse({"status": "ok", "model": self.model_name, "waiting": self.engine.num_waiting,
                             "running": self.engine.num_running, "free_pages": self.engine.allocator.num_free})

    async def models(self, request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": self.model_name, "object": "model",
                                                          "created": self.created, "owned_by": "turbofx"}]})

    async def completions(self, request: Request):
        body = await self._body(request, _COMPLETION_FIELDS)
        common = _parse_common(body)
        if "prompt" not in body:
            raise ApiError(400, "'prompt' is required: a string or a list of token ids", "prompt")
        prompt = body["prompt"]
        if isinstance(prompt, str):
            ids = _ids(self.tokenizer.encode(prompt))
        elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
            ids = list(prompt)
        else:
            raise ApiError(400, "'prompt' must be a string or a non-empty list of token ids (one prompt per "
                                f"request), got {type(prompt).__name__}", "prompt")
        return await self._respond(Params(ids, **common), request, chat=False)

    async def chat(self, request: Request):
        body = await self._body(request, _CHAT_FIELDS)
        if "max_tokens" in body and "max_completion_tokens" in body:
            raise ApiError(400, "give 'max_tokens' or 'max_completion_tokens', not both", "max_completion_tokens")
        common = _parse_common(body, "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "'messages' must be a non-empty list of {role, content}", "messages")
        for i, m in enumerate(messages):
            if (not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str)
                    or set(m) - {"role", "content", "name"}):
                raise ApiError(400, f"messages[{i}] must be an object with a string 'role' and a string 'content' "
                                    "(tool calls and content parts are not supported)", "messages")
        try:
            ids = _ids(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
        except Exception as e:  # a template that refuses these messages (e.g. roles out of order)
            raise ApiError(400, f"the chat template refused the messages: {e}", "messages") from None
        return await self._respond(Params(ids, **common), request, chat=True)


async def _watch_disconnect(request: Request, handle, queue: asyncio.Queue) -> None:
    """Cancel the request when its client disconnects (the body is already read: the next
    message is the disconnect)."""
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            handle.cancel()
            return


def build_app(engine, tokenizer, model_name: str, drain_timeout: float = DRAIN_TIMEOUT_S) -> Starlette:
    """The ASGI app over ``engine``; its lifespan starts the engine's thread and drains it."""
    import contextlib

    server = Server(engine, tokenizer, model_name, drain_timeout)

    def route(fn):
        async def endpoint(request: Request):
            try:
                return await fn(request)
            except ApiError as e:
                return _error_response(e.status, e.message, e.param, e.type)
        return endpoint

    async def http_error(request: Request, exc: HTTPException):
        msg = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        return _error_response(exc.status_code, msg.get(exc.status_code, str(exc.detail)))

    async def internal_error(request: Request, exc: Exception):
        return _error_response(500, f"internal error: {type(exc).__name__}: {exc}")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            await server.drain()

    app = Starlette(routes=[Route("/health", route(server.health), methods=["GET"]),
                            Route("/v1/models", route(server.models), methods=["GET"]),
                            Route("/v1/completions", route(server.completions), methods=["POST"]),
                            Route("/v1/chat/completions", route(server.chat), methods=["POST"])],
                    exception_handlers={HTTPException: http_error, Exception: internal_error}, lifespan=lifespan)
    app.state.turbofx = server
    return app


def serve(engine, tokenizer, model_name: str, host: str = "127.0.0.1", port: int = 8000,
          drain_timeout: float = DRAIN_TIMEOUT_S) -> None:
    """Serve until SIGINT/SIGTERM; then refuse new requests (503), finish the running ones, stop."""
    import uvicorn

    app = build_app(engine, tokenizer, model_name, drain_timeout)
    state: Server = app.state.turbofx

    class _Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            state.draining = True  # before uvicorn waits for the in-flight requests
            await super().shutdown(sockets)

    try:
        _Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on",
                               timeout_graceful_shutdown=drain_timeout)).run()
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it handled, after the graceful shutdown
        pass
