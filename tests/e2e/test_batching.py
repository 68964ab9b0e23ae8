"""Cross-session batching: jobs of several sessions in one CTranslate2 call.

First the decoder alone (`batched.decode_batch`, real tiny.en, real speech): a job's text and word times do
not depend on the jobs it shares a call with. Then the pipeline: eight sessions streamed at once through
one worker that batches, each transcript checked against its reference.
"""

import asyncio
import logging
import re
import uuid
from collections import defaultdict

import nats
import numpy as np
import pytest

from jetscribe.client.bot import Audio, stream_audio
from jetscribe.evaluation.speech import synthesize
from jetscribe.evaluation.wer import wer
from jetscribe.services.transcriber.batched import decode_batch, decode_jobs, prompts_of
from jetscribe.services.transcriber.decoding import DecodeJob
from jetscribe.shared.audio import SAMPLE_RATE
from jetscribe.shared.natsauth import env_connect_options
from tests.e2e.test_pipeline import assert_all_audio_acked, persisted

pytestmark = pytest.mark.e2e

# No numbers: Whisper writes digits where a reference spells them.
SENTENCES = [
    "The library opens early in the morning on weekdays.",
    "Please bring your ticket and a photo identification to the desk.",
    "The garden behind the museum is closed while the fountain is repaired.",
    "Our team meets every Tuesday to plan the work for the coming week.",
    "Turn left at the bakery and walk a few blocks to reach the station.",
    "She painted the kitchen a pale shade of yellow last summer.",
    "The weather service expects heavy rain along the coast tonight.",
    "He forgot his umbrella on the train and walked home in the rain.",
]


@pytest.fixture(scope="module")
def speech():
    return synthesize(SENTENCES, gap_s=0.8)


def job_of(speech, turns, prompt=""):
    """A final decode job over these turns of the speech, as the worker would hand it out."""
    start = max(0, int((turns[0].start_s - 0.3) * SAMPLE_RATE))
    end = min(len(speech.audio), int((turns[-1].end_s + 0.2) * SAMPLE_RATE))
    return DecodeJob(
        kind="final",
        audio=speech.audio[start:end].astype(np.float32) / 32768.0,
        start_sample=start,
        end_sample=end,
        language="en",
        prompt=prompt,
        beam_size=5,
        speech_end_sample=end - int(0.2 * SAMPLE_RATE),
        window="short",
    )


def text(decoded):
    return "".join(w.word for s in decoded.segments for w in s.words)


def words(decoded):
    return [(w.word, w.start, w.end) for s in decoded.segments for w in s.words]


def test_identical_jobs_decode_identically_batched_and_alone(tiny_model, speech):
    job = job_of(speech, speech.turns[:2], prompt="Opening hours.")
    alone = decode_batch(tiny_model, [job])
    together = decode_batch(tiny_model, [job] * 4)
    assert alone.redone == together.redone == 0, (alone.reasons, together.reasons)
    assert words(alone.results[0]) and wer(" ".join(SENTENCES[:2]), text(alone.results[0])) <= 0.1
    for result in together.results:
        assert words(result) == words(alone.results[0])


def test_a_job_decodes_the_same_whatever_shares_its_call(tiny_model, speech):
    # each job its own context, as long as a session's prompt is mid-session (cut to the same token count)
    jobs = [
        job_of(speech, [turn], prompt=" ".join(SENTENCES[i + 1 :] + SENTENCES[:i]))
        for i, turn in enumerate(speech.turns)
    ]
    groups = defaultdict(list)
    for job in jobs:
        groups[prompts_of(tiny_model).job_key(job)].append(job)
    shared = max(groups.values(), key=len)
    assert len(shared) >= 4  # the sentences are of a length: most share one window
    together = decode_batch(tiny_model, shared)
    for job, result in zip(shared, together.results, strict=True):
        assert words(result) == words(decode_batch(tiny_model, [job]).results[0])
    texts = {id(job): text(r) for job, r in zip(shared, together.results, strict=True)}
    for i, job in enumerate(jobs):
        if id(job) in texts:
            assert wer(SENTENCES[i], texts[id(job)]) <= 0.2, texts[id(job)]


def test_max_batch_one_is_the_sequential_path(tiny_model, speech):
    from jetscribe.services.transcriber.model import transcribe

    job = job_of(speech, speech.turns[2:3])
    assert words(decode_jobs(tiny_model, [job], 1)[0]) == words(transcribe(tiny_model, job))


async def test_eight_sessions_stream_at_once_through_batched_decoding(pipeline, speech, caplog):
    """Eight bots at twice real time into one worker (max batch 8): every transcript matches its reference,
    every chunk is acked, and the worker did decode several sessions in one call."""
    caplog.set_level(logging.DEBUG, logger="jetscribe.services.transcriber.app")
    tenant = "batch"
    sessions = [f"b{i}-{uuid.uuid4().hex[:6]}" for i in range(8)]
    # each bot speaks the sentences in its own order, so sessions are not in lockstep
    orders = [SENTENCES[i:] + SENTENCES[:i] for i in range(8)]
    speeches = [synthesize(order, gap_s=0.8) for order in orders]
    nc = await nats.connect(pipeline.nats_url, **env_connect_options(pipeline.nats_url))
    try:

        async def bot(i):
            await asyncio.sleep(0.3 * i)
            return await stream_audio(
                nc,
                Audio(speeches[i].audio, SAMPLE_RATE),
                tenant=tenant,
                session_id=sessions[i],
                speed=2.0,
            )

        await asyncio.gather(*(bot(i) for i in range(8)))
    finally:
        await nc.close()
    for i, session in enumerate(sessions):
        row, segments = await persisted(pipeline.database_url, tenant, session)
        text = " ".join(s.text for s in segments if s.text)
        assert row.status == "ended"
        assert wer(speeches[i].text, text) <= 0.1, (session, text)
    await assert_all_audio_acked(pipeline.nats_url)
    sizes = [int(m.group(1)) for r in caplog.records if (m := re.search(r"(\d+) (final|interim) job", r.getMessage()))]
    assert max(sizes) > 1, f"no call decoded more than one session: {sizes[:40]}"
