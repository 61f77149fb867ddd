"""Read a GGUF file's quantized linear weights as ``QuantizedWeight``s, without dequantizing them.

GGUF stores a weight [N, K] as N rows of blocks of 32 values along K:

* Q8_0 (34 bytes): d (fp16), then 32 int8 q;          w = d * q
* Q4_0 (18 bytes): d (fp16), then 16 bytes of nibbles; w = d * (q - 8)
* Q4_1 (20 bytes): d (fp16), m (fp16), 16 bytes;       w = d * q + m
  (a Q4 block's byte j holds value j in its low nibble and value j + 16 in its high nibble)

These map onto ``WeightQuant`` with group_size 32 and the fp16 d / m kept as stored (scale /
min fp16): int8 (zero 0), uint4 zero 8, uint4 with min. The nibbles are re-laid into our order
(byte j of a row holds k = 2j low, k = 2j + 1 high): the same bits, the same size.

Names and row order follow transformers' own GGUF loader (``transformers.modeling_gguf_pytorch_utils``):
its name map, and its per-architecture tensor processor, which for llama permutes the rows of
attn_q / attn_k (undoing llama.cpp's RoPE layout). The processor is applied to a column of row
indices, so any processing that only reorders rows is reproduced exactly with ``select_rows``; a
tensor whose processing is anything else is not returned (noted). Every returned weight is then
checked against the model's own (transformers-dequantized) parameter.
"""
from __future__ import annotations

import contextlib
import functools
import pathlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from turbofx.codegen.gemm import WeightQuant
from turbofx.errors import QuantizationError
from turbofx.quant.weights import QuantizedWeight, dequantize, pack_uint4

GGUF_BLOCK = 32  # values per block of every type kept here
_INSTALL = "pip install gguf"
VERIFY_RTOL = 1e-6


def _import_gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise QuantizationError(f"reading GGUF blocks needs the gguf package, which is not installed: {_INSTALL} "
                                "(or quantize the dequantized model with another scheme, e.g. quant='int4')") from None
    return gguf


