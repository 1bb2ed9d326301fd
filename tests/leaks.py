"""Looking for credentials where they must never be: Redis, logs, Flower, Sentry.

Fixtures register what the product wrote during the session (:class:`LeakWatch`);
``tests/integration/test_zz_no_secrets.py`` scans it all at the end. A secret is
searched as is and base64-encoded at each of the three byte alignments, so a
credential inside a kombu message body (base64) or a Basic auth header is found too.

Example::

    >>> watch = LeakWatch(["zz-secret-123456"])
    >>> watch.add_text("log line", "nothing to see")
    >>> watch.hits()
    []
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from pathlib import Path

import redis


def needles(secret: str) -> list[bytes]:
    """The secret, and for each byte alignment the base64 characters that depend on the secret's bytes alone."""
    raw = secret.encode()
    out = [raw]
    for pad in range(3):
        encoded = base64.b64encode(b"\0" * pad + raw + b"\0\0\0")
        pure = [i for i in range(len(encoded))
                if pad <= 6 * i // 8 and (6 * i + 5) // 8 < pad + len(raw)]
        middle = encoded[pure[0]: pure[-1] + 1] if pure else b""
        if len(middle) >= 8:
            out.append(middle)
    return out


@dataclass
class RedisScan:
    label: str
    keys: int = 0
    bytes: int = 0
    dead_letters: int = 0
    types: dict[str, int] = field(default_factory=dict)


def redis_values(client: redis.Redis) -> tuple[RedisScan, list[tuple[str, bytes]]]:
    """Every key and every value of every type in every non-empty db, as (where, bytes) pairs."""
    scan = RedisScan(label="")
    found: list[tuple[str, bytes]] = []
    info = client.info("keyspace")
    dbs = sorted(int(name[2:]) for name in info if name.startswith("db")) or [0]
    pool_kwargs = client.connection_pool.connection_kwargs
    for db in dbs:
        r = redis.Redis(host=pool_kwargs.get("host", "127.0.0.1"), port=pool_kwargs.get("port", 6379), db=db)
        for key in r.scan_iter(count=500):
            kind = r.type(key).decode()
            scan.keys += 1
            scan.types[kind] = scan.types.get(kind, 0) + 1
            parts: list[bytes] = [key]
            if kind == "string":
                parts.append(r.get(key) or b"")
            elif kind == "list":
                parts.extend(r.lrange(key, 0, -1))
            elif kind == "hash":
                for k, v in r.hgetall(key).items():
                    parts.extend((k, v))
            elif kind == "set":
                parts.extend(r.smembers(key))
            elif kind == "zset":
                parts.extend(member for member, _ in r.zrange(key, 0, -1, withscores=True))
            elif kind == "stream":
                for entry_id, fields in r.xrange(key):
                    parts.append(entry_id)
                    for k, v in fields.items():
                        parts.extend((k, v))
            else:
                raise AssertionError(f"unexpected Redis type {kind} of key {key!r}")
            if key.endswith(b":deadletters") and kind == "hash":
                scan.dead_letters += r.hlen(key)
            blob = b"\n".join(p if isinstance(p, bytes) else str(p).encode() for p in parts)
            scan.bytes += len(blob)
            found.append((f"redis db{db} {kind} {key.decode(errors='replace')}", blob))
        r.close()
    return scan, found


class LeakWatch:
    """What the session wrote, collected for one scan for credentials."""

    def __init__(self, secrets: list[str]) -> None:
        self.secrets = sorted({s for s in secrets if s})
        self.texts: list[tuple[str, bytes]] = []
        self.log_paths: list[Path] = []
        self.redis_scans: list[RedisScan] = []
        self.sources: dict[str, int] = {}  # kind -> bytes registered

    def _count(self, kind: str, n: int) -> None:
        self.sources[kind] = self.sources.get(kind, 0) + n

    def add_text(self, where: str, text: str | bytes, kind: str = "text") -> None:
        data = text.encode(errors="replace") if isinstance(text, str) else text
        self.texts.append((where, data))
        self._count(kind, len(data))

    def add_json(self, where: str, obj: object, kind: str) -> None:
        self.add_text(where, json.dumps(obj, default=str), kind)

    def add_log(self, path: str | Path) -> None:
        self.log_paths.append(Path(path))

    def add_redis(self, url: str, label: str) -> RedisScan:
        """Scan a Redis now (before it is emptied or stopped) and keep its contents for the final scan."""
        client = redis.Redis.from_url(url)
        try:
            scan, found = redis_values(client)
        finally:
            client.close()
        scan.label = label
        self.redis_scans.append(scan)
        for where, blob in found:
            self.texts.append((f"{label}: {where}", blob))
        self._count("redis", scan.bytes)
        self._count("redis keys", scan.keys)
        self._count("dead letters", scan.dead_letters)
        return scan

    def logs(self) -> list[tuple[str, bytes]]:
        out = []
        for path in dict.fromkeys(self.log_paths):
            if path.exists():
                out.append((f"log {path}", path.read_bytes()))
        return out

    def hits(self) -> list[str]:
        """``where: which secret`` for every place a credential shows up."""
        patterns = [(secret, n) for secret in self.secrets for n in needles(secret)]
        out = []
        for where, blob in [*self.texts, *self.logs()]:
            for secret, needle in patterns:
                if needle in blob:
                    out.append(f"{where}: {secret[:6]}... ({'raw' if needle == secret.encode() else 'base64'})")
        return out
