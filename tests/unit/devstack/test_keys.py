"""The stack's NATS keys: seed files only their owner reads, tenants added, listed and revoked."""

import stat

import pytest

from jetscribe.devstack.keys import Keyring, TenantError, public_key


def test_seeds_are_private_and_made_once(tmp_path):
    keys = Keyring(tmp_path / "keys").ensure_services()
    seed = keys.path("ingest").read_bytes()
    assert seed.startswith(b"SU") and stat.S_IMODE(keys.path("ingest").stat().st_mode) == 0o600
    assert stat.S_IMODE(keys.folder.stat().st_mode) == 0o700
    keys.ensure_services()
    assert keys.path("ingest").read_bytes() == seed
    assert {u.role for u in keys.users()} == {"ingest", "transcriber", "persister", "operator"}


def test_a_revoked_tenant_leaves_the_users_and_comes_back_with_a_new_key(tmp_path):
    keys = Keyring(tmp_path / "keys").ensure_services()
    first = public_key(keys.add_tenant("acme").read_bytes().strip())
    assert [(u.nkey, u.tenant) for u in keys.users() if u.role == "tenant"] == [(first, "acme")]
    keys.add_reader("acme", "translate")
    assert keys.revoke_tenant("acme") == ["reader_acme_translate"]  # for the CLI to delete on TRANSCRIPTS
    assert keys.tenants() == {"acme": True} and not keys.tenant_path("acme").exists()
    assert [u for u in keys.users() if u.role == "tenant"] == []
    again = public_key(keys.add_tenant("acme").read_bytes().strip())
    assert again != first and keys.tenants() == {"acme": False} and keys.readers("acme") == {}


def test_bad_or_unknown_tenants_are_refused(tmp_path):
    keys = Keyring(tmp_path / "keys")
    with pytest.raises(TenantError):
        keys.add_tenant("a.b")
    with pytest.raises(TenantError):
        keys.revoke_tenant("nobody")


def test_a_tenants_readers_go_into_its_user_and_no_consumer_name_is_shared(tmp_path):
    keys = Keyring(tmp_path / "keys").ensure_services()
    with pytest.raises(TenantError):
        keys.add_reader("acme", "tr")  # no such tenant yet
    keys.add_tenant("acme")
    keys.add_tenant("acme_x")
    assert keys.add_reader("acme", "x_tr") == ("reader_acme_x_tr", "transcript.acme.>")
    assert keys.add_reader("acme", "x_tr") == ("reader_acme_x_tr", "transcript.acme.>")  # the same again
    with pytest.raises(TenantError, match="acme's reader x_tr"):
        keys.add_reader("acme_x", "tr")  # the same consumer name: it would read acme's consumer
    with pytest.raises(TenantError, match="remove it first"):
        keys.add_reader("acme", "x_tr", "events")
    (user,) = [u for u in keys.users() if u.tenant == "acme"]
    assert user.readers == ("reader_acme_x_tr",)
    assert "$JS.API.CONSUMER.MSG.NEXT.TRANSCRIPTS.reader_acme_x_tr" in str(user.as_config())
    keys.add_tenant("acme")  # adding again keeps its readers
    assert keys.readers("acme") == {"x_tr": ("reader_acme_x_tr", "transcript.acme.>")}
    assert keys.remove_reader("acme", "x_tr") == "reader_acme_x_tr" and keys.readers("acme") == {}
    assert [u.readers for u in keys.users() if u.tenant == "acme"] == [()]


def test_a_tenants_api_key_is_kept_hashed_privately_replaced_by_a_new_one_and_gone_at_revoke(tmp_path):
    from jetscribe.shared.natsauth import api_key_hash

    keys = Keyring(tmp_path / "keys").ensure_services()
    with pytest.raises(TenantError):
        keys.new_api_key("acme")  # no such tenant yet
    keys.add_tenant("acme")
    first = keys.new_api_key("acme")
    stored = keys.api_keys_path.read_text()
    assert first not in stored and api_key_hash(first) in stored
    assert stat.S_IMODE(keys.api_keys_path.stat().st_mode) == 0o600
    second = keys.new_api_key("acme")
    assert (
        api_key_hash(first) not in keys.api_keys_path.read_text()
        and api_key_hash(second) in keys.api_keys_path.read_text()
    )
    keys.revoke_tenant("acme")
    assert "acme" not in keys.api_keys_path.read_text()
