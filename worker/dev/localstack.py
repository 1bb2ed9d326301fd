"""A local stack for the demo and the tests: a private redis-server, Celery worker processes, Flower, the
metrics exporter.

Also a redis-server speaking only TLS with a private CA (:func:`make_tls_files`), and a Sentinel-managed
set: a master, a replica and three Sentinels (:class:`SentinelStack`).

Example::

    >>> server = RedisServer().start()          # doctest: +SKIP
    >>> server.url                              # doctest: +SKIP
    'redis://127.0.0.1:40123/0'
    >>> stack = SentinelStack().start()         # doctest: +SKIP
    >>> stack.env                               # doctest: +SKIP
    {'REDIS_URL': 'sentinel://127.0.0.1:40125,127.0.0.1:40127,127.0.0.1:40129/0', 'REDIS_SENTINEL_MASTER': 'vdw'}
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """True if nothing could listen on ``host:port`` now (someone else does, or may not be allowed to)."""
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def terminate(proc: subprocess.Popen | None, timeout: float = 10.0) -> None:
    """SIGTERM a child and wait for it; SIGKILL it if it has not ended within ``timeout``."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


@dataclass(frozen=True)
class TlsFiles:
    """A private CA and a server certificate it signed (for 127.0.0.1 and localhost), PEM files."""

    ca: str
    cert: str
    key: str


