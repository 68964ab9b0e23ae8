"""compose.yaml's NATS, run without Docker: three real nats-servers from deploy/nats/nats.conf (only the hosts, ports
and store folders rewritten, as compose's network and volumes would give them), with the users file that
`jetscribe nats-users` writes (compose's nats-auth). They form a cluster, keep the streams in three replicas, refuse
a client without a user, and a tenant's reader (examples/translate_finals.py) gets its finals, also with a node down.
"""

import asyncio
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nats
import pytest

from jetscribe.client.readers import provision_reader
from jetscribe.devstack.keys import Keyring
from jetscribe.devstack.servers import _nats_server_binary, free_port
from jetscribe.shared import subjects
from jetscribe.shared.config import StreamSettings
from jetscribe.shared.natsauth import ClientAuth
from jetscribe.shared.streams import ensure_streams
from jetscribe.shared.wire import Segment, encode

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).parents[2]
NATS_CONF = ROOT / "deploy" / "nats" / "nats.conf"
EXAMPLE = ROOT / "examples" / "translate_finals.py"
NODES = ("nats-1", "nats-2", "nats-3")


def node_config(text: str, ports: dict[str, dict[str, int]], node: str, store: Path) -> str:
    """deploy/nats/nats.conf as `node` would read it on compose's network, with this host's ports instead."""
    own = ports[node]
    text = text.replace("listen: 0.0.0.0:4222", f"listen: 127.0.0.1:{own['client']}")
    text = text.replace("http: 0.0.0.0:8222", f"http: 127.0.0.1:{own['http']}")
    text = text.replace("listen: 0.0.0.0:6222", f"listen: 127.0.0.1:{own['cluster']}")
    text = text.replace("store_dir: /data", f"store_dir: {store}")
    for name, theirs in ports.items():
        text = text.replace(f"nats-route://{name}:6222", f"nats-route://127.0.0.1:{theirs['cluster']}")
    assert "0.0.0.0" not in text and "nats-route://nats-" not in text, text
    return text


