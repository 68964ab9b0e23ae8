"""Who may do what on NATS: one nkey user per service, per tenant and for the operator, each with subject
permissions, and the nats-server config that holds them; plus the options a client connects with.

Tenant isolation is enforced by nats-server itself: every subject carries its tenant (subjects.py), so a
tenant's user is allowed only subjects with its own tenant token.

A tenant creates no JetStream consumer itself. A consumer's create request names its filter in the subject
(`$JS.API.CONSUMER.CREATE.<stream>.<name>.<filter>`), but its deliver subject only in the body, and nats-server
(2.15.1, checked by tests/integration/test_auth.py) does not check that subject against the creator's permissions:
a tenant allowed to create a push consumer on its own filter could have the server push its messages onto
`transcript.<other>.…` or `_INBOX_<other>.…`, into another tenant's subscribers. Whether a create request makes a
push or a pull consumer is in the body too, so no permission on the create subject can allow only pull consumers.
Instead a tenant's durable readers are provisioned for it (`jetscribe tenant reader T NAME`, with the operator's
rights): PULL consumers named `reader_<T>_<NAME>` filtered to T's subjects, and T's user may only fetch from, look
at and ack those names (`tenant_reader_subjects`). Live reading needs no consumer: core subscriptions on T's own
subjects. Accounts per tenant (each importing its subjects from the services' account) were weighed: a tenant
would still need the consumer API of the account holding TRANSCRIPTS, with the same unchecked deliver subject,
unless each tenant kept a sourced stream of its own; more servers' state for the same guarantee.
"""

from __future__ import annotations

import hashlib
import json
import os
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from jetscribe.shared import subjects
from jetscribe.shared.config import StreamSettings

ROLES = ("ingest", "transcriber", "persister", "operator", "tenant", "root")
SERVICE_ROLES = ("ingest", "transcriber", "persister")

_SERVICE_INBOX = "_INBOX.>"  # nats-py's default inbox prefix: the services' and the operator's replies
_MICRO = ("$SRV.>",)  # the micro-services API every service answers (discovery.py)


def tenant_inbox_prefix(tenant: str) -> str:
    """A tenant's reply inboxes: `_INBOX_<tenant>.<id>`; its user may subscribe to these and no others', so one
    tenant cannot read another's replies (nor the services', on `_INBOX.>`)."""
    if not subjects.is_valid_token(tenant):
        raise ValueError(f"tenant {tenant!r} must be 1-64 letters, digits, '_' or '-'")
    return f"_INBOX_{tenant}"


API_KEYS_FILE = "api-keys.json"  # in the keyring's folder: tenant -> sha256 of its WebSocket API key


def api_key_hash(key: str) -> str:
    """What is kept of a tenant's WebSocket API key: its sha256 (the key is 32 random bytes: no slow hash needed)."""
    return hashlib.sha256(key.encode()).hexdigest()


READER_FILTERS = ("transcripts", "events", "all")


def reader_filter(tenant: str, what: str = "transcripts") -> str:
    """The filter of a tenant's reader on TRANSCRIPTS: its transcripts, its events, or both."""
    if what not in READER_FILTERS:
        raise ValueError(f"a reader reads {', '.join(READER_FILTERS)}, not {what!r}")
    return {"transcripts": f"transcript.{tenant}.>", "events": f"session.{tenant}.>", "all": f"*.{tenant}.>"}[what]


def reader_consumer(tenant: str, name: str) -> str:
    """The TRANSCRIPTS consumer of tenant's reader `name`. Tenant and name are tokens, and the keyring refuses a
    consumer name that another tenant's reader already has (`reader_a_b_x` could be a's `b_x` or a_b's `x`)."""
    for what, value in (("tenant", tenant), ("reader", name)):
        if not subjects.is_valid_token(value):
            raise ValueError(f"{what} {value!r} must be 1-64 letters, digits, '_' or '-'")
    return f"reader_{tenant}_{name}"


def tenant_reader_subjects(consumer: str) -> list[str]:
    """What a tenant may publish to use its provisioned reader: pull (MSG.NEXT), look at it (INFO), ack."""
    stream = subjects.TRANSCRIPTS_STREAM
    return [
        f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}",
        f"$JS.API.CONSUMER.INFO.{stream}.{consumer}",
        f"$JS.ACK.{stream}.{consumer}.>",
    ]


