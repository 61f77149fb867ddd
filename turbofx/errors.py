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
