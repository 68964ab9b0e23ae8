"""Every JetStream API and KV request the services send by hand, with typed errors.

nats-py covers streams, consumers and KV in general; what it does not cover (pulls in a `pinned_client` priority
group, UNPIN, RESET, KV writes with a per-message TTL and a compare-and-set on the revision) goes through here, so
`$JS.API` subjects are built and replies are parsed in this one place. A refusal is parsed from the reply's JSON
`error` (or a pull's status header) into a `JetStreamAPIError` subclass; transport failures (timeouts, no
responders, a closed connection) stay nats-py's own exceptions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg

from jetscribe.shared.errors import CodedError

API_PREFIX = "$JS.API"
PIN_ID_HEADER = "Nats-Pin-Id"
TTL_HEADER = "Nats-TTL"
EXPECTED_LAST_SUBJECT_SEQUENCE_HEADER = "Nats-Expected-Last-Subject-Sequence"
# The subject (wildcards allowed) whose last sequence the header above names; by default the publish subject.
EXPECTED_LAST_SUBJECT_SEQUENCE_SUBJECT_HEADER = "Nats-Expected-Last-Subject-Sequence-Subject"

# JetStream's err_codes (the server's errors.json) this project acts on.
ERR_CONSUMER_NOT_FOUND = 10014
ERR_NO_MESSAGE_FOUND = 10037
ERR_STREAM_NOT_FOUND = 10059
ERR_WRONG_LAST_SEQUENCE = 10071

PIN_MISMATCH_STATUS = 423
_PULL_DONE = (404, 408)  # no messages / the request expired
_PULL_HEARTBEAT = 100
_PULL_INTERRUPTED = 409  # e.g. max waiting exceeded, a leadership change: pull again


class JetStreamAPIError(CodedError):
    """JetStream refused a request: `status` is its HTTP-like code, `err_code` its own (0 when it gave none)."""

    code = "jetstream_api_error"

    def __init__(self, status: int, err_code: int = 0, description: str = "", request: str = ""):
        super().__init__(None, f"{request + ': ' if request else ''}{status} {err_code} {description}".rstrip())
        self.status = status
        self.err_code = err_code
        self.description = description
        self.request = request


class NotFoundError(JetStreamAPIError):
    """The stream or consumer named in the request does not exist."""

    code = "jetstream_not_found"


class WrongLastSequenceError(JetStreamAPIError):
    """A compare-and-set lost: the subject's last sequence (a KV key's revision) is not the one expected."""

    code = "jetstream_wrong_last_sequence"


class PinMismatchError(JetStreamAPIError):
    """A pull carried a pin id the priority group is not pinned to (status 423): another client is pinned."""

    code = "jetstream_pin_mismatch"


def api_error(status: int, err_code: int = 0, description: str = "", request: str = "") -> JetStreamAPIError:
    """The most specific error for a refusal."""
    if err_code == ERR_WRONG_LAST_SEQUENCE:
        cls: type[JetStreamAPIError] = WrongLastSequenceError
    elif status == PIN_MISMATCH_STATUS:
        cls = PinMismatchError
    elif status == 404 or err_code in (ERR_CONSUMER_NOT_FOUND, ERR_STREAM_NOT_FOUND):
        cls = NotFoundError
    else:
        cls = JetStreamAPIError
    return cls(status, err_code, description, request)


def parse_reply(data: bytes, request: str = "") -> dict[str, Any]:
    """A JSON reply of the API or of a publish; raises the matching `JetStreamAPIError` if it holds an error."""
    try:
        reply = json.loads(data)
    except ValueError:
        raise JetStreamAPIError(0, 0, f"not a JSON reply: {data[:200]!r}", request) from None
    if not isinstance(reply, dict):
        raise JetStreamAPIError(0, 0, f"unexpected reply: {data[:200]!r}", request)
    error = reply.get("error")
    if error is not None:
        raise api_error(
            int(error.get("code") or 0), int(error.get("err_code") or 0), str(error.get("description", "")), request
        )
    return reply


def expect_last(subject: str, seq: int) -> dict[str, str]:
    """Headers that make a publish conditional: the stream stores it only if its last message on `subject` (any
    subject of that stream, not only the one published to) is at sequence `seq` (0: it has none), and refuses it
    otherwise (`WrongLastSequenceError`), as one step on the stream's leader."""
    return {EXPECTED_LAST_SUBJECT_SEQUENCE_HEADER: str(seq), EXPECTED_LAST_SUBJECT_SEQUENCE_SUBJECT_HEADER: subject}


def nanoseconds(seconds: float) -> int:
    """JetStream's durations are integer nanoseconds."""
    return int(seconds * 1_000_000_000)


@dataclass(frozen=True)
class PullStatus:
    """A status message answering a pull request (not a stored message)."""

    status: int
    description: str

    @property
    def heartbeat(self) -> bool:
        """An idle heartbeat: the request is still open."""
        return self.status == _PULL_HEARTBEAT

    @property
    def interrupted(self) -> bool:
        """The server ended the request early (409); pulling again is fine."""
        return self.status == _PULL_INTERRUPTED


def pull_status(msg: Msg, request: str = "") -> PullStatus:
    """Classify a status message on a pull's reply subject: heartbeat (100), done (404/408) or interrupted (409).
    Raises `PinMismatchError` on 423 and `JetStreamAPIError` on any other status."""
    headers = msg.headers or {}
    try:
        status = int(headers.get("Status", "0"))
    except ValueError:
        status = 0
    description = headers.get("Description", "")
    if status in (_PULL_HEARTBEAT, _PULL_INTERRUPTED, *_PULL_DONE):
        return PullStatus(status, description)
    raise api_error(status, 0, description, request or msg.subject)