@dataclass(frozen=True)
class Permissions:
    """A user's subject permissions: allow lists (everything else is denied) and whether it may answer
    requests it received (`allow_responses`: publish once to each received message's reply subject)."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    allow_responses: bool = False

    def as_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "publish": {"allow": list(self.publish)},
            "subscribe": {"allow": list(self.subscribe)},
        }
        if self.allow_responses:
            config["allow_responses"] = True
        return config


def _errors_of(service: str) -> str:
    """Every tenant's error subject of a service, `_` (unknown tenant) among them. Not `subjects.errors(service, "*")`:
    that names `errors.<service>._`, since `*` is no valid tenant."""
    return f"errors.{service}.*"


DATA_STREAMS = (subjects.AUDIO_STREAM, subjects.TRANSCRIPTS_STREAM, subjects.ERRORS_STREAM)


def _stream_use(stream: str) -> list[str]:
    """What a service may ask of a stream it uses: make it or bring it to its config (every service does at
    start), look at it, get a message, and make, look at, pull from, unpin and reset consumers. Not: delete it,
    purge it, delete a message, snapshot or restore it."""
    api = "$JS.API"
    return [
        f"{api}.STREAM.CREATE.{stream}",
        f"{api}.STREAM.UPDATE.{stream}",
        f"{api}.STREAM.INFO.{stream}",
        f"{api}.STREAM.MSG.GET.{stream}",
        f"{api}.DIRECT.GET.{stream}",
        f"{api}.DIRECT.GET.{stream}.>",
        f"{api}.CONSUMER.CREATE.{stream}",
        f"{api}.CONSUMER.CREATE.{stream}.>",
        f"{api}.CONSUMER.DURABLE.CREATE.{stream}.>",
        f"{api}.CONSUMER.INFO.{stream}.>",
        f"{api}.CONSUMER.MSG.NEXT.{stream}.>",
        f"{api}.CONSUMER.NAMES.{stream}",
        f"{api}.CONSUMER.LIST.{stream}",
        f"{api}.CONSUMER.UNPIN.{stream}.>",
        f"{api}.CONSUMER.RESET.{stream}.>",
    ]


def service_jetstream_api(buckets: Iterable[str], read_buckets: Iterable[str] = ()) -> list[str]:
    """A service's JetStream API rights, instead of all of `$JS.API.>`: the data streams (AUDIO, TRANSCRIPTS,
    ERRORS) as `_stream_use` says, its KV buckets the same plus a purge (a key's purge is a filtered purge,
    `jetstream.JetStreamAPI.kv_purge`) and deleting their consumers (watchers); buckets it only reads, info
    and gets. So a service's key cannot delete or purge a stream, nor touch another service's buckets."""
    rules = ["$JS.API.INFO", "$JS.API.STREAM.NAMES"]
    for stream in DATA_STREAMS:
        rules += _stream_use(stream)
    for bucket in buckets:
        rules += [
            *_stream_use(f"KV_{bucket}"),
            f"$JS.API.STREAM.PURGE.KV_{bucket}",
            f"$JS.API.CONSUMER.DELETE.KV_{bucket}.>",
        ]
        rules.append(f"$KV.{bucket}.>")
    for bucket in read_buckets:
        stream = f"KV_{bucket}"
        rules += [
            f"$JS.API.STREAM.INFO.{stream}",
            f"$JS.API.STREAM.MSG.GET.{stream}",
            f"$JS.API.DIRECT.GET.{stream}",
            f"$JS.API.DIRECT.GET.{stream}.>",
        ]
    return rules


def permissions(role: str, tenant: str | None = None, readers: Iterable[str] = ()) -> Permissions:
    """What a user of `role` may do; `tenant` for the tenant role (a bot or a downstream reader of it), with the
    consumer names of its provisioned `readers` (no consumer of its own: see the module's docstring)."""
    if role == "tenant":
        if tenant is None:
            raise ValueError("a tenant user needs its tenant")
        inbox = tenant_inbox_prefix(tenant)
        return Permissions(
            publish=(
                f"ingest.audio.{tenant}.>",
                f"ingest.session.{tenant}.>",
                subjects.history(tenant, "*"),  # its sessions' stored transcripts, through a gateway
                *(s for consumer in sorted(readers) for s in tenant_reader_subjects(consumer)),
            ),
            subscribe=(f"transcript.{tenant}.>", f"session.{tenant}.>", subjects.errors("*", tenant), f"{inbox}.>"),
        )
    if tenant is not None or readers:
        raise ValueError(f"role {role} has no tenant")
    if role == "ingest":
        return Permissions(
            publish=(
                subjects.AUDIO_PUBLISHED,
                subjects.INGEST_PARTITIONS_ALL,  # forwarding to the partition's holder
                subjects.INGEST_AUDIO_ALL,  # a multichannel chunk split: each channel a request of its track session
                subjects.INGEST_SESSION_ALL,
                _errors_of("ingest"),
                "$JS.ACK.TRANSCRIPTS.>",  # its consumer of the transcribers' ended/rejected events
                *service_jetstream_api(
                    (subjects.INGEST_MEMBERS_BUCKET, subjects.INGEST_LEASES_BUCKET, subjects.TENANT_SESSIONS_BUCKET),
                    read_buckets=(subjects.SESSION_CHECKPOINTS_BUCKET,),  # where a resumed session's audio ends
                ),
            ),
            subscribe=(
                subjects.INGEST_AUDIO_ALL,
                subjects.INGEST_SESSION_ALL,
                subjects.INGEST_PARTITIONS_ALL,
                subjects.SESSION_EVENTS_ALL,
                subjects.HISTORY_ALL,  # tenants' history requests (services/ingest/history.py)
                subjects.TRANSCRIPTS_ALL,  # a WebSocket client's segments, sent back on its socket
                _SERVICE_INBOX,
                *_MICRO,
                subjects.service_endpoint("ingest", "*", "*"),
            ),
            allow_responses=True,  # the bots' replies, on their tenants' inboxes
        )
    if role == "transcriber":
        return Permissions(
            publish=(
                subjects.TRANSCRIPTS_ALL,
                subjects.SESSION_EVENTS_ALL,
                subjects.TRANSCRIBER_CLAIMS_ALL,  # its claims on its partitions (group.py, fenced writes)
                _errors_of("transcriber"),
                subjects.TRANSCRIBER_STATS_ALL,
                "$JS.ACK.AUDIO.>",
                *service_jetstream_api(
                    (
                        subjects.PARTITION_LEASES_BUCKET,
                        subjects.TRANSCRIBER_MEMBERS_BUCKET,
                        subjects.SESSION_CHECKPOINTS_BUCKET,
                    )
                ),
            ),
            subscribe=(_SERVICE_INBOX, *_MICRO, subjects.service_endpoint("transcriber", "*", "*")),
            allow_responses=True,
        )
    if role == "persister":
        return Permissions(
            publish=(_errors_of("persister"), "$JS.ACK.TRANSCRIPTS.>", *service_jetstream_api(())),
            subscribe=(
                _SERVICE_INBOX,
                *_MICRO,
                subjects.service_endpoint("persister", "*", "*"),
                # a new leader of its consumer: acks the old one took may be lost (services/persister/app.py)
                f"$JS.EVENT.ADVISORY.CONSUMER.LEADER_ELECTED.{subjects.TRANSCRIPTS_STREAM}.{subjects.PERSISTER_CONSUMER}",
            ),
            allow_responses=True,
        )
    if role == "operator":
        # Reads everything and manages consumers; writes nothing the services trust (no stream, no KV).
        return Permissions(
            publish=(
                "ingest.audio.*.>",
                "ingest.session.*.>",  # `jetscribe stream` / `demo` as any tenant
                subjects.HISTORY_ALL,
                "$SRV.>",
                "$JS.API.INFO",
                "$JS.API.STREAM.NAMES",
                "$JS.API.STREAM.LIST",
                "$JS.API.STREAM.INFO.>",
                "$JS.API.STREAM.MSG.GET.>",
                "$JS.API.DIRECT.GET.>",
                "$JS.API.CONSUMER.>",
                "$JS.FC.>",
            ),
            subscribe=(">",),
            allow_responses=True,
        )
    if role == "root":  # only where a test fixture asks for it (tests/conftest.py): publishes test data directly
        return Permissions(publish=(">",), subscribe=(">",), allow_responses=True)
    raise ValueError(f"unknown role {role!r}: one of {', '.join(ROLES)}")


@dataclass(frozen=True)
class NatsUser:
    """One nkey user of the server: its public key (`U...`), its role and, for a tenant, the tenant."""

    nkey: str
    role: str
    tenant: str | None = None
    readers: tuple[str, ...] = ()  # a tenant's provisioned readers' consumer names

    def as_config(self) -> dict[str, Any]:
        return {"nkey": self.nkey, "permissions": permissions(self.role, self.tenant, self.readers).as_config()}


@dataclass(frozen=True)
class ServerTLS:
    """The server's certificate and key; with `ca_file`, clients must show a certificate that CA signed."""

    cert_file: str
    key_file: str
    ca_file: str = ""

    def as_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {"cert_file": self.cert_file, "key_file": self.key_file}
        if self.ca_file:
            config.update(ca_file=self.ca_file, verify=True)
        return config


@dataclass(frozen=True)
class Cluster:
    """A node's cluster block: its name, where it listens for routes and the routes to its peers."""

    name: str
    listen: str  # host:port
    routes: tuple[str, ...] = field(default_factory=tuple)  # nats-route://host:port of every node


def server_config(
    *,
    host: str,
    port: int,
    store_dir: str,
    users: Iterable[NatsUser] | None,
    server_name: str = "",
    cluster: Cluster | None = None,
    tls: ServerTLS | None = None,
    max_payload: int = 16 * 1024 * 1024,
    monitor_port: int | None = None,
) -> str:
    """The nats-server config of one node: JetStream, its users and their permissions (None: no auth, for a
    server nobody else can reach), TLS and the cluster routes. Every node of a cluster gets the same users."""
    config: dict[str, Any] = {
        "listen": f"{host}:{port}",
        # An oversized audio chunk then reaches the gateway's own size check (clear error) instead of failing
        # inside the client.
        "max_payload": max_payload,
        "jetstream": {"store_dir": store_dir},
    }
    if server_name:
        config["server_name"] = server_name
    if monitor_port:  # /healthz: JetStream ready and, in a cluster, caught up (jetscribe/devstack/servers.py)
        config["http"] = f"{host}:{monitor_port}"
    if users is not None:
        config["authorization"] = {"users": [user.as_config() for user in users]}
    if tls is not None:
        config["tls"] = tls.as_config()
    if cluster is not None:
        config["cluster"] = {"name": cluster.name, "listen": cluster.listen, "routes": list(cluster.routes)}
    # nats-server reads JSON values; quoted, `$JS...` is a string, not a variable.
    return "".join(f"{key}: {json.dumps(value, indent=2)}\n" for key, value in config.items())


def users_config(users: Iterable[NatsUser]) -> str:
    """The `authorization` block alone, for a file a cluster's nodes include (`deploy/nats/nats.conf`, written by
    `jetscribe nats-users`): the same users and permissions `server_config` gives a single server."""
    return f"authorization: {json.dumps({'users': [user.as_config() for user in users]}, indent=2)}\n"


@dataclass(frozen=True)
class ClientAuth:
    """How a client proves who it is and checks the server: an nkey seed file and TLS files."""

    creds: str = ""  # a file holding the user's nkey seed (`S...`); empty: connect without a user
    tls_ca: str = ""  # CA bundle that signed the server's certificate; set, or a tls:// URL, means TLS
    tls_cert: str = ""  # a client certificate, where the server verifies clients
    tls_key: str = ""

    @classmethod
    def of(cls, settings: StreamSettings) -> ClientAuth:
        """From a StreamSettings (config.py), whose fields read NATS_CREDS and JETSCRIBE_NATS_TLS_*."""
        return cls(settings.nats_creds, settings.nats_tls_ca, settings.nats_tls_cert, settings.nats_tls_key)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ClientAuth:
        return cls(
            env.get("NATS_CREDS", ""),
            env.get("JETSCRIBE_NATS_TLS_CA", ""),
            env.get("JETSCRIBE_NATS_TLS_CERT", ""),
            env.get("JETSCRIBE_NATS_TLS_KEY", ""),
        )

    def connect_options(self, url: str, tenant: str | None = None) -> dict[str, Any]:
        """Keyword arguments for nats-py's connect: the seed file (read by nats-py to sign the server's nonce,
        never kept or logged here), a tenant's own inbox prefix, and an SSL context when TLS is asked for."""
        options: dict[str, Any] = {}
        if self.creds:
            options["nkeys_seed"] = self.creds
        if tenant is not None:
            options["inbox_prefix"] = tenant_inbox_prefix(tenant)
        if self.tls_ca or self.tls_cert or url.startswith("tls://"):
            context = ssl.create_default_context(cafile=self.tls_ca or None)
            if self.tls_cert:
                context.load_cert_chain(self.tls_cert, self.tls_key or None)
            options["tls"] = context
        return options


def env_connect_options(url: str) -> dict[str, Any]:
    """nats-py connect options from NATS_CREDS and JETSCRIBE_NATS_TLS_* (scripts and tests that connect
    with what the environment says)."""
    return ClientAuth.from_env(os.environ).connect_options(url)
