"""Chaos: the persister, nats-server and PostgreSQL fail under a live session; nothing is lost.

One transcriber, the ingest gateway and the persister run as real processes against the test's own
nats-server (file store); the bot streams a 22.6 s two-voice dialog from this process. Each test
reports takeover time, words lost and segments duplicated (see tests/chaos/harness.py, ChaosSummary).
"""

import asyncio
import time

import pytest

from jetscribe.shared import subjects
from tests.chaos.harness import (
    Findings,
    Live,
    check_audio_acked,
    connect,
    dialog_speech,
    first_after,
    first_stored_since,
    first_write_after,
    settle_and_check,
    stream,
)

pytestmark = pytest.mark.chaos

SPEED = 2.0
MAX_WER_VS_BASELINE = 0.03
MAX_WER_VS_REFERENCE = 0.15  # sanity: tiny.en reads this dialog at about 0.06


def one_worker_stack(make_stack, nats_server, database_url):
    stack = make_stack(nats_server, database_url)
    stack.start_ingest()
    stack.start_persister()
    stack.start_transcriber("w1")
    stack.wait_ready()
    return stack


def assert_no_findings(findings: Findings, summary) -> None:
    summary.problems = list(findings.problems)
    assert not findings, "\n".join(findings.problems)


def check_words(summary, findings: Findings) -> None:
    if summary.wer_vs_baseline > MAX_WER_VS_BASELINE:
        findings.add(
            f"WER vs the no-fault run {summary.wer_vs_baseline:.3f} > {MAX_WER_VS_BASELINE}: "
            f"{summary.extra.get('text')!r}"
        )
    if summary.wer_vs_reference > MAX_WER_VS_REFERENCE:
        findings.add(f"WER vs the script {summary.wer_vs_reference:.3f} > {MAX_WER_VS_REFERENCE}")


@pytest.mark.timeout(120)
async def test_persister_killed_mid_stream_and_restarted(chaos_nats, chaos_db, make_stack, summary, tenant, baseline):
    """kill -9 the persister just as a final reaches it (likely mid-batch), restart it a second later:
    every segment ends up in Postgres exactly once, as published."""
    speech = dialog_speech()
    stack = one_worker_stack(make_stack, chaos_nats, chaos_db)
    persister = stack.services["persister"]
    findings = Findings()
    nc = await connect(stack.nats_url)
    try:
        js = nc.jetstream()
        live = Live(SPEED, speech.duration_s).start()
        bot = asyncio.create_task(stream(nc, speech, tenant, "s1", SPEED, on_segment=live.on_segment))
        await live.until(lambda: live.just_finalised(0.3, fresh_s=0.1), 30, "a final past 30 % of the audio")
        killed_at = persister.kill()
        info = await js.consumer_info(subjects.TRANSCRIPTS_STREAM, subjects.PERSISTER_CONSUMER)
        summary.extra["unacked_at_kill"] = info.num_ack_pending  # a batch in flight: back after ack_wait
        await asyncio.sleep(1.0)
        restarted_at = time.time()
        persister.start()  # from this thread: the child dies with it (PR_SET_PDEATHSIG)
        await persister.ready()
        await bot
        # A batch the killed persister had fetched but not acked must come back at once (the new one
        # resets the consumer to its ack floor), not after the consumer's 60 s ack_wait: the default
        # drain timeout and the check that `ended` is never stored before its finals say so.
        found, _ = await settle_and_check(stack, js, tenant, "s1", speech, baseline["dialog"], summary, findings)
        await check_audio_acked(js, findings)
        first = first_write_after(found, killed_at)
        summary.takeover = "kill -9 of the persister -> its first row written to Postgres after the restart"
        summary.takeover_s = first - killed_at if first else None
        summary.outage_s = restarted_at - killed_at
        check_words(summary, findings)
        stack.check_alive()
    finally:
        await nc.close()
    assert_no_findings(findings, summary)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["stop", "kill"])
