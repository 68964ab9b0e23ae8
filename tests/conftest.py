"""Shared fixtures: real NATS and PostgreSQL servers, one of each per test session.

They run on free ports in pytest's temporary folders and stop when the session
ends. A test that stops, kills or restarts a server must start its own instead
of using these shared ones (a cluster of its own: `NatsCluster`, as the chaos
tests' `chaos_cluster`).

Every nats-server in the tests (these, the ones tests start themselves, `jetscribe up`'s) runs with
authentication on, with the users of one keyring made for the session (JETSCRIBE_NATS_KEYS): the services'
and the operator's, as `jetscribe up` makes them, plus a `root` user allowed everything, which the tests
connect as (NATS_CREDS) because they publish test data into the streams the services trust. Services the
tests start in-process connect as root too; `jetscribe up` (LocalStack) gives each service its own user.
"""

import os
import uuid

import pytest

from jetscribe.devstack.keys import Keyring
from jetscribe.devstack.servers import NatsCluster, NatsServer, PostgresServer

TEST_CLOCK_OFFSET_S = str(10 * 24 * 3600)
DEFAULT_FUZZ_COUNT = 1000


def pytest_addoption(parser):
    parser.addoption(
        "--fuzz-count",
        type=int,
        default=None,
        help=f"messages per entry point in tests/fuzz (default: $JETSCRIBE_FUZZ_COUNT, else {DEFAULT_FUZZ_COUNT})",
    )


@pytest.fixture(scope="session")
def fuzz_count(request) -> int:
    """Hostile messages per entry point in tests/fuzz: --fuzz-count, else $JETSCRIBE_FUZZ_COUNT, else 1000."""
    return request.config.getoption("--fuzz-count") or int(
        os.environ.get("JETSCRIBE_FUZZ_COUNT") or DEFAULT_FUZZ_COUNT
    )  # ten days: a clock read compared with a zero default shows at once


@pytest.fixture(scope="session", autouse=True)
def offset_clock():
    """Every service clock in the tests (in-process, and subprocesses that inherit the environment)
    runs ten days ahead, so no test host is "just booted" (see shared/clock.py)."""
    previous = os.environ.get("JETSCRIBE_CLOCK_OFFSET_S")
    os.environ["JETSCRIBE_CLOCK_OFFSET_S"] = TEST_CLOCK_OFFSET_S
    yield
    if previous is None:
        os.environ.pop("JETSCRIBE_CLOCK_OFFSET_S", None)
    else:
        os.environ["JETSCRIBE_CLOCK_OFFSET_S"] = previous


@pytest.fixture(scope="session", autouse=True)
def nats_keys(tmp_path_factory):
    """The session's NATS users (services, operator, root); the tests connect as root."""
    keys = Keyring(tmp_path_factory.mktemp("nats-keys") / "keys").ensure_services()
    root = keys.ensure_root()
    saved = {name: os.environ.get(name) for name in ("JETSCRIBE_NATS_KEYS", "NATS_CREDS")}
    os.environ.update(JETSCRIBE_NATS_KEYS=str(keys.folder), NATS_CREDS=str(root))
    yield keys
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session", autouse=True)
def speakers_from_audio_off():
    """Transcribers started by the tests (in-process from_env, subprocesses that inherit the environment) hear no
    speakers in the audio unless a test turns it on: the voice model costs each start seconds and each final CPU."""
    previous = os.environ.get("JETSCRIBE_SPEAKERS_AUDIO")
    os.environ["JETSCRIBE_SPEAKERS_AUDIO"] = previous or "off"
    yield
    if previous is None:
        os.environ.pop("JETSCRIBE_SPEAKERS_AUDIO", None)


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
def nats_cluster(tmp_path_factory):
    """Three nats-servers joined in one JetStream cluster, shared by the whole session; `.url` lists all three."""
    with NatsCluster(tmp_path_factory.mktemp("nats-cluster"), 3) as cluster:
        yield cluster


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
