"""The ``turbofx`` command: export, run, demo (the main job), serve, bisect, doctor.

Errors are one line on stderr: ``turbofx: error: ...`` (exit 2) for what the user can fix,
``turbofx: turbofx bug: ...`` (exit 3) for our own failures, ``turbofx: interrupted`` (exit 130)
on Ctrl-C. The full traceback is printed only under ``TURBOFX_LOG=debug``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback

DEFAULT_PROMPT = "What is the capital of France? Answer in one sentence."


def _flag(p: argparse.ArgumentParser, name: str, **kw) -> None:
    """Register --some-flag and --some_flag as one option."""
    under = "--" + name[2:].replace("-", "_")
    p.add_argument(*([name] if under == name else [name, under]), **kw)


def _dtype(name: str):
    import torch

    return {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
            "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}[name]


def _prompt_ids(tok, prompt: str, vocab: int):
    import torch

    if tok is None:  # random-weight model without a tokenizer: bytes of the prompt as token ids
        return torch.tensor([[b % vocab for b in prompt.encode()][:64] or [1]])
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                  return_tensors="pt")
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    return ids


def _decode(tok, tokens: list[int]) -> str:
    return tok.decode(tokens, skip_special_tokens=True) if tok is not None else " ".join(map(str, tokens))


def _load(spec: str, dtype: str):
    from turbofx.compiler.models import load_model

    print(f"loading {spec} ({dtype}) ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    model, tok = load_model(spec, dtype=_dtype(dtype))
    print(f"  loaded in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
    return model, tok


QUANTIZE_HELP = ("weight quantization: int8 | int4 | int4-gN | w8a8 | fp8 | fp8-dynamic | gguf (the GGUF file's own "
                 "Q8_0/Q4_0/Q4_1 blocks, kept as they are); default: none")


def _quantize(spec: str | None, model=None):
    """The parsed --quantize value; for gguf, the model's GGUF blocks are attached to its weights
    first (a model not loaded from a GGUF file is refused)."""
    from turbofx.quant import GGUFNative, parse

    cfg = parse(spec)
    if isinstance(cfg, GGUFNative) and model is not None:
        from turbofx.errors import QuantizationError
        from turbofx.quant.native import attach_gguf

        path = getattr(model, "_turbofx_gguf_file", None)
        if path is None:
            raise QuantizationError("--quantize gguf needs a model loaded from a GGUF file (e.g. smollm2); "
                                    "use int8 or int4 for other models")
        notes = attach_gguf(model, path)
        for note in notes:
            print(f"  gguf: {note}", file=sys.stderr)
    return cfg


def _is_causal_lm(model) -> bool:
    return hasattr(model, "generate") and hasattr(model, "lm_head") or type(model).__name__.endswith("ForCausalLM")


def cmd_export(a) -> int:
    import torch

    import turbofx
    from turbofx.compiler.artifact import check_output_dir

    check_output_dir(a.output_dir, a.overwrite)  # before loading and compiling the model
    _quantize(a.quantize)  # a bad --quantize fails before the model loads
    model, tok = _load(a.model, a.dtype)
    quant = _quantize(a.quantize, model)
    vocab = model.config.vocab_size
    ids = _prompt_ids(tok, DEFAULT_PROMPT, vocab)[:, :8]
    eos = getattr(model.config, "eos_token_id", None)
    extra = {"model": a.model, "vocab_size": vocab, "eos_token_id": eos}
    print(f"compiling for {a.target or 'the detected target'} ...", file=sys.stderr, flush=True)
    if a.kind == "generation" or (a.kind == "auto" and _is_causal_lm(model)):
        from turbofx.compiler.generation import export_generation

        path = export_generation(model, ids, a.output_dir, a.max_cache_len, target=a.target, extra=extra,
                                 overwrite=a.overwrite, tokenizer=tok, quantize=quant)
    else:
        kwargs = {"use_cache": False} if getattr(model.config, "use_cache", None) is not None else {}
        extra["generate_kwargs"] = kwargs
        with torch.no_grad():
            path = turbofx.export(model, (ids,), kwargs, output_dir=a.output_dir, target=a.target, dynamic=True,
                                  extra=extra, overwrite=a.overwrite, tokenizer=tok, quantize=quant)
    print(f"wrote {path}")
    return 0


def cmd_run(a) -> int:
    from pathlib import Path

    import turbofx

    d = Path(a.artifact)
    _check_artifact_quantization(d, a.quantize)
    tok = None
    if (d / "tokenizer").is_dir():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(d / "tokenizer"))
    if (d / "generation.json").is_file():
        return _run_generation(d, tok, a)
    from turbofx.runtime.generate import greedy

    cm = turbofx.load(d)
    extra = cm.turbofx_meta.get("extra", {})
    ids = _prompt_ids(tok, a.prompt, extra.get("vocab_size", 32000))
    kwargs = extra.get("generate_kwargs", {})
    eos = extra.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) else eos
    tokens, secs = greedy(lambda x: cm(x, **kwargs), ids, a.max_new_tokens, eos, label="turbofx")
    print(_decode(tok, tokens))
    print(f"[{len(tokens)} tokens in {secs:.2f}s: {len(tokens) / secs:.2f} tokens/s; full prefix each step]")
    return 0


def _check_artifact_quantization(d, spec: str | None) -> None:
    """``run --quantize X``: an artifact's weights were quantized when it was exported; X must say
    the same (nothing is re-quantized at load time)."""
    if spec is None:
        return
    from turbofx.compiler.artifact import read_sealed
    from turbofx.errors import ArtifactError

    want = _quantize(spec)
    meta_path = d / "decode" / "meta.json" if (d / "generation.json").is_file() else d / "meta.json"
    if not meta_path.is_file():
        return  # load reports what is missing
    quant = read_sealed(meta_path, meta_path.parent).get("quantization")
    have = None
    if quant:
        from turbofx.errors import TurbofxError
        from turbofx.quant import config_from_json

        try:
            have = config_from_json(quant["config"]).name
        except TurbofxError:  # made with a custom filter (not stored): its scheme
            have = str(quant["config"].get("scheme"))
    if have != want.name:
        raise ArtifactError(f"{d} was exported with quantize={have!r}, not {want.name!r}: weights are quantized at "
                            f"export; re-export with --quantize {want.name}")


def _run_generation(d, tok, a) -> int:
    from turbofx.compiler.generation import load_generation

    gen = load_generation(d)
    ids = _prompt_ids(tok, a.prompt, gen.info["vocab_size"])
    res = gen.generate(ids, a.max_new_tokens)
    tokens = res.new_tokens[0].tolist()
    print(_decode(tok, tokens))
    print(f"[{len(tokens)} tokens: prefill {res.prefill_seconds:.2f}s, decode {res.decode_tokens_per_second:.2f} "
          f"tokens/s over the KV cache]")
    return 0


def cmd_demo(a) -> int:
    """The main job: generate with eager HF and with turbofx (compiled prefill + decode over a
    static KV cache), compare the tokens, print the answer, the report and both speeds."""
    import torch

    import turbofx

    torch.manual_seed(0)
    _quantize(a.quantize)  # a bad --quantize fails before the model loads
    model, tok = _load(a.model, a.dtype)
    quant = _quantize(a.quantize, model)
    ids = _prompt_ids(tok, a.prompt, model.config.vocab_size)
    eos = getattr(model.config, "eos_token_id", None)
    print(f"prompt: {a.prompt!r} ({ids.shape[1]} tokens)", flush=True)
    print("eager greedy generation (transformers generate) ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=a.max_new_tokens,
                             do_sample=False, pad_token_id=eos[0] if isinstance(eos, list) else eos)
    eager_s = time.perf_counter() - t0
    eager_tokens = ref[0, ids.shape[1]:].tolist()
    print("turbofx: compiling prefill and decode step, then generating ...", file=sys.stderr, flush=True)
    res = turbofx.generate(model, ids, a.max_new_tokens, eos_token_id=eos, target=a.target, quantize=quant)
    tfx_tokens = res.new_tokens[0].tolist()
    if eos is not None and (eos if isinstance(eos, int) else None) in tfx_tokens:  # HF stops at EOS too
        tfx_tokens = tfx_tokens[: tfx_tokens.index(eos) + 1]
    print("\nanswer (turbofx):", _decode(tok, tfx_tokens))
    what = "eager greedy"
    if quant is not None and quant.name != "gguf":  # the reference: eager on the same quantized weights
        from turbofx.quant.reference import dequantized_model

        layers = [name for q in res.reports["decode"].quantized for name in q.layers]
        with torch.no_grad():
            ref = dequantized_model(model, quant, layers).generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=a.max_new_tokens, do_sample=False,
                pad_token_id=eos[0] if isinstance(eos, list) else eos)
        full_precision = eager_tokens
        eager_tokens = ref[0, ids.shape[1]:].tolist()
        what = f"eager greedy with the same {quant.name} weights (dequantized)"
        print(f"answer (eager, full precision): {_decode(tok, full_precision)}")
    same = tfx_tokens == eager_tokens
    print(f"same tokens as {what}: {same}" + ("" if same else f"\n  eager: {_decode(tok, eager_tokens)}"))
    print("\n[decode step]")
    print(res.reports["decode"])
    print(f"[prefill] steps: {res.reports['prefill'].counts()}")
    n = len(tfx_tokens)
    tfx_s = res.prefill_seconds + res.decode_seconds
    target = res.reports["decode"].target
    print(f"\nspeed, batch 1, {n} new tokens after a {ids.shape[1]}-token prompt:")
    print(f"  eager (transformers generate, {platform.machine()} CPU/ATen): {len(eager_tokens) / eager_s:.2f} tokens/s")
    print(f"  turbofx ({target}): {n / tfx_s:.2f} tokens/s end to end; prefill {res.prefill_seconds:.2f}s, "
          f"decode {res.decode_tokens_per_second:.2f} tokens/s; compile {res.compile_seconds:.1f}s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"same_tokens": same, "eager_tokens_per_s": len(eager_tokens) / eager_s,
                       "turbofx_tokens_per_s": n / tfx_s, "decode_tokens_per_s": res.decode_tokens_per_second,
                       "prefill_s": res.prefill_seconds, "compile_s": res.compile_seconds, "target": target,
                       "answer": _decode(tok, tfx_tokens), "kernels": res.reports["decode"].counts()}, f, indent=1)
    return 0 if same else 1


def cmd_serve(a) -> int:
    """Compile the model into a ``turbofx.Engine`` and serve it over OpenAI-compatible HTTP."""
    from pathlib import Path

    import turbofx
    from turbofx.errors import GenerationError

    d = Path(a.model)
    if d.is_dir() and ((d / "generation.json").is_file() or (d / "meta.json").is_file()):
        raise GenerationError(f"{d} is a `turbofx export` artifact (fixed-shape programs); the server's engine "
                              "compiles its own paged programs from the model: run `turbofx serve MODEL` with the "
                              "model it was exported from (e.g. smollm2), or `turbofx run` on the artifact")
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise GenerationError(f"turbofx serve needs starlette and uvicorn ({e}): pip install -e '.[serve]'") from None
    from turbofx.compiler.server import serve

    _quantize(a.quantize)  # a bad --quantize fails before the model loads
    model, tok = _load(a.model, a.dtype)
    if tok is None:
        raise GenerationError(f"{a.model} has no tokenizer: the server takes text; serve a model that has one "
                              "(e.g. smollm2)")
    quant = _quantize(a.quantize, model)
    print("compiling the engine's paged decoder ...", file=sys.stderr, flush=True)
    engine = turbofx.Engine(model, max_batch_size=a.max_batch_size, max_num_tokens=a.max_num_tokens,
                            page_size=a.page_size, num_pages=a.num_pages, max_seq_len=a.max_seq_len, quantize=quant)
    print(f"  compiled in {engine.stats.compile_seconds:.1f}s", file=sys.stderr, flush=True)
    print(f"serving {a.model} at http://{a.host}:{a.port}/v1 (Ctrl-C drains and stops)", flush=True)
    serve(engine, tok, a.model, a.host, a.port)
    print(f"stopped after {engine.stats.tokens} generated tokens; the in-flight requests were drained", file=sys.stderr)
    return 0


def cmd_bisect(a) -> int:
    """Find the rewrite that makes the compiled model differ from eager (binary search over
    ``max_rewrites``); prints each trial on stderr and the verdict on stdout."""
    from turbofx.compiler.bisect import bisect

    model, tok = _load(a.model, a.dtype)
    config = getattr(model, "config", None)
    ids = _prompt_ids(tok, a.prompt, getattr(config, "vocab_size", 256))[:, : a.seq]
    kwargs = {"use_cache": False} if getattr(config, "use_cache", None) is not None else {}

    def show(t) -> None:
        budget = "none" if t.max_rewrites is None else t.max_rewrites
        print(f"  max_rewrites={budget}: {t.rewrites_made} rewrites, {'WRONG' if t.wrong else 'right'} "
              f"(max abs error {t.max_abs_error:.3g})", file=sys.stderr, flush=True)

    print(f"bisecting {a.model} on {ids.shape[1]} tokens against eager ...", file=sys.stderr, flush=True)
    print(bisect(model, (ids,), kwargs, on_trial=show, target=a.target))
    return 0


def cmd_doctor(a) -> int:
    import torch
    import triton
    import transformers

    import turbofx
    from turbofx.codegen.target import detect

    print(f"turbofx {turbofx.__version__}; python {platform.python_version()}; torch {torch.__version__}; "
          f"triton {triton.__version__}; transformers {transformers.__version__}")
    print(f"target: {detect().describe()}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            print(f"gpu {i}: {torch.cuda.get_device_name(i)}")
    else:
        print("gpu: none (kernels run in the Triton interpreter)")
    try:
        from turbofx.compiler.models import find_smollm2_gguf

        print(f"smollm2: {find_smollm2_gguf()}")
    except Exception as e:
        print(f"smollm2: not available ({e})")
    return 0


def _debug() -> bool:
    return os.environ.get("TURBOFX_LOG", "").lower() == "debug"


def _one_line(msg: str, limit: int = 600) -> str:
    """A message as one line: whitespace runs collapsed, a long middle cut (its head says what was
    wrong, its tail what to do)."""
    flat = " ".join(str(msg).split())
    if len(flat) <= limit:
        return flat
    return f"{flat[: limit // 2]} ... {flat[-limit // 3:]} (TURBOFX_LOG=debug for all of it)"


def main(argv: list[str] | None = None) -> int:
    """Run the command; every failure ends as one line on stderr and a non-zero exit code."""
    from turbofx.errors import TurbofxError, TurbofxInternalError

    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("turbofx: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout closed early (| head): stop quietly, and keep the exit flush quiet too
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except OSError:
            pass
        return 1
    except TurbofxError as err:
        if _debug():
            traceback.print_exc()
        bug = isinstance(err, TurbofxInternalError)
        print(f"turbofx: {'' if bug else 'error: '}{_one_line(err)}", file=sys.stderr)
        return 3 if bug else 2
    except Exception as err:  # not raised on purpose: ours
        if _debug():
            traceback.print_exc()
        print(f"turbofx: turbofx bug: {_one_line(f'{type(err).__name__}: {err}')}. Please report it with the "
              "output of the same command under TURBOFX_LOG=debug", file=sys.stderr)
        return 3


def _main(argv: list[str] | None = None) -> int:
    from turbofx.codegen.target import cli_target

    p = argparse.ArgumentParser(prog="turbofx", description="Graph-level compiler for transformer models.")
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="compile a model and write a self-contained artifact")
    e.add_argument("model", nargs="?", default="smollm2", help="smollm2 | llama | qwen2 | ... | pkg.module:factory")
    _flag(e, "--output-dir", required=True)
    _flag(e, "--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    _flag(e, "--target", default=None, type=cli_target, help="cpu | cuda | hip | cuda:smNN | hip:gfxNNN")
    _flag(e, "--kind", default="auto", choices=["auto", "generation", "forward"],
          help="generation: prefill + decode over a KV cache (default for causal LMs); forward: one program")
    _flag(e, "--max-cache-len", type=int, default=256)
    e.add_argument("--overwrite", action="store_true",
                   help="replace an existing turbofx artifact in --output-dir (never any other directory)")
    _flag(e, "--quantize", default=None, help=QUANTIZE_HELP)
    r = sub.add_parser("run", help="load an artifact and generate greedily")
    r.add_argument("artifact")
    _flag(r, "--prompt", default=DEFAULT_PROMPT)
    _flag(r, "--max-new-tokens", type=int, default=16)
    _flag(r, "--quantize", default=None, help="check that the artifact was exported with this quantization")
    d = sub.add_parser("demo", help="compile and run a model next to eager (the README's main job)")
    d.add_argument("model", nargs="?", default="smollm2")
    _flag(d, "--prompt", default=DEFAULT_PROMPT)
    _flag(d, "--max-new-tokens", type=int, default=12)
    _flag(d, "--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    _flag(d, "--target", default=None, type=cli_target, help="cpu | cuda | hip")
    _flag(d, "--json", default=None)
    _flag(d, "--quantize", default=None, help=QUANTIZE_HELP)
    s = sub.add_parser("serve", help="serve a model over OpenAI-compatible HTTP (continuous batching)")
    s.add_argument("model", nargs="?", default="smollm2", help="smollm2 | llama | qwen2 | ... | pkg.module:factory")
    _flag(s, "--host", default="127.0.0.1")
    _flag(s, "--port", type=int, default=8000)
    _flag(s, "--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    _flag(s, "--max-batch-size", type=int, default=8)
    _flag(s, "--max-num-tokens", type=int, default=256)
    _flag(s, "--page-size", type=int, default=16)
    _flag(s, "--num-pages", type=int, default=None)
    _flag(s, "--max-seq-len", type=int, default=None)
    _flag(s, "--quantize", default=None, help=QUANTIZE_HELP)
    b = sub.add_parser("bisect", help="find the rewrite that makes the compiled model differ from eager")
    b.add_argument("model", help="smollm2 | llama | qwen2 | ... | pkg.module:factory")
    _flag(b, "--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    _flag(b, "--target", default=None, type=cli_target, help="cpu | cuda | hip | cuda:smNN | hip:gfxNNN")
    _flag(b, "--seq", type=int, default=8, help="prompt tokens to run on")
    _flag(b, "--prompt", default=DEFAULT_PROMPT)
    sub.add_parser("doctor", help="versions, target and GPU")
    a = p.parse_args(argv)
    import contextlib
    import logging

    if not os.environ.get("TURBOFX_LOG"):  # progress of long steps on stderr
        logging.basicConfig(format="  turbofx: %(message)s", stream=sys.stderr)
        logging.getLogger("turbofx").setLevel(logging.INFO)
    from turbofx.compiler.progress import interactive

    cmd = {"export": cmd_export, "run": cmd_run, "demo": cmd_demo, "serve": cmd_serve, "bisect": cmd_bisect,
           "doctor": cmd_doctor}[a.cmd]
    if interactive():  # log lines printed above the progress bar, not through it
        from tqdm.contrib.logging import logging_redirect_tqdm

        redirect = logging_redirect_tqdm(loggers=[logging.getLogger("turbofx"), logging.getLogger()])
    else:
        redirect = contextlib.nullcontext()
    with redirect:
        return cmd(a)


if __name__ == "__main__":
    sys.exit(main())
