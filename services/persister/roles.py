"""Who may do what to jetscribe's tables in PostgreSQL: three roles, each with what its processes need.

The owner role owns the database and runs the migrations (`jetscribe db upgrade`, the migrate job); the persister's
role reads and writes the persister's tables and nothing else (no DDL, no other table, no schema, no temporary
table); the readers' role (the CLI's `transcript`, `sessions`) only reads. The owner grants after every upgrade, so a
table a later migration adds gets its grants in the same step.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Connection, text

from jetscribe.shared.config import ConfigError, FromEnv, env

PERSISTER_TABLES = ("sessions", "segments")
SCHEMA_TABLE = "alembic_version"  # read by both: the persister and the readers check the schema's revision


@dataclass(frozen=True)
class TableRoles(FromEnv):
    """The roles the owner grants to (empty: none); `jetscribe db upgrade` reads them from the environment."""

    persister: str = env("JETSCRIBE_PG_PERSISTER_ROLE", "")
    reader: str = env("JETSCRIBE_PG_READER_ROLE", "")

    def __bool__(self) -> bool:
        return bool(self.persister or self.reader)


def grant_statements(roles: TableRoles, quote) -> list[str]:
    """The SQL that gives `roles` their rights (`quote`: the dialect's identifier quoting), safe to run again."""
    tables = ", ".join(quote(name) for name in PERSISTER_TABLES)
    statements = [
        # Nobody but the owner makes objects: PostgreSQL 15+ already keeps CREATE on public from PUBLIC, not TEMP.
        "REVOKE CREATE ON SCHEMA public FROM PUBLIC",
        "DO $$ BEGIN EXECUTE format('REVOKE CREATE, TEMPORARY ON DATABASE %I FROM PUBLIC', current_database()); END $$",
    ]
    if roles.persister:
        role = quote(roles.persister)
        statements += [
            f"GRANT USAGE ON SCHEMA public TO {role}",
            f"GRANT SELECT, INSERT, UPDATE ON {tables} TO {role}",
            f"GRANT SELECT ON {quote(SCHEMA_TABLE)} TO {role}",
        ]
    if roles.reader:
        role = quote(roles.reader)
        statements += [
            f"GRANT USAGE ON SCHEMA public TO {role}",
            f"GRANT SELECT ON {tables}, {quote(SCHEMA_TABLE)} TO {role}",
        ]
    return statements


class NotTheOwner(ConfigError):
    """Grants made by a role that does not own the tables: PostgreSQL would only warn and grant nothing."""

    code = "not_the_owner"


def grant(connection: Connection, roles: TableRoles) -> None:
    """Give `roles` their rights on the tables, as their owner, in the connection's transaction; NotTheOwner if
    the connection's role does not own them."""
    owner, me = connection.execute(
        text("SELECT tableowner, current_user FROM pg_tables WHERE schemaname = 'public' AND tablename = :table"),
        {"table": PERSISTER_TABLES[0]},
    ).one()
    if owner != me:
        raise NotTheOwner(
            f"{me} does not own the tables ({owner} does): grant as the owner, e.g. `jetscribe db upgrade`"
        )
    quote = connection.dialect.identifier_preparer.quote
    for statement in grant_statements(roles, quote):
        connection.execute(text(statement))
