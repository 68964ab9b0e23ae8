"""Who may do what: the permission lists, the server config that holds them and a client's connect options."""

import ssl
import subprocess

import pytest

from jetscribe.devstack.keys import new_seed, public_key
from jetscribe.devstack.servers import _nats_server_binary
from jetscribe.shared.natsauth import (
    ClientAuth,
    Cluster,
    NatsUser,
    ServerTLS,
    permissions,
    reader_consumer,
    reader_filter,
    server_config,
    tenant_inbox_prefix,
)


def matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: `*` one token, `>` one or more at the end."""
    want, have = pattern.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(have) > i
        if i >= len(have) or (token != "*" and token != have[i]):
            return False
    return len(want) == len(have)


def allowed(patterns, subject):
    return any(matches(p, subject) for p in patterns)


A = permissions("tenant", "a", readers=["reader_a_tr"])

OWN_PUBLISH = [
    "ingest.audio.a.s1",
    "ingest.session.a.s1",
    "$JS.API.CONSUMER.MSG.NEXT.TRANSCRIPTS.reader_a_tr",
    "$JS.API.CONSUMER.INFO.TRANSCRIPTS.reader_a_tr",
    "$JS.ACK.TRANSCRIPTS.reader_a_tr.1.2.3.4.5.6",
]
OWN_SUBSCRIBE = ["transcript.a.s1", "session.a.s1.ended", "errors.ingest.a", "_INBOX_a.xyz.1"]
OTHERS = [
    "ingest.audio.b.s1",
    "ingest.session.b.s1",
    "transcript.b.s1",
    "session.b.s1.ended",
    "errors.ingest.b",
    "_INBOX_b.xyz",
    "_INBOX.xyz",
    "_INBOX_ab.xyz",
    "audio.a.s1",
    "transcript.a.s1",  # publishing its own transcript: only the transcriber does
    "$KV.session_checkpoints.a.s1",
    "$JS.API.CONSUMER.CREATE.TRANSCRIPTS",
    "$JS.API.CONSUMER.CREATE.TRANSCRIPTS.f1",
    "$JS.API.CONSUMER.CREATE.TRANSCRIPTS.f1.transcript.a.>",  # its own filter too: the deliver subject is unchecked
    "$JS.API.CONSUMER.MSG.NEXT.TRANSCRIPTS.reader_b_tr",
    "$JS.API.CONSUMER.INFO.TRANSCRIPTS.reader_b_tr",
    "$JS.API.CONSUMER.DELETE.TRANSCRIPTS.reader_a_tr",
    "$JS.ACK.TRANSCRIPTS.reader_b_tr.1.2.3.4.5.6",
    "$JS.API.CONSUMER.CREATE.TRANSCRIPTS.f1.transcript.b.s1",
    "$JS.API.CONSUMER.CREATE.AUDIO.f1.audio.a.s1.3",
    "$JS.API.CONSUMER.DURABLE.CREATE.TRANSCRIPTS.f1",
    "$JS.API.CONSUMER.MSG.NEXT.TRANSCRIPTS.persister",
    "$JS.API.STREAM.MSG.GET.TRANSCRIPTS",
    "$JS.API.DIRECT.GET.TRANSCRIPTS",
]


def test_a_tenant_may_publish_and_subscribe_only_its_own_subjects():
    assert all(allowed(A.publish, s) for s in OWN_PUBLISH)
    assert all(allowed(A.subscribe, s) for s in OWN_SUBSCRIBE)
    assert [s for s in OTHERS if allowed(A.publish, s) or (allowed(A.subscribe, s) and "a" not in s.split("."))] == []
    assert not allowed(A.publish, "transcript.a.s1") and not allowed(A.subscribe, "transcript.b.s1")


@pytest.mark.parametrize("subject", ["audio.t.s", "transcript.t.s", "session.t.s.ended", "$KV.partition_leases.p0"])
def test_only_the_services_write_the_streams_and_buckets(subject):
    writers = {
        r for r in ("ingest", "transcriber", "persister", "operator") if allowed(permissions(r).publish, subject)
    }
    assert writers and writers <= {"ingest", "transcriber"} and not allowed(A.publish, subject)


def test_each_service_writes_only_its_own_part():
    assert allowed(permissions("ingest").publish, "audio.t.s")
    assert not allowed(permissions("transcriber").publish, "audio.t.s")
    assert allowed(permissions("transcriber").publish, "transcript.t.s")
    assert not allowed(permissions("ingest").publish, "transcript.t.s")
    persister = permissions("persister").publish
    assert not any(allowed(persister, s) for s in ("audio.t.s", "transcript.t.s", "$KV.session_checkpoints.t.s"))


def test_a_tenant_creates_no_consumer_and_uses_only_its_readers():
    plain = permissions("tenant", "a")
    assert not any("$JS.API" in s for s in plain.publish) and not plain.allow_responses
    assert reader_consumer("a", "tr") == "reader_a_tr" and reader_filter("a", "all") == "*.a.>"
    for bad in (("a.b", "x"), ("a", "x.y"), ("a", "*")):
        with pytest.raises(ValueError):
            reader_consumer(*bad)
    with pytest.raises(ValueError):
        reader_filter("a", "audio")


@pytest.mark.parametrize("role", ["ingest", "transcriber", "persister"])
def test_a_service_cannot_delete_or_purge_a_stream_or_touch_others_buckets(role):
    publish = permissions(role).publish
    for stream in ("AUDIO", "TRANSCRIPTS", "ERRORS", "KV_partition_leases", "KV_tenant_sessions"):
        for endpoint in ("STREAM.DELETE", "STREAM.MSG.DELETE", "STREAM.SNAPSHOT", "STREAM.RESTORE"):
            assert not allowed(publish, f"$JS.API.{endpoint}.{stream}"), (role, endpoint, stream)
    for stream in ("AUDIO", "TRANSCRIPTS", "ERRORS"):
        assert not allowed(publish, f"$JS.API.STREAM.PURGE.{stream}")
        assert not allowed(publish, f"$JS.API.CONSUMER.DELETE.{stream}.persister")
        assert allowed(publish, f"$JS.API.STREAM.UPDATE.{stream}")  # every service brings the streams to its config
    assert not any(
        allowed(publish, f"$JS.API.{x}") for x in ("ACCOUNT.PURGE.x", "SERVER.REMOVE", "META.LEADER.STEPDOWN")
    )
    mine = {"ingest": "tenant_sessions", "transcriber": "partition_leases", "persister": None}[role]
    others = {"tenant_sessions", "partition_leases", "ingest_leases", "transcriber_members"} - {mine}
    if role == "ingest":
        others -= {"ingest_leases"}
    if role == "transcriber":
        others -= {"transcriber_members"}
    for bucket in others:
        assert not allowed(publish, f"$KV.{bucket}.k") and not allowed(publish, f"$JS.API.STREAM.PURGE.KV_{bucket}")
    if mine:
        assert allowed(publish, f"$KV.{mine}.k") and allowed(publish, f"$JS.API.STREAM.PURGE.KV_{mine}")


def test_tenant_names_that_are_no_subject_token_are_refused():
    for bad in ("a.b", "*", ">", "", "a b"):
        with pytest.raises(ValueError):
            tenant_inbox_prefix(bad)
    with pytest.raises(ValueError):
        permissions("tenant")
    with pytest.raises(ValueError):
        permissions("nobody")


def test_the_config_holds_every_user_and_nats_server_accepts_it(tmp_path):
    users = [NatsUser(public_key(new_seed()), role) for role in ("ingest", "transcriber", "persister", "operator")]
    users.append(NatsUser(public_key(new_seed()), "tenant", "acme"))
    common = dict(host="127.0.0.1", port=4999, store_dir=str(tmp_path / "js"), users=users, server_name="n1")
    cluster = Cluster("jetscribe", "127.0.0.1:6222", ("nats-route://127.0.0.1:6223",))
    with_tls = server_config(**common, tls=ServerTLS("/c.pem", "/k.pem", ca_file="/ca.pem"))
    assert '"ca_file": "/ca.pem"' in with_tls and '"verify": true' in with_tls
    text = server_config(**common, cluster=cluster)  # checked without TLS: its files do not exist here
    assert (
        '"ingest.audio.acme.>"' in text
        and '"$JS.API.STREAM.INFO.AUDIO"' in text
        and "nats-route://127.0.0.1:6223" in text
    )
    path = tmp_path / "nats.conf"
    path.write_text(text)
    checked = subprocess.run([_nats_server_binary(), "-c", str(path), "-t"], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_connect_options_carry_the_seed_file_the_tenant_inbox_and_tls():
    options = ClientAuth("/keys/tenant-a.nk").connect_options("nats://h:4222", tenant="a")
    assert options == {"nkeys_seed": "/keys/tenant-a.nk", "inbox_prefix": "_INBOX_a"}
    assert isinstance(ClientAuth().connect_options("tls://h:4222")["tls"], ssl.SSLContext)
    assert ClientAuth().connect_options("nats://h:4222") == {}


@pytest.mark.parametrize("role", ["ingest", "transcriber", "persister"])
def test_a_service_reports_errors_of_every_tenant(role):
    for tenant in ("a", "acme-2", "_"):
        assert allowed(permissions(role).publish, f"errors.{role}.{tenant}")