def pin_id(msg: Msg) -> str | None:
    """The pin id a stored message was delivered under (pinned_client priority groups), if any."""
    return (msg.headers or {}).get(PIN_ID_HEADER)


def kv_subject(bucket: str, key: str = ">") -> str:
    """The stream subject a KV bucket keeps `key` under (by default: all its keys)."""
    return f"$KV.{bucket}.{key}"


def kv_key(bucket: str, subject: str) -> str:
    """The key a KV bucket's stream subject stands for."""
    return subject.removeprefix(f"$KV.{bucket}.")


def is_stored_message(msg: Msg) -> bool:
    """A message from the stream (it has an ack subject), as opposed to a status message."""
    return bool(msg.reply)


class JetStreamAPI:
    """The raw requests, over one connection. Each request waits at most `timeout_s` for its reply."""

    def __init__(self, nc: Client, timeout_s: float = 5.0):
        self.nc = nc
        self.timeout_s = timeout_s

    async def request(self, endpoint: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """`$JS.API.<endpoint>` with a JSON body; the parsed reply, or the typed error it holds."""
        subject = f"{API_PREFIX}.{endpoint}"
        payload = json.dumps(body).encode() if body is not None else b""
        reply = await self.nc.request(subject, payload, timeout=self.timeout_s)
        return parse_reply(reply.data, endpoint)

    async def create_consumer(self, stream: str, config: dict[str, Any]) -> dict[str, Any]:
        """Create the durable `config["durable_name"]`, or bring it to `config` (what may change in place).
        Durations in `config` are nanoseconds (see `nanoseconds`). Returns the consumer info."""
        name = config["durable_name"]
        return await self.request(f"CONSUMER.CREATE.{stream}.{name}", {"stream_name": stream, "config": config})

    async def unpin(self, stream: str, consumer: str, group: str) -> None:
        """Clear a priority group's pin: the next pull without an id is pinned, the old pin id gets 423."""
        await self.request(f"CONSUMER.UNPIN.{stream}.{consumer}", {"group": group})

    async def reset(self, stream: str, consumer: str, seq: int | None = None) -> dict[str, Any]:
        """Move the consumer back to its ack floor (or to stream sequence `seq`): what it delivered but nobody
        acked is delivered again now, not after ack_wait. Redeliveries restart at num_delivered 1, and an ack
        the server has not processed yet may be undone. nats-server 2.15.1 does not answer a RESET of a missing
        consumer: that is a nats-py timeout, not `NotFoundError`."""
        return await self.request(f"CONSUMER.RESET.{stream}.{consumer}", {} if seq is None else {"seq": seq})

    async def pull(
        self,
        stream: str,
        consumer: str,
        *,
        reply: str,
        batch: int,
        expires_s: float,
        group: str | None = None,
        pin: str | None = None,
    ) -> None:
        """Ask for up to `batch` messages, delivered to `reply` until `expires_s` from now, then a status message
        (see `pull_status`). In a priority group, `pin` is the id learned from `pin_id`; without it the
        request asks to become the pinned client."""
        body: dict[str, Any] = {"batch": batch, "expires": nanoseconds(expires_s)}
        if group is not None:
            body["group"] = group
        if pin:
            body["id"] = pin
        await self.nc.publish(
            f"{API_PREFIX}.CONSUMER.MSG.NEXT.{stream}.{consumer}", json.dumps(body).encode(), reply=reply
        )

    async def kv_put(
        self, bucket: str, key: str, value: bytes, *, ttl_s: int | None = None, last_revision: int | None = None
    ) -> int:
        """Write a KV entry; returns its revision. `ttl_s`: the server drops this entry after so many whole
        seconds (the bucket must allow per-message TTLs). `last_revision`: compare-and-set, the write only
        succeeds if the key's last revision is this one (0: the key has no entry), else
        `WrongLastSequenceError`."""
        headers = {}
        if ttl_s is not None:
            if ttl_s < 1 or int(ttl_s) != ttl_s:
                raise ValueError(f"a KV entry's TTL is whole seconds, at least 1: not {ttl_s}")
            headers[TTL_HEADER] = f"{int(ttl_s)}s"
        if last_revision is not None:
            headers[EXPECTED_LAST_SUBJECT_SEQUENCE_HEADER] = str(last_revision)
        subject = kv_subject(bucket, key)
        reply = await self.nc.request(subject, value, timeout=self.timeout_s, headers=headers or None)
        return int(parse_reply(reply.data, subject)["seq"])

    async def publish(self, subject: str, data: bytes, headers: dict[str, str] | None = None) -> dict[str, Any]:
        """Publish into a stream and wait for its acknowledgement: `{"stream", "seq"[, "duplicate"]}`. A refused
        condition (e.g. `Nats-Expected-Last-Subject-Sequence`) raises its typed error."""
        reply = await self.nc.request(subject, data, timeout=self.timeout_s, headers=headers or None)
        return parse_reply(reply.data, subject)

    async def last_sequence(self, stream: str, subject: str) -> int:
        """The stream sequence of the last message stored on `subject` (wildcards allowed); 0 when there is none."""
        try:
            reply = await self.request(f"STREAM.MSG.GET.{stream}", {"last_by_subj": subject})
        except NotFoundError as exc:
            if exc.err_code == ERR_NO_MESSAGE_FOUND:
                return 0
            raise
        return int(reply["message"]["seq"])

    async def kv_purge(self, bucket: str, key: str) -> None:
        """Remove every entry of `key` and leave no delete marker (unlike a KV delete): the key is simply gone."""
        await self.request(f"STREAM.PURGE.KV_{bucket}", {"filter": kv_subject(bucket, key)})
