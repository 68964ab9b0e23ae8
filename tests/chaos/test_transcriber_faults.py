"""Chaos: transcribers die, stop and share the load; partitions move without loss or double work.

The transcribers form the partition consumer group (services/transcriber/group.py) with a 3 s lease
TTL, 0.5 s heartbeat and 10 s AUDIO ack_wait, so a dead worker's partitions should move within
TAKEOVER_BOUND_S. Every test waits for the group to settle (all 16 leases held, every worker holding
some) before any audio flows.
"""

import asyncio
import importlib.util
import time
from collections import Counter, defaultdict

import pytest

from jetscribe.evaluation.speakers import bot_turns, script_speaker, speaker_errors, words_split_wrongly
from jetscribe.shared import subjects
from jetscribe.shared.wire import SessionCheckpoint, decode
from tests.chaos.harness import (
    ACK_WAIT_S,
    PARTITIONS,
    TAKEOVER_BOUND_S,
    Findings,
    Live,
    Tap,
    check_audio_acked,
    check_transcript,
    claims_made,
    concurrent_workers,
    connect,
    dialog_speech,
    duplicated_finals,
    final_segments_published,
    first_after,
    lease_holders,
    published,
    seq_overlaps,
    settle_and_check,
    short_speech,
    stale_writes,
    stored,
    stream,
    wait_group_settled,
    wait_persister_drained,
    wait_stored_ended,
    word_diff,
)

pytestmark = pytest.mark.chaos

SPEED = 2.0
MAX_WER_VS_BASELINE = 0.03
MAX_WER_VS_REFERENCE = 0.15


def group_stack(make_stack, nats_server, database_url, workers, **env):
    stack = make_stack(nats_server, database_url)
    stack.start_ingest()
    stack.start_persister()
    for worker in workers:
        stack.start_transcriber(worker, **env)
    stack.wait_ready()
    return stack


async def watch_leases(js, survivor: str, since: float, until: asyncio.Event) -> float | None:
    """Seconds from `since` until `survivor` holds every partition's lease (None if not before `until`)."""
    while not until.is_set():
        holders = await lease_holders(js)
        if len(holders) == PARTITIONS and set(holders.values()) == {survivor}:
            return time.time() - since
        await asyncio.sleep(0.1)
    return None