def healthy(port: int) -> bool:
    """compose's health check: GET /healthz on the monitoring port."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as answer:
            return answer.status == 200
    except OSError:
        return False


@pytest.fixture
def cluster(tmp_path):
    """The three nodes; yields (keyring, {node: client URL}, {node: process})."""
    keys = Keyring(tmp_path / "keys")
    env = {**os.environ, "JETSCRIBE_NATS_KEYS": str(keys.folder)}
    keys.add_tenant("acme")  # `docker compose run --rm nats-auth jetscribe tenant add acme`, then nats-auth again
    keys.add_reader("acme", "translate")  # `jetscribe tenant reader acme translate`: the example's reader
    users = tmp_path / "auth-volume" / "users.conf"
    made = subprocess.run(
        [sys.executable, "-m", "jetscribe.cli.main", "nats-users", "--out", str(users)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert made.returncode == 0, made.stderr
    ports = {node: {"client": free_port(), "cluster": free_port(), "http": free_port()} for node in NODES}
    processes = {}
    try:
        for node in NODES:
            folder = tmp_path / node
            (folder / "auth").mkdir(parents=True)
            (folder / "auth" / "users.conf").symlink_to(users)  # the nats-auth volume at /etc/nats/auth
            (folder / "nats.conf").write_text(node_config(NATS_CONF.read_text(), ports, node, folder / "data"))
            processes[node] = subprocess.Popen(
                [_nats_server_binary(), "-c", str(folder / "nats.conf")],
                env={"NATS_SERVER_NAME": node},
                stdout=subprocess.DEVNULL,
                stderr=(folder / "nats.log").open("wb"),
            )
        deadline = time.monotonic() + 60
        while not all(healthy(ports[node]["http"]) for node in NODES):
            for node, process in processes.items():
                assert process.poll() is None, f"{node} exited: {(tmp_path / node / 'nats.log').read_text()}"
            assert time.monotonic() < deadline, "the cluster did not become healthy"
            time.sleep(0.2)
        yield keys, {node: f"nats://127.0.0.1:{ports[node]['client']}" for node in NODES}, processes
    finally:
        for process in processes.values():
            process.kill()
            process.wait()


async def test_the_compose_nats_cluster_keeps_three_replicas_and_serves_a_tenant_with_a_node_down(cluster, tmp_path):
    keys, urls, processes = cluster
    with pytest.raises(Exception, match="(?i)authorization"):  # nobody gets in without a user
        await nats.connect(urls["nats-1"], max_reconnect_attempts=0, allow_reconnect=False)

    all_nodes = ",".join(urls.values())  # compose's NATS_URL
    settings = StreamSettings(nats_url=all_nodes, replicas=3)
    auth = ClientAuth(creds=str(keys.path("transcriber")))
    transcriber = await nats.connect(list(urls.values()), **auth.connect_options(urls["nats-1"]))
    js = transcriber.jetstream()
    await ensure_streams(js, settings)
    deadline = time.monotonic() + 30
    while True:  # a leader and two current replicas, on three different nodes
        info = await js.stream_info(subjects.TRANSCRIPTS_STREAM)
        assert info.config.num_replicas == 3
        peers = [p.name for p in (info.cluster.replicas or []) if p.current] if info.cluster else []
        if info.cluster and info.cluster.leader and len({info.cluster.leader, *peers}) == 3:
            break
        assert time.monotonic() < deadline, info.cluster
        await asyncio.sleep(0.2)

    reader, filter_subject = keys.add_reader("acme", "translate")  # recorded already: its consumer's name and filter
    deadline = time.monotonic() + 30
    while True:  # a tenant may make no consumer itself; a cluster just formed may not answer a create at once
        try:
            await provision_reader(transcriber, reader, filter_subject, max_ack_pending=1)
            break
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError, nats.js.errors.Error):
            assert time.monotonic() < deadline, "the reader's consumer could not be made for 30 s"
            await asyncio.sleep(0.2)

    async def final(session: str, segment_id: int, text: str) -> int:
        """Published as a transcriber does: again until stored (a node's loss moves the stream's leader)."""
        segment = Segment(
            tenant="acme",
            session_id=session,
            segment_id=segment_id,
            revision=1,
            status="final",
            start=0,
            end=1,
            text=text,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                return (await js.publish(subjects.transcript("acme", session), encode(segment), timeout=2)).seq
            except (
                nats.errors.TimeoutError,
                nats.errors.NoRespondersError,
                nats.js.errors.NoStreamResponseError,
                nats.js.errors.APIError,
            ):
                assert time.monotonic() < deadline, "TRANSCRIPTS took no message for 30 s with two nodes of three up"
                await asyncio.sleep(0.2)

    first = await final("s1", 0, "hello there")
    out, log = tmp_path / "translations.jsonl", tmp_path / "example.log"
    example = await asyncio.create_subprocess_exec(
        sys.executable,
        str(EXAMPLE),
        "--nats",
        urls["nats-2"],
        "--tenant",
        "acme",
        "--creds",
        str(keys.tenant_path("acme")),
        "--out",
        str(out),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=log.open("wb"),
    )
    try:

        async def lines(count: int) -> list[str]:
            deadline = time.monotonic() + 30
            while len(found := out.read_text().splitlines() if out.exists() else []) < count:
                assert example.returncode is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                await asyncio.sleep(0.1)
            return found

        assert re.search(rf'"stream_seq": {first}\b', (await lines(1))[0])
        processes["nats-3"].kill()  # one node down: the streams' other two replicas carry on
        processes["nats-3"].wait()
        second = await final("s2", 0, "general kenobi")
        assert re.search(rf'"stream_seq": {second}\b', (await lines(2))[1])
    finally:
        example.terminate()
        await example.wait()
        await transcriber.close()
