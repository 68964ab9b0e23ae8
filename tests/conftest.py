"""Shared fixtures: real NATS and PostgreSQL servers, one of each per test session.

They run on free ports in pytest's temporary folders and stop when the session
ends. A test that stops, kills or restarts a server must start its own instead
of using these shared ones.
"""

import uuid

import pytest

from jetscribe.servers import NatsServer, PostgresServer


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory):
    """A NATS server with JetStream, shared by the whole session."""
    with NatsServer(tmp_path_factory.mktemp("nats")) as server:
        yield server


@pytest.fixture(scope="session")
def nats_url(nats_server):
    """URL of the session's NATS server."""
    return nats_server.url


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory):
    """A PostgreSQL server (fsync off), shared by the whole session."""
    with PostgresServer(tmp_path_factory.mktemp("postgres"), fast=True) as server:
        yield server


@pytest.fixture
def database_url(postgres_server):
    """SQLAlchemy URL of a new, empty database for this test alone."""
    name = f"t_{uuid.uuid4().hex}"
    postgres_server.create_database(name)
    return postgres_server.url(name)
