"""Quantization configs: which scheme, applied to which linear layers.

A config is a small frozen dataclass. ``filter`` picks the linear layers by their fully-qualified
module name ("model.layers.0.self_attn.q_proj"); None means ``default_filter`` (every linear
except embeddings and the LM head). ``parse`` turns the CLI / options spelling into a config;
``to_json`` / ``config_from_json`` record one in an artifact.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from turbofx.codegen.gemm import WeightQuant
from turbofx.errors import QuantizationError
from turbofx.quant.weights import FP8_LARGEST, QuantizedWeight, quantize_fp8, quantize_int4, quantize_int8

CONFIG_JSON_VERSION = 1
CUSTOM_FILTER = "custom"  # how to_json records a user's filter function (code cannot be stored)
_EXCLUDED_LAST_PARTS = frozenset({"lm_head", "embed_out", "output"})


def default_filter(name: str) -> bool:
    """The default policy: quantize every linear layer except the LM head and embeddings, i.e.
    not when the module name's last part is "lm_head", "embed_out" or "output", or contains
    "embed" (their error lands directly on the logits / every token; they are also often tied)."""
    last = name.rsplit(".", 1)[-1].lower()
    return last not in _EXCLUDED_LAST_PARTS and "embed" not in last


@dataclass(frozen=True)
class QuantConfig:
    """Base of every config. ``filter(module_name) -> bool`` chooses the linear layers (None: the
    default policy, ``default_filter``); the compiler also skips structurally-shared weights."""
    filter: Callable[[str], bool] | None = field(default=None, kw_only=True)
    # also the token embedding tables (gathered rows dequantized) and a LM head tied to one: the
    # largest single weights of a small model, left in full precision by default
    embeddings: bool = field(default=False, kw_only=True)
    scheme: ClassVar[str] = ""

    def __post_init__(self) -> None:
        if self.filter is not None and not callable(self.filter):
            raise QuantizationError(f"{type(self).__name__}.filter must be a function of a module name "
                                    f"(str -> bool) or None, not {self.filter!r}")

    @property
    def name(self) -> str:
        return self._base_name() + ("+emb" if self.embeddings else "")

    def _base_name(self) -> str:
        return self.scheme

    @property
    def fmt(self) -> WeightQuant | None:
        """The stored form of the weights this config makes (None: decided by the source, GGUF)."""
        raise NotImplementedError

    def applies_to(self, module_name: str) -> bool:
        """Whether the linear layer named ``module_name`` is to be quantized."""
        chosen = (self.filter or default_filter)(module_name)
        if not isinstance(chosen, bool):
            raise QuantizationError(f"{self.name} filter returned {chosen!r} for {module_name!r}: it must "
                                    "return True or False")
        return chosen

    def quantize(self, w: torch.Tensor) -> QuantizedWeight:
        raise NotImplementedError

    def _fields_json(self) -> dict[str, Any]:
        return {}

    def to_json(self) -> dict[str, Any]:
        """A versioned plain dict. A custom filter is recorded as "custom": code cannot be stored,
        so ``config_from_json`` refuses it unless given the filter again."""
        return {"version": CONFIG_JSON_VERSION, "scheme": self.scheme, **self._fields_json(),
                "embeddings": self.embeddings, "filter": None if self.filter is None else CUSTOM_FILTER}

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class Int8WeightOnly(QuantConfig):
    """int8 weights, one scale per output row; activations stay in the model's dtype."""
    scheme: ClassVar[str] = "int8"

    @property
    def fmt(self) -> WeightQuant:
        return WeightQuant("int8")

    def quantize(self, w: torch.Tensor) -> QuantizedWeight:
        return quantize_int8(w)


@dataclass(frozen=True)
class Int4WeightOnly(QuantConfig):
    """uint4 weights with a scale and a min per group of ``group_size`` columns (asymmetric),
    round-to-nearest on each group's [min, max]. ``search=True``: a calibration-free per-group
    range search that lowers the weights' squared error (never raises it in any group); it is off
    by default because lower weight error did not mean lower perplexity: on SmolLM2-135M (4,096
    tokens of tests/data/public_domain.txt, g128) RTN gave +51.4 % and the search +46.1 % to +61.1 %
    depending on its settings, i.e. no reliable gain."""
    group_size: int = 128
    search: bool = False
    scheme: ClassVar[str] = "int4"

    def __post_init__(self) -> None:
        super().__post_init__()
        g = self.group_size
        if isinstance(g, bool) or not isinstance(g, int) or g < 2 or g % 2:
            raise QuantizationError(f"Int4WeightOnly.group_size must be an even whole number >= 2 (e.g. 32, 64, "
                                    f"128), not {g!r}")
        if not isinstance(self.search, bool):
            raise QuantizationError(f"Int4WeightOnly.search must be True or False, not {self.search!r}")

    def _base_name(self) -> str:
        return f"int4-g{self.group_size}" + ("-search" if self.search else "")

    @property
    def fmt(self) -> WeightQuant:
        return WeightQuant("uint4", group_size=self.group_size, has_min=True)

    def quantize(self, w: torch.Tensor) -> QuantizedWeight:
        return quantize_int4(w, self.group_size, self.search)

    def _fields_json(self) -> dict[str, Any]:
        return {"group_size": self.group_size, "search": self.search}


