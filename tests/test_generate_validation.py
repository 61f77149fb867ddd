"""turbofx.generate checks what it is given (one GenerationError saying what to pass instead), reads
the KV cache geometry from the model itself, and never reuses programs built for other weights."""
from __future__ import annotations

import pytest
import torch

import turbofx
from turbofx.compiler.models import make_tiny_model
from turbofx.errors import GenerationError


def _ids(b, s, seed=1):
    return torch.randint(3, 120, (b, s), generator=torch.Generator().manual_seed(seed))


def _hf(model, ids, n):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, do_sample=False)


def _programs(model):
    return [k for engine in model._turbofx_engines.values() for k in engine.programs]


@pytest.fixture(scope="module")
def llama():
    return make_tiny_model("llama")


@pytest.mark.parametrize("kw, compile", [(dict(multi_query=True), True),
                                         (dict(new_decoder_architecture=True, num_kv_heads=2), False)])
def test_falcon_cache_geometry_comes_from_the_model(kw, compile):
    """Falcon's multi-query attention caches 1 KV head and its config has no num_key_value_heads
    (guessing from config fields allocated 4 heads and crashed); the new decoder architecture
    caches one per query head. Both equal HF eager greedy generation (the second runs the same
    StaticDecoder eagerly, to keep the file fast)."""
    from transformers import FalconConfig, FalconForCausalLM

    config = FalconConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0, **kw)
    torch.manual_seed(0)
    model = FalconForCausalLM(config).eval()
    ids = _ids(1, 6)
    out = turbofx.generate(model, ids, 4, compile=compile)
    assert torch.equal(out.sequences, _hf(model, ids, 4)), out.sequences


def test_short_max_cache_len_is_refused_with_the_numbers(llama):
    # a prompt of 6 runs as a bucket of 16: 16 + 4 positions do not fit a cache of 16 (the
    # compiled cache write would drop them and return wrong tokens)
    with pytest.raises(GenerationError, match=r"max_cache_len=20"):
        turbofx.generate(llama, _ids(1, 6), 4, max_cache_len=16)


def test_max_new_tokens_zero_returns_the_prompt(llama):
    ids = _ids(2, 5).int()
    out = turbofx.generate(llama, ids, 0)
    assert out.new_tokens.shape == (2, 0) and out.steps == 0
    assert torch.equal(out.sequences, ids.long())


def test_int32_ids_and_bool_or_float_masks_reuse_the_int64_programs(llama):
    ids = _ids(1, 6)
    ref = _hf(llama, ids, 3)
    assert torch.equal(turbofx.generate(llama, ids, 3).sequences, ref)
    before = len(_programs(llama))
    for kw in (dict(input_ids=ids.int()), dict(input_ids=ids, attention_mask=torch.ones(1, 6, dtype=torch.bool)),
               dict(input_ids=ids, attention_mask=torch.ones(1, 6))):
        out = turbofx.generate(llama, max_new_tokens=3, **kw)
        assert out.sequences.dtype == torch.int64 and torch.equal(out.sequences, ref), kw
    assert len(_programs(llama)) == before  # converted to int64: nothing recompiled


