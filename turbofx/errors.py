"""Errors raised by turbofx. Each says what was wrong and what to do about it."""
from __future__ import annotations


class TurbofxError(Exception):
    """Base class of every error turbofx raises on purpose."""


class CaptureError(TurbofxError):
    """The model could not be captured into an FX graph."""


class InputMismatchError(TurbofxError, TypeError):
    """A compiled model was called with inputs unlike the ones it was compiled for."""


class GenerationError(TurbofxError, ValueError):
    """turbofx.generate was given a model or arguments it cannot generate with."""


class ArtifactError(TurbofxError):
    """An exported artifact is missing, corrupt, or was made by incompatible versions."""


class ModelLoadError(TurbofxError):
    """A model named on the command line or in the API could not be loaded."""


class CodegenError(TurbofxError):
    """A kernel could not be generated or compiled (a bug in turbofx: please report it)."""


class VerificationError(TurbofxError):
    """Verify mode found a pass that changed the graph's results."""


REPORT_TO = "the turbofx issue tracker"  # no public address yet: say where, in words


class TurbofxInternalError(TurbofxError):
    """An unexpected failure inside turbofx's own code: a turbofx bug, not the user's."""

    def __init__(self, what: str, cause: BaseException | None = None) -> None:
        detail = f" ({type(cause).__name__}: {cause})" if cause is not None else ""
        super().__init__(f"turbofx bug: {what}{detail}. Please report it on {REPORT_TO} with the output of "
                         "the same run under TURBOFX_LOG=debug")


class BisectError(TurbofxError):
    """``turbofx bisect`` could not run (e.g. the model is not compiled wrongly to begin with)."""


class TargetError(TurbofxError, ValueError):
    """An unknown target name, or a target this machine cannot provide (a GPU target without a GPU)."""


class OpArgsError(TurbofxError, TypeError):
    """An argument view (``turbofx.runtime.op_args``) was asked of a node of another op, or of a
    call whose arguments do not fit the op's schema (a turbofx bug: please report it)."""


class GemmInputError(TurbofxError, ValueError):
    """The GEMM launcher (or its reference) was called with a spec or tensors that do not fit together."""


class QuantizationError(TurbofxError, ValueError):
    """A quantization config, a weight or a GGUF file that cannot be quantized or read as asked
    (a bad config, a weight with NaN/inf, a scheme the target cannot run)."""
