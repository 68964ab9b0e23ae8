"""The CLI's side of PostgreSQL: `jetscribe db upgrade|downgrade|current`, and an engine for the readers that turns
an unreachable server or an old schema into one line that says what to do."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

from jetscribe.cli.errors import SchemaMismatch, Unreachable, UsageError
from jetscribe.shared.config import PostgresClient

T = TypeVar("T")


def unreachable(url: str, exc: BaseException) -> Unreachable:
    cause = getattr(exc, "orig", None) or exc
    last = (str(cause).strip().splitlines() or [type(cause).__name__])[-1]
    return Unreachable(f"cannot use PostgreSQL at {_without_password(url)} ({last}): {_what_to_do(last)}")


def _what_to_do(failure: str) -> str:
    """What a user can change for this connection failure: the TLS files, the password, or where the server is."""
    if "SSL" in failure or "certificate" in failure:
        return (
            "set JETSCRIBE_PG_TLS_CA to the CA that signed the server's certificate (JETSCRIBE_PG_SSLMODE, "
            "JETSCRIBE_PG_TLS_CERT and _KEY for the rest)"
        )
    if "password" in failure:
        return "set JETSCRIBE_PG_PASSWORD_FILE to a file holding the role's password"
    return "start the stack with `jetscribe up` in this folder, or set DATABASE_URL"


def _without_password(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def _sync(url: str, work: Callable[[], T]) -> T:
    """Run a blocking alembic step; a server that does not answer (or is not trusted) becomes Unreachable."""
    import psycopg
    from sqlalchemy.exc import OperationalError

    try:
        return work()
    except (OperationalError, psycopg.OperationalError) as exc:
        raise unreachable(url, exc) from None


def _revision_arg(text: str, known: list[str]) -> str:
    if text not in known and text != "base":
        raise UsageError(f"no revision {text!r}: the revisions are {', '.join(known)} (or base, before the first)")
    return text


def upgrade(url: str, target: str | None, client: PostgresClient | None = None) -> str:
    """`jetscribe db upgrade [REV]`: what it did, as one line. The roles named by JETSCRIBE_PG_PERSISTER_ROLE and
    _READER_ROLE get their grants every time, also when the schema was already there."""
    from jetscribe.services.persister import migrate

    known = migrate.revisions()
    target = _revision_arg(target, known) if target else known[-1]
    before = _sync(url, lambda: migrate.current(url, client))
    if before == target:
        _sync(url, lambda: migrate.grant_roles(url, client))
        return f"already at {target}" + (" (the newest)" if target == known[-1] else "") + _grants_note()
    if before in known and target in known and known.index(before) > known.index(target):
        raise UsageError(f"the database is at {before}, above {target}: use `jetscribe db downgrade {target}`")
    _sync(url, lambda: migrate.upgrade(url, target, client))
    after = _sync(url, lambda: migrate.current(url, client))
    return f"upgraded {before or 'an empty database'} -> {after}" + _grants_note()


def _grants_note() -> str:
    """Which roles the upgrade granted to (JETSCRIBE_PG_*_ROLE), as the end of its line."""
    from jetscribe.services.persister.roles import TableRoles

    roles = TableRoles.from_env()
    named = [f"{what} {role}" for what, role in (("persister", roles.persister), ("reader", roles.reader)) if role]
    return "; granted " + ", ".join(named) if named else ""


def downgrade(url: str, target: str | None, client: PostgresClient | None = None) -> str:
    """`jetscribe db downgrade [REV]` (one revision back by default): what it did, as one line."""
    from jetscribe.services.persister import migrate

    known = migrate.revisions()
    before = _sync(url, lambda: migrate.current(url, client))
    if before is None:
        return "the database has no jetscribe schema: nothing to downgrade"
    if target is None:
        if before not in known:
            raise UsageError(f"the database is at {before}, a revision this jetscribe does not know")
        index = known.index(before)
        target = known[index - 1] if index > 0 else "base"
    target = _revision_arg(target, known)
    if before == target:
        return f"already at {target}"
    if target != "base" and before in known and known.index(before) < known.index(target):
        raise UsageError(f"the database is at {before}, below {target}: use `jetscribe db upgrade {target}`")
    _sync(url, lambda: migrate.downgrade(url, target, client))
    after = _sync(url, lambda: migrate.current(url, client))
    return f"downgraded {before} -> {after or 'base (no tables)'}"


def current(url: str, fmt: str = "text", client: PostgresClient | None = None) -> str:
    """`jetscribe db current`: the database's revision and the newest this jetscribe has."""
    from jetscribe.services.persister import migrate

    head = migrate.revisions()[-1]
    at = _sync(url, lambda: migrate.current(url, client))
    if fmt == "json":
        return json.dumps({"current": at, "head": head, "up_to_date": at == head})
    if at == head:
        return f"at {at}, the newest revision"
    return f"at {at or 'no revision (an empty database)'}; the newest is {head}: run `jetscribe db upgrade`"


@contextlib.asynccontextmanager
async def reading(url: str, client: PostgresClient | None = None) -> AsyncIterator:
    """An engine for the CLI's reads: an unreachable server is Unreachable, a schema older than the queries
    (UndefinedColumn, UndefinedTable) is SchemaMismatch naming its revision."""
    import psycopg
    from sqlalchemy.exc import OperationalError, ProgrammingError

    from jetscribe.services.persister.migrate import revisions, schema_revision
    from jetscribe.services.persister.store import open_engine

    engine = open_engine(url, client)
    try:
        yield engine
    except OperationalError as exc:
        raise unreachable(url, exc) from None
    except ProgrammingError as exc:
        if not isinstance(exc.orig, (psycopg.errors.UndefinedColumn, psycopg.errors.UndefinedTable)):
            raise
        async with engine.connect() as conn:
            at = await schema_revision(conn)
        raise SchemaMismatch(
            f"the database schema is at {at or 'no revision (an empty database)'}, this jetscribe reads "
            f"{revisions()[-1]}: run `jetscribe db upgrade`"
        ) from None
    finally:
        await engine.dispose()
