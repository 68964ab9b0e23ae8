"""The real servers of jetscribe.servers: start, keep data across restarts, die on kill."""

import socket

import nats
import psycopg
import pytest
import sqlalchemy as sa

from jetscribe.servers import NatsServer, PostgresServer

pytestmark = pytest.mark.timeout(60)


def _refuses_tcp(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.mark.asyncio
async def test_session_nats_has_jetstream_and_16mb_payloads(nats_url):
    nc = await nats.connect(nats_url)
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
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        await js.add_stream(name="AUDIO", subjects=["audio.>"])
        acks = [await js.publish("audio.s1", f"chunk {i}".encode()) for i in range(3)]
        await nc.close()

        port = server.port
        server.restart()
        assert server.port == port

        nc = await nats.connect(server.url)
        msgs = [await nc.jetstream().get_msg("AUDIO", ack.seq) for ack in acks]
        assert [m.data for m in msgs] == [b"chunk 0", b"chunk 1", b"chunk 2"]
        await nc.close()

        server.kill()
        assert not server.running
        assert _refuses_tcp(server.host, server.port)

        server.start()
        nc = await nats.connect(server.url)
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
