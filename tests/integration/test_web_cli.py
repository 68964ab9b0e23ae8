"""`jetscribe web`: the captions page and session browser as a process of its own, on a real PostgreSQL."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

from jetscribe.devstack.servers import free_port
from jetscribe.services.persister.migrate import upgrade


def _get(url: str, key: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"Authorization": f"Token {key}"} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as refused:
        return refused.code, refused.read()


def test_jetscribe_web_serves_the_page_and_a_tenant_s_sessions_and_stops_on_ctrl_c(database_url, nats_keys, tmp_path):
    upgrade(database_url)
    nats_keys.add_tenant("webcli")
    key = nats_keys.new_api_key("webcli")
    port = free_port()
    env = {**os.environ, "DATABASE_URL": database_url, "JETSCRIBE_HOME": str(tmp_path / "home")}
    web = subprocess.Popen(
        [sys.executable, "-m", "jetscribe.cli.main", "web", "--port", str(port), "--gateway", "ws://127.0.0.1:8765"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert web.stdout.readline() == f"captions page: http://127.0.0.1:{port}/  (Ctrl-C stops it)\n"
        page = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 30
        while True:  # its port opens once it has started
            try:
                status, body = _get(page)
                break
            except urllib.error.URLError:
                assert web.poll() is None and time.monotonic() < deadline, web.stderr.read()
                time.sleep(0.1)
        assert status == 200 and b"/static/captions.js" in body
        assert json.loads(_get(f"{page}config.json")[1]) == {
            "gateway_url": "ws://127.0.0.1:8765",
            "key_parameter": "token",
        }
        assert _get(f"{page}static/captions.js")[0] == 200
        assert _get(f"{page}static/../app.py")[0] == 404
        assert _get(f"{page}api/sessions", key) == (200, b"[]")
        status, body = _get(f"{page}api/sessions", "jsk_wrong")
        assert status == 401 and json.loads(body)["code"] == "unknown_key"
        web.send_signal(signal.SIGINT)
        assert web.wait(30) == 0
        assert "refused GET /api/sessions: this API key belongs to no tenant" in web.stderr.read()
    finally:
        if web.poll() is None:
            web.kill()
            web.wait()
