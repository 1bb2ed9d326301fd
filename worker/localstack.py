"""A local stack for the demo and the tests: a private redis-server, Celery worker processes, Flower, the
metrics exporter.

Example::

    >>> server = RedisServer().start()          # doctest: +SKIP
    >>> server.url                              # doctest: +SKIP
    'redis://127.0.0.1:40123/0'
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
from pathlib import Path

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


class RedisServer:
    """A private ``redis-server`` on a free loopback port, in a temp dir."""

    def __init__(self, port: int | None = None, persist: bool = False) -> None:
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="vdw-redis-")
        self.persist = persist
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        return self.spawn().wait_started()

    def spawn(self) -> RedisServer:
        """Start the process and return at once (:meth:`start` also waits until it answers)."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir,
                "--save", "", "--appendonly", "yes" if self.persist else "no", "--logfile", "redis.log"]
        # Its own session: a Ctrl-C in the terminal reaches the demo, which stops the workers before Redis.
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        return self

    def wait_started(self) -> RedisServer:
        assert self.proc is not None, "spawn() first"
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
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
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

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
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

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


#: Variables a stack environment never inherits from the caller's shell.
VENDOR_ENV_PREFIXES = ("CONVERTLOOP_", "LOOPS_", "CONVEYOUR_", "SENTRY_")


def sandbox_env(redis_url: str, base_urls: dict[str, str], **overrides: str) -> dict[str, str]:
    """The environment that points the product at a sandbox: its URLs and credentials, this Redis.

    The caller's own vendor variables are dropped, so real credentials never reach a local stack.
    """
    from .sandbox import SANDBOX_CREDENTIALS

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


def wait_until(predicate, timeout: float = 15.0, interval: float = 0.05, message: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)