async def hand_over(
    make_stack,
    chaos_nats,
    chaos_db,
    summary,
    tenant,
    baseline,
    fault: str,
    speakers: bool = False,
    voices: bool = False,
) -> Findings:
    """Two workers; the dialog streams at speed 2; in the middle of an utterance the worker that owns
    the session gets `fault` ("kill": SIGKILL, "term": SIGTERM). The other must finish the session with
    nothing lost, nothing twice, and no moment where both worked on it.

    With `speakers` the bot says who talks, each change early in the pause before a turn: the change to the
    turn under way at the fault is in audio acked before it, so only the checkpoint tells the next owner.

    With `voices` the workers label speakers from the audio and the fault comes in B's second turn: a survivor
    that started its speakers afresh would call B by the first label, which A had."""
    speech = dialog_speech()
    workers = ["w1", "w2"]
    env = {"JETSCRIBE_SPEAKERS_AUDIO": "on"} if voices else {}
    stack = group_stack(make_stack, chaos_nats, chaos_db, workers, **env)
    findings = Findings()
    done = asyncio.Event()  # ends watch_leases
    leases = None
    nc = await connect(stack.nats_url)
    try:
        js = nc.jetstream()
        before = await wait_group_settled(js, workers)
        summary.extra["partitions_before"] = dict(Counter(before.values()))
        tap = await Tap(nc, tenant).start()
        live = Live(SPEED, speech.duration_s).start()
        said = {"speaker_turns": bot_turns(speech.turns, into_pause=0.1)} if speakers else {}
        bot = asyncio.create_task(
            stream(nc, speech, tenant, "s1", SPEED, on_segment=live.on_segment, wait_s=60, **said)
        )
        if voices:  # the owner has heard both voices (A's and B's first finals) before it dies
            await live.until(lambda: len(finals_with_text(live)) >= 2, 60, "the first two finals")
        # Halfway through the third turn ("We sold forty trays ..."), or the fourth (B's) for `voices`: the owner
        # has that utterance open.
        latest, interim_open = await live.inside_turn(speech.turns[3 if voices else 2])
        victim = latest.worker_id  # the worker that owns the session now
        survivor = next(w for w in workers if w != victim)
        summary.extra.update(
            victim=victim,
            fault=fault,
            fault_at_audio_s=round(live.audio_s, 2),
            interim_open_at_fault=interim_open,
            latest_heard=(latest.segment_id, latest.status, latest.text),
        )
        leases = asyncio.create_task(watch_leases(js, survivor, time.time(), done))
        if fault == "kill":
            fault_at = stack.transcriber(victim).kill()
        else:
            fault_at, code, exit_s = await stack.transcriber(victim).sigterm(timeout=30)
            summary.extra.update(exit_code=code, exit_s=round(exit_s, 3) if exit_s is not None else None)
            if code != 0:
                findings.add(f"{victim} exited with {code} after SIGTERM (None: still running after 30 s)")
        try:
            await bot
        except TimeoutError:
            findings.add(
                f"the session never ended: after {fault} of {victim}, the bot waited 60 s for `ended` "
                f"in vain (segments heard after the fault: "
                f"{[(s.worker_id, s.segment_id, s.status) for t, s in live.heard if t > fault_at]})"
            )
            return findings
        found, messages = await settle_and_check(
            stack, js, tenant, "s1", speech, baseline["dialog"], summary, findings, heard=tap.of("s1")
        )
        done.set()
        lease_s = await leases
        await check_audio_acked(js, findings, timeout=ACK_WAIT_S + 15)

        first = first_after(messages, fault_at, worker=survivor)
        summary.takeover = (
            f"{'kill -9' if fault == 'kill' else 'SIGTERM'} of the session's worker -> the first "
            f"segment of that session stored from the other worker"
        )
        summary.takeover_s = first.stored_at - fault_at if first else None
        summary.extra["lease_takeover_s"] = round(lease_s, 3) if lease_s is not None else None
        if lease_s is None or lease_s > TAKEOVER_BOUND_S:
            findings.add(
                f"{survivor} did not hold all {PARTITIONS} partition leases within {TAKEOVER_BOUND_S} s "
                f"(took {lease_s})"
            )
        # A drain first finishes what the victim can (that is no loss), so after SIGTERM the bound runs
        # from the victim's exit; after kill -9, from the kill.
        bound = TAKEOVER_BOUND_S + (summary.extra.get("exit_s") or 0.0)
        if first is None:
            findings.add(f"{survivor} never published a segment of the session after {victim} was stopped")
        elif summary.takeover_s > bound:
            findings.add(f"takeover took {summary.takeover_s:.1f} s > {bound:.1f} s")
        after = [p.message.worker_id for p in messages if p.stored_at > fault_at + 0.5 and p.message.worker_id]
        if victim in after and fault == "kill":
            findings.add(f"{victim} published after it was killed: {after}")
        findings.problems += concurrent_workers(messages + tap.of("s1"))
        if summary.wer_vs_baseline > MAX_WER_VS_BASELINE:
            findings.add(
                f"WER vs the no-fault run {summary.wer_vs_baseline:.3f} > {MAX_WER_VS_BASELINE}: {found.text!r}"
            )
        if summary.wer_vs_reference > MAX_WER_VS_REFERENCE:
            findings.add(f"WER vs the script {summary.wer_vs_reference:.3f} > {MAX_WER_VS_REFERENCE}")
        summary.extra["segments"] = [(r.segment_id, r.seq_first, r.seq_last, r.worker_id) for r in found.finals]
        if speakers:
            finals = [(r.start_s, r.end_s, r.speaker, r.text) for r in found.finals]
            findings.problems += speaker_errors(speech.turns, finals)
            findings.problems += words_split_wrongly(speech.turns, [(r.speaker, r.words) for r in found.finals])
            summary.extra["speakers"] = [(r.segment_id, r.speaker, r.worker_id) for r in found.finals]
        if voices:
            findings.problems += await voice_problems(js, tenant, speech, found.finals, victim, survivor)
            summary.extra["voices"] = [(r.segment_id, r.speaker, r.worker_id, r.text[:20]) for r in found.finals]
        stack.check_alive(*(n for n in stack.services if n != f"transcriber-{victim}"))
    finally:
        done.set()
        if leases is not None:
            await asyncio.gather(leases, return_exceptions=True)
        await nc.close()
    return findings


