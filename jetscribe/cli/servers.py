"""Which NATS and PostgreSQL a command talks to: NATS_URL / DATABASE_URL, else the stack `jetscribe up` runs here.

Never the machine's default ports: a server that happens to listen on 127.0.0.1:4222 or :5432 is not jetscribe's.
"""

from __future__ import annotations

import os

from jetscribe.cli.errors import Unreachable


def nats_url() -> str:
    """NATS_URL, or the NATS of the stack running in this folder; Unreachable when there is neither."""
    return _url("NATS_URL", "nats_url")


def database_url() -> str:
    """DATABASE_URL, or the PostgreSQL of the stack running in this folder; Unreachable when there is neither."""
    return _url("DATABASE_URL", "database_url")


def _url(variable: str, key: str) -> str:
    if os.environ.get(variable):
        return os.environ[variable]
    from jetscribe.devstack import stack  # only now: importing it takes ~2 s (alembic, the servers' packages)

    url = stack.running_stack_urls().get(key)
    if not url:
        raise Unreachable(
            f"no jetscribe stack is running in {stack.home_dir()} and {variable} is not set: "
            f"start one with `jetscribe up` in this folder, or set {variable}",
            code="no_stack",
        )
    return url
