"""Which NATS and PostgreSQL a command talks to: NATS_URL / DATABASE_URL, else the stack `jetscribe up` runs here.

Never the machine's default ports: a server that happens to listen on 127.0.0.1:4222 or :5432 is not jetscribe's.
"""

from __future__ import annotations

import os
from dataclasses import replace

from jetscribe.cli.errors import Unreachable
from jetscribe.shared.config import PostgresClient


def nats_url() -> str:
    """NATS_URL, or the NATS of the stack running in this folder; Unreachable when there is neither."""
    return _url("NATS_URL", "nats_url")


def database_url() -> str:
    """DATABASE_URL, or the PostgreSQL of the stack running in this folder; Unreachable when there is neither."""
    return _url("DATABASE_URL", "database_url")


def database(role: str = "owner") -> tuple[str, PostgresClient]:
    """Where and how a command signs in to PostgreSQL: DATABASE_URL with JETSCRIBE_PG_* when it is set; else the
    stack running here, as `role` ("owner" for `jetscribe db`, "reader" for the reads) with that role's password
    file (a stack given its DATABASE_URL made no roles: its URL, as for every role)."""
    client = PostgresClient.from_env()
    url = database_url()
    if os.environ.get("DATABASE_URL"):
        return url, client
    from jetscribe.devstack import stack

    signed_in = (stack.running_stack_urls().get("database_roles") or {}).get(role)
    if not signed_in:
        return url, client
    return signed_in["url"], replace(client, password_file=client.password_file or signed_in["password_file"])


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
