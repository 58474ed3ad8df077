"""User-facing errors: one clear message that names the fix, and a non-zero exit."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input (file, flag, profile, environment).

    The CLI prints ``message`` (and ``hint`` when given) without a traceback and
    exits with ``exit_code``.
    """

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n{self.hint}"


class ValidationFailed(UserError):
    """The exported model disagrees with the PyTorch reference beyond tolerance."""

    exit_code = 1


class BackendUnavailable(UserError):
    """A runtime the command needs (TensorRT, a CUDA provider) is not installed here."""

    exit_code = 3


class Interrupted(UserError):
    """The user pressed Ctrl-C; the message says what is on disk and in what state."""

    exit_code = 130
