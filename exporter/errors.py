"""Errors a user can act on.

Anything raised as ``SlmExportError`` is printed by the CLI as one message (plus an optional hint)
and turned into a non-zero exit code, without a traceback unless ``--debug`` is given.
"""

from __future__ import annotations


class SlmExportError(Exception):
    """A failure caused by input or environment, with a message meant for the user."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class ModelLoadError(SlmExportError):
    """The model path is missing, corrupt, untrusted or of an unsupported architecture."""


class UnsupportedRecipeError(SlmExportError):
    """The recipe cannot be produced for this format / architecture."""


class ExportFailedError(SlmExportError):
    """A converter rejected the model; the message is the converter's, condensed."""


class ParityGateFailed(SlmExportError):
    """The exported artifact does not match the PyTorch reference within the recipe's thresholds."""

    exit_code = 3


class DeviceError(SlmExportError):
    """A device is unreachable, refused us, or lacks what the bundle needs."""

    exit_code = 4


class RuntimeRejectedBundle(SlmExportError):
    """A field runtime that is installed (onnxruntime-genai, ExecuTorch's runner, ...) cannot run the bundle."""

    exit_code = 6


class BudgetExceeded(SlmExportError):
    """The model does not fit the board's flash or RAM."""

    exit_code = 5


# The one exception condenser, shared with the device-side runtime (which imports nothing of ours).
from exporter.runtime.messages import condense  # noqa: E402, F401
