"""Chaos on a three-node NATS cluster: AUDIO, TRANSCRIPTS and the KV buckets in three copies (JETSCRIBE_REPLICAS
auto), the services and the bot connected through every node's URL. A node is killed (the AUDIO stream's leader,
or one that leads neither AUDIO nor TRANSCRIPTS), a node is restarted, or the session's transcriber freezes
(SIGSTOP) past its lease while another takes its partitions over. Each time: no word lost against the no-fault
run, no segment twice, nothing stored by a fenced owner (every segment and event names the claim it was written
under, and none was stored after a later claim: harness.stale_writes)."""

import asyncio
import json
import re
import time
from collections import Counter

import pytest

from jetscribe.shared import subjects
from jetscribe.shared.wire import Segment
from tests.chaos.harness import (
    PARTITIONS,
    TAKEOVER_BOUND_S,
    CheckpointTap,
    Findings,
    Live,
    Tap,
    check_audio_acked,
    claim_of,
    claims_made,
    connect,
    dialog_speech,
    first_after,
    first_stored_since,
    lease_holders,
    settle_and_check,
    stream,
    wait_group_settled,
)

pytestmark = pytest.mark.chaos

SPEED = 2.0
MAX_WER_VS_BASELINE = 0.03
MAX_WER_VS_REFERENCE = 0.15
# A killed leader's streams elect another after NATS's raft election timeout (4-9 s), then the services
# catch up: a segment after the fault within this.
CLUSTER_TAKEOVER_BOUND_S = 25.0
LEADERS_OF = (
    subjects.AUDIO_STREAM,
    subjects.TRANSCRIPTS_STREAM,
    f"KV_{subjects.PARTITION_LEASES_BUCKET}",
    f"KV_{subjects.SESSION_CHECKPOINTS_BUCKET}",
)


def cluster_stack(make_stack, cluster, database_url, workers=("w1",)):
    stack = make_stack(cluster, database_url)  # NATS_URL: every node's URL
    stack.start_ingest()
    stack.start_persister()
    for worker in workers:
        stack.start_transcriber(worker)
    stack.wait_ready()
    return stack


async def stream_cluster(nc, stream_name: str) -> dict:
    """The stream's `cluster` info: its leader and its replicas, by node name."""
    reply = await nc.request(f"$JS.API.STREAM.INFO.{stream_name}", b"", timeout=3)
    info = json.loads(reply.data)
    if "error" in info:
        raise RuntimeError(f"STREAM.INFO {stream_name}: {info['error']}")
    return info.get("cluster", {})


async def leaders(nc) -> dict[str, str]:
    return {name: (await stream_cluster(nc, name)).get("leader", "") for name in LEADERS_OF}


async def new_leader(nc, stream_name: str, old: str, since: float, timeout: float = 30.0) -> tuple[str, float]:
    """Wait until `stream_name` has a leader other than `old`; (its name, seconds from `since`)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            leader = (await stream_cluster(nc, stream_name)).get("leader")
        except Exception:  # no leader to answer yet, or our connection is moving to another node
            leader = None
        if leader and leader != old:
            return leader, time.time() - since
        if time.monotonic() > deadline:
            raise TimeoutError(f"{stream_name} has no leader other than {old} {timeout:.0f} s after it was lost")
        await asyncio.sleep(0.1)


def check_outcome(summary, findings: Findings) -> None:
    """What every scenario must show: the no-fault run's words, each segment once."""
    if summary.words_lost:
        findings.add(f"{summary.words_lost} words lost against the no-fault run: {summary.extra.get('text')!r}")
    if summary.segments_duplicated:
        findings.add(f"{summary.segments_duplicated} segments duplicated")
    if summary.wer_vs_baseline > MAX_WER_VS_BASELINE:
        findings.add(f"WER vs the no-fault run {summary.wer_vs_baseline:.3f} > {MAX_WER_VS_BASELINE}")
    if summary.wer_vs_reference > MAX_WER_VS_REFERENCE:
        findings.add(f"WER vs the script {summary.wer_vs_reference:.3f} > {MAX_WER_VS_REFERENCE}")


