"""The gateway's view of the tenants' API keys (`api-keys.json`), re-read when the file changes."""

import json
import os

from jetscribe.services.ingest.websocket import ApiKeys
from jetscribe.shared.natsauth import api_key_hash


def write_keys(path, keys: dict[str, str], mtime_ns: int | None = None) -> None:
    """As the keyring writes it: aside, then renamed over the old file; `mtime_ns` pins the new file's mtime."""
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps({tenant: api_key_hash(key) for tenant, key in keys.items()}))
    if mtime_ns is not None:
        os.utime(partial, ns=(mtime_ns, mtime_ns))
    partial.replace(path)


def test_a_key_replaced_by_one_of_the_same_size_in_the_same_mtime_tick_is_seen(tmp_path):
    path = tmp_path / "api-keys.json"
    write_keys(path, {"acme": "jsk_old"}, mtime_ns=1_000_000_000)
    keys = ApiKeys(path)
    assert keys.tenant_of("jsk_old") is not None
    write_keys(path, {"acme": "jsk_new"}, mtime_ns=1_000_000_000)  # same size, same mtime: another file
    assert keys.tenant_of("jsk_old") is None
    assert keys.tenant_of("jsk_new") == ("acme", api_key_hash("jsk_new"))


def test_a_deleted_file_means_no_keys_and_a_new_one_is_read(tmp_path):
    path = tmp_path / "api-keys.json"
    keys = ApiKeys(path)
    assert keys.tenant_of("jsk_a") is None
    write_keys(path, {"acme": "jsk_a"})
    assert keys.valid("acme", api_key_hash("jsk_a"))
    path.unlink()
    assert not keys.valid("acme", api_key_hash("jsk_a"))
