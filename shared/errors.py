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


MAX_MESSAGE_CHARS = 500


def brief(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """A refusal's message as one line of at most `limit` characters: it may quote what a client sent, which can be
    any size (a 200 kB id), and it goes into a reply, an error event and a log line."""
    line = " ".join(text.split())
    return line if len(line) <= limit else f"{line[: limit - 15]}... ({len(line)} chars)"
