"""The whole pipeline on one machine: real nats-server and PostgreSQL from pip packages, plus
the three services as child processes (the transcriber as N workers, sized by `sizing.py`).
With NATS_URL / DATABASE_URL set, those servers are used.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jetscribe.devstack.keys import Keyring
from jetscribe.devstack.servers import NatsServer, PostgresServer, nats_keys_dir
from jetscribe.devstack.sizing import WorkerPlan, plan_workers, thread_env
from jetscribe.services.persister.migrate import upgrade
from jetscribe.services.transcriber.partitions import Members, assign, decode_lease, decode_member
from jetscribe.shared import subjects
from jetscribe.shared.config import DEFAULT_DATABASE_URL, DEFAULT_NATS_URL, device_defaults, resolve_device
from jetscribe.shared.natsauth import SERVICE_ROLES, ClientAuth, ServerTLS

log = logging.getLogger(__name__)

SERVICES = ("jetscribe.services.ingest", "jetscribe.services.transcriber", "jetscribe.services.persister")
TRANSCRIBER = "jetscribe.services.transcriber"


class StackError(RuntimeError):
    """A service of the local stack exited, or its transcribers did not take their partitions."""


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


def keyring(home: Path | None = None) -> Keyring:
    """The NATS users of the stack in `home`: $JETSCRIBE_NATS_KEYS, else <home>/nats-keys."""
    return Keyring(nats_keys_dir((home or home_dir()) / "nats-keys"))


def nats_auth(creds: str | None = None, env: Mapping[str, str] | None = None) -> ClientAuth:
    """How a command connects: `creds` (its --creds), else NATS_CREDS, else the operator's key of a stack
    running in this folder; TLS from JETSCRIBE_NATS_TLS_*."""
    found = ClientAuth.from_env(os.environ if env is None else env)
    if creds:
        return ClientAuth(creds, found.tls_ca, found.tls_cert, found.tls_key)
    if not found.creds and not (env or os.environ).get("NATS_URL"):
        operator = running_stack_urls().get("nats_creds", "")
        return ClientAuth(operator, found.tls_ca, found.tls_cert, found.tls_key)
    return found


def server_tls(env: Mapping[str, str]) -> ServerTLS | None:
    """The local nats-server's TLS: JETSCRIBE_NATS_SERVER_CERT and _KEY (and _CLIENT_CA to verify clients)."""
    cert, key = env.get("JETSCRIBE_NATS_SERVER_CERT", ""), env.get("JETSCRIBE_NATS_SERVER_KEY", "")
    if not cert and not key:
        return None
    if not (cert and key):
        raise StackError("set both JETSCRIBE_NATS_SERVER_CERT and JETSCRIBE_NATS_SERVER_KEY, or neither")
    return ServerTLS(cert, key, env.get("JETSCRIBE_NATS_SERVER_CLIENT_CA", ""))


def reload_nats(home: Path | None = None) -> bool:
    """Have the nats-server of a stack running in `home` reload its users from the keyring; False if none runs."""
    info = running_stack_urls(home)
    if not info.get("nats_pid"):
        return False
    server = NatsServer(
        (home or home_dir()) / "nats",
        port=int(info["nats_port"]),
        host=info["nats_host"],
        keyring=keyring(home),
        tls=ServerTLS(**info["nats_tls"]) if info.get("nats_tls") else None,
    )
    server.reload(pid=int(info["nats_pid"]))
    return True


def database_url() -> str:
    return os.environ.get("DATABASE_URL") or running_stack_urls().get("database_url") or DEFAULT_DATABASE_URL


def cores_available() -> int:
    """The cores this process (and so its children) may run on."""
    return len(os.sched_getaffinity(0))


def cuda_device_count() -> int:
    """GPUs CTranslate2 can use (what the transcriber itself asks before it loads)."""
    import ctranslate2

    return int(ctranslate2.get_cuda_device_count())


