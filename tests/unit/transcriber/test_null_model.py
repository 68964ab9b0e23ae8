"""The null model (JETSCRIBE_MODEL=null): one fixed word per utterance, through the real session core."""

import numpy as np

from jetscribe.services.transcriber.model import load_model, transcribe
from jetscribe.services.transcriber.null_model import NULL_WORD, NullModel
from jetscribe.shared.audio import SAMPLE_RATE
from tests.unit.transcriber.scripted import CHUNK, chunk, new_stream, silence, tone


def test_each_utterance_gets_one_final_of_the_null_word_spanning_its_speech():
    model = load_model("null")
    assert isinstance(model, NullModel)
    stream = new_stream()
    audio = np.concatenate([silence(0.5), tone(1.2), silence(1.0), tone(0.7), silence(1.0)])
    for seq, off in enumerate(range(0, len(audio), CHUNK)):
        stream.receive(chunk(seq, audio[off : off + CHUNK]), seq)
        while (job := stream.next_job()) is not None:
            stream.complete(job, transcribe(model, job))
    finals = [s for s in stream.segments if s.status == "final"]
    assert [f.text.strip() for f in finals] == [NULL_WORD, NULL_WORD]
    for final, (start, end) in zip(finals, [(0.5, 1.7), (2.7, 3.4)], strict=True):
        (word,) = final.words
        assert abs(word.start - start) < 0.1 and abs(word.end - end) < 0.1  # the utterance's speech, in session time
        assert not final.dropped  # the guards keep it


def test_decode_batch_decodes_each_job_as_decode_does():
    model, stream = NullModel(), new_stream()
    audio = np.concatenate([tone(1.0), silence(1.0)])
    jobs = []
    for seq, off in enumerate(range(0, len(audio), CHUNK)):
        stream.receive(chunk(seq, audio[off : off + CHUNK]), seq)
        if (job := stream.next_job()) is not None:
            jobs.append(job)
            stream.complete(job, model.decode(job))
    assert jobs and model.decode_batch(jobs) == [model.decode(job) for job in jobs]
    assert all(
        d.segments[0].words[0].end <= len(j.audio) / SAMPLE_RATE + 1e-9
        for d, j in zip(model.decode_batch(jobs), jobs, strict=True)
    )