def finals_with_text(live) -> set[int]:
    return {s.segment_id for _, s in live.heard if s.status == "final" and s.text}


async def voice_problems(js, tenant, speech, finals, victim, survivor) -> list[str]:
    """Speakers from the audio across a takeover: both workers labelled finals, each script speaker has one label
    all session long, the two labels differ, and the last checkpoint's voices were built from the whole session
    (the survivor carried the victim's centroids on)."""
    problems = []
    labels: dict[str, set[str]] = defaultdict(set)
    for r in finals:
        if r.text:
            labels[script_speaker(speech.turns, r.start_s, r.end_s)].add(f"{r.speaker}")
            if r.speaker_source != "audio":
                problems.append(f"final {r.segment_id} {r.text!r}: speaker_source {r.speaker_source!r}")
    if any(len(v) != 1 for v in labels.values()) or len(set().union(*labels.values())) != len(labels):
        problems.append(f"labels by script speaker across the takeover: {dict(labels)}")
    if {r.worker_id for r in finals if r.text} != {victim, survivor}:
        problems.append(f"finals by {sorted({r.worker_id for r in finals})}: not both workers'")
    entry = await (await js.key_value(subjects.SESSION_CHECKPOINTS_BUCKET)).get(subjects.checkpoint_key(tenant, "s1"))
    checkpoint = decode(entry.value, SessionCheckpoint)
    speech_s = sum(t.end_s - t.start_s for t in speech.turns)
    heard_s = sum(v.seconds for v in checkpoint.voices)
    if len(checkpoint.voices) != 2 or heard_s < 0.8 * speech_s:
        problems.append(
            f"last checkpoint's voices {[(v.label, v.seconds) for v in checkpoint.voices]}: "
            f"{heard_s:.1f} s of the script's {speech_s:.1f} s of speech"
        )
    return problems


@pytest.mark.timeout(150)
async def test_transcriber_killed_mid_utterance(chaos_nats, chaos_db, make_stack, summary, tenant, baseline):
    """kill -9 the worker owning the session mid-utterance: the other takes its partitions over within
    10 s; the Postgres transcript has no gap and no duplicate; WER vs the no-fault run <= 0.03."""
    findings = await hand_over(make_stack, chaos_nats, chaos_db, summary, tenant, baseline, "kill")
    summary.problems = list(findings.problems)
    assert not findings, "\n".join(findings.problems)


@pytest.mark.timeout(150)
async def test_transcriber_killed_keeps_the_speakers(chaos_nats, chaos_db, make_stack, summary, tenant, baseline):
    """kill -9 the session's worker mid-utterance while the bot says who talks: the other worker carries the
    speaker on from the checkpoint, and every stored final and word has the script's speaker."""
    findings = await hand_over(make_stack, chaos_nats, chaos_db, summary, tenant, baseline, "kill", speakers=True)
    summary.problems = list(findings.problems)
    assert not findings, "\n".join(findings.problems)


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="the `speakers` extra (make test installs it)")
@pytest.mark.timeout(180)
async def test_transcriber_killed_keeps_the_voices(chaos_nats, chaos_db, make_stack, summary, tenant, baseline):
    """kill -9 the session's worker mid-utterance while it labels speakers from the audio: the survivor restores
    the voices from the checkpoint, so each speaker keeps its label across the takeover."""
    findings = await hand_over(make_stack, chaos_nats, chaos_db, summary, tenant, baseline, "kill", voices=True)
    summary.problems = list(findings.problems)
    assert not findings, "\n".join(findings.problems)


@pytest.mark.timeout(150)
async def test_transcriber_sigterm_drains_and_hands_over(chaos_nats, chaos_db, make_stack, summary, tenant, baseline):
    """SIGTERM the worker owning the session mid-utterance: it drains, hands its partitions over and
    exits 0; the other finishes the session with nothing lost and nothing twice."""
    findings = await hand_over(make_stack, chaos_nats, chaos_db, summary, tenant, baseline, "term")
    summary.problems = list(findings.problems)
    assert not findings, "\n".join(findings.problems)


