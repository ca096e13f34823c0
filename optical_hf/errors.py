"""Exception types shared across optical_hf.

:class:`OpticalInputError` marks errors caused by the user's input (a flag, a file, a model path): the ``optical-hf``
command reports exactly these as one ``optical-hf: error: ...`` line with exit status 2, while any other exception
(a bug, or a failure deep in torch or transformers) keeps its traceback.
"""

from __future__ import annotations

__all__ = ["NonFiniteLossError", "OpticalInputError"]


class OpticalInputError(ValueError):
    """Bad user input; the message names the flag, file (and line) or path at fault."""


class NonFiniteLossError(FloatingPointError):
    """Training produced a non-finite (NaN or infinite) loss or gradient norm; the message names the step."""
