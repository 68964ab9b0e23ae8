"""The gateway's WebSocket way in: clients that cannot speak NATS (browsers, phone bridges, Deepgram clients).

A thin shell: the handshake is checked by `listen.parse_request` and the tenant's API key; each connection is
one session whose frames become the very requests a bot sends over NATS (`IngestGateway.submit`: the same
checks, sequencing, rate limits and error codes), and whose segments and events, heard on the session's
subjects as `jetscribe follow` hears them, go back on the socket as JSON.

Audio is cut into chunks of `listen.CHUNK_S` of input frames (decoded first, for Opus), so a chunk's seq says
where in the input it starts: a client that reconnects with the same session id is told where to send from.
A dropped connection leaves its session open (the client may reconnect and resume; else the idle timeout ends it,
as for a bot that went away); `CloseStream` ends it. A session whose input the gateway refuses after its start (an
undecodable Opus stream, a text frame it does not know, its tenant's key revoked, audio it could not store) has its
socket closed with the error and is ended at once, its end giving the reason `refused: <code>`: the transcriber
publishes the finals of its audio so far and an `ended` with that reason (Postgres, `jetscribe follow`, its log).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import urllib.parse
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus
from pathlib import Path
from typing import Any

import numpy as np
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from jetscribe.services.ingest.containers import ContainerError, OpusStreamDecoder
from jetscribe.services.ingest.listen import (
    DeepgramDialect,
    ListenRefused,
    ListenRequest,
    error_message,
    native_message,
    parse_request,
    resume_message,
)
from jetscribe.shared import subjects
from jetscribe.shared.natsauth import api_key_hash
from jetscribe.shared.retry import backoff_delay
from jetscribe.shared.wire import (
    AudioChunk,
    Reply,
    Segment,
    SessionControl,
    SessionEvent,
    WireError,
    decode,
    refused_reason,
)

log = logging.getLogger(__name__)

REVOCATION_CHECK_S = 1.0  # how often open sockets are checked against the key file
UNAVAILABLE_ATTEMPTS = 20  # as a bot: `unavailable` is sent again with a backoff this many times
REFUSED_END_ATTEMPTS = 3  # the end of a refused session: best effort, else the transcriber's idle timeout ends it
ENDED_ELSEWHERE = frozenset({"rejected", "session_ended"})  # refusals of a session the transcriber closed already
CLOSE_REFUSED = 1008  # policy violation: the gateway refused the session or its audio
CLOSE_REVOKED = 4001
CLOSE_BAD_AUDIO = 1007  # invalid frame payload data
MAX_FRAME_BYTES = 1 << 20
CLOSE_WAIT_S = 120.0  # CloseStream waits this long for the transcriber's `ended` (its last finals come first)


class ApiKeys:
    """Tenants' API keys as the keyring stores them (`api-keys.json`: tenant -> sha256 of the key), re-read when
    the file changes: a key made or revoked while the gateway runs counts at once."""

    def __init__(self, path: Path):
        self.path = path
        self._stamp: tuple[int, ...] | None = None
        self._hashes: dict[str, str] = {}

    def hashes(self) -> dict[str, str]:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            self._stamp, self._hashes = None, {}
            return self._hashes
        # The keyring replaces the file (a new inode); the inode and ctime also tell a rewrite of the same size
        # within one mtime tick, which size and mtime alone would miss (a revoked key that went on working).
        stamp = (stat.st_ino, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_size)
        if stamp != self._stamp:
            self._hashes = {str(k): str(v) for k, v in json.loads(self.path.read_text()).items()}
            self._stamp = stamp
        return self._hashes

    def tenant_of(self, key: str) -> tuple[str, str] | None:
        """(tenant, key hash) of an API key, or None if no tenant has it."""
        wanted = api_key_hash(key)
        for tenant, stored in self.hashes().items():
            if hmac.compare_digest(stored, wanted):
                return tenant, stored
        return None

    def valid(self, tenant: str, key_hash: str) -> bool:
        return self.hashes().get(tenant) == key_hash


def presented_key(request: Request) -> str | None:
    """The API key a client shows: `Authorization: Token <key>` (deepgram-sdk), `Bearer <key>`, the
    `Sec-WebSocket-Protocol: token, <key>` a browser can set, or `?token=<key>`."""
    authorization = request.headers.get("Authorization", "")
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() in ("token", "bearer") and value.strip():
        return value.strip()
    protocols = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",")]
    if len(protocols) == 2 and protocols[0] == "token":
        return protocols[1]
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(request.path).query)
    tokens = query.get("token", [])
    return tokens[0] if len(tokens) == 1 else None


@dataclass
class Admitted:
    """A handshake that passed: who the client is and what it asked for."""

    tenant: str
    key_hash: str
    request: ListenRequest


def _json_response(status: int, body: dict[str, Any]) -> Response:
    data = json.dumps(body).encode()
    headers = Headers([("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
    return Response(status, HTTPStatus(status).phrase, headers, data)


class SocketGateway:
    """The WebSocket listener of one gateway process."""

    def __init__(self, gateway, keys: ApiKeys, host: str, port: int, diarize_available: bool = False):
        """`gateway`: the process's IngestGateway (its `submit`, its NATS connection, its refusal reporting)."""
        self.gateway = gateway
        self.keys = keys
        self.host, self.port = host, port
        self.diarize_available = diarize_available
        self.server: Server | None = None
        self._admitted: dict[int, Admitted] = {}
        self._open: dict[ServerConnection, tuple[Admitted, SocketSession]] = {}
        self._watch: asyncio.Task | None = None

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    async def start(self) -> None:
        self.server = await serve(
            self._connection,
            self.host,
            self.port,
            process_request=self._handshake,
            max_size=MAX_FRAME_BYTES,
            subprotocols=None,
            select_subprotocol=_select_token_protocol,
        )
        if self.port == 0:
            self.port = next(iter(self.server.sockets)).getsockname()[1]
        self._watch = asyncio.create_task(self._close_revoked())
        log.info("WebSocket listener on %s (Deepgram-compatible /v1/listen, native /v1/sessions/<id>)", self.url)

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
        if self.server is not None:
            self.server.close(close_connections=True)
            await self.server.wait_closed()

    async def _handshake(self, connection: ServerConnection, request: Request) -> Response | None:
        split = urllib.parse.urlsplit(request.path)
        request_id = str(connection.id)
        key = presented_key(request)
        found = self.keys.tenant_of(key) if key else None
        if found is None:
            why = "no API key: send Authorization: Token <key>" if not key else "API key not recognised (or revoked)"
            await self._refused_handshake("unauthorized", why)
            return _json_response(401, {"err_code": "INVALID_AUTH", "err_msg": why, "request_id": request_id})
        try:
            listen = parse_request(
                split.path,
                urllib.parse.parse_qs(split.query, keep_blank_values=True),
                diarize_available=self.diarize_available,
                request_id=request_id,
            )
        except ListenRefused as exc:
            await self._refused_handshake("bad_request", str(exc), tenant=found[0])
            return _json_response(exc.status, exc.body(request_id))
        self._admitted[id(connection)] = Admitted(found[0], found[1], listen)
        return None

    async def _refused_handshake(self, code: str, why: str, tenant: str = subjects.UNKNOWN_TENANT) -> None:
        """A refused handshake is reported, counted and logged like a refused request (no session yet)."""
        await self.gateway.report_refusal(tenant, None, code, f"WebSocket handshake refused: {why}")

    async def _connection(self, connection: ServerConnection) -> None:
        admitted = self._admitted.pop(id(connection), None)
        if admitted is None:  # cannot happen: the handshake admitted it
            await connection.close(1011, "not admitted")
            return
        session = SocketSession(self.gateway, connection, admitted.tenant, admitted.request)
        self._open[connection] = (admitted, session)
        try:
            await session.run()
        finally:
            self._open.pop(connection, None)

    async def _close_revoked(self) -> None:
        while True:
            await asyncio.sleep(REVOCATION_CHECK_S)
            for connection, (admitted, session) in list(self._open.items()):
                if session.refused is None and not self.keys.valid(admitted.tenant, admitted.key_hash):
                    why = "the tenant's API key was revoked: its socket is closed"
                    await self.gateway.report_refusal(admitted.tenant, admitted.request.session_id, "revoked", why)
                    session.refused = "revoked"  # its run ends the session once the socket is closed
                    await connection.close(CLOSE_REVOKED, "API key revoked")