@dataclass(frozen=True)
class Int8Dynamic(QuantConfig):
    """W8A8: int8 per-row weights and int8 per-row dynamic activations (integer tensor cores)."""
    scheme: ClassVar[str] = "w8a8"

    @property
    def fmt(self) -> WeightQuant:
        return WeightQuant("int8", act="int8")

    def quantize(self, w: torch.Tensor) -> QuantizedWeight:
        return quantize_int8(w, act="int8")


def _check_fp8_storage(config: QuantConfig, storage: object) -> None:
    if storage not in FP8_LARGEST:
        raise QuantizationError(f"{type(config).__name__}.storage must be one of {sorted(FP8_LARGEST)} "
                                f"(fnuz: AMD MI300), not {storage!r}")


@dataclass(frozen=True)
class Float8WeightOnly(QuantConfig):
    """fp8 (e4m3) weights, one scale per output row, or per ``group_size`` columns of a row (finer
    scales, dequantized in the prologue); activations stay in the model's dtype."""
    storage: str = "fp8_e4m3"
    group_size: int = 0
    scheme: ClassVar[str] = "fp8"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_fp8_storage(self, self.storage)
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 0:
            raise QuantizationError(f"Float8WeightOnly.group_size must be a whole number >= 0, not {self.group_size!r}")

    def _base_name(self) -> str:
        return ("fp8" if self.storage == "fp8_e4m3" else "fp8-fnuz") + (f"-g{self.group_size}" if self.group_size else "")

    @property
    def fmt(self) -> WeightQuant:
        return WeightQuant(self.storage, group_size=self.group_size)

    def quantize(self, w: torch.Tensor) -> QuantizedWeight:
        return quantize_fp8(w, self.storage, group_size=self.group_size)

    def _fields_json(self) -> dict[str, Any]:
        return {"storage": self.storage, "group_size": self.group_size}


@dataclass(frozen=True)
class Float8Dynamic(QuantConfig):
    """fp8 per-row weights and fp8 per-row dynamic activations (fp8 tensor cores)."""
    storage: str = "fp8_e4m3"
    scheme: ClassVar[str] = "fp8-dynamic"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_fp8_storage(self, self.storage)

    def _base_name(self) -> str:
        return "fp8-dynamic" if self.storage == "fp8_e4m3" else "fp8-fnuz-dynamic"

    @property
    def fmt(self) -> WeightQuant:
        return WeightQuant(self.storage, act=self.storage)

    def quantize(self, w: torch.Tensor) -> QuantizedWeight:
        return quantize_fp8(w, self.storage, act=self.storage)

    def _fields_json(self) -> dict[str, Any]:
        return {"storage": self.storage}


@dataclass(frozen=True)
class GGUFNative(QuantConfig):
    """Keep a GGUF file's own quantized blocks (Q8_0, Q4_0, Q4_1) for the linear layers that have
    them (``turbofx.quant.gguf.gguf_linear_weights``); there is nothing to quantize."""
    scheme: ClassVar[str] = "gguf"

    @property
    def fmt(self) -> None:
        return None  # per tensor: whatever block type the file holds

    def quantize(self, w: torch.Tensor) -> QuantizedWeight:
        raise QuantizationError("quant='gguf' keeps the quantized blocks of a GGUF file, and a plain tensor has "
                                "none: load the model from a .gguf file (its linear weights then come from "
                                "turbofx.quant.gguf.gguf_linear_weights), or choose a scheme that quantizes: "
                                + ", ".join(CHOICES[:-1]))


_CLASSES: dict[str, type[QuantConfig]] = {c.scheme: c for c in (Int8WeightOnly, Int4WeightOnly, Int8Dynamic,
                                                                 Float8WeightOnly, Float8Dynamic, GGUFNative)}
