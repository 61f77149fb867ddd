"""turbofx serve: OpenAI shapes and errors over ASGI, and end to end over loopback HTTP: concurrent
streamed text equals HF greedy decoding, disconnects cancel and free pages, shutdown drains."""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import pytest
import torch

import turbofx

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

from turbofx.compiler.server import Detokenizer, build_app  # noqa: E402

VOCAB = 128
EOS = 2


class ByteTokenizer:
    """A tiny byte-level tokenizer (SmolLM2's takes ~8 s to load here): ids 0/1/2 are pad/bos/eos,
    3..97 printable ASCII, 98..127 UTF-8 lead and continuation bytes (so random tokens make half
    characters, which the server must never stream)."""

    eos_token_id = EOS
    BYTES = list(range(0x20, 0x7F)) + [0xC3, 0xC5, 0xCE, 0xE2, 0xE3] + [0x80 + i for i in range(25)]

    def __init__(self):
        assert len(self.BYTES) == VOCAB - 3
        self.ids = {b: i + 3 for i, b in enumerate(self.BYTES)}

    def encode(self, text: str) -> list[int]:
        return [1] + [self.ids[b] for b in text.encode()]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        out, raw = [], bytearray()
        for i in ids:
            if i < 3:
                if not skip_special_tokens:
                    raw += ["<pad>", "<s>", "</s>"][i].encode()
            else:
                raw.append(self.BYTES[i - 3])
        out.append(raw.decode("utf-8", errors="replace"))
        return "".join(out)

    def apply_chat_template(self, messages, add_generation_prompt: bool = False, tokenize: bool = True):
        text = "".join(f"<{m['role']}>{m['content']}|" for m in messages)
        text += "<assistant>" if add_generation_prompt else ""
        return self.encode(text) if tokenize else text


def _tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=EOS)
    return LlamaForCausalLM(cfg).eval()


def _hf_greedy(model, prompt, k):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=k, do_sample=False, eos_token_id=EOS,
                             pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _engine(model, compile: bool = False, **kw):
    args = dict(max_batch_size=4, max_num_tokens=32, page_size=4, num_pages=64, max_seq_len=128)
    args.update(kw)
    return turbofx.Engine(model, compile=compile, **args)


async def _asgi(app, calls):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        return [await c.request(m, url, **kw) for m, url, kw in calls]


def _assert_error(r, status: int, param=None, words=""):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status
    assert "Traceback" not in err["message"] and words in err["message"], err
    if param is not None:
        assert err["param"] == param, err


# ---------------------------------------------------------------------------------------- unit

def test_detokenizer_never_streams_half_a_character_or_a_stop_prefix():
    tok = ByteTokenizer()
    euro = [tok.ids[b] for b in "\u3000".encode()]  # 3 bytes: e3 80 80
    d = Detokenizer(tok, [])
    pieces = [d.add(t) for t in [tok.ids[ord("a")]] + euro[:2]]
    assert pieces == ["a", "", ""]  # the lead bytes are held back
    pieces.append(d.add(euro[2]))
    pieces.append(d.finish())
    assert "".join(pieces) == tok.decode([tok.ids[ord("a")]] + euro) and "\ufffd" not in pieces[1] + pieces[2]
    s = Detokenizer(tok, ["yz"])
    out = [s.add(tok.ids[ord(c)]) for c in "xy"]
    assert out == ["x", ""] and not s.stopped  # "y" may start the stop string
    assert s.add(tok.ids[ord("z")]) == "" and s.stopped and s.text == "x"


# ---------------------------------------------------------------------------------------- ASGI

@pytest.fixture(scope="module")
def model():
    return _tiny_llama()