def _fp16_field(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """[N, B, bytes] uint8 blocks -> [N, B] fp16 read from bytes start:start+2 (little-endian)."""
    return blocks[:, :, start:start + 2].contiguous().view(torch.float16).squeeze(-1)


def _q4_values(nibbles: torch.Tensor) -> torch.Tensor:
    """[N, B, 16] GGUF Q4 bytes -> [N, B * 32] values 0..15 in K order (low nibbles are values
    0..15 of the block, high nibbles values 16..31)."""
    vals = torch.cat([nibbles & 0x0F, nibbles >> 4], dim=-1)
    return vals.reshape(nibbles.shape[0], -1)


def _blocks_to_weight(kind: str, raw: np.ndarray, n: int, k: int) -> QuantizedWeight:
    """Re-lay one tensor's raw blocks [N, K / 32 * block_bytes] into a QuantizedWeight."""
    block_bytes = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}[kind]
    if k % GGUF_BLOCK or raw.shape != (n, k // GGUF_BLOCK * block_bytes):
        raise QuantizationError(f"GGUF {kind} tensor data has shape {list(raw.shape)}, not the rows of "
                                f"{GGUF_BLOCK}-value blocks of a [{n}, {k}] weight: the file is corrupt")
    blocks = torch.from_numpy(np.array(raw, dtype=np.uint8, copy=True)).reshape(n, k // GGUF_BLOCK, block_bytes)
    scale = _fp16_field(blocks, 0)
    if kind == "Q8_0":
        q = blocks[:, :, 2:].contiguous().view(torch.int8).reshape(n, k)
        return QuantizedWeight(WeightQuant("int8", group_size=GGUF_BLOCK), q, scale, None, (n, k))
    if kind == "Q4_0":
        q = pack_uint4(_q4_values(blocks[:, :, 2:]))
        return QuantizedWeight(WeightQuant("uint4", group_size=GGUF_BLOCK, zero=8), q, scale, None, (n, k))
    q = pack_uint4(_q4_values(blocks[:, :, 4:]))
    return QuantizedWeight(WeightQuant("uint4", group_size=GGUF_BLOCK, has_min=True), q, scale,
                           _fp16_field(blocks, 2), (n, k))


KEPT_TYPES = ("Q8_0", "Q4_0", "Q4_1")


@contextlib.contextmanager
def _memoized_name_map(gguf: Any) -> Iterator[None]:
    """transformers rebuilds gguf's tensor-name map once per submodule (hundreds of times, seconds):
    memoize it while we ask for the mapping, and put the original back after."""
    original = gguf.get_tensor_name_map
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(original)
    try:
        yield
    finally:
        gguf.get_tensor_name_map = original


def _row_order(processor: Any, tensor_name: str, n: int, mapping: dict[str, str]) -> tuple[torch.Tensor | None, str]:
    """What transformers' tensor processor does to this tensor's rows: (index, processed name) with
    ``index`` a permutation of 0..N-1 (dense_row[i] = gguf_row[index[i]]), or (None, reason) when
    the processing is not a pure row reordering (then the tensor is not kept quantized)."""
    ids = np.arange(n, dtype=np.float64).reshape(n, 1)
    try:
        result = processor.process(weights=ids, name=tensor_name, tensor_key_mapping=mapping,
                                   parsed_parameters={"tensors": {}, "config": {}})
    except Exception as exc:  # a processor written for real weights may choke on an index column
        return None, f"transformers' {type(processor).__name__} cannot be replayed on row indices ({exc})"
    out = np.asarray(result.weights) if result.weights is not None else None
    if out is None or out.shape != (n, 1) or not np.array_equal(np.sort(out[:, 0]), ids[:, 0]):
        return None, f"transformers' {type(processor).__name__} changes it beyond a row reordering"
    return torch.from_numpy(out[:, 0].astype(np.int64)), result.name


def gguf_linear_weights(path: str | pathlib.Path, model: torch.nn.Module
                        ) -> tuple[dict[str, QuantizedWeight], list[str]]:
    """The quantized weights of ``model``'s nn.Linear layers as stored in the GGUF file ``path``.

    Returns ({parameter name, e.g. "model.layers.0.self_attn.q_proj.weight": QuantizedWeight},
    notes): Q8_0 / Q4_0 / Q4_1 tensors of linear layers, in the model's row order. The notes say
    what was not returned and why (other block types, dequantized on load; tensors that are not
    a linear layer's weight, such as a tied token embedding). ``model`` must be the model
    transformers loaded from this file (its config and, for verification, its weights):
    every returned weight dequantizes (fp32) to the model's parameter, exactly or within 1e-6
    relative, or this raises QuantizationError naming the tensor."""
    gguf = _import_gguf()
    try:
        from transformers import modeling_gguf_pytorch_utils as hf_gguf
    except ImportError as exc:
        raise QuantizationError(f"reading GGUF weight names needs transformers' GGUF support ({exc})") from None
    path = pathlib.Path(path)
    if not path.is_file():
        raise QuantizationError(f"GGUF file {path} does not exist")
    try:
        reader = gguf.GGUFReader(path)
        arch_field = reader.fields.get("general.architecture")
        architecture = str(bytes(arch_field.parts[arch_field.data[0]]), encoding="utf-8") if arch_field else None
        tensors = list(reader.tensors)
    except Exception as exc:  # numpy / gguf raise ValueError, IndexError, ... on a damaged file
        raise QuantizationError(f"could not read GGUF file {path}: {type(exc).__name__}: {exc}. The file is corrupt "
                                "or truncated: download it again") from None
    if architecture is None:
        raise QuantizationError(f"GGUF file {path} has no general.architecture: it is corrupt or not a model")
    if getattr(reader, "byte_order", "I") != "I":
        raise QuantizationError(f"GGUF file {path} was written for the other byte order; convert it with "
                                "gguf-convert-endian first")

    processor = hf_gguf.TENSOR_PROCESSORS.get(architecture, hf_gguf.TensorProcessor)(config=model.config.to_dict())
    try:
        with _memoized_name_map(gguf):
            mapping: dict[str, str] = hf_gguf.get_gguf_hf_weights_map(model, processor)
    except Exception as exc:
        raise QuantizationError(f"could not map GGUF tensor names of {path} ({architecture}) to "
                                f"{type(model).__name__}'s parameters: {exc}") from None

    linear_weights = {f"{name}.weight" if name else "weight": module for name, module in model.named_modules()
                      if isinstance(module, torch.nn.Linear)}
    all_params = dict(model.named_parameters(remove_duplicate=False))
    out: dict[str, QuantizedWeight] = {}
    notes: list[str] = []
    other_types: dict[str, list[str]] = {}
    not_linear: list[str] = []
    n_dense_other = 0  # unquantized tensors of other layers (norms, ...): counted, not listed
    for t in tensors:
        kind = t.tensor_type.name
        row_index, name = (None, t.name)
        dims = [int(d) for d in t.shape]  # GGUF order: ne0 (K, contiguous) first
        if len(dims) == 2:
            row_index, name = _row_order(processor, t.name, dims[1], mapping)
            if row_index is None:
                if t.name in mapping and mapping[t.name] in linear_weights:
                    notes.append(f"{t.name} ({kind}): not kept quantized: {name}")
                continue
        param = mapping.get(name)
        if param is None:
            continue
        if param not in linear_weights:
            if kind in KEPT_TYPES:  # quantized but not a linear layer's: say so (e.g. a token embedding)
                not_linear.append(f"{t.name} ({kind}) -> {param}")
            else:
                n_dense_other += 1
            continue
        if kind not in KEPT_TYPES:
            other_types.setdefault(kind, []).append(t.name)
            continue
        n, k = dims[1], dims[0]
        try:
            qw = _blocks_to_weight(kind, t.data, n, k)
        except QuantizationError as exc:
            raise QuantizationError(f"{path}: tensor {t.name}: {exc}") from None
        except Exception as exc:
            raise QuantizationError(f"{path}: tensor {t.name} ({kind}) could not be read: {exc}. The file is "
                                    "corrupt or truncated") from None
        if not torch.equal(row_index, torch.arange(n)):
            qw = qw.select_rows(row_index)
        _verify(t.name, param, qw, all_params[param])
        out[param] = qw
    for kind, names in sorted(other_types.items()):
        notes.append(f"{len(names)} linear weight(s) stored as {kind} are not kept quantized (dequantized on load): "
                     + ", ".join(names[:4]) + (" ..." if len(names) > 4 else ""))
    tied = _tied_linears(model, all_params)
    for entry in not_linear:
        param = entry.rsplit(" -> ", 1)[1]
        sharing = tied.get(param)
        extra = f"; tied to {', '.join(sharing)}, which stays dense" if sharing else ""
        notes.append(f"{entry}: not a linear layer's weight (left to the dense model{extra})")
    if n_dense_other:
        notes.append(f"{n_dense_other} unquantized tensor(s) of other layers (norms, ...) are left to the dense model")
    missing = sorted(p for p in linear_weights if p not in out and p not in tied)
    if missing:
        notes.append(f"{len(missing)} linear weight(s) have no kept GGUF block tensor: "
                     + ", ".join(missing[:4]) + (" ..." if len(missing) > 4 else ""))
    return out, notes


def _tied_linears(model: torch.nn.Module, all_params: dict[str, torch.nn.Parameter]) -> dict[str, list[str]]:
    """{parameter name: the other names of the same tensor} for parameters known by several names."""
    by_id: dict[int, list[str]] = {}
    for name, p in all_params.items():
        by_id.setdefault(id(p), []).append(name)
    return {name: [o for o in names if o != name] for names in by_id.values() if len(names) > 1 for name in names}


def _verify(tensor_name: str, param_name: str, qw: QuantizedWeight, param: torch.Tensor) -> None:
    """dequantize(qw) in fp32, rounded to the parameter's dtype, must equal the model's parameter
    (transformers dequantizes the same blocks in fp32, then casts) within 1e-6 relative."""
    if tuple(param.shape) != qw.shape:
        raise QuantizationError(f"GGUF tensor {tensor_name} is {list(qw.shape)} but {param_name} is "
                                f"{list(param.shape)}: the model was not loaded from this file")
    if param.is_meta:
        raise QuantizationError(f"cannot verify GGUF tensor {tensor_name}: {param_name} is on the meta device "
                                "(load the model's weights first)")
    ours = dequantize(qw, torch.float32).to(param.dtype)
    theirs = param.detach().to("cpu")
    if torch.equal(ours, theirs):
        return
    diff = (ours.double() - theirs.double()).abs().max().item()
    bound = VERIFY_RTOL * max(theirs.double().abs().max().item(), 1e-30)
    if not diff <= bound:
        raise QuantizationError(f"GGUF tensor {tensor_name} ({qw.fmt.storage}) does not match {param_name}: max "
                                f"|difference| {diff:.3g} > {bound:.3g}. The model was not loaded from this file, or "
                                "its weights were changed since")
