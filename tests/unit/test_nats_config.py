"""`jetscribe nats-config`: the config of a NATS node someone runs themselves, with the stack's users."""

import subprocess

from jetscribe.cli.main import main
from jetscribe.devstack.servers import _nats_server_binary
from jetscribe.shared.natsauth import api_key_hash


def test_it_prints_a_config_nats_server_accepts_with_every_user_and_the_routes(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("JETSCRIBE_NATS_KEYS", str(tmp_path / "keys"))
    assert main(["tenant", "add", "acme"]) == 0
    added = capsys.readouterr().out
    key = added.split("Authorization: Token ", 1)[1].split()[0]  # its WebSocket API key, kept only as a hash
    assert key.startswith("jsk_") and api_key_hash(key) in (tmp_path / "keys" / "api-keys.json").read_text()
    argv = ["nats-config", "--listen", "127.0.0.1:4999", "--store-dir", str(tmp_path / "js"), "--server-name", "n1"]
    assert main([*argv, "--cluster-listen", "127.0.0.1:6999", "--route", "nats-route://127.0.0.1:6998"]) == 0
    text = capsys.readouterr().out
    assert text.count('"nkey"') == 5 and '"ingest.audio.acme.>"' in text and "nats-route://127.0.0.1:6998" in text
    (tmp_path / "nats.conf").write_text(text)
    checked = subprocess.run([_nats_server_binary(), "-c", str(tmp_path / "nats.conf"), "-t"], capture_output=True)
    assert checked.returncode == 0, checked.stderr
    assert main(["nats-config", "--listen", "nowhere"]) == 2