def plan_for_host(env: Mapping[str, str], transcribers: int | None, partitions: int) -> WorkerPlan:
    """The transcriber workers this host runs: `transcribers` (None: as many as suit it), each held to
    JETSCRIBE_CPU_THREADS threads if set, else to an equal share of the cores."""
    requested = env.get("JETSCRIBE_DEVICE") or "auto"
    gpus = 0 if requested == "cpu" else cuda_device_count()
    device = resolve_device(requested, gpus, int(env.get("JETSCRIBE_DEVICE_INDEX") or 0))
    return plan_workers(
        cores_available(),
        device,
        gpus,
        transcribers=transcribers,
        threads=int(env.get("JETSCRIBE_CPU_THREADS") or 0) or None,
        partitions=partitions,
    )


def worker_ids(prefix: str, count: int) -> list[str]:
    """Stable names, the same at every start: `<prefix>-t0` .. `<prefix>-t<count-1>`."""
    return [f"{prefix}-t{i}" for i in range(count)]


def holders(leases: Iterable[tuple[int, str, int]], since_revision: int) -> dict[str, list[int]]:
    """Which worker holds which partition, from (partition, holder, KV revision) rows of the lease bucket; a
    holder is `<worker id>#<incarnation>` (group.py). Only leases written after `since_revision` count, so a
    lease left by an earlier run under the same worker id does not."""
    held: dict[str, list[int]] = {}
    for partition, holder, revision in sorted(leases):
        if revision > since_revision:
            held.setdefault(holder.partition("#")[0], []).append(partition)
    return held


def unsettled(
    ours: Iterable[str], partitions: int, members: Members, held: Mapping[str, list[int]]
) -> dict[str, tuple[int, int]]:
    """Our workers that do not yet hold what the group assigns them (partitions.py's rendezvous over the
    live `members`), each with (partitions held, partitions assigned); one not yet a member is assigned 0."""
    assigned = assign(partitions, members)
    behind = {}
    for worker in ours:
        wanted = sorted(p for p, owner in assigned.items() if owner == worker)
        if worker not in members or held.get(worker, []) != wanted:
            behind[worker] = (len(held.get(worker, [])), len(wanted))
    return behind


