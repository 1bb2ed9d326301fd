"""Where Redis is: ``REDIS_URL`` (plain, TLS, or a Sentinel-managed master) read once for every Redis user.

Three forms, one variable:

* ``redis://[:password@]host:6379/0`` — one Redis, as always;
* ``rediss://[:password@]host:6380/0?ssl_cert_reqs=required&ssl_ca_certs=/etc/ca.pem`` — the same over TLS;
* ``sentinel://[:password@]h1:26379,h2:26379,h3:26379/0`` with ``REDIS_SENTINEL_MASTER=mymaster`` — the
  master that these Sentinels monitor under that name, found again after every failover;
  ``sentinels://…?ssl_ca_certs=/etc/ca.pem`` speaks TLS to the Sentinels and to the master alike.

A password in the URL is the Redis one (master and replicas); ``REDIS_SENTINEL_PASSWORD`` is the
Sentinels' own (``requirepass`` in sentinel.conf). The producer's publisher, the workers' clients (limiter,
breaker, retry schedule, dead letters), Celery's broker (``celeryconfig.py``), Flower and the CLI all
take their Redis from :class:`RedisTarget`, so they can never disagree.

Example::

    >>> t = RedisTarget.parse("sentinel://10.0.0.1:26379,10.0.0.2:26379/0", master="mymaster")
    >>> t.sentinels
    (('10.0.0.1', 26379), ('10.0.0.2', 26379))
    >>> t.celery()["broker_url"], t.celery()["transport_options"]["sentinels"]
    ('sentinel://10.0.0.1:26379/0', ['sentinel://10.0.0.1:26379', 'sentinel://10.0.0.2:26379'])
    >>> RedisTarget.parse("sentinel://10.0.0.1:26379/0")
    Traceback (most recent call last):
    ...
    worker.redisconf.RedisConfigError: REDIS_URL names Redis Sentinels (sentinel://10.0.0.1:26379/0): set REDIS_SENTINEL_MASTER to the name they monitor the master under (sentinel monitor <name> ...)
"""  # noqa: E501 (the doctest shows the error message as raised, on one line)

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, quote, unquote

import redis
from redis.sentinel import MasterNotFoundError, Sentinel

#: The Sentinel port when a host in a sentinel:// URL names none.
DEFAULT_SENTINEL_PORT = 26379
#: URL schemes naming Sentinels, and whether they speak TLS.
SENTINEL_SCHEMES = {"sentinel": False, "sentinels": True}
#: The query parameters a sentinels:// URL may carry (redis-py's names, as in a rediss:// URL).
TLS_PARAMS = ("ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_check_hostname")
#: Connections a client's pool may hold open (redis-py's pool before 8.0: no cap of its own). A pool opens one
#: only when every open one is busy, so it holds as many as its process runs commands at once: a worker's
#: concurrency and its few timers, a web process's requests. redis-py 8 caps a pool at 100 and then fails the
#: command at once ("Too many connections"): on ``-P gevent -c 200``, deliveries whose acknowledgement met a
#: full pool stayed held and were delivered a second time.
MAX_CONNECTIONS = 2**31
_CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}
_BOOLS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


class RedisConfigError(ValueError):
    """REDIS_URL or the Sentinel settings are wrong (or name a master nobody monitors); the message says how."""


