"""The real servers of jetscribe.devstack.servers: start, keep data across restarts, die on kill."""

import os
import pwd
import socket
import stat
import subprocess
import sys
import time

import nats
import psycopg
import pytest
import sqlalchemy as sa

from jetscribe.devstack.servers import NatsServer, PostgresServer
from jetscribe.shared.natsauth import env_connect_options

pytestmark = pytest.mark.timeout(60)


def _refuses_tcp(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.mark.asyncio
async def test_session_nats_has_jetstream_and_16mb_payloads(nats_url):
    nc = await nats.connect(nats_url, **env_connect_options(nats_url))
    try:
        assert nc.max_payload == 16 * 1024 * 1024
        js = nc.jetstream()
        await js.add_stream(name="SMOKE", subjects=["smoke.>"])
        ack = await js.publish("smoke.a", b"hello")
        msg = await js.get_msg("SMOKE", ack.seq)
        assert msg.data == b"hello"
    finally:
        await nc.close()


@pytest.mark.asyncio
async def test_jetstream_data_survives_restart_and_kill(tmp_path):
    with NatsServer(tmp_path) as server:
        nc = await nats.connect(server.url, **env_connect_options(server.url))
        js = nc.jetstream()
        await js.add_stream(name="AUDIO", subjects=["audio.>"])
        acks = [await js.publish("audio.s1", f"chunk {i}".encode()) for i in range(3)]
        await nc.close()

        port = server.port
        server.restart()
        assert server.port == port

        nc = await nats.connect(server.url, **env_connect_options(server.url))
        msgs = [await nc.jetstream().get_msg("AUDIO", ack.seq) for ack in acks]
        assert [m.data for m in msgs] == [b"chunk 0", b"chunk 1", b"chunk 2"]
        await nc.close()

        server.kill()
        assert not server.running
        assert _refuses_tcp(server.host, server.port)

        server.start()
        nc = await nats.connect(server.url, **env_connect_options(server.url))
        info = await nc.jetstream().stream_info("AUDIO")
        assert info.state.messages == 3
        await nc.close()
    assert _refuses_tcp(server.host, server.port)
    assert "Server is ready" in (tmp_path / "nats.log").read_text()


def test_second_server_on_a_busy_port_fails_clearly(tmp_path, nats_server):
    other = NatsServer(tmp_path, port=nats_server.port)
    with pytest.raises(RuntimeError, match="already in use"):
        other.start()
    assert not other.running


def test_session_postgres_gives_fresh_databases(database_url, postgres_server):
    assert database_url.startswith(f"postgresql+psycopg://postgres@127.0.0.1:{postgres_server.port}/t_")
    postgres_server.create_database(database_url.rsplit("/", 1)[1])  # idempotent
    engine = sa.create_engine(database_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")).scalar() == 0
            assert conn.execute(sa.text("SELECT current_database()")).scalar() == database_url.rsplit("/", 1)[1]
    finally:
        engine.dispose()


def test_postgres_table_survives_restart_and_kill(tmp_path):
    with PostgresServer(tmp_path, fast=True) as server:
        server.create_database("jetscribe")
        engine = sa.create_engine(server.url(), pool_pre_ping=True)
        try:
            with engine.begin() as conn:
                conn.execute(sa.text("CREATE TABLE segments (id int PRIMARY KEY, text text)"))
                conn.execute(sa.text("INSERT INTO segments VALUES (1, 'héllo wörld')"))

            server.restart()
            with engine.connect() as conn:
                assert conn.execute(sa.text("SELECT text FROM segments")).scalar() == "héllo wörld"
                assert conn.execute(sa.text("SELECT upper(text) FROM segments")).scalar() == "HÉLLO WÖRLD"

            with engine.begin() as conn:
                conn.execute(sa.text("INSERT INTO segments VALUES (2, 'committed before the crash')"))
            server.kill()
            assert not server.running
            with pytest.raises(psycopg.OperationalError):
                psycopg.connect(host=server.host, port=server.port, user="postgres", connect_timeout=2)
            engine.dispose()

            server.start()  # crash recovery
            with engine.connect() as conn:
                assert conn.execute(sa.text("SELECT count(*) FROM segments")).scalar() == 2
        finally:
            engine.dispose()
    assert _refuses_tcp(server.host, server.port)
    assert "database system is shut down" in (tmp_path / "postgres.log").read_text()


# Run in a child process: start, use and restart a PostgresServer in argv[1].
_START_POSTGRES = """
import sys
from jetscribe.devstack.servers import PostgresServer
with PostgresServer(sys.argv[1], fast=True) as server:
    server.create_database("jetscribe")
    server.restart()
    server.create_database("again")
print("ok")
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="as root only: Postgres then runs as another user")
def test_concurrent_postgres_servers_do_not_need_the_parent_folders(tmp_path):
    # Each pytest session resets /tmp/pytest-of-root to 0700 as it starts, so
    # a concurrent session takes back any search grant a server put there.
    # Here the parent stays root's 0700 while servers start in other processes.
    shared = tmp_path / "pytest-of-root"
    shared.mkdir(mode=0o700)
    procs = []
    for i in range(4):
        data_dir = shared / f"pg{i}"
        data_dir.mkdir(mode=0o700)
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", _START_POSTGRES, str(data_dir)],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    try:
        while any(proc.poll() is None for proc in procs):
            if stat.S_IMODE(shared.stat().st_mode) != 0o700:
                shared.chmod(0o700)  # what a starting pytest session does
            time.sleep(0.001)
        outputs = [proc.communicate()[0] for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    assert [out.splitlines()[-1:] for out in outputs] == [["ok"]] * 4, "\n\n".join(outputs)


# Run in a child process: once argv[2] exists, ensure user argv[1] and print its uid.
_ENSURE_USER = """
import os, sys, time
from jetscribe.devstack.servers import _ensure_system_user
while not os.path.exists(sys.argv[2]):
    time.sleep(0.001)
print(_ensure_system_user(sys.argv[1]).pw_uid)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="as root only: creates a system user")
def test_concurrent_first_starts_create_the_postgres_user_once(tmp_path):
    # On a fresh machine several test sessions may start Postgres at once.
    # Concurrent useradds each rewrote the user with a new uid, and initdb then
    # ran as a uid without a user ("could not look up effective user ID").
    name = f"jstest{os.getpid() % 100000}"
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _ENSURE_USER, name, str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(8)
    ]
    try:
        time.sleep(2)  # let them import and wait
        go.touch()
        outputs = [proc.communicate(timeout=30)[0] for proc in procs]
        assert all(proc.returncode == 0 for proc in procs), outputs
        assert {out.strip() for out in outputs} == {str(pwd.getpwnam(name).pw_uid)}
    finally:
        for proc in procs:
            proc.kill()
        subprocess.run(["userdel", name], capture_output=True)
