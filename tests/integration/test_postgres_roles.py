"""The Postgres roles against a real server with password sign-in, made as `jetscribe up` makes them
(jetscribe/devstack/pgroles.py) and granted by the owner's upgrade (services/persister/roles.py): the persister's role
writes its tables and nothing else, the readers' role only reads, and each does its job (the persister storing, the
CLI reading as the reader, `jetscribe db` as the owner)."""

import asyncio
import json
import os
import stat
import subprocess
import uuid
from pathlib import Path

import nats
import psycopg
import pytest
from sqlalchemy.engine import make_url

from jetscribe.cli import main as cli
from jetscribe.devstack.pgroles import ROLE_NAMES, make_roles
from jetscribe.devstack.servers import PostgresServer
from jetscribe.services.persister.app import run as run_persister
from jetscribe.services.persister.migrate import upgrade
from jetscribe.services.persister.roles import TableRoles
from jetscribe.services.persister.store import final_segments, open_engine
from jetscribe.shared import subjects, wire
from jetscribe.shared.config import PersisterConfig, StreamSettings
from jetscribe.shared.natsauth import env_connect_options
from jetscribe.shared.streams import ensure_streams
from tests.integration.running import two_word_final

pytestmark = pytest.mark.timeout(90)
REFUSED = psycopg.errors.InsufficientPrivilege


@pytest.fixture(scope="module")
def roles(tmp_path_factory):
    """A server with the three roles and their password files, the schema migrated by the owner, who granted the
    other two their rights; plus a table of the owner's that is none of the persister's."""
    folder = tmp_path_factory.mktemp("pg-roles")
    with PostgresServer(folder / "server", fast=True, passwords=True) as server:
        signed_in = make_roles(server, folder / "pg-passwords", database="roles")
        owner = signed_in["owner"]
        upgrade(owner.url, client=owner.client(), roles=TableRoles(ROLE_NAMES["persister"], ROLE_NAMES["reader"]))
        with connect(owner) as conn:
            conn.execute("CREATE TABLE other_table (x int)")
        yield server, folder, signed_in


def connect(signed_in) -> psycopg.Connection:
    url = make_url(signed_in.url)
    password = Path(signed_in.password_file).read_text().strip()
    return psycopg.connect(
        host=url.host, port=url.port, user=url.username, dbname=url.database, password=password, autocommit=True
    )


def test_the_roles_passwords_are_0600_files_kept_across_starts(roles):
    server, folder, signed_in = roles
    assert stat.S_IMODE((folder / "pg-passwords").stat().st_mode) == 0o700
    passwords = {role: Path(s.password_file).read_text().strip() for role, s in signed_in.items()}
    for role, password in passwords.items():
        assert stat.S_IMODE(Path(signed_in[role].password_file).stat().st_mode) == 0o600 and len(password) >= 32
        assert password not in signed_in[role].url
    assert make_roles(server, folder / "pg-passwords", database="roles") == signed_in  # the next `jetscribe up`
    assert {role: Path(s.password_file).read_text().strip() for role, s in signed_in.items()} == passwords
    url = make_url(signed_in["reader"].url)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(host=url.host, port=url.port, user=url.username, dbname=url.database, password="guess")


def test_a_database_made_before_the_roles_is_given_to_the_owner(roles):
    """An older `jetscribe up` home: its database and tables belong to the superuser until the roles are made."""
    server, folder, _ = roles
    server.create_database("older")
    with server._connect("older") as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS sessions (x int)")
    owner = make_roles(server, folder / "pg-passwords", database="older")["owner"]
    with connect(owner) as conn:
        found = conn.execute("SELECT tableowner FROM pg_tables WHERE tablename = 'sessions'").fetchone()
    assert found == (ROLE_NAMES["owner"],)
    log = server.log_path.read_text()
    for password_file in (folder / "pg-passwords").iterdir():  # the server got verifiers, never a password
        assert password_file.read_text().strip() not in log


@pytest.mark.parametrize(
    "statement",
    [
        "DROP TABLE segments",
        "ALTER TABLE sessions ADD COLUMN x int",
        "CREATE TABLE mine (x int)",
        "CREATE SCHEMA mine",
        "CREATE TEMP TABLE mine (x int)",
        "DELETE FROM segments",
        "TRUNCATE sessions",
        "INSERT INTO other_table VALUES (1)",
        "SELECT * FROM other_table",
        "UPDATE alembic_version SET version_num = 'x'",
    ],
)
def test_the_persisters_role_writes_its_tables_only(roles, statement):
    with connect(roles[2]["persister"]) as conn, pytest.raises(REFUSED):
        conn.execute(statement)


@pytest.mark.parametrize(
    "statement",
    [
        "INSERT INTO sessions (tenant, session_id) VALUES ('t', 's')",
        "UPDATE sessions SET status = 'ended'",
        "DELETE FROM segments",
        "CREATE TABLE mine (x int)",
        "DROP TABLE sessions",
        "TRUNCATE segments",
    ],
)
def test_the_readers_role_only_reads(roles, statement):
    with connect(roles[2]["reader"]) as conn, pytest.raises(REFUSED):
        conn.execute(statement)


