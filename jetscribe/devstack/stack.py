"""The whole pipeline on one machine: real nats-server and PostgreSQL from pip packages, plus
the three services as child processes. With NATS_URL / DATABASE_URL set, those servers are used.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from jetscribe.devstack.servers import NatsServer, PostgresServer
from jetscribe.services.persister.migrate import upgrade
from jetscribe.shared.config import DEFAULT_DATABASE_URL, DEFAULT_NATS_URL

log = logging.getLogger(__name__)

INGEST = "jetscribe.services.ingest"
SERVICES = (INGEST, "jetscribe.services.transcriber", "jetscribe.services.persister")


def home_dir() -> Path:
    """Where `jetscribe up` keeps server data and its address file."""
    return Path(os.environ.get("JETSCRIBE_HOME") or ".jetscribe").resolve()


def stack_file(home: Path | None = None) -> Path:
    return (home or home_dir()) / "stack.json"


def running_stack_urls(home: Path | None = None) -> dict[str, str]:
    """URLs of a stack started by `jetscribe up` in this folder, if one is running."""
    path = stack_file(home)
    if not path.exists():
        return {}
    info = json.loads(path.read_text())
    try:
        os.kill(info["pid"], 0)
    except (OSError, KeyError):
        return {}
    return info


def nats_url() -> str:
    return os.environ.get("NATS_URL") or running_stack_urls().get("nats_url") or DEFAULT_NATS_URL


def database_url() -> str:
    return os.environ.get("DATABASE_URL") or running_stack_urls().get("database_url") or DEFAULT_DATABASE_URL


@dataclass
class LocalStack:
    home: Path
    model: str | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    gateways: int = 1  # ingest gateway processes; they share the sessions by partition (services/ingest/app.py)
    nats: NatsServer | None = field(default=None, init=False)
    postgres: PostgresServer | None = field(default=None, init=False)
    children: list[subprocess.Popen] = field(default_factory=list, init=False)
    nats_url: str = field(default="", init=False)
    database_url: str = field(default="", init=False)

    def start(self) -> LocalStack:
        if self.gateways < 1:
            raise ValueError(f"gateways must be at least 1, not {self.gateways}")
        self.home.mkdir(parents=True, exist_ok=True)
        self.nats_url = os.environ.get("NATS_URL", "")
        self.database_url = os.environ.get("DATABASE_URL", "")
        if not self.nats_url:
            self.nats = NatsServer(self.home / "nats")
            self.nats.start()
            self.nats_url = self.nats.url
        if not self.database_url:
            self.postgres = PostgresServer(self.home / "postgres")
            self.postgres.start()
            self.postgres.create_database("jetscribe")
            self.database_url = self.postgres.url("jetscribe")
        log.info("NATS at %s, PostgreSQL at %s", self.nats_url, self.database_url)
        upgrade(self.database_url)
        env = {**os.environ, **self.extra_env, "NATS_URL": self.nats_url, "DATABASE_URL": self.database_url}
        if self.model:
            env["JETSCRIBE_MODEL"] = self.model
        for module in SERVICES:
            for _ in range(self.gateways if module == INGEST else 1):
                self.children.append(subprocess.Popen([sys.executable, "-m", module], env=env))
        stack_file(self.home).write_text(
            json.dumps({"pid": os.getpid(), "nats_url": self.nats_url, "database_url": self.database_url})
        )
        return self

    def check(self) -> None:
        """Raise if a service died."""
        for child in self.children:
            if child.poll() is not None:
                raise RuntimeError(f"service {child.args[-1]} exited with code {child.returncode}")

    def stop(self) -> None:
        for child in self.children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for child in self.children:
            try:
                child.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        self.children.clear()
        for server in (self.postgres, self.nats):
            if server is not None:
                server.stop()
        stack_file(self.home).unlink(missing_ok=True)

    def __enter__(self) -> LocalStack:
        try:
            return self.start()
        except BaseException:
            self.stop()  # whatever did start must not outlive us
            raise

    def __exit__(self, *exc_info) -> None:
        self.stop()
