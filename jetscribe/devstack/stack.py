"""The whole pipeline on one machine: real nats-server and PostgreSQL from pip packages, plus
the three services as child processes (the transcriber as N workers, sized by `sizing.py`).
With NATS_URL / DATABASE_URL set, those servers are used.

Each child runs in a process group of its own, so a terminal's Ctrl-C reaches only the process that started
them, which stops them in order: services first, then the servers they need. One stack per home: a running
one holds `up.lock` there (an flock, gone with its process however it ends) and describes itself in
`stack.json`, which other commands (and `jetscribe down`) read.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from jetscribe.devstack.keys import OPERATOR, ROOT, Keyring, public_key
from jetscribe.devstack.pgroles import ROLE_NAMES, SignIn, make_roles
from jetscribe.devstack.servers import NatsCluster, NatsServer, PostgresServer, free_port, nats_keys_dir
from jetscribe.devstack.sizing import WorkerPlan, plan_workers, thread_env
from jetscribe.services.transcriber.partitions import Members, assign, decode_lease, decode_member
from jetscribe.shared import subjects
from jetscribe.shared.config import (
    DEFAULT_DATABASE_URL,
    DEFAULT_NATS_URL,
    PostgresClient,
    device_defaults,
    nats_servers,
    resolve_device,
)
from jetscribe.shared.natsauth import SERVICE_ROLES, ClientAuth, ServerTLS

log = logging.getLogger(__name__)

SERVICES = ("jetscribe.services.ingest", "jetscribe.services.transcriber", "jetscribe.services.persister")
TRANSCRIBER = "jetscribe.services.transcriber"
WEB = "jetscribe.services.web"  # the captions page: no NATS, so it is ready when its port answers, not on NATS


CONFIG_EXIT = 2  # a service's exit code for a setting that cannot work (telemetry.serve), with one line on stderr


class StackError(RuntimeError):
    """A service of the local stack exited, or did not get ready (its transcribers, their partitions) in time."""


class StackRunning(RuntimeError):
    """Another `jetscribe up` holds this home: its pid and URLs, in one line."""

    def __init__(self, home: Path, pid: int | None, info: Mapping[str, Any]):
        self.home, self.pid = home, pid
        where = (
            f": NATS {info['nats_url']}, PostgreSQL {info['database_url']}"
            if info.get("nats_url") and info.get("pid") == pid
            else " (still starting)"
        )
        super().__init__(
            f"a stack is already running in {home} (pid {pid if pid is not None else '?'}){where}; "
            "stop it with `jetscribe down`"
        )


class NoStack(RuntimeError):
    """`jetscribe down` found no running stack in its home."""


def home_dir() -> Path:
    """Where `jetscribe up` keeps server data and its address file."""
    return Path(os.environ.get("JETSCRIBE_HOME") or ".jetscribe").resolve()


def stack_file(home: Path | None = None) -> Path:
    return (home or home_dir()) / "stack.json"


def lock_file(home: Path) -> Path:
    return home / "up.lock"


class HomeLock:
    """The lock a `jetscribe up` holds on its home while it lives. An flock: the kernel drops it when the process
    ends, however it ends, so a lock is never stale (a stack.json can be: see `stop_leftovers`)."""

    def __init__(self, home: Path):
        self.path = lock_file(home)
        self._fd: int | None = None

    def acquire(self) -> bool:
        """Take the lock and write our pid in it; False if another process holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # drops the flock; the file stays (unlinking it would race a new `up` opening it)
            self._fd = None

    def holder(self) -> int | None:
        """The pid written by whoever holds the lock (None if unreadable: it is just taking it)."""
        for _ in range(20):
            with contextlib.suppress(OSError, ValueError):
                return int(self.path.read_text().strip())
            time.sleep(0.05)
        return None