def _select_token_protocol(connection: ServerConnection, protocols: list[str]) -> str | None:
    """A browser that sends its key as `Sec-WebSocket-Protocol: token, <key>` must get `token` back."""
    return "token" if "token" in protocols else None


class SessionRefused(Exception):
    """The gateway refused the session or its audio: the socket says why and closes."""

    def __init__(self, code: str, message: str, close_code: int = CLOSE_REFUSED, reported: bool = False):
        """`reported`: the gateway already reported it (its reply to the request); else the shell does."""
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.close_code, self.reported = code, message, close_code, reported


class SocketSession:
    """One connection: one session's audio in, its segments and events out."""

    def __init__(self, gateway, connection: ServerConnection, tenant: str, request: ListenRequest):
        self.gateway = gateway
        self.connection = connection
        self.tenant = tenant
        self.request = request
        self.dialect = DeepgramDialect(request) if request.dialect == "deepgram" else None
        self.opus = OpusStreamDecoder() if request.encoding == "opus" else None
        self.pending = np.zeros(0, dtype=np.uint8)  # input bytes not yet a whole chunk
        self.seq = 0
        self.audio_frames = 0  # input frames sent as chunks
        self.model: str | None = None
        self.outbox: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self.ended = asyncio.Event()  # the transcriber's `ended` or `rejected` came
        self.closing_event: SessionEvent | None = None
        self.closing = False  # CloseStream is sending the end
        self.started = False  # the gateway took the session's start
        self.end_sent = False  # the gateway took the session's end
        self.refused: str | None = None  # the code the gateway refused the session's input with (or `revoked`)

    @property
    def session_id(self) -> str:
        return self.request.session_id

    async def run(self) -> None:
        nc = self.gateway.nc
        subs = [
            await nc.subscribe(subjects.transcript(self.tenant, self.session_id), cb=self._on_segment),
            await nc.subscribe(subjects.session_events_of(self.tenant, self.session_id), cb=self._on_event),
        ]
        sender = asyncio.create_task(self._send_out())
        try:
            await self._start()
            self.started = True
            await self._serve()
        except SessionRefused as exc:
            self.refused = self.refused or exc.code
            if not exc.reported:
                await self.gateway.report_refusal(self.tenant, self.session_id, exc.code, exc.message)
            await self._say(error_message(self.request.dialect, exc.code, exc.message))
            await self._flush_outbox(sender)
            await self.connection.close(exc.close_code, exc.code)
        except ConnectionClosed:
            if self.refused is None:
                self._left_open()
        finally:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
            for sub in subs:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
        await self._end_refused()

    async def _end_refused(self) -> None:
        """A session whose input the gateway refused after its start, its socket now closed: its end, with the reason
        `refused: <code>`, so the transcriber finishes it now rather than at the idle timeout. Not for a session the
        transcriber closed itself, nor one whose end is sent already (CloseStream). Best effort: if it cannot be
        sent, the idle timeout still ends the session."""
        code = self.refused
        if code is None or not self.started or self.end_sent or self.ended.is_set() or code in ENDED_ELSEWHERE:
            return
        reason = refused_reason(code)
        try:
            await self._submit(self._control("end", reason=reason), unavailable_attempts=REFUSED_END_ATTEMPTS)
        except Exception as exc:  # SessionRefused, or NATS going away under the gateway
            log.warning(
                "%s/%s: refused (%s) after its start, and its end could not be sent (%s): the idle timeout ends it",
                self.tenant,
                self.session_id,
                code,
                exc,
            )
            return
        log.info("%s/%s: refused (%s) after its start: its end is sent, %r", self.tenant, self.session_id, code, reason)

    async def _serve(self) -> None:
        """Take the client's frames until it closes the stream, or the transcriber ends or rejects the session
        first (an idle timeout): then the socket says so and closes."""
        receiving = asyncio.create_task(self._receive())
        ended = asyncio.create_task(self.ended.wait())
        try:
            await asyncio.wait({receiving, ended}, return_when=asyncio.FIRST_COMPLETED)
            if receiving.done() or self.closing:  # CloseStream waits for the end itself
                await receiving
                return
            receiving.cancel()
            await asyncio.gather(receiving, return_exceptions=True)
            event = self.closing_event
            assert event is not None
            if event.event == "rejected":
                why = f"the transcriber rejected the session: {event.reason or 'no reason given'}"
                raise SessionRefused("rejected", why, reported=True)  # the transcriber's event is the report
            await self._closing_metadata()
            await self._flush_outbox()
            await self.connection.close(1000, f"session ended: {event.reason or 'ended'}"[:120])
        finally:
            for task in (receiving, ended):
                task.cancel()
            await asyncio.gather(receiving, ended, return_exceptions=True)

    async def _start(self) -> None:
        start = SessionControl(
            tenant=self.tenant,
            session_id=self.session_id,
            action="start",
            language=self.request.language,
            options=self.request.options,
            model=self.request.model,
            sent_at=time.time(),
        )
        reply = await self._submit(start)
        if reply.last_seq >= 0:  # a client reconnecting: it sends again from where the gateway's audio ends
            self.seq = reply.last_seq + 1
            self.audio_frames = self.seq * self.request.chunk_frames(self.request.sample_rate)
            await self._say(resume_message(self.request, reply.last_seq, self.request.sample_rate))

    async def _receive(self) -> None:
        async for frame in self.connection:
            if isinstance(frame, bytes):
                await self._audio(frame)
                continue
            try:
                kind = json.loads(frame).get("type")
            except (ValueError, AttributeError, RecursionError):  # not JSON, not an object, or nested too deep
                kind = None
            if kind == "KeepAlive":
                continue
            if kind == "Finalize":
                # Whole chunks only, so that chunk n still starts at input frame n * F (where a resume starts); the
                # few ms left go with the next chunk.
                await self._send_pending(final=False)
                await self._submit(self._control("finalize"))
                if self.dialect is not None:
                    self.dialect.from_finalize = True
            elif kind == "CloseStream":
                await self._close_stream()
                return
            else:
                raise SessionRefused(
                    "bad_message", f"text frame {frame[:80]!r}: send KeepAlive, Finalize or CloseStream"
                )
        self._left_open()  # the client closed the socket cleanly, without CloseStream

    def _left_open(self) -> None:
        log.info("%s/%s: socket closed without CloseStream; the session stays open", self.tenant, self.session_id)

    async def _audio(self, data: bytes) -> None:
        if self.opus is not None:
            try:
                pcm = self.opus.feed(data)
            except ContainerError as exc:
                raise SessionRefused("bad_payload", str(exc), CLOSE_BAD_AUDIO) from None
            if not len(pcm):
                return
            data = pcm.astype("<f4").tobytes()
        self.pending = np.concatenate([self.pending, np.frombuffer(data, dtype=np.uint8)])
        await self._send_pending(final=False)

    async def _send_pending(self, final: bool) -> None:
        """Whole chunks of the pending input; with `final`, the rest too (a shorter last chunk)."""
        frame_bytes, rate = self._input_format()
        chunk_bytes = self.request.chunk_frames(rate) * frame_bytes
        while len(self.pending) >= chunk_bytes or (final and len(self.pending) >= frame_bytes):
            size = min(chunk_bytes, len(self.pending) - len(self.pending) % frame_bytes)
            payload, self.pending = self.pending[:size].tobytes(), self.pending[size:]
            await self._chunk(payload, rate, frame_bytes)

    def _input_format(self) -> tuple[int, int]:
        """(bytes per frame, frames per second) of what `pending` holds."""
        if self.opus is not None:
            return 4 * max(self.opus.channels, 1), self.request.sample_rate
        return self.request.frame_bytes, self.request.sample_rate

    async def _chunk(self, payload: bytes, rate: int, frame_bytes: int) -> None:
        channels = max(self.opus.channels, 1) if self.opus is not None else self.request.channels
        chunk = AudioChunk(
            tenant=self.tenant,
            session_id=self.session_id,
            seq=self.seq,
            sent_at=time.time(),
            sample_rate=rate,
            channels=channels,
            encoding="pcm_f32le" if self.opus is not None else self.request.encoding,  # type: ignore[arg-type]
            payload=payload,
        )
        reply = await self._submit(chunk)
        self.seq = reply.last_seq + 1
        self.audio_frames += len(payload) // frame_bytes

    async def _close_stream(self) -> None:
        if self.opus is not None:
            try:
                self.opus.finish()
            except ContainerError as exc:
                raise SessionRefused("bad_payload", str(exc), CLOSE_BAD_AUDIO) from None
        await self._send_pending(final=True)
        if len(self.pending):
            frame_bytes = self._input_format()[0]
            await self._dropped(
                "bad_payload",
                f"the stream ended inside a frame: its last {len(self.pending)} bytes are no whole frame of "
                f"{frame_bytes} bytes and were dropped",
            )
        self.closing = True
        await self._submit(self._control("end"))
        self.end_sent = True
        try:
            await asyncio.wait_for(self.ended.wait(), CLOSE_WAIT_S)
        except TimeoutError:
            raise SessionRefused(
                "unavailable", f"the session's end was not confirmed within {CLOSE_WAIT_S:g} s"
            ) from None
        await self._closing_metadata()
        await self._flush_outbox()
        await self.connection.close(1000, "stream closed")

    async def _closing_metadata(self) -> None:
        """Deepgram's Metadata, last before the socket closes."""
        if self.dialect is not None:
            created = datetime.now(UTC).isoformat()
            await self._say(self.dialect.closing(self.audio_frames / self.request.sample_rate, created, self.model))

    async def _dropped(self, code: str, message: str) -> None:
        """Input the socket drops but the session goes on: reported, counted, logged, and said to the client."""
        await self.gateway.report_refusal(self.tenant, self.session_id, code, message)
        await self._say(error_message(self.request.dialect, code, message))

    def _control(self, action: str, reason: str = "") -> SessionControl:
        return SessionControl(
            tenant=self.tenant,
            session_id=self.session_id,
            action=action,  # type: ignore[arg-type]
            sent_at=time.time(),
            reason=reason,
        )

    async def _submit(
        self, message: AudioChunk | SessionControl, unavailable_attempts: int = UNAVAILABLE_ATTEMPTS
    ) -> Reply:
        """The gateway's answer, after waiting out `rate_limited` and retrying `unavailable` as a bot does;
        raises SessionRefused for any other refusal (already reported, counted and logged by the gateway)."""
        attempt = 0
        while True:
            reply: Reply = await self.gateway.submit(message)
            if reply.ok:
                return reply
            if reply.code == "rate_limited":
                await asyncio.sleep(max(reply.retry_after_s, 0.01))
                continue
            if reply.code == "unavailable" and attempt < unavailable_attempts:
                await asyncio.sleep(backoff_delay(attempt, max_s=2.0))
                attempt += 1
                continue
            raise SessionRefused(reply.code or "refused", reply.message, reported=True)

    # --- what goes back -------------------------------------------------------------------------------------
    async def _on_segment(self, msg) -> None:
        try:
            segment = decode(msg.data, Segment)
        except WireError as exc:
            log.warning("ignoring a bad segment on %s: %s", msg.subject, exc)
            return
        self.model = segment.model or self.model
        if self.dialect is not None:
            await self._say(self.dialect.results(segment))
        else:
            await self._say(native_message(segment))

    async def _on_event(self, msg) -> None:
        try:
            event = decode(msg.data, SessionEvent)
        except WireError as exc:
            log.warning("ignoring a bad session event on %s: %s", msg.subject, exc)
            return
        if self.dialect is not None:
            translated = self.dialect.event(event)
            if translated is not None:
                await self._say(translated)
        else:
            await self._say(native_message(event))
        if event.event in ("ended", "rejected"):
            self.model = event.model or self.model
            self.closing_event = event
            self.ended.set()

    async def _say(self, message: dict[str, Any]) -> None:
        await self.outbox.put(message)

    async def _send_out(self) -> None:
        while True:
            message = await self.outbox.get()
            try:
                if message is not None:
                    await self.connection.send(json.dumps(message, ensure_ascii=False))
            except ConnectionClosed:
                pass
            finally:
                self.outbox.task_done()

    async def _flush_outbox(self, sender: asyncio.Task | None = None) -> None:
        """Wait until everything queued so far is on the socket."""
        await self.outbox.join()
