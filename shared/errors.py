"""One coded error base class for every refusal and failure a caller can act on.

`code` is stable for machines (it is what goes on the wire, in `Reply.error` and `ErrorEvent.code`);
the message is for people and says what to do.
"""

from __future__ import annotations


class CodedError(Exception):
    """An error with a stable machine-readable `code` and a message a user can act on."""

    code: str = "error"

    def __init__(self, code: str | None = None, message: str = ""):
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self)
