"""The local stack's PostgreSQL roles: the owner (migrations, `jetscribe db`), the persister's and the readers'
(the CLI's reads), each with a generated password kept in a 0600 file under `<home>/pg-passwords`, as the NATS
users' seeds are kept (keys.py). What each role may do is granted by the owner (services/persister/roles.py)."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from jetscribe.devstack.servers import PostgresServer
from jetscribe.shared.config import PostgresClient

ROLE_NAMES = {"owner": "jetscribe_owner", "persister": "jetscribe_persister", "reader": "jetscribe_reader"}
DATABASE = "jetscribe"


@dataclass(frozen=True)
class SignIn:
    """How one role connects: its URL (no password in it) and the file holding its password."""

    url: str
    password_file: str

    def client(self, base: PostgresClient | None = None) -> PostgresClient:
        """`base` (TLS from the environment by default) with this role's password file."""
        from dataclasses import replace

        return replace(base or PostgresClient(), password_file=self.password_file)


def password_file(folder: Path, role: str) -> Path:
    """The role's password file, made once with a new random password (0600, in a 0700 folder)."""
    path = folder / f"{role}.password"
    if not path.exists():
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        folder.chmod(0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_urlsafe(24) + "\n")
    return path


def make_roles(postgres: PostgresServer, folder: Path, database: str = DATABASE) -> dict[str, SignIn]:
    """The three roles with their passwords (again at every start: a password file given anew is taken), and the
    database owned by the owner role. Returns how each signs in, by "owner", "persister", "reader"."""
    signed_in = {}
    for role, name in ROLE_NAMES.items():
        path = password_file(folder, role)
        postgres.create_role(name, path.read_text().strip())
        signed_in[role] = SignIn(postgres.url_of(name, database), str(path))
    postgres.create_database(database, owner=ROLE_NAMES["owner"])
    return signed_in
