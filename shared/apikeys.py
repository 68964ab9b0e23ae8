"""Tenants' API keys, for the clients that cannot speak NATS (a browser, a Deepgram client): the gateway's
WebSocket and the web process check them the same way, with `ApiKeys.tenant_of`.

A key is shown once, when it is made; the keys folder (the NATS keys' folder, `JETSCRIBE_NATS_KEYS`) keeps only
its SHA-256 in `api-keys.json` ({digest: tenant}), so reading that file gives no key away.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from pathlib import Path

API_KEYS_FILE = "api-keys.json"
KEY_PREFIX = "js_"  # a jetscribe API key is recognisable in a config file or a log line that should not hold it


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(24)


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class ApiKeys:
    """The API keys of a keys folder; re-read when the file changes, so a new or revoked key counts at once."""

    def __init__(self, folder: Path | str):
        self.path = Path(folder) / API_KEYS_FILE
        self._seen: tuple[float, int] | None = None
        self._tenants: dict[str, str] = {}

    def _load(self) -> dict[str, str]:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            self._seen, self._tenants = None, {}
            return self._tenants
        if self._seen != (stat.st_mtime, stat.st_size):
            self._tenants = {str(k): str(v) for k, v in json.loads(self.path.read_text()).items()}
            self._seen = (stat.st_mtime, stat.st_size)
        return self._tenants

    def tenant_of(self, key: str) -> str | None:
        """The tenant whose key this is, None if none has it (compared in constant time)."""
        wanted = digest(key)
        found = None
        for stored, tenant in self._load().items():
            if hmac.compare_digest(stored, wanted):
                found = tenant
        return found

    def issue(self, tenant: str) -> str:
        """A new key for tenant, beside any it has; returns the key (it is not stored, only its digest)."""
        key = new_key()
        tenants = dict(self._load())
        tenants[digest(key)] = tenant
        self._save(tenants)
        return key

    def revoke(self, tenant: str) -> int:
        """Remove every key of tenant; returns how many."""
        tenants = self._load()
        kept = {stored: owner for stored, owner in tenants.items() if owner != tenant}
        self._save(kept)
        return len(tenants) - len(kept)

    def _save(self, tenants: dict[str, str]) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        partial = self.path.with_suffix(".partial")
        partial.write_text(json.dumps(tenants, indent=2, sort_keys=True))
        partial.chmod(0o600)
        partial.replace(self.path)
        self._seen = None