async def node_fault(chaos_cluster, chaos_db, make_stack, summary, tenant, baseline, fault: str) -> Findings:
    """One transcriber; the dialog streams at speed 2; halfway through its third turn a node fails: "leader"
    (kill -9 the AUDIO leader), "follower" (kill -9 a node leading neither AUDIO nor TRANSCRIPTS) or "restart"
    (SIGTERM the TRANSCRIPTS leader, start it again 2 s later on the same store)."""
    speech = dialog_speech()
    stack = cluster_stack(make_stack, chaos_cluster, chaos_db)
    findings = Findings()
    nc = await connect(stack.nats_url)
    try:
        js = nc.jetstream()
        before = await leaders(nc)
        summary.extra["leaders_before"] = before
        tap = await Tap(nc, tenant).start()
        live = Live(SPEED, speech.duration_s).start()
        bot = asyncio.create_task(stream(nc, speech, tenant, "s1", SPEED, on_segment=live.on_segment))
        _, summary.extra["interim_open_at_fault"] = await live.inside_turn(speech.turns[2])
        if fault == "leader":
            victim = before[subjects.AUDIO_STREAM]
        elif fault == "follower":
            led = Counter(before.values())
            others = [n.server_name for n in chaos_cluster.nodes if n.server_name != before[subjects.AUDIO_STREAM]]
            victim = min(others, key=lambda name: (name == before[subjects.TRANSCRIPTS_STREAM], led[name]))
        else:
            victim = before[subjects.TRANSCRIPTS_STREAM]
        node = chaos_cluster.node(victim)
        summary.extra.update(fault=fault, node=victim, fault_at_audio_s=round(live.audio_s, 2))
        summary.extra["node_led"] = sorted(name for name, leader in before.items() if leader == victim)
        fault_at = time.time()
        if fault == "restart":
            await asyncio.to_thread(node.stop)
            summary.extra["node_stopped_s"] = round(time.time() - fault_at, 3)
            await asyncio.sleep(2.0)
            restarted_at = time.time()
            await asyncio.to_thread(node.start)
            await asyncio.to_thread(chaos_cluster.wait_healthy, [node], 60.0)
            summary.outage_s = restarted_at - fault_at
            summary.extra["node_current_again_s"] = round(time.time() - fault_at, 3)
        else:
            node.kill()
        for name in summary.extra["node_led"] if fault != "restart" else ():
            _, seconds = await new_leader(nc, name, victim, fault_at)
            summary.extra[f"{name}_leader_elected_s"] = round(seconds, 3)
        await bot
        found, messages = await settle_and_check(
            stack, js, tenant, "s1", speech, baseline["dialog"], summary, findings, heard=tap.of("s1")
        )
        await check_audio_acked(js, findings)
        first = first_after(messages, fault_at)
        audio_again = await first_stored_since(
            js, subjects.AUDIO_STREAM, subjects.audio_of_session(tenant, "s1"), fault_at
        )
        summary.extra["audio_stored_again_s"] = round(audio_again - fault_at, 3) if audio_again else None
        summary.extra["segment_stored_again_s"] = round(first.stored_at - fault_at, 3) if first else None
        what = {
            "leader": "kill -9 of the AUDIO leader",
            "follower": "kill -9 of a node leading neither AUDIO nor TRANSCRIPTS",
            "restart": "SIGTERM of the TRANSCRIPTS leader (started again 2 s later)",
        }[fault]
        summary.takeover = f"{what} -> audio stored in AUDIO and a segment stored in TRANSCRIPTS again (the later)"
        if first is None or audio_again is None:
            findings.add(f"nothing stored after the fault: segment {first}, audio {audio_again}")
        else:
            summary.takeover_s = max(first.stored_at, audio_again) - fault_at
            if summary.takeover_s > CLUSTER_TAKEOVER_BOUND_S:
                findings.add(f"the pipeline moved again only {summary.takeover_s:.1f} s after the fault")
        summary.extra["leaders_after"] = await leaders(nc)
        summary.extra["partitions_lapsed"] = stack.transcriber("w1").output().count(": lost partition")
        check_outcome(summary, findings)
        stack.check_alive()
    finally:
        await nc.close()
    return findings


@pytest.mark.timeout(150)
async def test_audio_leader_killed_mid_utterance(chaos_cluster, chaos_db, make_stack, summary, tenant, baseline):
    """kill -9 the node leading the AUDIO stream mid-utterance: the other two elect a leader, the gateway, worker
    and bot carry on through them; the transcript equals the no-fault run's."""
    findings = await node_fault(chaos_cluster, chaos_db, make_stack, summary, tenant, baseline, "leader")
    summary.problems = list(findings.problems)
    assert not findings, "\n".join(findings.problems)


@pytest.mark.timeout(150)
async def test_non_leader_node_killed_mid_utterance(chaos_cluster, chaos_db, make_stack, summary, tenant, baseline):
    """kill -9 a node that leads neither AUDIO nor TRANSCRIPTS: what was connected to it moves to the others."""
    findings = await node_fault(chaos_cluster, chaos_db, make_stack, summary, tenant, baseline, "follower")
    summary.problems = list(findings.problems)
    assert not findings, "\n".join(findings.problems)


@pytest.mark.timeout(150)
async def test_node_restarted_mid_utterance(chaos_cluster, chaos_db, make_stack, summary, tenant, baseline):
    """Stop the node leading TRANSCRIPTS mid-utterance and start it again 2 s later: it hands its leaderships
    over as it stops, catches up when it is back, and the session never notices."""
    findings = await node_fault(chaos_cluster, chaos_db, make_stack, summary, tenant, baseline, "restart")
    summary.problems = list(findings.problems)
    assert not findings, "\n".join(findings.problems)


