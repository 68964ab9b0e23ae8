"""Schema migrations, run from code: `upgrade(database_url)` is what `jetscribe db upgrade` calls."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, pool, text
from sqlalchemy.ext.asyncio import AsyncConnection

from jetscribe.services.persister.roles import TableRoles, grant
from jetscribe.services.persister.store import sqlalchemy_url
from jetscribe.shared.config import ConfigError, PostgresClient

MIGRATIONS = Path(__file__).parent / "migrations"


def alembic_config(database_url: str, client: PostgresClient | None = None) -> Config:
    """An Alembic config built in code, so no alembic.ini has to be found on disk; `client`: the password and TLS
    to connect with (None: JETSCRIBE_PG_* of the environment)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    # Passed as an attribute, not a main option: ini interpolation would mangle a '%' in a password.
    config.attributes["database_url"] = sqlalchemy_url(database_url)
    config.attributes["connect_args"] = (client or PostgresClient()).connect_args()
    return config


class SchemaBehind(ConfigError):
    """The database's schema is older than the one this code writes and reads: `jetscribe db upgrade` fixes it."""

    code = "schema_behind"

    def __init__(self, current: str | None, needed: str):
        super().__init__(
            f"the database schema is at {current or 'no revision (an empty database)'}, this jetscribe needs "
            f"{needed}: "
            "run `jetscribe db upgrade`"
        )
        self.current, self.needed = current, needed


def revisions() -> list[str]:
    """Every revision in migrations/versions, oldest first; the last is the schema this code needs."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    scripts = ScriptDirectory.from_config(config)
    return [script.revision for script in reversed(list(scripts.walk_revisions()))]


def upgrade(
    database_url: str, revision: str = "head", client: PostgresClient | None = None, roles: TableRoles | None = None
) -> None:
    """Bring the database at `database_url` up to `revision` (blocking; safe to run again), then give the
    persister's and the readers' roles their rights (`roles`, None: JETSCRIBE_PG_*_ROLE of the environment)."""
    command.upgrade(alembic_config(database_url, client), revision)
    grant_roles(database_url, client, roles)


def grant_roles(database_url: str, client: PostgresClient | None = None, roles: TableRoles | None = None) -> bool:
    """Grant the roles their rights on the tables (roles.py), as the owner; False if no role is named."""
    roles = roles if roles is not None else TableRoles.from_env()
    if not roles:
        return False
    engine = create_engine(
        sqlalchemy_url(database_url), poolclass=pool.NullPool, connect_args=(client or PostgresClient()).connect_args()
    )
    try:
        with engine.begin() as connection:
            grant(connection, roles)
    finally:
        engine.dispose()
    return True


def downgrade(database_url: str, revision: str, client: PostgresClient | None = None) -> None:
    command.downgrade(alembic_config(database_url, client), revision)


def current(database_url: str, client: PostgresClient | None = None) -> str | None:
    """The revision the database is at, or None before the first migration."""
    engine = create_engine(
        sqlalchemy_url(database_url), poolclass=pool.NullPool, connect_args=(client or PostgresClient()).connect_args()
    )
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()


async def schema_revision(connection: AsyncConnection) -> str | None:
    """The revision recorded in the database (alembic_version), or None before the first migration."""
    exists = await connection.scalar(text("SELECT to_regclass('alembic_version') IS NOT NULL"))
    if not exists:
        return None
    return await connection.scalar(text("SELECT version_num FROM alembic_version"))


async def check_schema(connection: AsyncConnection) -> None:
    """Raise SchemaBehind when the database is at an older revision than this code needs. An empty database (no
    revision yet) passes: `jetscribe db upgrade` is on its way, and writes wait for it. A revision this code does
    not know is newer than it: left to whoever migrated it."""
    current, known = await schema_revision(connection), revisions()
    if current in known and current != known[-1]:
        raise SchemaBehind(current, known[-1])