def test_error_shapes(model):
    engine = _engine(model, max_waiting=1)
    app = build_app(engine, ByteTokenizer(), "tiny")
    ok = {"prompt": [5, 6, 7], "max_tokens": 2}
    calls = [("POST", "/v1/completions", {"content": b"{not json"}),
             ("POST", "/v1/completions", {"json": [1, 2]}),
             ("POST", "/v1/completions", {"json": {**ok, "max_tokens": "4"}}),
             ("POST", "/v1/completions", {"json": {**ok, "temperature": "hot"}}),
             ("POST", "/v1/completions", {"json": {**ok, "echo": True}}),
             ("POST", "/v1/completions", {"json": {**ok, "logprobs": 3}}),
             ("POST", "/v1/completions", {"json": {**ok, "best_of": 2}}),
             ("POST", "/v1/completions", {"json": {**ok, "suffix": "x"}}),
             ("POST", "/v1/completions", {"json": {**ok, "n": 2}}),
             ("POST", "/v1/completions", {"json": {**ok, "frobnicate": 1}}),
             ("POST", "/v1/completions", {"json": {"max_tokens": 2}}),
             ("POST", "/v1/completions", {"json": {**ok, "prompt": [5, 999]}}),  # the engine's GenerationError
             ("POST", "/v1/completions", {"json": {**ok, "max_tokens": 500}}),  # past max_seq_len
             ("POST", "/v1/chat/completions", {"json": {"messages": "hi"}}),
             ("POST", "/v1/chat/completions", {"json": {"messages": [{"role": "user", "content": "a"}],
                                                        "tools": [{"type": "function"}]}}),
             ("GET", "/v1/nothing", {}),
             ("GET", "/v1/completions", {})]
    rs = asyncio.run(_asgi(app, calls))
    _assert_error(rs[0], 400, None, "not valid JSON")
    _assert_error(rs[1], 400, None, "JSON object")
    _assert_error(rs[2], 400, "max_tokens")
    _assert_error(rs[3], 400, "temperature")
    for r, name in zip(rs[4:8], ["echo", "logprobs", "best_of", "suffix"]):
        _assert_error(r, 400, name, "not supported")
    _assert_error(rs[8], 400, "n")
    _assert_error(rs[9], 400, "frobnicate", "unknown field")
    _assert_error(rs[10], 400, "prompt")
    _assert_error(rs[11], 400, None, "outside the vocabulary")
    _assert_error(rs[12], 400, None, "max_seq_len")
    _assert_error(rs[13], 400, "messages")
    _assert_error(rs[14], 400, "tools", "not supported")
    _assert_error(rs[15], 404)
    _assert_error(rs[16], 405)
    assert engine.num_waiting == 0 and engine.allocator.num_free == engine.allocator.num_pages
    # Queue full: the engine is not stepping and one request already waits (max_waiting=1).
    engine.submit([1, 2, 3], max_new_tokens=2)
    (full,) = asyncio.run(_asgi(app, [("POST", "/v1/completions", {"json": ok})]))
    _assert_error(full, 429, None, "max_waiting")