@pytest.mark.timeout(240)
async def test_three_workers_thirty_sessions(chaos_nats, chaos_db, make_stack, summary, tenant, baseline):
    """3 workers x 30 concurrent sessions (5 s each, speed 2): every session is processed by one worker
    at a time (from segment metadata: worker ids, publish times and audio seq ranges never overlap),
    and every transcript is whole and single."""
    speech = short_speech()
    workers = ["w1", "w2", "w3"]
    sessions = [f"s{i:02d}" for i in range(30)]
    stack = group_stack(make_stack, chaos_nats, chaos_db, workers)
    findings = Findings()
    nc = await connect(stack.nats_url)
    try:
        js = nc.jetstream()
        before = await wait_group_settled(js, workers)
        summary.extra["partitions_before"] = dict(Counter(before.values()))
        tap = await Tap(nc, tenant).start()
        started = time.monotonic()
        results = await asyncio.gather(
            *(stream(nc, speech, tenant, s, SPEED, wait_s=150) for s in sessions), return_exceptions=True
        )
        for session_id, result in zip(sessions, results, strict=False):
            if isinstance(result, BaseException):
                findings.add(f"{session_id}: the bot failed: {result!r}")
        for session_id in sessions:
            await wait_stored_ended(stack.database_url, tenant, session_id, timeout=60)
        summary.extra["all_ended_s"] = round(time.monotonic() - started, 3)
        try:
            await wait_persister_drained(js)
        except TimeoutError as exc:
            findings.add(str(exc))
        await check_audio_acked(js, findings, timeout=ACK_WAIT_S + 15)

        by_session = defaultdict(list)
        for item in await published(js, tenant):
            by_session[item.message.session_id].append(item)
        claims = await claims_made(js)
        per_worker, shared, lost, dup, republished, texts = Counter(), [], 0, 0, 0, []
        for session_id in sessions:
            messages = by_session[session_id]
            found = await stored(stack.database_url, tenant, session_id)
            session_findings = Findings()
            check_transcript(found, messages, session_findings)
            session_findings.problems += concurrent_workers(messages + tap.of(session_id))
            session_findings.problems += stale_writes(messages, claims)
            findings.problems += [f"{session_id}: {p}" for p in session_findings.problems]
            who = sorted({p.message.worker_id for p in messages + tap.of(session_id) if p.message.worker_id})
            per_worker.update(who)
            if len(who) > 1:
                shared.append((session_id, who))
            diff = word_diff(baseline["short"], found.text)
            lost += diff.deleted
            texts.append(found.text)
            dup += len(duplicated_finals(final_segments_published(messages + tap.of(session_id))))
            dup += len(seq_overlaps(found.finals))
            republished += sum(1 for versions in final_segments_published(messages).values() if len(versions) > 1)
        all_vs_base = word_diff(" ".join([baseline["short"]] * len(sessions)), " ".join(texts))
        all_vs_ref = word_diff(" ".join([speech.text] * len(sessions)), " ".join(texts))
        summary.sessions = len(sessions)
        summary.segments = sum(len(final_segments_published(by_session[s])) for s in sessions)
        summary.workers = sorted(per_worker)
        summary.words_lost = lost
        summary.words_inserted = all_vs_base.inserted
        summary.words_substituted = all_vs_base.substituted
        summary.segments_duplicated = dup
        summary.finals_republished = republished
        summary.wer_vs_baseline = all_vs_base.wer
        summary.wer_vs_reference = all_vs_ref.wer
        summary.extra.update(sessions_per_worker=dict(per_worker), sessions_on_two_workers=shared)
        summary.takeover = "no fault: no takeover expected"
        if len(per_worker) < len(workers):
            findings.add(f"not every worker got sessions: {dict(per_worker)}")
        if all_vs_base.wer > MAX_WER_VS_BASELINE:
            findings.add(f"WER of all sessions vs the no-fault run {all_vs_base.wer:.3f} > {MAX_WER_VS_BASELINE}")
        stack.check_alive()
    finally:
        await nc.close()
    summary.problems = list(findings.problems)
    assert not findings, "\n".join(findings.problems[:40])