async def test_each_role_does_its_job(roles, nats_url, tmp_path, monkeypatch, capsys):
    signed_in = roles[2]
    persister, reader = signed_in["persister"], signed_in["reader"]
    nc = await nats.connect(nats_url, **env_connect_options(nats_url))
    await ensure_streams(nc.jetstream(), StreamSettings(nats_url=nats_url))
    tenant = f"r{uuid.uuid4().hex[:8]}"
    await nc.jetstream().publish(
        subjects.transcript(tenant, "s1"), wire.encode(two_word_final(tenant, "s1", "only", "mine"))
    )
    await nc.close()
    stop = asyncio.Event()
    config = PersisterConfig(database_url=persister.url, postgres=persister.client(), retry_max_s=0.5)
    task = asyncio.create_task(run_persister(StreamSettings(nats_url=nats_url), config, stop))
    engine = open_engine(reader.url, reader.client())
    try:
        for _ in range(400):
            assert not task.done(), task.result()
            if await final_segments(engine, tenant, "s1"):
                break
            await asyncio.sleep(0.05)
        assert [row.text for row in await final_segments(engine, tenant, "s1")] == ["only mine"]
    finally:
        await engine.dispose()
        stop.set()
        await asyncio.wait_for(task, 10)

    # The CLI, in a folder whose stack.json names the roles (as `jetscribe up` writes it): reads as the reader,
    # `jetscribe db` as the owner; neither URL holds a password.
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("JETSCRIBE_PG_PASSWORD_FILE", raising=False)
    monkeypatch.setenv("JETSCRIBE_HOME", str(tmp_path))
    roles_json = {role: {"url": s.url, "password_file": s.password_file} for role, s in signed_in.items()}
    info = {"pid": os.getpid(), "database_url": signed_in["owner"].url, "database_roles": roles_json}
    (tmp_path / "stack.json").write_text(json.dumps(info))
    assert await asyncio.to_thread(cli.main, ["transcript", "s1", "--tenant", tenant]) == 0
    assert "only mine" in capsys.readouterr().out
    assert await asyncio.to_thread(cli.main, ["db", "current"]) == 0
    assert "the newest revision" in capsys.readouterr().out
    # the reader role cannot run `jetscribe db upgrade`: the schema is the owner's
    monkeypatch.setenv("DATABASE_URL", reader.url)
    monkeypatch.setenv("JETSCRIBE_PG_PASSWORD_FILE", reader.password_file)
    monkeypatch.setenv("JETSCRIBE_PG_READER_ROLE", ROLE_NAMES["reader"])
    assert await asyncio.to_thread(cli.main, ["db", "upgrade"]) == 2  # Postgres itself would only warn
    assert "jetscribe_reader does not own the tables (jetscribe_owner does)" in capsys.readouterr().err


def test_the_compose_roles_script_makes_the_roles_with_no_password_on_a_command_line(tmp_path):
    """deploy/postgres/roles.sh, as the postgres image runs it at its first start (psql through the Unix socket as
    the superuser), against a real server: each role signs in with its secret, and no psql it ran had a password
    in its arguments (what `ps` shows every user)."""
    from jetscribe.devstack.servers import POSTGRES_BIN_PATH

    secrets = tmp_path / "secrets"
    secrets.mkdir()
    passwords = {role: uuid.uuid4().hex for role in ROLE_NAMES}
    for role, password in passwords.items():
        (secrets / f"pg_{role}_password").write_text(password + "\n")
    seen = tmp_path / "psql-argv"
    wrapper = tmp_path / "bin" / "psql"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> {seen}\nexec {POSTGRES_BIN_PATH / "psql"} "$@"\n')
    wrapper.chmod(0o755)
    script = Path(__file__).parents[2] / "deploy" / "postgres" / "roles.sh"
    with PostgresServer(tmp_path / "server", fast=True, passwords=True) as server:
        server.create_database("app")
        env = {
            **os.environ,
            "PATH": f"{wrapper.parent}:{os.environ['PATH']}",
            "PGHOST": str(server.socket_dir),
            "PGPORT": str(server.port),
            "POSTGRES_USER": "postgres",
            "POSTGRES_DB": "app",
            "JETSCRIBE_SECRETS_DIR": str(secrets),
        }
        # A secret missing: it stops, rather than make a role without a password (psql would take an empty one).
        unset = {**env, "JETSCRIBE_SECRETS_DIR": str(tmp_path / "none")}
        done = subprocess.run(["sh", str(script)], env=unset, capture_output=True, text=True, timeout=60)
        assert done.returncode != 0 and "pg_owner_password" in done.stderr
        done = subprocess.run(["sh", str(script)], env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        for role, name in ROLE_NAMES.items():
            with psycopg.connect(
                host=server.host, port=server.port, user=name, dbname="app", password=passwords[role]
            ) as conn:
                owner = conn.execute("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'app'").fetchone()
            assert owner == (ROLE_NAMES["owner"],)
    argvs = seen.read_text()
    assert argvs.count("\n") >= 4  # the three roles and the database's owner
    for password in passwords.values():
        assert password not in argvs


async def test_a_password_file_given_anew_is_read_at_the_next_connect(roles, tmp_path):
    """JETSCRIBE_PG_PASSWORD_FILE is read at each connect: a long-lived engine (the persister's) signs in again with a
    rotated password once its connection is gone, not with the one read when it started."""
    from sqlalchemy import text

    from jetscribe.shared.config import PostgresClient

    server = roles[0]
    password_file = tmp_path / "rotating.password"
    password_file.write_text("first-password\n")
    server.create_role("rotating", "first-password")
    url = server.url_of("rotating", "roles")
    engine = open_engine(url, PostgresClient(password_file=str(password_file)))
    try:
        async with engine.connect() as conn:
            assert (await conn.execute(text("SELECT 1"))).scalar() == 1
        server.create_role("rotating", "second-password")  # rotated: the server, then the file
        password_file.write_text("second-password\n")
        await engine.dispose()  # the pooled connection is gone, as after a Postgres restart
        async with engine.connect() as conn:
            assert (await conn.execute(text("SELECT current_user"))).scalar() == "rotating"
    finally:
        await engine.dispose()
