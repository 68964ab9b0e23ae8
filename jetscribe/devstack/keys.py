"""The local stack's NATS users: one nkey per service, the operator and each tenant, kept as seed files.

A folder (`<home>/nats-keys` for `jetscribe up`, `JETSCRIBE_NATS_KEYS` to put it elsewhere) holds
`<name>.nk` seed files (0600) and `tenants.json` (each tenant's public key, whether it is revoked, and its
provisioned readers: the TRANSCRIPTS consumers its user may pull from).
The nats-server config is made from it (shared/natsauth.py); a revoked tenant's user leaves the config.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

import nkeys

from jetscribe.shared import subjects
from jetscribe.shared.natsauth import (
    API_KEYS_FILE,
    SERVICE_ROLES,
    NatsUser,
    api_key_hash,
    reader_consumer,
    reader_filter,
)

OPERATOR = "operator"
ROOT = "root"


def new_seed() -> bytes:
    """A fresh user nkey seed (`SU...`)."""
    return bytes(nkeys.encode_seed(secrets.token_bytes(32), nkeys.PREFIX_BYTE_USER))


def public_key(seed: bytes) -> str:
    pair = nkeys.from_seed(bytearray(seed))
    try:
        return pair.public_key.decode()
    finally:
        pair.wipe()


class TenantError(ValueError):
    """A tenant name that cannot be used, or one the keys do not know."""


class Keyring:
    """The seed files of one stack's NATS users."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def path(self, name: str) -> Path:
        """The seed file of `name`: a service role, `operator`, `root` or `tenant-<T>`."""
        return self.folder / f"{name}.nk"

    def tenant_path(self, tenant: str) -> Path:
        return self.path(f"tenant-{tenant}")

    def _ensure_folder(self) -> None:
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.folder.chmod(0o700)

    def _ensure(self, name: str) -> Path:
        path = self.path(name)
        if not path.exists():
            self._ensure_folder()
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(new_seed() + b"\n")
        return path

    def ensure_services(self) -> Keyring:
        """Seeds for the three services and the operator, made once."""
        for name in (*SERVICE_ROLES, OPERATOR):
            self._ensure(name)
        return self

    def ensure_root(self) -> Path:
        """A user allowed everything: only the test fixtures make one (their tests publish into the streams)."""
        return self._ensure(ROOT)

    def _tenants(self) -> dict[str, dict[str, object]]:
        path = self.folder / "tenants.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def _save_tenants(self, tenants: dict[str, dict[str, object]]) -> None:
        self._ensure_folder()
        path = self.folder / "tenants.json"
        path.with_suffix(".tmp").write_text(json.dumps(tenants, indent=2, sort_keys=True))
        path.with_suffix(".tmp").replace(path)

    def add_tenant(self, tenant: str) -> Path:
        """Make tenant's user (a new key if it was revoked); returns its seed file."""
        if not subjects.is_valid_token(tenant):
            raise TenantError(f"tenant {tenant!r} must be 1-64 letters, digits, '_' or '-'")
        tenants = self._tenants()
        if tenants.get(tenant, {}).get("revoked"):
            self.tenant_path(tenant).unlink(missing_ok=True)
        path = self._ensure(f"tenant-{tenant}")
        tenants[tenant] = {**tenants.get(tenant, {}), "nkey": public_key(path.read_bytes().strip()), "revoked": False}
        self._save_tenants(tenants)
        return path

    def revoke_tenant(self, tenant: str) -> list[str]:
        """Take tenant's user out of the server config (at the next reload), delete its seed and its API key and
        forget its readers; returns their consumer names, for the caller to delete on TRANSCRIPTS."""
        tenants = self._tenants()
        if tenant not in tenants:
            raise TenantError(f"no tenant {tenant!r}; `jetscribe tenant list` shows them")
        readers = dict(tenants[tenant].pop("readers", None) or {})
        tenants[tenant]["revoked"] = True
        self._save_tenants(tenants)
        self.tenant_path(tenant).unlink(missing_ok=True)
        hashes = self._api_key_hashes()
        if hashes.pop(tenant, None) is not None:
            self._save_api_key_hashes(hashes)
        return sorted(str(reader["consumer"]) for reader in readers.values())

    @property
    def api_keys_path(self) -> Path:
        return self.folder / API_KEYS_FILE

    def new_api_key(self, tenant: str) -> str:
        """A fresh API key for tenant's WebSocket clients (the gateway's `Authorization: Token <key>`); only its
        sha256 is kept, so it is shown once. A tenant has one key: a new one replaces the old."""
        if self._tenants().get(tenant, {}).get("revoked", True):
            raise TenantError(f"no tenant {tenant!r}; `jetscribe tenant add {tenant}` first")
        key = f"jsk_{secrets.token_urlsafe(32)}"
        hashes = self._api_key_hashes()
        hashes[tenant] = api_key_hash(key)
        self._save_api_key_hashes(hashes)
        return key

    def _api_key_hashes(self) -> dict[str, str]:
        path = self.api_keys_path
        return dict(json.loads(path.read_text())) if path.exists() else {}

    def _save_api_key_hashes(self, hashes: dict[str, str]) -> None:
        self._ensure_folder()
        partial = self.api_keys_path.with_suffix(".partial")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(json.dumps(hashes, indent=2, sort_keys=True))
        partial.replace(self.api_keys_path)

    def add_reader(self, tenant: str, name: str, what: str = "transcripts") -> tuple[str, str]:
        """Record tenant's reader `name` (its consumer then goes into the tenant's permissions at the next
        reload); returns (consumer name, filter). The same reader again is the same; a consumer name another
        tenant's reader has, or the same reader with another filter, is refused."""
        tenants = self._tenants()
        if tenant not in tenants or tenants[tenant].get("revoked"):
            raise TenantError(f"no tenant {tenant!r}; `jetscribe tenant add {tenant}` first")
        try:
            consumer, filter_subject = reader_consumer(tenant, name), reader_filter(tenant, what)
        except ValueError as exc:
            raise TenantError(str(exc)) from None
        for other, info in tenants.items():
            for other_name, reader in dict(info.get("readers") or {}).items():
                if reader["consumer"] == consumer and (other, other_name) != (tenant, name):
                    raise TenantError(
                        f"consumer {consumer} is tenant {other}'s reader {other_name}: choose another name"
                    )
                if (other, other_name) == (tenant, name) and reader["filter"] != filter_subject:
                    raise TenantError(f"reader {name} of {tenant} reads {reader['filter']}; remove it first")
        readers = dict(tenants[tenant].get("readers") or {})
        readers[name] = {"consumer": consumer, "filter": filter_subject}
        tenants[tenant]["readers"] = readers
        self._save_tenants(tenants)
        return consumer, filter_subject

    def remove_reader(self, tenant: str, name: str) -> str:
        """Forget tenant's reader `name` (out of its permissions at the next reload); returns its consumer name."""
        tenants = self._tenants()
        readers = dict(tenants.get(tenant, {}).get("readers") or {})
        if name not in readers:
            raise TenantError(f"tenant {tenant!r} has no reader {name!r}")
        consumer = str(readers.pop(name)["consumer"])
        tenants[tenant]["readers"] = readers
        self._save_tenants(tenants)
        return consumer

    def readers(self, tenant: str) -> dict[str, tuple[str, str]]:
        """Tenant's readers: name -> (consumer, filter)."""
        readers = dict(self._tenants().get(tenant, {}).get("readers") or {})
        return {name: (str(r["consumer"]), str(r["filter"])) for name, r in sorted(readers.items())}

    def tenants(self) -> dict[str, bool]:
        """Every tenant made here, and whether it is revoked."""
        return {name: bool(info.get("revoked")) for name, info in sorted(self._tenants().items())}

    def users(self) -> list[NatsUser]:
        """The users the server config lists: services, operator, root if made, tenants not revoked."""
        users = []
        for name in (*SERVICE_ROLES, OPERATOR, ROOT):
            path = self.path(name)
            if path.exists():
                users.append(NatsUser(public_key(path.read_bytes().strip()), name))
        for tenant, info in sorted(self._tenants().items()):
            if not info.get("revoked"):
                readers = tuple(sorted(str(r["consumer"]) for r in dict(info.get("readers") or {}).values()))
                users.append(NatsUser(str(info["nkey"]), "tenant", tenant, readers))
        return users
