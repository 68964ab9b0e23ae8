"""What a `jetscribe` command says when it cannot do what was asked: one line, and an exit code.

Commands raise a `CliError` (or let one of the library errors `as_cli_error` knows through); `main` catches it in
one place, prints `jetscribe <command>: <message>` and exits with its code. `--debug` adds the traceback.
"""

from __future__ import annotations

import sys

from jetscribe.shared.errors import CodedError

USAGE = 2  # the command line itself is wrong: fix the arguments
FAILED = 1  # the command was understood, but the operation was refused or failed


class CliError(CodedError):
    """A failure a user can act on; the message says what to do."""

    code = "failed"
    exit_code = FAILED

    def __init__(self, message: str, code: str | None = None):
        super().__init__(code, message)


class UsageError(CliError):
    """An argument that cannot work (a missing file, an unknown language, a bad time)."""

    code = "usage"
    exit_code = USAGE


class Unreachable(CliError):
    """A server the command needs does not answer, or none is known."""

    code = "unreachable"


class NotFound(CliError):
    """The session (or revision) asked for does not exist."""

    code = "not_found"


class Refused(CliError):
    """The pipeline refused the operation (a session id already ended, a rejected session)."""

    code = "refused"


class SchemaMismatch(CliError):
    """The database schema is not the one this jetscribe reads."""

    code = "schema"


def as_cli_error(exc: BaseException) -> CliError | None:
    """The CliError for an expected failure raised by a library the commands use; None for a bug."""
    from jetscribe.shared.config import ConfigError

    # An error of a module not imported yet cannot be the one raised: no import (seconds) just to check.
    bot, stack = sys.modules.get("jetscribe.client.bot"), sys.modules.get("jetscribe.devstack.stack")
    if isinstance(exc, CliError):
        return exc
    if bot is not None and isinstance(exc, bot.BotError):
        return Refused(bot_refusal(exc.reply.code, exc.reply.message), code=exc.reply.code)
    if isinstance(exc, ConfigError):
        return UsageError(str(exc), code=exc.code)
    if stack is not None and isinstance(exc, stack.StackError):
        return CliError(str(exc), code="stack")
    if isinstance(exc, TimeoutError) and str(exc):  # the bot's: no gateway answered, or no end came
        return CliError(str(exc), code="timeout")
    return None


def bot_refusal(code: str, message: str) -> str:
    """The gateway's refusal of a session, with what to do about it."""
    advice = {
        "session_ended": "a session id cannot be used again once it ended: pick a new --session",
        "bad_language": "use a Whisper language code (en, de, fr, ...) or auto",
        "rejected": "the transcriber had no room for it: try again later or start more transcribers",
    }.get(code)
    return f"{message} ({code})" + (f"; {advice}" if advice else "")