@dataclass(frozen=True)
class RedisTarget:
    """A parsed REDIS_URL: one Redis, or a Sentinel-managed master. Build clients with :meth:`client`."""

    url: str = field(repr=False)
    sentinels: tuple[tuple[str, int], ...] = ()
    master: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    #: redis-py's ssl_* keyword arguments when TLS is on (possibly empty: the defaults), else None.
    tls: dict[str, Any] | None = None
    sentinel_password: str | None = field(default=None, repr=False)

    # -- parsing ----------------------------------------------------------------

    @classmethod
    def parse(cls, url: str, master: str | None = None, sentinel_password: str | None = None) -> RedisTarget:
        """Read ``url`` (and the Sentinel settings); raises :class:`RedisConfigError` saying what is wrong."""
        scheme, sep, rest = url.partition("://")
        scheme = scheme.lower()
        if not sep:
            raise RedisConfigError(f"REDIS_URL must be a URL such as redis://127.0.0.1:6379/0, not {_mask(url)!r}")
        if scheme not in SENTINEL_SCHEMES:
            for name, value in (("REDIS_SENTINEL_MASTER", master), ("REDIS_SENTINEL_PASSWORD", sentinel_password)):
                if value:
                    raise RedisConfigError(f"{name} is set but REDIS_URL ({_mask(url)}) names no Sentinels: "
                                           "use REDIS_URL=sentinel://host1:26379,host2:26379/0, or unset it")
            try:
                kwargs = redis.connection.parse_url(url)
            except ValueError as exc:
                raise RedisConfigError(f"REDIS_URL ({_mask(url)}) is not a Redis URL: {exc}") from None
            tls = None
            if scheme == "rediss":
                tls = {k: v for k, v in kwargs.items() if k.startswith("ssl_")}
                tls.setdefault("ssl_cert_reqs", "required")
            return cls(url=url, db=int(kwargs.get("db") or 0), username=kwargs.get("username"),
                       password=kwargs.get("password"), tls=tls)
        return cls._parse_sentinel(url, scheme, rest, master, sentinel_password)

    @classmethod
    def _parse_sentinel(cls, url: str, scheme: str, rest: str, master: str | None,
                        sentinel_password: str | None) -> RedisTarget:
        shown = _mask(url)
        if ";" in rest:
            raise RedisConfigError(f"REDIS_URL ({shown}): list the Sentinels in one URL, separated by commas: "
                                   "sentinel://host1:26379,host2:26379,host3:26379/0")
        netloc, _, tail = rest.partition("/")
        path, _, query = tail.partition("?")
        if "?" in netloc:
            netloc, _, query = netloc.partition("?")
        userinfo, at, hosts = netloc.rpartition("@")
        username = password = None
        if at:
            user, colon, pw = userinfo.partition(":")
            username, password = unquote(user) or None, (unquote(pw) if colon else None) or None
        sentinels = tuple(_host_port(h, shown) for h in hosts.split(","))
        try:
            db = int(path or 0)
        except ValueError:
            raise RedisConfigError(f"REDIS_URL ({shown}): the database after the hosts must be a number, "
                                   f"not {path!r}") from None
        params = dict(parse_qsl(query, keep_blank_values=True))
        tls_on = SENTINEL_SCHEMES[scheme]
        if params and not tls_on and any(k.startswith("ssl") for k in params):
            raise RedisConfigError(f"REDIS_URL ({shown}): TLS options need the sentinels:// scheme "
                                   "(TLS to the Sentinels and to the master)")
        unknown = sorted(set(params) - set(TLS_PARAMS))
        if unknown:
            allowed = ", ".join(TLS_PARAMS) if tls_on else "none"
            raise RedisConfigError(f"REDIS_URL ({shown}): unknown option(s) {', '.join(unknown)} "
                                   f"(a {scheme}:// URL takes: {allowed})")
        tls = _tls_kwargs(params, shown) if tls_on else None
        if not master or not master.strip():
            raise RedisConfigError(f"REDIS_URL names Redis Sentinels ({shown}): set REDIS_SENTINEL_MASTER to the "
                                   "name they monitor the master under (sentinel monitor <name> ...)")
        return cls(url=url, sentinels=sentinels, master=master.strip(), db=db, username=username,
                   password=password, tls=tls, sentinel_password=sentinel_password or None)

    # -- what it is ---------------------------------------------------------------

    @property
    def is_sentinel(self) -> bool:
        return bool(self.sentinels)

    def describe(self) -> str:
        """Where this is, for messages: never a password."""
        if not self.is_sentinel:
            return _mask(self.url)
        hosts = ", ".join(f"{h}:{p}" for h, p in self.sentinels)
        return f"master {self.master!r} of the Sentinels at {hosts}{' (TLS)' if self.tls is not None else ''}"

    # -- clients ----------------------------------------------------------------

    def client(self, **kwargs: Any) -> redis.Redis:
        """A redis-py client for this Redis (for Sentinels: the current master, followed across failovers).

        ``kwargs`` are redis-py's connection options (timeouts, retry). Under Sentinel the timeouts also bound
        each Sentinel query, split between the Sentinels: finding the master costs at most one timeout. Its pool
        opens as many connections as commands run at once (:data:`MAX_CONNECTIONS`).
        """
        kwargs.setdefault("max_connections", MAX_CONNECTIONS)
        if not self.is_sentinel:
            return redis.Redis.from_url(self.url, **kwargs)
        manager = Sentinel(self.sentinels, sentinel_kwargs=self.sentinel_kwargs(kwargs))
        node: dict[str, Any] = {"db": self.db, "username": self.username, "password": self.password}
        if self.tls is not None:
            node.update(ssl=True, **self.tls)
        return manager.master_for(self.master, **node, **kwargs)

    def async_client(self, **kwargs: Any) -> redis.asyncio.Redis:
        """:meth:`client` for asyncio (``redis.asyncio``; its connections belong to the running event loop).

        ``kwargs`` are the same options; a ``retry`` must be ``redis.asyncio.retry.Retry``.
        """
        kwargs.setdefault("max_connections", MAX_CONNECTIONS)
        import redis.asyncio
        from redis.asyncio.sentinel import Sentinel as AsyncSentinel

        if not self.is_sentinel:
            return redis.asyncio.Redis.from_url(self.url, **kwargs)
        assert self.master is not None  # parse() requires the master's name for Sentinels
        manager = AsyncSentinel(self.sentinels, sentinel_kwargs=self.sentinel_kwargs(kwargs))
        node: dict[str, Any] = {"db": self.db, "username": self.username, "password": self.password}
        if self.tls is not None:
            node.update(ssl=True, **self.tls)
        return manager.master_for(self.master, **node, **kwargs)

    def sentinel_kwargs(self, kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
        """Connection options for the Sentinels themselves: their password, TLS, and ``kwargs``' timeouts
        divided among them (redis-py asks them in turn). No retries (unless ``kwargs`` has a policy): a Sentinel
        that does not answer is passed over for the next at once — redis-py's default would retry it with
        backoff, seconds for each new connection while one Sentinel is down."""
        kwargs = kwargs or {}
        out: dict[str, Any] = {"retry": kwargs.get("retry")}
        share = max(1, len(self.sentinels))
        for key in ("socket_connect_timeout", "socket_timeout"):
            if kwargs.get(key) is not None:
                out[key] = kwargs[key] / share
        if self.sentinel_password:
            out["password"] = self.sentinel_password
        if self.tls is not None:
            out.update(ssl=True, **self.tls)
        return out

    def celery(self, timeout: float = 5.0) -> dict[str, Any]:
        """Celery's settings for this Redis: ``broker_url``, ``broker_transport``, extra transport options and
        ``broker_use_ssl`` (which Flower's broker view reads too). ``timeout`` bounds each Sentinel query."""
        if not self.is_sentinel:
            return {"broker_url": self.url, "broker_transport": "worker.broker.transport:Transport",
                    "transport_options": {},
                    "broker_use_ssl": _celery_ssl(self.tls) if self.tls is not None else None}
        auth = ""
        if self.username or self.password:
            auth = f"{quote(self.username or '', safe='')}:{quote(self.password or '', safe='')}@"
        hosts = [f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.sentinels]
        # One Sentinel in the URL, all of them in an option: see worker.broker.transport.SentinelChannel for why.
        url = f"sentinel://{auth}{hosts[0]}/{self.db}"
        options = {"master_name": self.master, "sentinels": [f"sentinel://{h}" for h in hosts],
                   "sentinel_kwargs": self.sentinel_kwargs({"socket_connect_timeout": timeout,
                                                            "socket_timeout": timeout})}
        return {"broker_url": url, "broker_transport": "worker.broker.transport:SentinelTransport",
                "transport_options": options,
                "broker_use_ssl": _celery_ssl(self.tls) if self.tls is not None else None}

    # -- checks -----------------------------------------------------------------

    def check(self, timeout: float = 5.0) -> str:
        """Ask Redis (and the Sentinels) whether this configuration works; returns what answered.

        Raises :class:`RedisConfigError` for what only a configuration change fixes (a master name the
        Sentinels do not monitor, a TLS certificate not accepted, a wrong password), and redis-py's
        ``ConnectionError`` when nothing answers (an outage: that may pass).
        """
        where = ""
        if self.is_sentinel:
            host, port = self.find_master(timeout)
            where = f" at {host}:{port}"
        client = self.client(socket_connect_timeout=timeout, socket_timeout=timeout,
                             retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0))
        try:
            client.ping()
        except redis.RedisError as exc:
            problem = config_problem(exc)
            if problem:
                raise RedisConfigError(f"Redis ({self.describe()}{where}): {problem}") from None
            raise
        finally:
            client.close()
            manager = getattr(client.connection_pool, "sentinel_manager", None)
            if manager is not None:
                manager.close()
        return f"{self.describe()}{where} answered"

    def explain(self, exc: BaseException, timeout: float = 5.0) -> str | None:
        """What ``exc`` says about the configuration (see :func:`config_problem`), or None for an outage.
        When no master was found, whether the Sentinels monitor REDIS_SENTINEL_MASTER at all is asked."""
        problem = config_problem(exc)
        if problem is None and self.is_sentinel and isinstance(exc, MasterNotFoundError):
            try:
                self.find_master(timeout)
            except RedisConfigError as error:
                return str(error)
            except (redis.RedisError, OSError):
                return None
        return problem

    def find_master(self, timeout: float = 5.0) -> tuple[str, int]:
        """The master's address as the Sentinels report it; :class:`RedisConfigError` if the Sentinels that
        answer do not monitor REDIS_SENTINEL_MASTER or refuse us, ``MasterNotFoundError`` if none answers or
        the master is down (a failover may be under way)."""
        assert self.master is not None, "not a Sentinel target"  # parse() requires the master's name for Sentinels
        manager = Sentinel(self.sentinels, sentinel_kwargs={
            **self.sentinel_kwargs(), "socket_connect_timeout": timeout, "socket_timeout": timeout,
            "retry": redis.retry.Retry(redis.backoff.NoBackoff(), 0)})
        known: set[str] = set()
        errors: list[str] = []
        answered = 0
        try:
            for node in manager.sentinels:
                try:
                    # A dict by master name from every redis-py parser; the annotation also allows a list.
                    masters: dict[str, dict[str, Any]] = node.sentinel_masters()  # type: ignore[assignment]
                except redis.RedisError as exc:
                    problem = config_problem(exc)
                    addr = "{host}:{port}".format_map(node.connection_pool.connection_kwargs)
                    if problem:
                        raise RedisConfigError(f"the Sentinel at {addr}: {problem}") from None
                    errors.append(f"{addr}: {exc}")
                    continue
                answered += 1
                known.update(masters)
                state = masters.get(self.master)
                if state and manager.check_master_state(state, self.master):
                    return state["ip"], int(state["port"])
        finally:
            manager.close()
        if answered and self.master not in known:
            monitored = ", ".join(repr(m) for m in sorted(known)) or "none"
            raise RedisConfigError(f"REDIS_SENTINEL_MASTER={self.master!r} is not a master the Sentinels at "
                                   f"{', '.join(f'{h}:{p}' for h, p in self.sentinels)} monitor "
                                   f"(they monitor: {monitored})")
        if answered:
            raise MasterNotFoundError(f"the Sentinels report master {self.master!r} down (failover under way?)")
        raise MasterNotFoundError(f"no Sentinel answered: {'; '.join(errors)}")


