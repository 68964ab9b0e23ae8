"""Tenants' API keys: issued once, stored as digests, checked the same way by the gateway and the web process."""

from jetscribe.shared.apikeys import API_KEYS_FILE, ApiKeys


def test_a_key_names_its_tenant_until_revoked_and_the_file_holds_no_key(tmp_path):
    keys = ApiKeys(tmp_path)
    assert keys.tenant_of("js_nothing") is None  # no file yet
    acme, acme2, other = keys.issue("acme"), keys.issue("acme"), keys.issue("other")
    assert len({acme, acme2, other}) == 3 and acme.startswith("js_")
    assert [keys.tenant_of(k) for k in (acme, acme2, other)] == ["acme", "acme", "other"]
    assert keys.tenant_of(acme + "x") is None
    stored = (tmp_path / API_KEYS_FILE).read_text()
    assert acme not in stored and other not in stored
    assert (tmp_path / API_KEYS_FILE).stat().st_mode & 0o777 == 0o600

    reader = ApiKeys(tmp_path)  # another process (the gateway, the web process) reading the same folder
    assert reader.tenant_of(other) == "other"
    assert keys.revoke("acme") == 2
    assert reader.tenant_of(acme) is None and reader.tenant_of(other) == "other"  # it sees the change at once
