"""Exceptions raised by vit2bpu, each tied to one documented exit code.

The command-line interface turns every ``Vit2BpuError`` into a one-line message
and exits with its ``exit_code``; anything else is an internal error (exit 1).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_INPUT = 3
EXIT_UNSUPPORTED = 4
EXIT_PARITY = 5
EXIT_OUTPUT = 6


class Vit2BpuError(Exception):
    """Base class: a failure the user can act on."""

    exit_code = EXIT_INTERNAL

    def __init__(self, message: str, *, path: str | None = None, node: str | None = None,
                 op_type: str | None = None, hint: str | None = None):
        self.message = message
        self.path = path
        self.node = node
        self.op_type = op_type
        self.hint = hint
        super().__init__(self.format())

    def format(self) -> str:
        """Return the single line shown to the user."""
        parts = []
        if self.path:
            parts.append(f"{self.path}:")
        if self.node is not None:
            parts.append(f"node '{self.node}' ({self.op_type}):" if self.op_type else f"node '{self.node}':")
        parts.append(self.message)
        line = " ".join(parts)
        if self.hint:
            line += f" ({self.hint})"
        return line


class UsageError(Vit2BpuError):
    """An option or argument is invalid."""

    exit_code = EXIT_USAGE


class InputModelError(Vit2BpuError):
    """The input file is missing, not ONNX, truncated, invalid or of an unknown opset."""

    exit_code = EXIT_INPUT


class UnsupportedModelError(Vit2BpuError):
    """The model holds something vit2bpu cannot write at opset 11 or cannot pin to static shapes."""

    exit_code = EXIT_UNSUPPORTED


class ParityError(Vit2BpuError):
    """The converted graph does not match the original within the tolerances, or parity could not run."""

    exit_code = EXIT_PARITY

    def __init__(self, message: str, *, results=None, **kwargs):
        self.results = results
        super().__init__(message, **kwargs)


class OutputError(Vit2BpuError):
    """The output could not be written; no partial file is left behind."""

    exit_code = EXIT_OUTPUT