CHOICES = ("int8", "int4", "int4-g<N> (e.g. int4-g64)", "int4-search / int4-g<N>-search (weight-error search)",
           "w8a8", "fp8", "fp8-g<N> (group scales)",
           "fp8-dynamic", "fp8-fnuz", "fp8-fnuz-dynamic", "<any of those>+emb (embeddings too)", "gguf")
_FIXED = {"int8": Int8WeightOnly, "w8a8": Int8Dynamic, "gguf": GGUFNative,
          "fp8": lambda: Float8WeightOnly(), "fp8-dynamic": lambda: Float8Dynamic(),
          "fp8-fnuz": lambda: Float8WeightOnly(storage="fp8_e4m3fnuz"),
          "fp8-fnuz-dynamic": lambda: Float8Dynamic(storage="fp8_e4m3fnuz")}
_FP8_GROUPS = re.compile(r"fp8(-fnuz)?-g(\d+)")
_INT4 = re.compile(r"int4(?:-g(\d+))?(-rtn|-search)?")


def parse(value: QuantConfig | str | None) -> QuantConfig | None:
    """None (no quantization), a config (returned as is), or a name, case-insensitive: "int8",
    "int4" (group 128, round-to-nearest), "int4-g64" (any even group size >= 2), "int4-search" /
    "int4-g64-search" (the weight-error search; "-rtn" is accepted and means the default), "w8a8", "fp8", "fp8-dynamic", "fp8-fnuz", "fp8-fnuz-dynamic", "gguf"."""
    if value is None or isinstance(value, QuantConfig):
        return value
    if not isinstance(value, str):
        raise QuantizationError(f"quantization must be None, a turbofx.quant config or one of {', '.join(CHOICES)}; "
                                f"not {type(value).__name__} {value!r}")
    key = value.strip().lower()
    if key in ("", "none", "off"):
        return None
    if key.endswith("+emb"):  # the embedding tables (and a tied LM head) too
        import dataclasses

        base = parse(key[:-len("+emb")])
        if base is None or isinstance(base, GGUFNative):
            raise QuantizationError(f"{value!r}: '+emb' follows a scheme that quantizes (e.g. int4+emb)")
        return dataclasses.replace(base, embeddings=True)
    if key in _FIXED:
        return _FIXED[key]()
    m = _FP8_GROUPS.fullmatch(key)
    if m:
        return Float8WeightOnly(storage="fp8_e4m3fnuz" if m.group(1) else "fp8_e4m3", group_size=int(m.group(2)))
    m = _INT4.fullmatch(key)
    if m:
        group = int(m.group(1)) if m.group(1) else 128
        return Int4WeightOnly(group_size=group, search=m.group(2) == "-search")
    raise QuantizationError(f"unknown quantization {value!r}: choose one of {', '.join(CHOICES)}")


def config_from_json(d: dict[str, Any], filter: Callable[[str], bool] | None = None) -> QuantConfig:
    """The config ``to_json`` wrote. A config recorded with a custom filter cannot be restored
    from JSON alone (code is not stored): pass the same ``filter`` again, or it is refused."""
    if not isinstance(d, dict):
        raise QuantizationError(f"a quantization config record must be a dict, not {type(d).__name__}")
    version = d.get("version")
    if version != CONFIG_JSON_VERSION:
        raise QuantizationError(f"quantization config record version {version!r} is not the supported "
                                f"{CONFIG_JSON_VERSION}: re-export the artifact with this turbofx")
    scheme = d.get("scheme")
    cls = _CLASSES.get(scheme) if isinstance(scheme, str) else None
    if cls is None:
        raise QuantizationError(f"quantization config record names unknown scheme {scheme!r} "
                                f"(known: {sorted(_CLASSES)})")
    recorded = d.get("filter")
    if recorded not in (None, CUSTOM_FILTER):
        raise QuantizationError(f"quantization config record has filter {recorded!r}: expected null or "
                                f"{CUSTOM_FILTER!r}")
    if recorded == CUSTOM_FILTER and filter is None:
        raise QuantizationError(f"this {scheme} config was made with a custom filter function, which JSON cannot "
                                "hold: pass the same filter to config_from_json(record, filter=...)")
    if recorded is None and filter is not None:
        raise QuantizationError(f"this {scheme} config used the default filter; do not pass filter= for it")
    fields = {k: v for k, v in d.items() if k not in ("version", "scheme", "filter")}
    try:
        return cls(**fields, filter=filter)
    except TypeError as exc:
        raise QuantizationError(f"quantization config record for {scheme} has unexpected fields "
                                f"{sorted(fields)}: {exc}") from None