def read_stack_file(home: Path) -> dict[str, Any]:
    """What stack.json says ({} if there is none, or it is half written)."""
    try:
        info = json.loads(stack_file(home).read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


@dataclass(frozen=True)
class Recorded:
    """A process a stack started, as stack.json records it: enough to find it again, and not a stranger that
    reused its pid (the creation time tells them apart)."""

    name: str
    pid: int
    created: float
    stop_signal: int = signal.SIGTERM
    role: str = "service"  # or "server": stopped after the services, which need it to stop cleanly

    @classmethod
    def of(cls, name: str, pid: int, stop_signal: int = signal.SIGTERM, role: str = "service") -> Recorded | None:
        try:
            return cls(name, pid, psutil.Process(pid).create_time(), int(stop_signal), role)
        except psutil.NoSuchProcess:
            return None

    def alive(self) -> psutil.Process | None:
        """The process if it is still ours and running."""
        try:
            proc = psutil.Process(self.pid)
            if abs(proc.create_time() - self.created) > 0.01 or proc.status() == psutil.STATUS_ZOMBIE:
                return None
            return proc
        except psutil.NoSuchProcess:
            return None


def recorded_processes(info: Mapping[str, Any]) -> list[Recorded]:
    """The processes listed in a stack.json, in stop order (services, then servers)."""
    rows = []
    for row in info.get("processes") or []:
        with contextlib.suppress(KeyError, TypeError, ValueError):
            rows.append(
                Recorded(
                    str(row["name"]), int(row["pid"]), float(row["created"]), int(row["stop_signal"]), str(row["role"])
                )
            )
    return rows


def stop_processes(group: Iterable[Recorded], timeout_s: float = 15.0) -> list[str]:
    """Ask each still-running process of `group` to stop, all at once; SIGKILL those left after timeout_s.
    Returns the names of the ones that were running."""
    running = [(rec, proc) for rec in group if (proc := rec.alive()) is not None]
    for rec, proc in running:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(rec.stop_signal)
    _, left = psutil.wait_procs([proc for _, proc in running], timeout=timeout_s)
    for proc in left:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(left, timeout=5)
    return [rec.name for rec, _ in running]


def stop_leftovers(home: Path) -> tuple[int | None, list[str]]:
    """With the home's lock held: a stack.json left by a `jetscribe up` that died (SIGKILL, a crash) is stale.
    Stop what it started that still runs (services, then servers: a live Postgres would refuse the next
    start) and remove the file. Returns the dead `up`'s pid and the names stopped."""
    info = read_stack_file(home)
    if not stack_file(home).exists():
        return None, []
    processes = recorded_processes(info)
    stopped = stop_processes([p for p in processes if p.role != "server"])
    stopped += stop_processes([p for p in processes if p.role == "server"])
    stack_file(home).unlink(missing_ok=True)
    pid = info.get("pid")
    return (pid if isinstance(pid, int) else None), stopped


def stop_stack(home: Path, timeout_s: float = 60.0) -> str:
    """`jetscribe down`: stop the stack running in `home` (a detached one, or one in another terminal) and wait
    until it has stopped all it started. Returns what it stopped, in one line; raises NoStack if none runs."""
    lock = HomeLock(home)
    if not lock.path.exists() and not stack_file(home).exists():  # no `up` ever ran here: nothing to make
        raise NoStack(f"no stack is running in {home}")
    if lock.acquire():
        try:
            pid, leftovers = stop_leftovers(home)
        finally:
            lock.release()
        left = f"; stopped what a dead `jetscribe up` (pid {pid}) left running: {', '.join(leftovers)}"
        raise NoStack(f"no stack is running in {home}" + (left if leftovers else ""))
    pid = lock.holder()
    if pid is None:
        raise StackError(f"{lock.path} is locked but names no process; is a `jetscribe up` just starting?")
    info = read_stack_file(home)
    names = [p.name for p in recorded_processes(info)] if info.get("pid") == pid else []
    up = Recorded.of("jetscribe up", pid)
    started = time.monotonic()
    with contextlib.suppress(ProcessLookupError):  # it may have just ended on its own
        os.kill(pid, signal.SIGTERM)  # `up` stops its services, then its servers, lets go of the lock and exits
    while not lock.acquire() or (up is not None and up.alive() is not None):
        lock.release()
        if time.monotonic() - started > timeout_s:
            raise StackError(f"the stack in {home} (pid {pid}) is still stopping after {timeout_s:g} s")
        time.sleep(0.05)
    lock.release()
    what = ", ".join(names) if names else "it had started nothing yet"
    return f"stopped the stack in {home} (pid {pid}) in {time.monotonic() - started:.1f} s: {what}"


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


DEFAULT_WS_PORT = 8765


def websocket_env(env: Mapping[str, str], api_keys: Path) -> dict[str, str]:
    """The first gateway's WebSocket settings: JETSCRIBE_WS_PORT as given (0: off), else 8765, or a free port if
    8765 is taken (the URL `up` prints says which); the API keys the keyring's `tenant add` writes."""
    host = env.get("JETSCRIBE_WS_HOST") or "127.0.0.1"
    given = env.get("JETSCRIBE_WS_PORT")
    if given is not None and given.strip() in ("", "0"):
        return {}
    port = int(given) if given else _free_or_any(host, DEFAULT_WS_PORT)
    return {
        "JETSCRIBE_WS_HOST": host,
        "JETSCRIBE_WS_PORT": str(port),
        "JETSCRIBE_API_KEYS": env.get("JETSCRIBE_API_KEYS") or str(api_keys),
    }


def _free_or_any(host: str, port: int) -> int:
    """`port` if nothing listens there, else a free one."""
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError:
            probe.bind((host, 0))
        return int(probe.getsockname()[1])


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


def connects_as_tenant(auth: ClientAuth, home: Path | None = None) -> bool:
    """Whether `auth` is a tenant's user: a seed file that is not the operator's, root's or a service's of the
    stack's keyring (a seed from elsewhere counts as a tenant's). Without a seed, no: a server without auth."""
    if not auth.creds:
        return False
    try:
        key = public_key(Path(auth.creds).read_bytes().strip())
    except Exception:  # unreadable, or no nkey seed (a JWT credentials file; nkeys raises its own errors)
        return True  # the least it may be
    keys = keyring(home)
    for name in (*SERVICE_ROLES, OPERATOR, ROOT):
        path = keys.path(name)
        if path.exists() and public_key(path.read_bytes().strip()) == key:
            return False
    return True


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
    """One child process, in a process group of its own; its stderr is passed on to ours (or held back while the
    stack starts: see `release`), and the last lines are kept to say why it exited."""

    name: str
    proc: subprocess.Popen[str]
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=20))
    reader: threading.Thread | None = None
    held: deque[str] | None = None  # lines kept back until `release` (None: passed on as they come)
    muted: bool = False  # lines dropped (a start that failed says why in one line of its own)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def start(cls, name: str, module: str, env: Mapping[str, str], hold: bool = False) -> ServiceProcess:
        proc = subprocess.Popen(
            [sys.executable, "-m", module],
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            process_group=0,  # the terminal's Ctrl-C is for whoever started us; it stops us in order
        )
        child = cls(name, proc, held=deque(maxlen=10_000) if hold else None)
        child.reader = threading.Thread(target=child._pass_on, name=f"stderr-{name}", daemon=True)
        child.reader.start()
        return child

    def _pass_on(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._lock:
                if self.held is not None:
                    self.held.append(line)
                elif not self.muted:
                    self._write([line])
            if line.strip():
                self.tail.append(line.rstrip())

    def release(self) -> None:
        """Pass on the lines held back so far, and every later one as it comes."""
        with self._lock:
            held, self.held = self.held, None
            if held and not self.muted:
                self._write(held)

    def _write(self, lines: Iterable[str]) -> None:
        try:
            sys.stderr.writelines(lines)
            sys.stderr.flush()
        except OSError:  # our terminal is gone (a hangup): keep reading, or the child blocks on a full pipe
            self.muted = True

    def mute(self) -> None:
        """Drop its output from now on, held lines included."""
        with self._lock:
            self.held, self.muted = None, True

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
    nats_nodes: int = 1  # nats-servers; more than one: a cluster, the streams kept in min(3, nodes) copies
    ready_timeout_s: float = 120.0  # for every service to report ready (transcribers: model loaded, partitions taken)
    hold_output: bool = False  # keep the services' stderr back until all are ready: a failed start is one line
    nats: NatsServer | None = field(default=None, init=False)
    nats_cluster: NatsCluster | None = field(default=None, init=False)
    postgres: PostgresServer | None = field(default=None, init=False)
    children: list[ServiceProcess] = field(default_factory=list, init=False)
    nats_url: str = field(default="", init=False)
    database_url: str = field(default="", init=False)
    web_url: str = field(default="", init=False)  # the captions page and session browser
    database_roles: dict[str, SignIn] = field(default_factory=dict, init=False)  # the roles made, when it runs Postgres
    plan: WorkerPlan | None = field(default=None, init=False)
    transcriber_ids: list[str] = field(default_factory=list, init=False)
    partitions: int = field(default=16, init=False)  # AUDIO partitions (JETSCRIBE_PARTITIONS)
    partitions_held: dict[str, list[int]] = field(default_factory=dict, init=False)
    auth: ClientAuth = field(default_factory=ClientAuth, init=False)  # how the stack itself (the operator) connects
    ws_url: str = field(default="", init=False)  # the first gateway's WebSocket listener ("" when off)
    lock: HomeLock | None = field(default=None, init=False)  # held from start to the end of stop

    def start(self) -> LocalStack:
        """Start the servers and the services; return once every service reports ready and every transcriber
        holds its partitions. Raises StackRunning, before anything starts, if a stack runs in this home."""
        if self.gateways < 1:
            raise ValueError(f"gateways must be at least 1, not {self.gateways}")
        self._take_home()
        if self.nats_nodes < 1:
            raise ValueError(f"nats_nodes must be at least 1, not {self.nats_nodes}")
        env = {**os.environ, **self.extra_env}
        if self.model:
            env["JETSCRIBE_MODEL"] = self.model
        self.partitions = int(env.get("JETSCRIBE_PARTITIONS") or 16)
        # A device or count that cannot work is refused here, before anything runs.
        self.plan = plan_for_host(env, self.transcribers, self.partitions)
        prefix = env.get("JETSCRIBE_WORKER_ID") or socket.gethostname()
        self.transcriber_ids = worker_ids(prefix, self.plan.transcribers)
        log.info("%s", self.plan.describe(cores_available()))
        self.nats_url = os.environ.get("NATS_URL", "")
        self.database_url = os.environ.get("DATABASE_URL", "")
        self.auth = ClientAuth.from_env(env)
        service_auth: dict[str, dict[str, str]] = {}
        if not self.nats_url and self.nats_nodes > 1:
            self.nats_cluster = NatsCluster(
                self.home / "nats-cluster", self.nats_nodes, keyring=keyring(self.home), own_group=True
            )
            self.nats_cluster.start()
            self.nats_url = self.nats_cluster.url
            if not env.get("JETSCRIBE_REPLICAS"):  # auto would say 3, more than two nodes can keep
                env["JETSCRIBE_REPLICAS"] = str(min(3, self.nats_nodes))
            nodes_keyring = self.nats_cluster.nodes[0].keyring
            assert nodes_keyring is not None
            self.auth = ClientAuth(str(nodes_keyring.path("operator")), self.auth.tls_ca)
            service_auth = {role: {"NATS_CREDS": str(nodes_keyring.path(role))} for role in SERVICE_ROLES}
        elif not self.nats_url:
            self.nats = NatsServer(self.home / "nats", keyring=keyring(self.home), tls=server_tls(env), own_group=True)
            self.nats.start()
            self.nats_url = self.nats.url
            assert self.nats.keyring is not None
            self.auth = ClientAuth(str(self.nats.keyring.path("operator")), self.auth.tls_ca)
            # Each service connects as its own user (shared/natsauth.py says what each may do).
            service_auth = {role: {"NATS_CREDS": str(self.nats.keyring.path(role))} for role in SERVICE_ROLES}
        persister_db: dict[str, str] = {}
        if not self.database_url:
            self.postgres = PostgresServer(self.home / "postgres", own_group=True, passwords=True)
            self.postgres.start()
            # Each process signs in as its own role (services/persister/roles.py says what each may do).
            self.database_roles = make_roles(self.postgres, self.home / "pg-passwords")
            self.database_url = self.database_roles["owner"].url
            env.pop("JETSCRIBE_PG_PASSWORD_FILE", None)  # whoever needs one gets its role's below
            persister = self.database_roles["persister"]
            persister_db = {"DATABASE_URL": persister.url, "JETSCRIBE_PG_PASSWORD_FILE": persister.password_file}
        log.info("NATS at %s, PostgreSQL at %s", self.nats_url, self.database_url)
        self._write_stack_file()  # the servers are on record before anything else can fail
        migrate(self.database_url, self._owner_env(env))
        env.update(NATS_URL=self.nats_url, DATABASE_URL=self.database_url)
        since = asyncio.run(_lease_revision(self.nats_url, self.auth))
        try:
            sockets = websocket_env(env, keyring(self.home).api_keys_path)
            self.ws_url = f"ws://{sockets['JETSCRIBE_WS_HOST']}:{sockets['JETSCRIBE_WS_PORT']}" if sockets else ""
            for gateway in range(self.gateways):
                name = f"ingest {gateway}" if self.gateways > 1 else "ingest"
                # One listener, on the first gateway: a socket's session goes to its partition's gateway over NATS.
                gateway_env = {**env, **service_auth.get("ingest", {}), **(sockets if gateway == 0 else {})}
                self.children.append(ServiceProcess.start(name, SERVICES[0], gateway_env, self.hold_output))
            for i, worker in enumerate(self.transcriber_ids):
                worker_env = {**self._worker_env(env, i), **service_auth.get("transcriber", {})}
                self.children.append(
                    ServiceProcess.start(f"transcriber {worker}", TRANSCRIBER, worker_env, self.hold_output)
                )
            persister_env = {**env, **service_auth.get("persister", {}), **persister_db}
            self.children.append(ServiceProcess.start("persister", SERVICES[2], persister_env, self.hold_output))
            self.children.append(ServiceProcess.start("web", WEB, self._web_env(env), self.hold_output))
            self._write_stack_file()
            self.partitions_held = asyncio.run(self._wait_until_ready(since))
        except BaseException:
            self._quiet_failed_start()
            raise
        for child in self.children:
            child.release()
        return self

    def _owner_env(self, env: Mapping[str, str]) -> dict[str, str]:
        """The migrations' environment: the owner's password, and the roles it grants to (those this stack made)."""
        if not self.database_roles:
            return dict(env)
        return {
            **env,
            "JETSCRIBE_PG_PASSWORD_FILE": self.database_roles["owner"].password_file,
            "JETSCRIBE_PG_PERSISTER_ROLE": ROLE_NAMES["persister"],
            "JETSCRIBE_PG_READER_ROLE": ROLE_NAMES["reader"],
        }

    def database(self, role: str = "reader") -> tuple[str, PostgresClient]:
        """How to sign in to this stack's database as `role` (owner, persister, reader): its URL and a client with
        its password file; a stack given its DATABASE_URL made no roles: that URL and the environment's client."""
        if role not in self.database_roles:
            return self.database_url, PostgresClient.from_env()
        signed_in = self.database_roles[role]
        return signed_in.url, signed_in.client(PostgresClient.from_env())

    def _take_home(self) -> None:
        """Hold the home's lock, or refuse; clear what a `jetscribe up` that died left behind."""
        lock = HomeLock(self.home)
        if not lock.acquire():
            pid = lock.holder()
            raise StackRunning(self.home, pid, read_stack_file(self.home))
        try:
            pid, stopped = stop_leftovers(self.home)
        except BaseException:  # interrupted: the stale stack.json stays, for the next `up` or `down` to finish
            lock.release()
            raise
        self.lock = lock
        if stopped:
            log.warning(
                "a `jetscribe up` (pid %s) died and left these running; stopped them: %s", pid, ", ".join(stopped)
            )

    def _write_stack_file(self) -> None:
        """stack.json: our pid, the URLs other commands use, and every process we started (`jetscribe down`, and
        the next `up` if we die without stopping them). Written whole, then renamed: readers never see half."""
        assert self.plan is not None
        processes = [Recorded.of(child.name, child.proc.pid) for child in self.children]
        for server in self.servers():
            if server.pid is not None:
                processes.append(Recorded.of(server.name, server.pid, server.stop_signal, role="server"))
        info = {
            "pid": os.getpid(),
            "nats_url": self.nats_url,
            "nats_nodes": len(nats_servers(self.nats_url)),
            "database_url": self.database_url,
            "web_url": self.web_url,
            # how `jetscribe db` (owner) and the CLI's reads (reader) sign in: URLs and password files, no password
            "database_roles": {role: asdict(signed_in) for role, signed_in in self.database_roles.items()},
            "transcribers": self.plan.transcribers,
            "transcriber_ids": self.transcriber_ids,
            "cpu_threads": self.plan.threads,
            "device": self.plan.device,
            "processes": [asdict(p) for p in processes if p is not None],
            # the operator's key: commands run in this folder connect with it unless given their own
            "nats_creds": self.auth.creds,
            "ws_url": self.ws_url,
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
        path = stack_file(self.home)
        partial = path.with_suffix(".json.partial")
        partial.write_text(json.dumps(info))
        partial.replace(path)

    def _quiet_failed_start(self) -> None:
        """A start that failed says why in one line (the StackError): a service that exited with a setting that
        cannot work already said it in that line, so only a crash's own lines (its traceback) are passed on."""
        for child in self.children:
            crashed = child.proc.poll() not in (None, 0, CONFIG_EXIT)
            if crashed and child.held is not None:
                child.release()
            child.mute()

    def servers(self) -> list[NatsServer | PostgresServer]:
        """The servers this stack started (none of those it was given by URL): stopped after the services."""
        nodes = self.nats_cluster.nodes if self.nats_cluster is not None else []
        return [server for server in (self.nats, *nodes, self.postgres) if server is not None]

    def _web_env(self, env: Mapping[str, str]) -> dict[str, str]:
        """The web process reads PostgreSQL and the tenants' API keys; JETSCRIBE_WEB_PORT, else a free port; its
        page streams to the first gateway's WebSocket unless JETSCRIBE_WEB_GATEWAY_URL says otherwise."""
        host = env.get("JETSCRIBE_WEB_HOST") or "127.0.0.1"
        port = int(env.get("JETSCRIBE_WEB_PORT") or free_port(host))
        self.web_url = f"http://{host}:{port}/"
        reader = self.database_roles.get("reader")  # it only reads: the read-only role, where this stack made roles
        database = {"DATABASE_URL": reader.url, "JETSCRIBE_PG_PASSWORD_FILE": reader.password_file} if reader else {}
        return {
            **env,
            **database,
            "JETSCRIBE_WEB_PORT": str(port),
            "JETSCRIBE_API_KEYS": env.get("JETSCRIBE_API_KEYS") or str(keyring(self.home).api_keys_path),
            "JETSCRIBE_WEB_GATEWAY_URL": env.get("JETSCRIBE_WEB_GATEWAY_URL") or self.ws_url,
        }

    def _worker_env(self, env: Mapping[str, str], index: int) -> dict[str, str]:
        assert self.plan is not None
        worker = {**env, **thread_env(self.plan.threads), "JETSCRIBE_WORKER_ID": self.transcriber_ids[index]}
        if self.plan.device == "cuda":
            worker.update(JETSCRIBE_DEVICE="cuda", JETSCRIBE_DEVICE_INDEX=str(self.plan.device_indexes[index]))
            if not env.get("JETSCRIBE_MAX_BATCH"):  # a GPU decodes larger batches for about the cost of one job
                worker["JETSCRIBE_MAX_BATCH"] = str(device_defaults("cuda")[1])
        return worker

    async def _wait_until_ready(self, since_revision: int) -> dict[str, list[int]]:
        """Until every service answers ready on the NATS micro API (its `health`, the same Readiness as its
        `/readyz`) and every transcriber holds what the group assigns it; returns who holds which partition."""
        import nats

        async def quiet(exc: Exception) -> None:  # a refused connect is retried; the deadline below says it all
            pass

        assert self.plan is not None
        nc = await nats.connect(nats_servers(self.nats_url), error_cb=quiet, **self.auth.connect_options(self.nats_url))
        try:
            deadline = time.monotonic() + self.ready_timeout_s
            names = {child.proc.pid: child.name for child in self.children if child.name != "web"}
            while True:
                self.check()
                waiting = not_ready(names, await _health_by_pid(nc, set(names)))
                if self.web_url and not await _answers(self.web_url):
                    waiting["web"] = f"{self.web_url} does not answer yet"
                held = holders(await _leases(nc), since_revision)
                behind = unsettled(self.transcriber_ids, self.partitions, await _members(nc), held)
                if not waiting and not behind:
                    return held
                if time.monotonic() > deadline:
                    for child in self.children:
                        if child.name in waiting:
                            child.release()  # their own lines say best why they are not ready
                    raise StackError(not_ready_message(self.ready_timeout_s, waiting, behind))
                await asyncio.sleep(0.2)
        finally:
            await nc.close()

    def check(self) -> None:
        """Raise StackError if a service exited, naming it with its last line."""
        for child in self.children:
            reason = child.exited()
            if reason:
                raise StackError(reason)

    def stop(self) -> list[str]:
        """Stop the services, then the servers they need (services first: a service whose NATS went away first
        retries and complains until it is killed); return the names of what was still running."""
        stopped = []
        for child in self.children:
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
                stopped.append(child.name)
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
        servers = [server for server in self.servers() if server.running]
        for server in servers:
            server.ask_to_stop()
            stopped.append(server.name)
        for server in servers:
            server.wait_stopped()
        if self.lock is not None:  # only the stack that holds the home owns its stack.json
            stack_file(self.home).unlink(missing_ok=True)
            self.lock.release()
            self.lock = None
        return stopped

    def __enter__(self) -> LocalStack:
        try:
            return self.start()
        except BaseException:
            self.stop()  # whatever did start must not outlive us
            raise

    def __exit__(self, *exc_info) -> None:
        self.stop()


def not_ready(names: Mapping[int, str], reports: Mapping[int, Mapping[str, Any]]) -> dict[str, str]:
    """Our services (pid -> name) that are not ready yet, each with why, from their readiness reports by pid."""
    waiting = {}
    for pid, name in names.items():
        report = reports.get(pid)
        if report is None:
            waiting[name] = "not answering on NATS yet"
        elif not report.get("ready"):
            checks = report.get("checks") or {}
            failing = [f"{check}: {why}" for check, why in sorted(checks.items()) if why != "ok"]
            waiting[name] = ", ".join(failing) or "not ready"
    return waiting


def not_ready_message(timeout_s: float, waiting: Mapping[str, str], behind: Mapping[str, tuple[int, int]]) -> str:
    """One line: who is not ready after timeout_s, and why."""
    parts = [f"{name} ({why})" for name, why in waiting.items()]
    parts += [f"transcriber {w} holds {n} of its {m} partitions" for w, (n, m) in behind.items()]
    return f"not ready after {timeout_s:g} s: " + "; ".join(parts)


async def _answers(url: str) -> bool:
    """Whether an HTTP server accepts connections at url's host and port."""
    host, _, port = url.split("/")[2].rpartition(":")
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 1.0)
    except (OSError, TimeoutError):
        return False
    writer.close()
    return True


async def _health_by_pid(nc: Any, pids: set[int], wait_s: float = 0.5) -> dict[int, dict[str, Any]]:
    """The readiness report of each of our services that answers `$SRV.STATS` within wait_s, by its pid as its
    micro-service metadata gives it (services of other hosts on a shared NATS are left out)."""
    from jetscribe.shared.discovery import HEALTH_ENDPOINT

    host, reports, everyone = socket.gethostname(), {}, asyncio.Event()

    async def collect(msg: Any) -> None:
        try:
            reply = json.loads(msg.data)
            meta = reply.get("metadata") or {}
            pid = int(meta.get("pid", -1))
        except (ValueError, TypeError, AttributeError):
            return
        if meta.get("host") != host or pid not in pids:
            return
        health = next((e.get("data") for e in reply.get("endpoints") or [] if e.get("name") == HEALTH_ENDPOINT), {})
        reports[pid] = health if isinstance(health, dict) else {}
        if set(reports) >= pids:
            everyone.set()

    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, cb=collect)
    try:
        await nc.publish("$SRV.STATS", b"", reply=inbox)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(everyone.wait(), wait_s)
    finally:
        await sub.unsubscribe()
    return reports


def migrate(database_url: str, env: Mapping[str, str] | None = None) -> None:
    """The alembic migrations (services/persister/migrate.py), in a child process: SQLAlchemy and alembic then
    stay out of ours, whose exit would otherwise spend a second tearing them down on a busy machine. `env`: its
    environment (the owner's password file, the roles to grant to)."""
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from jetscribe.services.persister.migrate import upgrade; upgrade(sys.argv[1])",
        ]
        + [database_url],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        process_group=0,
        env=None if env is None else dict(env),
    )
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        raise StackError(f"the database migrations failed: {lines[-1] if lines else f'exit code {done.returncode}'}")


async def _lease_revision(url: str, auth: ClientAuth) -> int:
    """The partition lease bucket's last revision now (0 before any worker made it)."""
    import nats
    from nats.js.errors import NotFoundError

    nc = await nats.connect(nats_servers(url), **auth.connect_options(url))
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