@dataclass
class ServiceProcess:
    """One child process; its stderr is passed on to ours, and the last lines are kept to say why it exited."""

    name: str
    proc: subprocess.Popen[str]
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=20))
    reader: threading.Thread | None = None

    @classmethod
    def start(cls, name: str, module: str, env: Mapping[str, str]) -> ServiceProcess:
        proc = subprocess.Popen(
            [sys.executable, "-m", module], env=dict(env), stderr=subprocess.PIPE, text=True, errors="replace"
        )
        child = cls(name, proc)
        child.reader = threading.Thread(target=child._pass_on, name=f"stderr-{name}", daemon=True)
        child.reader.start()
        return child

    def _pass_on(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            sys.stderr.write(line)
            sys.stderr.flush()
            if line.strip():
                self.tail.append(line.rstrip())

    def exited(self) -> str | None:
        """None while it runs; else what to tell the user: its exit code and its last line."""
        if self.proc.poll() is None:
            return None
        if self.reader is not None:
            self.reader.join(2.0)  # its last lines arrive just after it exits
        last = f": {self.tail[-1]}" if self.tail else ""
        return f"{self.name} exited with code {self.proc.returncode}{last}"


@dataclass
class LocalStack:
    home: Path
    model: str | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    transcribers: int | None = 1  # transcriber workers; None: as many as suit this host (`sizing.py`)
    gateways: int = 1  # ingest gateways; they share the sessions by partition (services/ingest/app.py)
    ready_timeout_s: float = 120.0  # for every transcriber to load its model and take its partitions
    nats: NatsServer | None = field(default=None, init=False)
    postgres: PostgresServer | None = field(default=None, init=False)
    children: list[ServiceProcess] = field(default_factory=list, init=False)
    nats_url: str = field(default="", init=False)
    database_url: str = field(default="", init=False)
    plan: WorkerPlan | None = field(default=None, init=False)
    transcriber_ids: list[str] = field(default_factory=list, init=False)
    partitions: int = field(default=16, init=False)  # AUDIO partitions (JETSCRIBE_PARTITIONS)
    partitions_held: dict[str, list[int]] = field(default_factory=dict, init=False)
    auth: ClientAuth = field(default_factory=ClientAuth, init=False)  # how the stack itself (the operator) connects

    def start(self) -> LocalStack:
        """Start the servers and the services; return once every transcriber holds its partitions."""
        if self.gateways < 1:
            raise ValueError(f"gateways must be at least 1, not {self.gateways}")
        env = {**os.environ, **self.extra_env}
        if self.model:
            env["JETSCRIBE_MODEL"] = self.model
        self.partitions = int(env.get("JETSCRIBE_PARTITIONS") or 16)
        # A device or count that cannot work is refused here, before anything runs.
        self.plan = plan_for_host(env, self.transcribers, self.partitions)
        prefix = env.get("JETSCRIBE_WORKER_ID") or socket.gethostname()
        self.transcriber_ids = worker_ids(prefix, self.plan.transcribers)
        log.info("%s", self.plan.describe(cores_available()))
        self.home.mkdir(parents=True, exist_ok=True)
        self.nats_url = os.environ.get("NATS_URL", "")
        self.database_url = os.environ.get("DATABASE_URL", "")
        self.auth = ClientAuth.from_env(env)
        service_auth: dict[str, dict[str, str]] = {}
        if not self.nats_url:
            self.nats = NatsServer(self.home / "nats", keyring=keyring(self.home), tls=server_tls(env))
            self.nats.start()
            self.nats_url = self.nats.url
            assert self.nats.keyring is not None
            self.auth = ClientAuth(str(self.nats.keyring.path("operator")), self.auth.tls_ca)
            # Each service connects as its own user (shared/natsauth.py says what each may do).
            service_auth = {role: {"NATS_CREDS": str(self.nats.keyring.path(role))} for role in SERVICE_ROLES}
        if not self.database_url:
            self.postgres = PostgresServer(self.home / "postgres")
            self.postgres.start()
            self.postgres.create_database("jetscribe")
            self.database_url = self.postgres.url("jetscribe")
        log.info("NATS at %s, PostgreSQL at %s", self.nats_url, self.database_url)
        upgrade(self.database_url)
        env.update(NATS_URL=self.nats_url, DATABASE_URL=self.database_url)
        since = asyncio.run(_lease_revision(self.nats_url, self.auth))
        for gateway in range(self.gateways):
            name = f"ingest {gateway}" if self.gateways > 1 else "ingest"
            self.children.append(ServiceProcess.start(name, SERVICES[0], {**env, **service_auth.get("ingest", {})}))
        for i, worker in enumerate(self.transcriber_ids):
            worker_env = {**self._worker_env(env, i), **service_auth.get("transcriber", {})}
            self.children.append(ServiceProcess.start(f"transcriber {worker}", TRANSCRIBER, worker_env))
        self.children.append(
            ServiceProcess.start("persister", SERVICES[2], {**env, **service_auth.get("persister", {})})
        )
        stack_file(self.home).write_text(
            json.dumps(
                {
                    "pid": os.getpid(),
                    "nats_url": self.nats_url,
                    "database_url": self.database_url,
                    "transcribers": self.plan.transcribers,
                    "transcriber_ids": self.transcriber_ids,
                    "cpu_threads": self.plan.threads,
                    "device": self.plan.device,
                    # the operator's key: commands run in this folder connect with it unless given their own
                    "nats_creds": self.auth.creds,
                    **(
                        {
                            "nats_pid": self.nats.pid,
                            "nats_host": self.nats.host,
                            "nats_port": self.nats.port,
                            "nats_tls": dataclasses.asdict(self.nats.tls) if self.nats.tls else None,
                        }
                        if self.nats is not None
                        else {}
                    ),
                }
            )
        )
        self.partitions_held = asyncio.run(self._wait_for_partitions(since))
        return self

    def _worker_env(self, env: Mapping[str, str], index: int) -> dict[str, str]:
        assert self.plan is not None
        worker = {**env, **thread_env(self.plan.threads), "JETSCRIBE_WORKER_ID": self.transcriber_ids[index]}
        if self.plan.device == "cuda":
            worker.update(JETSCRIBE_DEVICE="cuda", JETSCRIBE_DEVICE_INDEX=str(self.plan.device_indexes[index]))
            if not env.get("JETSCRIBE_MAX_BATCH"):  # a GPU decodes larger batches for about the cost of one job
                worker["JETSCRIBE_MAX_BATCH"] = str(device_defaults("cuda")[1])
        return worker

    async def _wait_for_partitions(self, since_revision: int) -> dict[str, list[int]]:
        import nats

        assert self.plan is not None
        nc = await nats.connect(self.nats_url, **self.auth.connect_options(self.nats_url))
        try:
            deadline = time.monotonic() + self.ready_timeout_s
            while True:
                self.check()
                held = holders(await _leases(nc), since_revision)
                behind = unsettled(self.transcriber_ids, self.partitions, await _members(nc), held)
                if not behind:
                    return held
                if time.monotonic() > deadline:
                    raise StackError(
                        f"after {self.ready_timeout_s:g} s, these transcribers have not taken their partitions: "
                        + ", ".join(f"{w} (holds {n} of {m})" for w, (n, m) in behind.items())
                        + "; see their log lines above"
                    )
                await asyncio.sleep(0.2)
        finally:
            await nc.close()

    def check(self) -> None:
        """Raise StackError if a service exited, naming it with its last line."""
        for child in self.children:
            reason = child.exited()
            if reason:
                raise StackError(reason)

    def stop(self) -> None:
        for child in self.children:
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for child in self.children:
            try:
                child.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait()
            if child.reader is not None:
                child.reader.join(2.0)
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


async def _lease_revision(url: str, auth: ClientAuth) -> int:
    """The partition lease bucket's last revision now (0 before any worker made it)."""
    import nats
    from nats.js.errors import NotFoundError

    nc = await nats.connect(url, **auth.connect_options(url))
    try:
        info = await nc.jetstream().stream_info(f"KV_{subjects.PARTITION_LEASES_BUCKET}")
        return int(info.state.last_seq)
    except NotFoundError:
        return 0
    finally:
        await nc.close()


async def _leases(nc: Any) -> list[tuple[int, str, int]]:
    """(partition, owner, revision) of every lease now in KV `partition_leases`."""
    from nats.js.errors import BucketNotFoundError, KeyNotFoundError, NoKeysError

    try:
        kv = await nc.jetstream().key_value(subjects.PARTITION_LEASES_BUCKET)
        keys = await kv.keys()
    except (BucketNotFoundError, NoKeysError):
        return []
    rows = []
    for key in keys:
        try:
            entry = await kv.get(key)
        except KeyNotFoundError:  # released between keys() and get()
            continue
        if entry.value:
            rows.append(
                (int(key.removeprefix("p")), decode_lease(entry.value, entry.revision or 0).owner, entry.revision or 0)
            )
    return rows


async def _members(nc: Any) -> dict[str, frozenset[int] | None]:
    """The live transcribers in KV `transcriber_members`, each with the partitions it may own (None: any)."""
    from nats.js.errors import BucketNotFoundError, KeyNotFoundError, NoKeysError

    try:
        kv = await nc.jetstream().key_value(subjects.TRANSCRIBER_MEMBERS_BUCKET)
        keys = await kv.keys()
    except (BucketNotFoundError, NoKeysError):
        return {}
    members = {}
    for key in keys:
        try:
            entry = await kv.get(key)
        except KeyNotFoundError:  # left, or expired, between keys() and get()
            continue
        if entry.value:
            member, eligible = decode_member(entry.value)
            members[member] = eligible
    return members