B = torch.tensor([[5, 7, 9]])
BAD_CALLS = {
    "1-D ids": (dict(input_ids=B[0]), r"ids\[None\]"),
    "empty prompt": (dict(input_ids=B[:, :0]), "empty"),
    "float ids": (dict(input_ids=B.float()), "integer token ids"),
    "list ids": (dict(input_ids=[[5, 7]]), "torch tensor"),
    "id >= vocab": (dict(input_ids=torch.tensor([[5, 128]])), "vocabulary"),
    "negative id": (dict(input_ids=torch.tensor([[5, -1]])), "vocabulary"),
    "negative max_new_tokens": (dict(max_new_tokens=-1), "max_new_tokens"),
    "float max_new_tokens": (dict(max_new_tokens=2.5), "max_new_tokens"),
    "zero temperature sampling": (dict(do_sample=True, temperature=0.0), "do_sample=False"),
    "negative temperature": (dict(temperature=-1.0), "temperature"),
    "top_p 0": (dict(do_sample=True, top_p=0.0), "top_p"),
    "top_p > 1": (dict(do_sample=True, top_p=1.5), "top_p"),
    "negative top_k": (dict(do_sample=True, top_k=-1), "top_k"),
    "mask shape": (dict(attention_mask=torch.ones(3, dtype=torch.long)), "shaped like input_ids"),
    "mask values": (dict(attention_mask=torch.full((1, 3), 2)), "only 0"),
    "right padding": (dict(attention_mask=torch.tensor([[1, 1, 0]])), "left"),
    "empty mask row": (dict(attention_mask=torch.zeros(1, 3, dtype=torch.long)), "no tokens"),
    "eos string": (dict(eos_token_id="2"), "eos_token_id"),
    "eos float": (dict(eos_token_id=2.0), "eos_token_id"),
    "eos outside vocab": (dict(eos_token_id=[2, 500]), "vocabulary"),
    "pad list": (dict(pad_token_id=[0]), "pad_token_id"),
    "batch bucket too small": (dict(input_ids=B.repeat(2, 1), batch_buckets=[1]), "add a bucket >= 2 to batch_buckets"),
    "seq bucket too small": (dict(seq_buckets=[2]), "add a bucket >= 3 to seq_buckets"),
    "bad bucket list": (dict(seq_buckets=[0, 16]), "positive ints"),
    "zero max_cache_len": (dict(max_cache_len=0), "max_cache_len"),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_misuse_is_one_clear_error(llama, case):
    kw, words = BAD_CALLS[case]
    kw = {"input_ids": B, "max_new_tokens": 2, **kw}
    with pytest.raises(GenerationError, match=words):
        turbofx.generate(llama, **kw)


def test_models_generate_cannot_use(llama):
    from transformers import AutoModel

    with pytest.raises(GenerationError, match="config"):
        turbofx.generate(torch.nn.Linear(4, 4), B, 2)
    with pytest.raises(GenerationError, match="no logits"):
        turbofx.generate(AutoModel.from_config(llama.config).eval(), B, 2)


def test_weights_changed_between_calls_are_used():
    """Programs read the parameters live (load_state_dict is seen without recompiling); a dtype
    conversion or a replaced parameter rebuilds cache and programs instead of reading stale or
    wrong-typed tensors."""
    model = make_tiny_model("llama")
    ids = _ids(1, 6)
    turbofx.generate(model, ids, 3)
    n = len(_programs(model))

    model.load_state_dict(make_tiny_model("llama", seed=5).state_dict())
    assert torch.equal(turbofx.generate(model, ids, 3).sequences, _hf(model, ids, 3))
    assert len(_programs(model)) == n  # same tensors, new values: no recompile

    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))
    assert torch.equal(turbofx.generate(model, ids, 3).sequences, _hf(model, ids, 3))

    model.to(torch.float64)  # fp32 programs must not run on fp64 weights (fp64: tokens comparable exactly)
    out = turbofx.generate(model, ids, 3)
    assert torch.equal(out.sequences, turbofx.generate(model, ids, 3, compile=False).sequences)
    decoders = [d for e in model._turbofx_engines.values() for d in e.decoders.values()]
    assert decoders and all(d.key_cache_0.dtype == torch.float64 for d in decoders)  # old caches dropped


def test_compiled_programs_live_as_long_as_the_model():
    """generate keeps its programs on the model: a dropped model (and its programs) is freed, and a
    copy of the model starts without them."""
    import copy
    import gc
    import weakref

    from turbofx.compiler.models import make_tiny_model

    model = make_tiny_model("llama")
    turbofx.generate(model, _ids(1, 4), 2)
    assert len(_programs(model)) == 2
    twin = copy.deepcopy(model)
    assert not getattr(twin, "_turbofx_engines", {})
    gone = weakref.ref(model)
    del model
    gc.collect()
    assert gone() is None
