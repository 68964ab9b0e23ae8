"""Fixtures for the chaos tests (marker `chaos`): real nats-server, real PostgreSQL and the three
services as child processes, faults injected from the test, numbers reported per scenario.

- `chaos_nats`: a nats-server (JetStream, file store) of the test's own, so it may be restarted.
- `chaos_cluster`: three nats-servers in one cluster of the test's own (streams and buckets at three copies).
- `chaos_db`: a fresh, migrated database on the session's PostgreSQL (for tests that leave Postgres
  alone; a test that stops Postgres starts its own with `own_postgres`).
- `make_stack`: builds a `ChaosStack`; every service it started is stopped at teardown (SIGTERM,
  then SIGKILL), and the logs' tails are printed when the test failed.
- `summary`: the scenario's `ChaosSummary`; emitted at teardown (stdout line `CHAOS {...}`, and one JSON
  line appended to $JETSCRIBE_CHAOS_REPORT if set), passed or not.
- `baseline`: the no-fault transcripts of the scenario audio, made once per test session through
  the same processes and settings.

$JETSCRIBE_CHAOS_TRANSCRIBER names another module to run as the transcriber (python -m), e.g. a
variant under development; the services' own JETSCRIBE_* settings come from the harness only.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid

import pytest

from jetscribe.devstack.servers import NatsCluster, NatsServer, PostgresServer
from jetscribe.services.persister.migrate import upgrade
from tests.chaos.harness import (
    ChaosStack,
    ChaosSummary,
    connect,
    dialog_speech,
    short_speech,
    stored,
    stream,
    wait_persister_drained,
    wait_stored_ended,
)


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"chaos_rep_{report.when}", report)


def _failed(request) -> bool:
    return any(
        getattr(request.node, f"chaos_rep_{when}", None) is not None
        and getattr(request.node, f"chaos_rep_{when}").failed
        for when in ("setup", "call")
    )


@pytest.fixture
def chaos_nats(tmp_path):
    server = NatsServer(tmp_path / "nats")
    server.start()
    yield server
    server.kill() if server.running else None


@pytest.fixture
def chaos_cluster(tmp_path):
    """Three nats-servers in one JetStream cluster of the test's own, so its nodes may be killed and restarted;
    the services reach it through every node's URL and keep the streams and buckets in three copies."""
    cluster = NatsCluster(tmp_path / "nats-cluster", 3)
    cluster.start()
    yield cluster
    for node in cluster.nodes:
        node.kill() if node.running else None


@pytest.fixture
def chaos_db(postgres_server):
    name = f"chaos_{uuid.uuid4().hex[:12]}"
    postgres_server.create_database(name)
    url = postgres_server.url(name)
    upgrade(url)
    return url


@pytest.fixture
def own_postgres(tmp_path):
    """A PostgreSQL of this test's own (fsync off), for a test that stops it."""
    server = PostgresServer(tmp_path / "postgres", fast=True)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def make_stack(tmp_path, request):
    stacks: list[ChaosStack] = []

    def make(nats_server, database_url, **env) -> ChaosStack:
        stack = ChaosStack(tmp_path / f"stack{len(stacks)}", nats_server, database_url, **env)
        stacks.append(stack)
        return stack

    yield make
    failed = _failed(request)
    for stack in stacks:
        if failed:
            print(f"\n===== service logs ({stack.home}) =====\n{stack.logs(60)}")
        with contextlib.suppress(Exception):  # one stack failing to stop must not leave the others running
            stack.stop()
    for stack in stacks:  # nothing may outlive the test
        for service in stack.services.values():
            assert not service.running, f"{service.name} (pid {service.pid}) still running after teardown"


_SUMMARIES: list[ChaosSummary] = []


@pytest.fixture
def summary(request):
    started = time.monotonic()
    result = ChaosSummary(scenario=request.node.name)
    yield result
    result.passed = not _failed(request)
    result.wall_s = time.monotonic() - started
    if not result.passed and not result.problems:  # failed before its checks: say where
        for when in ("setup", "call"):
            report = getattr(request.node, f"chaos_rep_{when}", None)
            if report is not None and report.failed:
                crash = getattr(report.longrepr, "reprcrash", None)
                result.problems = [f"{when}: {crash.message if crash else str(report.longrepr)[-500:]}"]
    result.emit()
    _SUMMARIES.append(result)


def pytest_terminal_summary(terminalreporter):
    """The scenarios' numbers at the end of every run that had some (the full JSON lines go to stdout and
    to $JETSCRIBE_CHAOS_REPORT)."""
    if not _SUMMARIES:
        return
    terminalreporter.section("chaos: takeover, words lost, segments duplicated, writes by a fenced owner")

    def num(value, unit=""):
        return "-" if value is None else (f"{value:.2f}{unit}" if isinstance(value, float) else f"{value}{unit}")

    for s in _SUMMARIES:
        terminalreporter.write_line(
            f"{'PASS' if s.passed else 'FAIL'} {s.scenario}: takeover {num(s.takeover_s, ' s')} "
            f"(outage {num(s.outage_s, ' s')}), words lost {num(s.words_lost)}, segments duplicated "
            f"{num(s.segments_duplicated)}, stored by a fenced owner {num(s.stale_stored)} (refused "
            f"{num(s.stale_refused)}), WER vs no-fault {num(s.wer_vs_baseline)}, vs script "
            f"{num(s.wer_vs_reference)}, {num(s.sessions)} session(s), {num(s.segments)} finals, "
            f"workers {','.join(s.workers) or '-'}, {num(s.wall_s, ' s')}"
        )


@pytest.fixture
def tenant():
    return f"chaos{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
async def baseline(tmp_path_factory, postgres_server):
    """{"dialog": text, "short": text}: what the pipeline stores for each scenario audio with no fault
    (one transcriber, streamed at twice real time as the fault runs are, both sessions at once), made once
    per test session."""
    home = tmp_path_factory.mktemp("chaos-baseline")
    name = f"chaos_baseline_{uuid.uuid4().hex[:8]}"
    postgres_server.create_database(name)
    url = postgres_server.url(name)
    upgrade(url)
    server = NatsServer(home / "nats")
    server.start()
    stack = ChaosStack(home, server, url)
    try:
        stack.start_ingest()
        stack.start_persister()
        stack.start_transcriber("base1")
        stack.wait_ready()
        nc = await connect(server.url)
        try:
            speeches = {"dialog": dialog_speech(), "short": short_speech()}
            await asyncio.gather(*(stream(nc, speech, "baseline", key, 2.0) for key, speech in speeches.items()))
            for key in speeches:
                await wait_stored_ended(url, "baseline", key, 60.0)
            await wait_persister_drained(nc.jetstream())
            texts = {key: (await stored(url, "baseline", key)).text for key in speeches}
        finally:
            await nc.close()
    except BaseException:
        print(f"\n===== baseline service logs =====\n{stack.logs(60)}")
        raise
    finally:
        try:
            stack.stop()
        finally:
            server.stop()
    print(f"\nchaos baseline: {texts}")
    return texts