def config_problem(exc: BaseException) -> str | None:
    """What an error says about the configuration, or None when it looks like an outage (it may pass)."""
    seen: set[int] = set()
    node: BaseException | None = exc
    while node is not None and id(node) not in seen:
        seen.add(id(node))
        text = str(node)
        if isinstance(node, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in text:
            detail = getattr(node, "verify_message", None) or text.split("] ")[-1]
            return (f"its TLS certificate was not accepted ({detail}): check ssl_ca_certs in REDIS_URL "
                    "against the CA that signed the Redis server's certificate")
        if isinstance(node, ssl.SSLError):
            return f"the TLS handshake failed ({text}): check that the port speaks TLS and the ssl_* options"
        if isinstance(node, FileNotFoundError | IsADirectoryError | PermissionError):
            return f"a TLS file in REDIS_URL cannot be read: {node}"
        if isinstance(node, redis.AuthenticationError) or any(
                code in text for code in ("WRONGPASS", "NOAUTH", "invalid password", "invalid username")):
            return f"the password was refused ({text})"
        node = node.__cause__ or node.__context__
    return None


#: How the product names Redis refusing writes at ``maxmemory`` (``maxmemory-policy noeviction``: redis-py's
#: ``OutOfMemoryError``, "OOM command not allowed when used memory > 'maxmemory'"). Not an outage: Redis answers,
#: reads work, deletes work; what adds memory is refused until something frees some or maxmemory is raised.
REDIS_FULL = "Redis is full: maxmemory reached"
#: Share of maxmemory above which ``python -m worker check`` warns.
NEARLY_FULL = 0.9


def is_full(exc: BaseException | None) -> bool:
    """Did Redis refuse a write because it is at maxmemory (noeviction)?"""
    return isinstance(exc, redis.OutOfMemoryError)


@dataclass(frozen=True)
class Memory:
    """Redis' ``INFO memory``: bytes used, ``maxmemory`` (0: unlimited) and the eviction policy."""

    used: int
    max: int
    policy: str
    #: Bytes Redis leaves out when it compares its use with maxmemory (replica output and AOF buffers).
    not_counted: int = 0

    @property
    def share(self) -> float | None:
        """Used memory as a share of maxmemory (None: no maxmemory)."""
        return self.used / self.max if self.max else None

    @property
    def full(self) -> bool:
        """At maxmemory, as Redis counts it: a write that adds memory is refused (or, with an evicting
        policy, makes Redis evict keys)."""
        return bool(self.max) and self.used - self.not_counted > self.max

    def describe(self) -> str:
        """``"1.2 MiB used of 2.0 MiB maxmemory (60%, noeviction)"``, or ``"... used, no maxmemory"``."""
        if not self.max:
            return f"{_mib(self.used)} used, no maxmemory ({self.policy})"
        return f"{_mib(self.used)} used of {_mib(self.max)} maxmemory ({self.share:.0%}, {self.policy})"


def memory(client: redis.Redis) -> Memory:
    """Read :class:`Memory` from ``client``'s Redis (one ``INFO memory``)."""
    info: dict[str, Any] = client.info("memory")
    return Memory(used=int(info.get("used_memory", 0)), max=int(info.get("maxmemory", 0)),
                  policy=str(info.get("maxmemory_policy", "?")),
                  not_counted=int(info.get("mem_not_counted_for_evict", 0)))


def _mib(n: int) -> str:
    return f"{n / 1024 / 1024:.1f} MiB"


def _host_port(item: str, shown: str) -> tuple[str, int]:
    item = item.strip()
    if not item:
        raise RedisConfigError(f"REDIS_URL ({shown}): an empty Sentinel address")
    if item.startswith("["):
        host, _, after = item[1:].partition("]")
        port_text = after[1:] if after.startswith(":") else ""
    else:
        host, _, port_text = item.partition(":")
    try:
        port = int(port_text) if port_text else DEFAULT_SENTINEL_PORT
    except ValueError:
        raise RedisConfigError(f"REDIS_URL ({shown}): {item!r} is not host:port") from None
    if not host or not 0 < port < 65536:
        raise RedisConfigError(f"REDIS_URL ({shown}): {item!r} is not host:port")
    return host, port


def _tls_kwargs(params: dict[str, str], shown: str) -> dict[str, Any]:
    out: dict[str, Any] = {"ssl_cert_reqs": "required"}
    for key, value in params.items():
        if key == "ssl_cert_reqs":
            if value.lower() not in _CERT_REQS:
                raise RedisConfigError(f"REDIS_URL ({shown}): ssl_cert_reqs is none, optional or required, "
                                       f"not {value!r}")
            out[key] = value.lower()
        elif key == "ssl_check_hostname":
            if value.lower() not in _BOOLS:
                raise RedisConfigError(f"REDIS_URL ({shown}): ssl_check_hostname is true or false, not {value!r}")
            out[key] = _BOOLS[value.lower()]
        else:
            out[key] = value
    return out


def _celery_ssl(tls: dict[str, Any]) -> dict[str, Any]:
    out = dict(tls)
    reqs = out.get("ssl_cert_reqs", "required")
    out["ssl_cert_reqs"] = _CERT_REQS.get(reqs, reqs) if isinstance(reqs, str) else reqs
    return out


def _mask(url: str) -> str:
    """``url`` with any password replaced by ``***``."""
    scheme, sep, rest = url.partition("://")
    netloc, slash, tail = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    if not at:
        return url
    user, colon, _ = userinfo.partition(":")
    return f"{scheme}{sep}{user}{':***' if colon else ''}@{hosts}{slash}{tail}"