@pytest.mark.timeout(180)
async def test_frozen_transcriber_wakes_up_fenced(chaos_cluster, chaos_db, make_stack, summary, tenant, baseline):
    """Two workers; the moment the session's worker has published a final (its checkpoint and acks still to come),
    SIGSTOP it, and keep it frozen until the other holds every partition and has published the session; then
    SIGCONT it. The woken worker stores nothing under the claims it held before, in TRANSCRIPTS or the checkpoints'
    bucket (group.py, 5.); the transcript equals the no-fault run's."""
    speech = dialog_speech()
    workers = ["w1", "w2"]
    stack = cluster_stack(make_stack, chaos_cluster, chaos_db, workers)
    findings = Findings()
    nc = await connect(stack.nats_url)
    try:
        js = nc.jetstream()
        summary.extra["partitions_before"] = dict(Counter((await wait_group_settled(js, workers)).values()))
        checkpoints = await CheckpointTap(js).start()
        live = Live(SPEED, speech.duration_s).start()
        fault: dict = {}

        def freeze_after_a_final(item) -> None:  # in the Tap's callback: as soon as the final is heard
            message = item.message
            armed = live.audio_s >= speech.turns[1].end_s  # past the second turn: a session with a history
            if armed and not fault and isinstance(message, Segment) and message.status == "final":
                fault.update(victim=message.worker_id, segment=message.segment_id)
                fault["at"] = stack.transcriber(message.worker_id).freeze()

        tap = await Tap(nc, tenant, on_heard=freeze_after_a_final).start()
        bot = asyncio.create_task(stream(nc, speech, tenant, "s1", SPEED, on_segment=live.on_segment, wait_s=90))
        await live.until(lambda: fault, 60, "a final past the second turn")
        victim, frozen_at = fault["victim"], fault["at"]
        survivor = next(w for w in workers if w != victim)
        frozen = stack.transcriber(victim)
        summary.extra.update(
            victim=victim, frozen_after_final=fault["segment"], fault_at_audio_s=round(live.audio_s, 2)
        )

        async def taken_over():
            holders = await lease_holders(js)
            return len(holders) == PARTITIONS and set(holders.values()) == {survivor}

        deadline = time.monotonic() + TAKEOVER_BOUND_S + 5
        while not await taken_over():
            if time.monotonic() > deadline:
                raise AssertionError(f"{survivor} did not take every partition within {TAKEOVER_BOUND_S + 5:.0f} s")
            await asyncio.sleep(0.1)
        summary.extra["lease_takeover_s"] = round(time.time() - frozen_at, 3)
        await live.until(
            lambda: any(s.worker_id == survivor for t, s in live.heard if t > frozen_at), 30, f"{survivor} publishing"
        )
        thawed_at = frozen.thaw()
        summary.outage_s = thawed_at - frozen_at
        await bot
        found, messages = await settle_and_check(
            stack, js, tenant, "s1", speech, baseline["dialog"], summary, findings, heard=tap.of("s1")
        )
        await check_audio_acked(js, findings)
        findings.problems += checkpoints.stale_checkpoints(subjects.checkpoint_key(tenant, "s1"))

        # The claims the victim held when it froze, and what it did under them after it woke.
        claims = await claims_made(js)
        held: dict[str, int] = {}
        for subject, made in claims.items():
            for c in made:
                if c.owner.split("#", 1)[0] == victim and c.stored_at < frozen_at:
                    held[subject] = max(held.get(subject, 0), c.seq)
        old = set(held.items())
        stored_after = [p for p in messages if p.stored_at > thawed_at and claim_of(p) in old]
        tried_after = [p for p in tap.of("s1") if p.stored_at > thawed_at and claim_of(p) in old]
        output = frozen.output()
        summary.extra.update(
            stale_owner_stored_after_wake=len(stored_after),
            stale_owner_tried_after_wake=len(tried_after),
            stale_owner_steps_left=len(re.findall(r"is not ours any more", output)),
            stale_owner_writes_refused=len(re.findall(r"refused a write", output)),
            checkpoint_writes_seen=sum(1 for w in checkpoints.stored if not w.key.startswith("claim=")),
            workers_after=sorted({p.message.worker_id for p in messages if p.stored_at > thawed_at}),
        )
        if stored_after:
            findings.add(f"{victim} stored {len(stored_after)} messages under the claims it held before it froze")
        first = first_after(messages, frozen_at, worker=survivor)
        summary.takeover = f"SIGSTOP of the session's worker -> the first segment of the session stored from {survivor}"
        summary.takeover_s = first.stored_at - frozen_at if first else None
        if first is None or summary.takeover_s > TAKEOVER_BOUND_S:
            findings.add(f"{survivor} took {summary.takeover_s} s to publish the session (bound {TAKEOVER_BOUND_S} s)")
        check_outcome(summary, findings)
        stack.check_alive()
        await checkpoints.stop()
    finally:
        await nc.close()
    summary.problems = list(findings.problems)
    assert not findings, "\n".join(findings.problems)
