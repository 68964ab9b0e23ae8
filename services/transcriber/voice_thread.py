"""The thread that embeds voices, beside the decode thread, so that speakers from the audio never hold a decode.

Two kinds of work, one thread, one forward pass at a time (torch on one core: the decoder has the other):

- Ahead: while an utterance streams, the windows its final will surely embed (`EmbedOptions.spans_ahead`) are
  queued as soon as they are heard, from every session, and embedded in batches into the embedder's cache.
- Finals: a final's (or early final's) voices are asked for when its decode starts; only what the cache lacks is
  embedded (the last window, or the whole of a short utterance), so they are ready about when its text is.

Finals go first: ahead windows wait while a final is queued. Ahead windows that pile up past `MAX_AHEAD` (the thread
cannot keep up) are dropped oldest first, counted and logged: a final whose windows were dropped embeds them itself.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from jetscribe.services.transcriber.embedding import VoiceEmbedder
from jetscribe.services.transcriber.voices import VoicePiece
from jetscribe.shared.audio import SAMPLE_RATE

log = logging.getLogger(__name__)

MAX_AHEAD = 256  # windows waiting to be embedded ahead; older ones are dropped beyond it
AHEAD_BATCH = 4  # ahead windows per forward pass: a final that comes meanwhile waits for one such pass at most


@dataclass
class VoiceTotals:
    """What the thread did, for the worker's stats."""

    finals: int = 0  # calls for finals' voices
    final_pieces: int = 0
    final_audio_s: float = 0.0
    final_cpu_s: float = 0.0
    ahead_windows: int = 0  # windows embedded ahead
    ahead_cpu_s: float = 0.0
    ahead_dropped: int = 0
    failures: int = 0
    final_waits: int = 0  # finals that asked for voices, and the seconds they waited in all (see `waits`)
    final_wait_s: float = 0.0
    waits: deque[float] = field(default_factory=lambda: deque(maxlen=1000))  # a final's wait for its voices after
    # its text was decoded (0: they were ready), the last 1000: what speakers from the audio adds to final latency

    def waited(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.final_waits += 1
        self.final_wait_s += seconds

    def as_dict(self) -> dict[str, float]:
        out = {k: round(float(v), 3) for k, v in vars(self).items() if k != "waits"}
        waits = sorted(self.waits)
        for name, q in (("final_wait_p50_s", 0.5), ("final_wait_p95_s", 0.95)):
            out[name] = round(waits[min(int(q * len(waits)), len(waits) - 1)], 3) if waits else 0.0
        out["final_wait_max_s"] = round(waits[-1], 3) if waits else 0.0
        return out


@dataclass
class _FinalRequest:
    utterances: list[tuple[np.ndarray, int]]
    owners: list[str]
    future: Future[list[list[VoicePiece]]]


class VoiceThread:
    """Embeds windows ahead and finals' voices on one thread; finals first."""

    def __init__(self, embedder: VoiceEmbedder, nice: int = 0):
        self.embedder = embedder
        self.nice = nice  # the thread's niceness (Linux: per thread), above the decoder's: it yields to decoding
        self.totals = VoiceTotals()
        self._finals: deque[_FinalRequest] = deque()
        self._ahead: deque[tuple[str, np.ndarray]] = deque()  # (owner, window)
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="voices", daemon=True)
        self._thread.start()

    def ahead(self, owner: str, windows: Sequence[np.ndarray]) -> None:
        """Queue windows of an utterance still streaming (of `owner`, a session), to be embedded when no final
        waits."""
        if not windows:
            return
        with self._wake:
            self._ahead.extend((owner, w) for w in windows)
            dropped = 0
            while len(self._ahead) > MAX_AHEAD:
                self._ahead.popleft()
                dropped += 1
            self._wake.notify()
        if dropped:
            self.totals.ahead_dropped += dropped
            log.warning("voice thread behind: %d window(s) queued ahead dropped (their finals embed them)", dropped)

    async def pieces(self, utterances: list[tuple[np.ndarray, int]], owners: list[str]) -> list[list[VoicePiece]]:
        """The voice pieces of finals' audio (audio, first session sample) of `owners` (their sessions), embedding
        what the cache lacks."""
        request = _FinalRequest(utterances, owners, Future())
        with self._wake:
            if self._closed:
                raise RuntimeError("the voice thread is closed")
            self._finals.append(request)
            self._wake.notify()
        return await asyncio.wrap_future(request.future)

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        if self.nice:
            try:
                tid = threading.get_native_id()  # on Linux a thread's priority is its own
                os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + self.nice)
                log.info("voice thread at nice %+d from the process's", self.nice)
            except (AttributeError, OSError) as exc:
                log.warning("voice thread: cannot set nice %+d (%s): it runs at the decoder's priority", self.nice, exc)
        while True:
            with self._wake:
                while not self._closed and not self._finals and not self._ahead:
                    self._wake.wait()
                if self._closed:
                    for request in self._finals:
                        request.future.cancel()
                    return
                finals = list(self._finals)
                self._finals.clear()
                ahead = [] if finals else [self._ahead.popleft() for _ in range(min(AHEAD_BATCH, len(self._ahead)))]
            if finals:
                self._embed_finals(finals)
            else:
                self._embed_ahead(ahead)

    def _embed_finals(self, requests: list[_FinalRequest]) -> None:
        """All waiting finals in one call (sessions batched)."""
        requests = [r for r in requests if r.future.set_running_or_notify_cancel()]  # not those given up on
        if not requests:
            return
        started = time.thread_time()
        try:
            pieces = self.embedder.embed(
                [u for r in requests for u in r.utterances], [o for r in requests for o in r.owners]
            )
        except Exception as exc:
            self.totals.failures += 1
            for request in requests:
                request.future.set_exception(exc)
            return
        totals = self.totals
        totals.finals += 1
        totals.final_pieces += sum(len(p) for p in pieces)
        totals.final_audio_s += sum(len(a) for r in requests for a, _ in r.utterances) / SAMPLE_RATE
        totals.final_cpu_s += time.thread_time() - started
        for request in requests:
            mine, pieces = pieces[: len(request.utterances)], pieces[len(request.utterances) :]
            request.future.set_result(mine)

    def _embed_ahead(self, windows: list[tuple[str, np.ndarray]]) -> None:
        started = time.thread_time()
        try:
            self.totals.ahead_windows += self.embedder.prefetch(windows)
        except Exception:  # the finals embed these windows themselves
            self.totals.failures += 1
            log.exception("voice embeddings of %d window(s) ahead failed", len(windows))
        self.totals.ahead_cpu_s += time.thread_time() - started
