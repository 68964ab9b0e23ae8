"""Alembic environment: runs migrations against the URL that `jetscribe.services.persister.migrate` passes in."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool

from jetscribe.services.persister.tables import Base

config = context.config
target_metadata = Base.metadata


def run_migrations_offline() -> None:
    context.configure(
        url=config.attributes["database_url"],
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    # postgresql+psycopg:// serves sync and async; migrations run sync on a throwaway connection.
    engine = create_engine(
        config.attributes["database_url"], poolclass=pool.NullPool, connect_args=config.attributes["connect_args"]
    )
    try:
        with engine.connect() as connection:
            context.configure(connection=connection, target_metadata=target_metadata)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
