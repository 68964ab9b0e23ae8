"""The operators' HTTP endpoint: /metrics, /healthz, /readyz over a real socket."""

import asyncio
import json

from jetscribe.shared.health import Readiness
from jetscribe.shared.http_endpoint import HttpEndpoint


async def _get(port, request):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    answer = await reader.read()
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    return status, head.decode(), body


async def test_probes_and_metrics_over_http():
    readiness = Readiness("persister").need("database")
    endpoint = HttpEndpoint(readiness, lambda: b"# a metric\nx_total 3\n", "127.0.0.1", 0)
    await endpoint.start()
    try:
        assert endpoint.port > 0
        status, _, body = await _get(endpoint.port, b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 503 and json.loads(body) == {
            "service": "persister",
            "ready": False,
            "checks": {"database": "starting"},
        }
        readiness.up("database")
        status, _, body = await _get(endpoint.port, b"GET /readyz HTTP/1.1\r\n\r\n")
        assert status == 200 and json.loads(body)["ready"] is True
        status, _, body = await _get(endpoint.port, b"GET /healthz HTTP/1.0\r\n\r\n")
        assert status == 200 and json.loads(body)["alive"] is True
        status, head, body = await _get(endpoint.port, b"GET /metrics?x=1 HTTP/1.1\r\n\r\n")
        assert status == 200 and body == b"# a metric\nx_total 3\n" and "text/plain" in head
        status, head, body = await _get(endpoint.port, b"HEAD /metrics HTTP/1.1\r\n\r\n")
        assert status == 200 and body == b"" and "Content-Length: 21" in head
        assert (await _get(endpoint.port, b"GET /nope HTTP/1.1\r\n\r\n"))[0] == 404
        assert (await _get(endpoint.port, b"POST /metrics HTTP/1.1\r\n\r\n"))[0] == 405
        assert (await _get(endpoint.port, b"nonsense\r\n\r\n"))[0] == 400
    finally:
        await endpoint.stop()


async def test_without_prometheus_metrics_is_404_and_probes_still_answer():
    endpoint = HttpEndpoint(Readiness("ingest"), None, "127.0.0.1", 0)
    await endpoint.start()
    try:
        status, _, body = await _get(endpoint.port, b"GET /metrics HTTP/1.1\r\n\r\n")
        assert status == 404 and b"OTEL_METRICS_EXPORTER" in body
        assert (await _get(endpoint.port, b"GET /readyz HTTP/1.1\r\n\r\n"))[0] == 200
    finally:
        await endpoint.stop()


async def test_a_client_that_sends_nothing_does_not_stop_the_server():
    endpoint = HttpEndpoint(Readiness("ingest"), None, "127.0.0.1", 0)
    await endpoint.start()
    try:
        _, silent = await asyncio.open_connection("127.0.0.1", endpoint.port)
        silent.close()  # gone before its request line
        assert (await _get(endpoint.port, b"GET /healthz HTTP/1.1\r\n\r\n"))[0] == 200
    finally:
        await endpoint.stop()
