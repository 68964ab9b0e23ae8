"""What an operator's tools do, for the tests: GET a service's /metrics, /healthz or /readyz over HTTP, and
read Prometheus samples."""

from __future__ import annotations

import asyncio
import json
import time

from prometheus_client.parser import text_string_to_metric_families


async def http_get(port: int, path: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    await writer.drain()
    answer = await reader.read()
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def scrape(port: int) -> list:
    """Every sample on the service's /metrics."""
    status, body = await http_get(port, "/metrics")
    assert status == 200, body
    return [sample for family in text_string_to_metric_families(body.decode()) for sample in family.samples]


def total(samples: list, name: str, **labels: str) -> float:
    """The sum of the samples called `name` whose labels include `labels`."""
    return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


async def readiness(port: int) -> tuple[int, dict]:
    status, body = await http_get(port, "/readyz")
    return status, json.loads(body)


async def wait_until_ready(tel, timeout_s: float = 30.0) -> None:
    """Until the service's /readyz answers 200 (its endpoint first has to be up)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if tel.metrics_port is not None and (await readiness(tel.metrics_port))[0] == 200:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{tel.service} not ready after {timeout_s} s: {tel.readiness.report()}")