def make_tls_files(directory: str | os.PathLike[str], name: str = "vdw test") -> TlsFiles:
    """A new private CA and a server certificate signed by it, made with ``openssl`` in ``directory``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    ca, ca_key, cert, key, csr, ext = (str(d / f) for f in ("ca.pem", "ca.key", "server.pem", "server.key",
                                                            "server.csr", "server.ext"))
    Path(ext).write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
                         "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
                         "authorityKeyIdentifier=keyid\nsubjectKeyIdentifier=hash\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for cmd in (
        ["req", "-x509", *ec, "-keyout", ca_key, "-out", ca, "-days", "2", "-subj", f"/CN={name} CA",
         "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        ["req", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1"],
        ["x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert, "-days", "2",
         "-extfile", ext],
    ):
        subprocess.run(["openssl", *cmd], check=True, capture_output=True)
    return TlsFiles(ca=ca, cert=cert, key=key)


class RedisServer:
    """A private ``redis-server`` on a free loopback port, in a temp dir.

    With ``tls`` it speaks only TLS (``--port 0 --tls-port``), with that certificate; clients are not asked
    for one. ``args`` are more redis-server options (e.g. ``("--replicaof", "127.0.0.1", "6379")``).
    """

    def __init__(self, port: int | None = None, persist: bool = False, tls: TlsFiles | None = None,
                 args: tuple[str, ...] = ()) -> None:
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="vdw-redis-")
        self.persist = persist
        self.tls = tls
        self.args = args
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        if self.tls:
            return f"rediss://127.0.0.1:{self.port}/0?ssl_cert_reqs=required&ssl_ca_certs={self.tls.ca}"
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self, **kwargs: object) -> redis.Redis:
        return redis.Redis.from_url(self.url, **kwargs)

    def start(self) -> RedisServer:
        return self.spawn().wait_started()

    def spawn(self) -> RedisServer:
        """Start the process and return at once (:meth:`start` also waits until it answers)."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        ports = ["--port", str(self.port)]
        if self.tls:
            ports = ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", self.tls.cert,
                     "--tls-key-file", self.tls.key, "--tls-ca-cert-file", self.tls.ca, "--tls-auth-clients", "no"]
        args = [binary, *ports, "--bind", "127.0.0.1", "--dir", self.dir,
                "--save", "", "--appendonly", "yes" if self.persist else "no", "--logfile", "redis.log", *self.args]
        # Its own session: a Ctrl-C in the terminal reaches the demo, which stops the workers before Redis.
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        return self

    def wait_started(self) -> RedisServer:
        assert self.proc is not None, "spawn() first"
        client = self.client(socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                time.sleep(0.05)

    def stop(self, keep_data: bool = False) -> None:
        """Shut Redis down (SIGTERM: it writes its AOF); ``keep_data`` lets :meth:`start` bring it back."""
        terminate(self.proc)
        if not keep_data:
            shutil.rmtree(self.dir, ignore_errors=True)


class SentinelStack:
    """A Sentinel-managed Redis on loopback: one master, one replica (``--replicaof``) and three Sentinels
    (``sentinel monitor <master> 127.0.0.1 <port> 2``) that fail over ``down_after`` ms after the master stops
    answering. :attr:`env` points the product at it; :meth:`kill_master` and :meth:`wait_failover` drive a failover.
    With ``tls`` every node and Sentinel speaks only TLS, with that certificate (``sentinels://``).
    """

    def __init__(self, master_name: str = "vdw", sentinels: int = 3, down_after_ms: int = 1000,
                 failover_timeout_ms: int = 5000, quorum: int = 2, master_args: tuple[str, ...] = (),
                 tls: TlsFiles | None = None) -> None:
        self.master_name = master_name
        self.tls = tls
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.quorum = quorum
        self.master_args = master_args
        self.dir = tempfile.mkdtemp(prefix="vdw-sentinel-")
        self.sentinel_ports = [free_port() for _ in range(sentinels)]
        self.nodes: dict[int, RedisServer] = {}  # by port: the first master and its replica
        self.sentinel_procs: list[subprocess.Popen] = []

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        if self.tls:
            return f"sentinels://{hosts}/0?ssl_cert_reqs=required&ssl_ca_certs={self.tls.ca}"
        return f"sentinel://{hosts}/0"

    @property
    def env(self) -> dict[str, str]:
        return {"REDIS_URL": self.url, "REDIS_SENTINEL_MASTER": self.master_name}

    def start(self, timeout: float = 30.0) -> SentinelStack:
        common = ("--repl-diskless-sync-delay", "0", *(("--tls-replication", "yes") if self.tls else ()),
                  *self.master_args)
        master = RedisServer(tls=self.tls, args=common).start()
        self.nodes[master.port] = master
        replica = RedisServer(tls=self.tls, args=(*common, "--replicaof", "127.0.0.1", str(master.port)))
        self.nodes[replica.port] = replica.start()
        wait_until(lambda: replica.client().info("replication").get("master_link_status") == "up",
                   timeout=timeout, message="the replica to sync")
        binary = shutil.which("redis-server")
        assert binary is not None  # the master and the replica above run it
        for port in self.sentinel_ports:
            conf = Path(self.dir) / f"sentinel-{port}.conf"
            listen = f"port {port}\n"
            if self.tls:
                listen = (f"port 0\ntls-port {port}\ntls-cert-file {self.tls.cert}\ntls-key-file {self.tls.key}\n"
                          f"tls-ca-cert-file {self.tls.ca}\ntls-auth-clients no\ntls-replication yes\n")
            conf.write_text(
                f"{listen}bind 127.0.0.1\ndir {self.dir}\nlogfile sentinel-{port}.log\n"
                f"sentinel monitor {self.master_name} 127.0.0.1 {master.port} {self.quorum}\n"
                f"sentinel down-after-milliseconds {self.master_name} {self.down_after_ms}\n"
                f"sentinel failover-timeout {self.master_name} {self.failover_timeout_ms}\n"
                f"sentinel parallel-syncs {self.master_name} 1\n")
            self.sentinel_procs.append(subprocess.Popen([binary, str(conf), "--sentinel"],
                                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        others = len(self.sentinel_ports) - 1

        def settled() -> bool:  # every Sentinel sees the master, its replica and the other Sentinels
            try:
                for port in self.sentinel_ports:
                    # A dict from one Sentinel's client (the bool in the annotation is Sentinel.execute_command's).
                    state: dict[str, Any] = self.sentinel(port).sentinel_master(self.master_name)  # type: ignore[assignment]
                    if state["num-slaves"] < 1 or state["num-other-sentinels"] < others:
                        return False
                return True
            except redis.RedisError:
                return False

        wait_until(settled, timeout=timeout, interval=0.2, message="the Sentinels to find each other")
        return self

    def sentinel(self, port: int | None = None) -> redis.Redis:
        tls: dict[str, Any] = {"ssl": True, "ssl_ca_certs": self.tls.ca} if self.tls else {}
        return redis.Redis(port=port or self.sentinel_ports[0], socket_timeout=2, decode_responses=True, **tls)

    def master_port(self, sentinel_port: int | None = None) -> int:
        """The master's port as a Sentinel reports it."""
        addr = self.sentinel(sentinel_port).sentinel_get_master_addr_by_name(self.master_name)
        if not isinstance(addr, tuple):
            raise RuntimeError(f"the Sentinel does not know master {self.master_name!r}: {addr!r}")
        return int(addr[1])

    def kill_master(self) -> int:
        """SIGKILL the master now (no shutdown, no last writes); returns its port."""
        port = self.master_port()
        proc = self.nodes[port].proc
        assert proc is not None, "started"
        proc.kill()
        proc.wait(5)
        return port

    def wait_failover(self, old_port: int, timeout: float = 30.0) -> int:
        """Wait until every Sentinel names a new master and it takes writes; returns its port."""
        def promoted() -> int | None:
            try:
                ports = {self.master_port(p) for p in self.sentinel_ports}
                if len(ports) != 1 or old_port in ports:
                    return None
                port = ports.pop()
                return port if self.nodes[port].client().info("replication")["role"] == "master" else None
            except (redis.RedisError, KeyError):
                return None

        return wait_until(promoted, timeout=timeout, interval=0.05, message="the Sentinels to promote the replica")

    def wait_replica(self, port: int, timeout: float = 60.0) -> None:
        """Wait until the node on ``port`` (a master before a failover) is a replica again."""
        def replica() -> bool:
            try:
                return self.nodes[port].client().info("replication")["role"] == "slave"
            except redis.RedisError:
                return False

        wait_until(replica, timeout=timeout, interval=0.1, message=f"the node on {port} to become a replica")

    def stop(self) -> None:
        for proc in self.sentinel_procs:
            terminate(proc)
        for node in self.nodes.values():
            node.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class WorkerProcess:
    """``celery -A worker worker`` as a subprocess, its log in a file."""

    def __init__(self, env: dict[str, str], name: str, args: tuple[str, ...] = (), log_dir: str | None = None) -> None:
        self.env = env
        self.name = name
        self.args = args
        self.log_path = Path(log_dir or tempfile.mkdtemp(prefix="vdw-worker-")) / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> WorkerProcess:
        return self.spawn().wait_started(timeout)

    def spawn(self) -> WorkerProcess:
        """Start the process and return at once (:meth:`start` also waits until it is ready)."""
        cmd = [sys.executable, "-m", "celery", "-A", "worker", "worker", "--loglevel=INFO",
               "-n", f"{self.name}@%h", "--without-mingle", "--without-gossip", *self.args]
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        return self

    def wait_started(self, timeout: float = 30.0) -> WorkerProcess:
        assert self.proc is not None, "spawn() first"
        deadline = time.monotonic() + timeout
        while " ready." not in self.log():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker {self.name} did not start:\n{self.log()[-4000:]}")
            time.sleep(0.1)
        return self

    def log(self) -> str:
        return read_log(self.log_path)

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        if getattr(self, "_log", None):
            self._log.close()


class FlowerProcess:
    """``celery -A worker flower`` on loopback as a subprocess, with basic auth, its log in a file.

    ``port``: None picks a free one now (``url`` is known before :meth:`start`); 0 lets Flower bind a
    free one itself (no race with other programs; ``url`` is known once started); else that port.
    :meth:`start` raises RuntimeError, at once, when Flower cannot listen (e.g. the port is in use),
    and only counts Flower as up once its own log names the port it bound.
    """

    def __init__(self, env: dict[str, str], log_path: str | os.PathLike[str], port: int | None = None,
                 basic_auth: str = "ops:pw") -> None:
        self.env = env
        self.log_path = Path(log_path)
        self.port = free_port() if port is None else port
        self.basic_auth = basic_auth
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        if not self.port:
            raise RuntimeError("Flower picks its port when it starts: read url after start()")
        return f"http://127.0.0.1:{self.port}"

    @property
    def auth(self) -> tuple[str, str]:
        user, _, password = self.basic_auth.partition(":")
        return user, password

    def start(self, timeout: float = 30.0) -> FlowerProcess:
        return self.spawn().wait_started(timeout)

    def spawn(self) -> FlowerProcess:
        """Start the process and return at once (:meth:`start` also waits until it answers)."""
        cmd = [sys.executable, "-m", "celery", "-A", "worker", "flower", f"--port={self.port}",
               "--address=127.0.0.1", f"--basic-auth={self.basic_auth}"]
        with open(self.log_path, "wb") as log:  # the child keeps its own handle
            self.proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        return self

    def wait_started(self, timeout: float = 30.0) -> FlowerProcess:
        assert self.proc is not None, "spawn() first"
        deadline = time.monotonic() + timeout
        while True:
            # Flower logs "Visit me at <url>" once it has bound its port: then whatever answers there is ours.
            bound = re.search(r"Visit me at http://127\.0\.0\.1:(\d+)", self.log())
            if bound:
                self.port = int(bound.group(1))
                if self.up():
                    return self
            if self.proc.poll() is not None:
                raise RuntimeError(self._failure())
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"Flower did not answer within {timeout:.0f}s; its log {self.log_path}:\n"
                                   + self.log()[-2000:])
            time.sleep(0.1)

    def _failure(self) -> str:
        text = self.log()
        if "Address already in use" in text or "Errno 98" in text:
            return (f"Flower could not listen on 127.0.0.1:{self.port}: the port is in use by another program "
                    f"(its log: {self.log_path})")
        return f"Flower exited with status {self.proc.returncode if self.proc else '?'}; its log {self.log_path}:\n" \
            + text[-2000:]

    def log(self) -> str:
        return read_log(self.log_path)

    def up(self) -> bool:
        import httpx

        if not self.port:
            return False
        try:
            return httpx.get(f"{self.url}/healthcheck", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        terminate(self.proc)


class MetricsExporterProcess:
    """``python -m worker metrics`` on loopback as a subprocess, its log in a file."""

    def __init__(self, env: dict[str, str], log_path: str | os.PathLike[str], port: int | None = None) -> None:
        self.env = env
        self.log_path = Path(log_path)
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/metrics"

    def start(self, timeout: float = 30.0) -> MetricsExporterProcess:
        cmd = [sys.executable, "-m", "worker", "metrics", "--port", str(self.port), "--host", "127.0.0.1"]
        with open(self.log_path, "wb") as log:  # the child keeps its own handle
            self.proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        wait_until(self.up, timeout=timeout, interval=0.1, message="the metrics exporter")
        return self

    def up(self) -> bool:
        import httpx

        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"the metrics exporter exited:\n{self.log_path.read_text(errors='replace')[-4000:]}")
        try:
            return httpx.get(self.url, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def scrape(self) -> str:
        import httpx

        response = httpx.get(self.url, timeout=10)
        response.raise_for_status()
        return response.text

    def stop(self) -> None:
        terminate(self.proc)


class AppServer:
    """A web app under its real server (gunicorn, uvicorn, Django's runserver) as a subprocess, its log in a file.

    ``command`` contains ``{port}``, filled with a free loopback port; :meth:`start` waits until
    ``GET health_path`` answers 200.
    """

    def __init__(self, command: list[str], env: dict[str, str], log_path: str | os.PathLike[str],
                 cwd: str | os.PathLike[str] | None = None, health_path: str = "/health") -> None:
        self.port = free_port()
        self.command = [part.replace("{port}", str(self.port)) for part in command]
        self.env = env
        self.cwd = cwd
        self.log_path = Path(log_path)
        self.health_path = health_path
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> AppServer:
        with open(self.log_path, "wb") as log:  # the child keeps its own handle
            proc = self.proc = subprocess.Popen(self.command, env=self.env, cwd=self.cwd, stdout=log,
                                                stderr=subprocess.STDOUT, start_new_session=True)

        def up() -> bool:
            import httpx

            if proc.poll() is not None:
                raise RuntimeError(f"{self.command[:3]} exited:\n{self.log()[-3000:]}")
            try:
                return httpx.get(self.url + self.health_path, timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        try:
            wait_until(up, timeout=timeout, interval=0.1, message=f"{' '.join(self.command[:3])} to answer")
        except BaseException:
            self.stop()
            raise
        return self

    def log(self) -> str:
        return read_log(self.log_path)

    def stop(self) -> None:
        terminate(self.proc)


#: Variables a stack environment never inherits from the caller's shell.
VENDOR_ENV_PREFIXES = ("CONVERTLOOP_", "LOOPS_", "CONVEYOUR_", "SENTRY_")


def sandbox_env(redis_url: str, base_urls: dict[str, str], **overrides: str) -> dict[str, str]:
    """The environment that points the product at a sandbox: its URLs and credentials, this Redis.

    The caller's own vendor variables are dropped, so real credentials never reach a local stack.
    """
    from ..sandbox import SANDBOX_CREDENTIALS

    env = {k: v for k, v in os.environ.items() if not k.startswith(VENDOR_ENV_PREFIXES)}
    env.update(SANDBOX_CREDENTIALS)
    env.update(
        REDIS_URL=redis_url,
        CONVERTLOOP_BASE_URL=base_urls["convertloop"],
        LOOPS_BASE_URL=base_urls["loops"],
        CONVEYOUR_BASE_URL=base_urls["conveyour"],
        PYTHONUNBUFFERED="1",
    )
    env.update({k: str(v) for k, v in overrides.items()})
    return env


def wait_until(predicate, timeout: float = 15.0, interval: float = 0.05, message: str = "condition",
               error: type[Exception] = AssertionError):
    """Poll ``predicate`` until it returns something truthy (returned); ``error`` when ``timeout`` passes first."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise error(f"timed out after {timeout:g}s waiting for {message}")
        time.sleep(interval)


def read_log(path: Path) -> str:
    """A child process's log so far ('' before it exists)."""
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