async def test_nats_restarted_mid_stream(chaos_nats, chaos_db, make_stack, summary, tenant, baseline, how):
    """Stop nats-server (file store; "stop": SIGTERM, "kill": SIGKILL) in the middle of an utterance,
    start it again 2 s later on the same port and store: every service and the bot reconnect by
    themselves; the session completes with nothing lost."""
    speech = dialog_speech()
    stack = one_worker_stack(make_stack, chaos_nats, chaos_db)
    findings = Findings()
    nc = await connect(stack.nats_url)
    try:
        js = nc.jetstream()
        live = Live(SPEED, speech.duration_s).start()
        bot = asyncio.create_task(stream(nc, speech, tenant, "s1", SPEED, on_segment=live.on_segment))
        _, summary.extra["interim_open_at_fault"] = await live.inside_turn(speech.turns[2])
        stopped_at = time.time()
        chaos_nats.stop() if how == "stop" else chaos_nats.kill()
        await asyncio.sleep(2.0)
        restarted_at = time.time()
        chaos_nats.start()
        for service in stack.services.values():
            await service.logged(r"reconnected to NATS", timeout=30)
        reconnected_at = time.time()
        await bot
        _, messages = await settle_and_check(stack, js, tenant, "s1", speech, baseline["dialog"], summary, findings)
        await check_audio_acked(js, findings)
        first = first_after(messages, restarted_at)
        summary.takeover = f"nats-server {how} -> the first segment stored in TRANSCRIPTS after it restarted"
        summary.takeover_s = first.stored_at - stopped_at if first else None
        summary.outage_s = restarted_at - stopped_at
        summary.extra["services_reconnected_s"] = round(reconnected_at - restarted_at, 3)
        audio_again = await first_stored_since(
            js, subjects.AUDIO_STREAM, subjects.audio_of_session(tenant, "s1"), restarted_at
        )
        summary.extra["audio_stored_again_s"] = round(audio_again - stopped_at, 3) if audio_again else None
        check_words(summary, findings)
        stack.check_alive()
    finally:
        await nc.close()
    assert_no_findings(findings, summary)


@pytest.mark.timeout(120)
async def test_postgres_stopped_for_10s_mid_stream(chaos_nats, own_postgres, make_stack, summary, tenant, baseline):
    """Stop PostgreSQL for 10 s while the dialog streams in real time: the persister retries (with
    JETSCRIBE_PERSIST_RETRY_MAX_S=1) and, once Postgres is back, stores everything, once."""
    from jetscribe.services.persister.migrate import upgrade

    speech = dialog_speech()
    speed = 1.0  # the outage lies inside the stream
    own_postgres.create_database("jetscribe")
    database_url = own_postgres.url("jetscribe")
    upgrade(database_url)
    stack = one_worker_stack(make_stack, chaos_nats, database_url)
    persister = stack.services["persister"]
    findings = Findings()
    nc = await connect(stack.nats_url)
    try:
        js = nc.jetstream()
        live = Live(speed, speech.duration_s).start()
        bot = asyncio.create_task(stream(nc, speech, tenant, "s1", speed, on_segment=live.on_segment))
        _, summary.extra["interim_open_at_fault"] = await live.inside_turn(speech.turns[1])
        stopped_at = time.time()
        await asyncio.to_thread(own_postgres.stop)
        await asyncio.sleep(10.0)
        restarted_at = time.time()
        await asyncio.to_thread(own_postgres.start)
        await bot
        found, _ = await settle_and_check(stack, js, tenant, "s1", speech, baseline["dialog"], summary, findings)
        await check_audio_acked(js, findings)
        retries = persister.output().count("; retry ")
        if not retries:
            findings.add("the persister never logged a failed write and retry during the outage")
        first = first_write_after(found, stopped_at)
        summary.takeover = "Postgres stopped -> the persister's first row written after it came back"
        summary.takeover_s = first - stopped_at if first else None
        summary.outage_s = restarted_at - stopped_at
        summary.extra["persister_retries_logged"] = retries
        check_words(summary, findings)
        stack.check_alive()
    finally:
        await nc.close()
    assert_no_findings(findings, summary)