def test_chat_models_health_and_shutdown_drains(model):
    engine = _engine(model)
    tok = ByteTokenizer()
    app = build_app(engine, tok, "tiny")
    server = app.state.turbofx
    engine.start()  # ASGITransport runs no lifespan
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            health = await c.get("/health")
            models = await c.get("/v1/models")
            chat = await c.post("/v1/chat/completions", json={"model": "tiny", "messages": messages,
                                                              "max_completion_tokens": 5})
            stream = await c.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 5,
                                                                "stream": True})
            inflight = asyncio.create_task(c.post("/v1/completions", json={"prompt": "abc", "max_tokens": 60}))
            t0 = time.monotonic()
            while engine.num_running == 0 and time.monotonic() - t0 < 10:
                await asyncio.sleep(0.001)
            running = engine.num_running
            drain = asyncio.create_task(server.drain())
            await asyncio.sleep(0)
            during = await c.post("/v1/completions", json={"prompt": "abc", "max_tokens": 2})
            await drain
            done = await inflight
            after = await c.post("/v1/completions", json={"prompt": "abc", "max_tokens": 2})
            health_after = await c.get("/health")
            return health, models, chat, stream, running, during, done, after, health_after

    health, models, chat, stream, running, during, done, after, health_after = asyncio.run(go())
    assert health.status_code == 200 and health.json()["status"] == "ok"
    m = models.json()
    assert m["object"] == "list" and m["data"][0]["id"] == "tiny" and m["data"][0]["object"] == "model"
    c = chat.json()
    assert chat.status_code == 200 and c["object"] == "chat.completion" and c["model"] == "tiny"
    assert c["id"].startswith("chatcmpl-") and isinstance(c["created"], int)
    (choice,) = c["choices"]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
    ref = _hf_greedy(model, prompt, 5)
    assert choice["index"] == 0 and choice["logprobs"] is None and choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == tok.decode(ref, skip_special_tokens=True)
    assert choice["finish_reason"] == ("stop" if ref[-1] == EOS else "length")
    assert c["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": len(ref),
                          "total_tokens": len(prompt) + len(ref)}
    events = [line[6:] for line in stream.text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(ch["object"] == "chat.completion.chunk" for ch in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks) == choice["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == choice["finish_reason"]
    # Drain: the in-flight request completes; new ones get 503.
    assert running == 1
    _assert_error(during, 503, None, "shutting down")
    d = done.json()
    assert done.status_code == 200, d
    assert d["choices"][0]["finish_reason"] in ("length", "stop") and d["usage"]["completion_tokens"] >= 1
    _assert_error(after, 503)
    assert health_after.status_code == 503
    assert engine.allocator.num_free == engine.allocator.num_pages
    engine.allocator.check()


def test_seeded_sampling_repeats_and_an_engine_failure_is_a_500(model, monkeypatch):
    engine = _engine(model)
    app = build_app(engine, ByteTokenizer(), "tiny")
    engine.start()
    body = {"prompt": [4, 5, 6], "max_tokens": 6, "temperature": 0.9, "top_p": 0.9, "top_k": 20, "seed": 7}
    try:
        a, b, bad = asyncio.run(_asgi(app, [("POST", "/v1/completions", {"json": body}),
                                            ("POST", "/v1/completions", {"json": body}),
                                            ("POST", "/v1/completions", {"json": {**body, "top_p": 2.0}})]))
        assert a.status_code == 200 and a.json()["choices"][0]["text"] == b.json()["choices"][0]["text"]
        assert a.json()["usage"]["completion_tokens"] >= 1
        _assert_error(bad, 400, None, "top_p")

        def boom(*args, **kwargs):
            raise RuntimeError("device lost")

        monkeypatch.setattr(engine, "_run", boom)
        failed, failed_stream = asyncio.run(_asgi(app, [("POST", "/v1/completions", {"json": body}),
                                                        ("POST", "/v1/completions",
                                                         {"json": {**body, "stream": True}})]))
        _assert_error(failed, 500, None, "device lost")
        assert failed_stream.status_code == 500 and "device lost" in failed_stream.json()["error"]["message"]
    finally:
        engine.shutdown()
    assert engine.allocator.num_free == engine.allocator.num_pages
    engine.allocator.check()


# ---------------------------------------------------------------------------------------- loopback

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def live(model):
    """uvicorn on loopback over a compiled engine (compiles in ~6 s here)."""
    engine = _engine(model, compile=True, max_seq_len=256)
    app = build_app(engine, ByteTokenizer(), "tiny")
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield engine, f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(60)
    assert not thread.is_alive()


def _stream(url: str, body: dict, out: dict, key) -> None:
    text, reason = [], None
    try:
        with httpx.Client(timeout=60) as c, \
                c.stream("POST", url + "/v1/completions", json={**body, "stream": True}) as r:
            assert r.status_code == 200, r.read()
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                ch = json.loads(line[6:])["choices"][0]
                text.append(ch["text"])
                reason = ch["finish_reason"] or reason
        out[key] = ("".join(text), reason)
    except BaseException as e:  # reported by the test's assertion
        out[key] = e


def _wait_free(engine, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while engine.allocator.num_free != engine.allocator.num_pages or engine.has_work:
        assert time.monotonic() < deadline, (engine.allocator.num_free, engine.allocator.num_pages)
        time.sleep(0.02)


def test_loopback_concurrent_streams_match_hf_greedy(model, live):
    engine, url = live
    tok = ByteTokenizer()
    g = torch.Generator().manual_seed(3)
    reqs = [(torch.randint(3, VOCAB, (n,), generator=g).tolist(), k)
            for n, k in [(3, 8), (17, 5), (9, 12), (1, 6), (25, 9), (6, 3)]]
    out: dict = {}
    threads = [threading.Thread(target=_stream, args=(url, {"prompt": p, "max_tokens": k}, out, i))
               for i, (p, k) in enumerate(reqs)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    secs = time.perf_counter() - t0
    for i, (p, k) in enumerate(reqs):
        assert not isinstance(out[i], BaseException), out[i]
        ref = _hf_greedy(model, p, k)
        text, reason = out[i]
        assert text == tok.decode(ref, skip_special_tokens=True), (i, text)
        assert reason == ("stop" if ref[-1] == EOS else "length")
    print(f"\n6 streams, {sum(k for _, k in reqs)} max tokens, {secs:.2f}s over loopback")
    _wait_free(engine)
    engine.allocator.check()
    # A stop string cuts the text before it and cancels the request (non-streaming and streaming).
    texts = {i: tok.decode(_hf_greedy(model, p, k), skip_special_tokens=True) for i, (p, k) in enumerate(reqs)}
    i = max(texts, key=lambda j: len(texts[j]))
    full, (p, k) = texts[i], reqs[i]
    assert len(full) >= 6, full
    stop = full[3:5]
    r = httpx.post(url + "/v1/completions", json={"prompt": p, "max_tokens": k, "stop": [stop, "\x00never"]},
                   timeout=60)
    ch = r.json()["choices"][0]
    assert ch["text"] == full[: full.find(stop)] and ch["finish_reason"] == "stop", (ch, full, stop)
    out = {}
    _stream(url, {"prompt": p, "max_tokens": k, "stop": stop}, out, "s")
    assert out["s"] == (full[: full.find(stop)], "stop"), (out, full, stop)
    _wait_free(engine)
    engine.allocator.check()


def test_loopback_disconnect_cancels_and_frees_pages(live):
    engine, url = live
    before = engine.stats.tokens
    with httpx.Client(timeout=60) as c:
        with c.stream("POST", url + "/v1/completions",
                      json={"prompt": [5, 6, 7, 8], "max_tokens": 200, "stream": True}) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: "):
                    break  # one chunk, then hang up
    _wait_free(engine)
    engine.allocator.check()
    assert engine.stats.tokens - before < 200  # cancelled, not run to max_tokens


def test_loopback_non_streaming_client_gone_cancels(live):
    engine, url = live
    before = engine.stats.tokens
    with pytest.raises(httpx.TimeoutException):
        httpx.post(url + "/v1/completions", json={"prompt": [9, 8, 7], "max_tokens": 200}, timeout=0.5)
    _wait_free(engine)
    engine.allocator.check()
    assert engine.stats.tokens - before < 200


_SIGINT_SERVER = """
import sys, torch
import turbofx
sys.path.insert(0, {root!r})
from tests.test_server import _tiny_llama, _engine, ByteTokenizer
from turbofx.compiler.server import serve
engine = _engine(_tiny_llama())
serve(engine, ByteTokenizer(), "tiny", "127.0.0.1", {port})
print("drained", engine.allocator.num_free == engine.allocator.num_pages, flush=True)
"""


@pytest.mark.slow
def test_sigint_drains_the_in_flight_stream_then_exits(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    port = _free_port()
    script = tmp_path / "serve.py"
    script.write_text(_SIGINT_SERVER.format(root=str(Path(__file__).resolve().parents[1]), port=port))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else ""
            try:
                httpx.get(url + "/health", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        chunks, reason, done = 0, None, False
        with httpx.Client(timeout=60) as c, c.stream("POST", url + "/v1/completions",
                                                     json={"prompt": [5, 6, 7], "max_tokens": 60,
                                                           "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    chunks += 1
                    reason = json.loads(line[6:])["choices"][0]["finish_reason"] or reason
                    if chunks == 2:
                        proc.send_signal(signal.SIGINT)
                done = done or line == "data: [DONE]"
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert done and reason in ("length", "stop"), (chunks, reason)
    assert proc.returncode == 0 and "drained True" in out, out[-2000:]


def test_cli_serve_refuses_an_export_artifact(tmp_path, capsys):
    from turbofx.compiler import cli

    (tmp_path / "generation.json").write_text("{}")
    assert cli.main(["serve", str(tmp_path)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("turbofx: error: ") and "turbofx serve MODEL" in err[0], err


def tiny_served():  # a pkg.module:factory for `turbofx serve tests.test_server:tiny_served`
    return _tiny_llama(), ByteTokenizer()
