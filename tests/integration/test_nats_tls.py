"""NATS with TLS, certificates made here with trustme: the services' connect and the CLI honour
JETSCRIBE_NATS_TLS_CA (and a client certificate where the server verifies clients); without the CA, or
without a client certificate the server asks for, the connection is refused."""

import asyncio
import json
import os
import subprocess
import sys

import nats
import pytest
import trustme

from jetscribe.devstack.servers import NatsServer
from jetscribe.shared.config import StreamSettings
from jetscribe.shared.natsauth import ClientAuth, ServerTLS
from jetscribe.shared.streams import connect

pytestmark = pytest.mark.timeout(60)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, the server's certificate for 127.0.0.1 and a client certificate, as files."""
    folder = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    files = {name: folder / f"{name}.pem" for name in ("ca", "server", "server-key", "client", "client-key")}
    ca.cert_pem.write_to_path(str(files["ca"]))
    for name, cert in (("server", ca.issue_cert("127.0.0.1", "localhost")), ("client", ca.issue_cert("client"))):
        cert.private_key_pem.write_to_path(str(files[f"{name}-key"]))
        with open(files[name], "wb") as out:
            for pem in cert.cert_chain_pems:
                out.write(pem.bytes())
    return {name: str(path) for name, path in files.items()}


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory, pki):
    with NatsServer(tmp_path_factory.mktemp("tls-nats"), tls=ServerTLS(pki["server"], pki["server-key"])) as server:
        yield server


async def test_a_service_connects_with_the_ca_from_its_settings(tls_server, pki):
    assert tls_server.url.startswith("tls://")
    settings = StreamSettings(nats_url=tls_server.url, nats_tls_ca=pki["ca"])
    nc = await connect(settings, "tls-test")
    try:
        assert nc.is_connected
        assert (await nc.jetstream().account_info()) is not None
    finally:
        await nc.close()


async def test_without_the_ca_the_server_is_not_trusted(tls_server):
    options = ClientAuth(os.environ["NATS_CREDS"]).connect_options(tls_server.url)
    with pytest.raises(Exception, match="(?i)certificate verify failed"):
        await nats.connect(tls_server.url, max_reconnect_attempts=0, allow_reconnect=False, **options)


async def test_a_server_that_verifies_clients_needs_a_client_certificate(tmp_path, pki):
    tls = ServerTLS(pki["server"], pki["server-key"], ca_file=pki["ca"])
    with NatsServer(tmp_path / "nats", tls=tls) as server:
        creds = os.environ["NATS_CREDS"]
        without = ClientAuth(creds, tls_ca=pki["ca"]).connect_options(server.url)
        with pytest.raises(Exception):  # noqa: B017 - the handshake fails: an SSL or a connection error
            await asyncio.wait_for(
                nats.connect(server.url, max_reconnect_attempts=0, allow_reconnect=False, **without), 10
            )
        auth = ClientAuth(creds, tls_ca=pki["ca"], tls_cert=pki["client"], tls_key=pki["client-key"])
        nc = await nats.connect(server.url, **auth.connect_options(server.url))
        assert nc.is_connected
        await nc.close()


def test_the_cli_honours_the_tls_environment(tls_server, pki):
    env = {**os.environ, "NATS_URL": tls_server.url, "JETSCRIBE_NATS_TLS_CA": pki["ca"], "PYTHONPATH": ROOT}
    argv = [sys.executable, "-m", "jetscribe.cli.main", "status", "--format", "json", "--wait", "0.3"]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr  # reached it, and says the services are missing: nothing runs there
    assert json.loads(done.stdout)["missing"]
    env.pop("JETSCRIBE_NATS_TLS_CA")
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert (
        done.returncode == 1 and "TLS with NATS" in done.stderr
    )  # a failed operation: 1 (usage errors: 2) and "JETSCRIBE_NATS_TLS_CA" in done.stderr
