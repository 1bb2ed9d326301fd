"""A durable local spool: messages that could not reach the broker wait here.

One file per producer call, holding the ready-made broker messages of every
vendor it fans out to. A file is written to a temporary name, fsynced and
renamed into place, so a crash never leaves half an entry. The spool is bounded
(``SPOOL_MAX_BYTES``): when it is full, :meth:`Spool.put` raises
:class:`SpoolFull` and the caller gets :class:`~worker.errors.EnqueueError`.

The size bound is kept without reading the directory on a caller's thread: the spool sums its files once,
then adds what it writes and takes off what it publishes; :meth:`Spool.refresh` (the publisher's flusher
thread calls it while anything is spooled) sums them again to see what other processes on the host wrote.
A caller reads the directory only for a first figure, or when the entry would not fit (then the exact sum
decides, at most once per ``SIZE_CACHE_SECONDS``). During a long outage the spool holds tens of thousands of
files: summing them takes tens of milliseconds, which every producer call would otherwise pay once a second.
Reading the directory yields the GIL every ``SCAN_CHUNK`` entries, so an event loop in another thread of the
process is not held for the interpreter's whole switch interval (5 ms) meanwhile.

Draining is safe with several processes on one host: a process claims a file
by renaming it, pushes its messages, then deletes it. A claim left by a process
that died is taken back on the next drain. A crash between the push and the
delete publishes that entry again (at-least-once: the vendors' idempotency
keys are the event ids).

Example::

    >>> spool = Spool("/var/tmp/vdw-spool", max_bytes=1 << 20)              # doctest: +SKIP
    >>> spool.put("e1", [("loops", '{"body": "..."}')])                     # doctest: +SKIP
    >>> spool.drain(lambda messages: push(messages))                        # doctest: +SKIP
    1
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from ..envelope import Message

log = logging.getLogger(__name__)


#: File suffix of a complete entry waiting to be published.
READY = ".json"
#: Infix of an entry a process has claimed for publishing: ``<name>.json.claimed-<pid>``.
CLAIMED = ".claimed-"
#: Seconds the size of the spool may be old before :meth:`Spool.refresh` sums the directory again (more when
#: summing it is slow: see ``REFRESH_COST_SHARE``), and before a refused entry sums it again for an exact figure.
SIZE_CACHE_SECONDS = 1.0
#: Summing the directory takes at most this share of a thread's time (a spool of 40 000 entries takes about
#: 0.1 s to sum, so it is summed every 5 s instead of every second).
REFRESH_COST_SHARE = 0.02
#: Entries read between two GIL yields while the directory is read.
SCAN_CHUNK = 256


class SpoolFull(Exception):
    """The spool holds SPOOL_MAX_BYTES already; the entry was not written."""


class Spool:
    """A bounded directory of broker messages waiting to be published."""

    def __init__(self, directory: str | os.PathLike[str], max_bytes: int) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        #: Bytes the spool holds, as last summed plus what this process wrote and published since (None: unknown).
        self._size: int | None = None
        self._size_at = 0.0
        #: Seconds the last sum took.
        self._sum_seconds = 0.0
        #: Bytes this process has spooled (a sum counts on from it: what was spooled while it read the directory).
        self._written = 0

    # -- writing ----------------------------------------------------------------

    def put(self, event_id: str, messages: list[Message]) -> Path:
        """Store one call's messages durably; raises SpoolFull or OSError."""
        data = json.dumps({"event_id": event_id, "spooled_at": time.time(), "messages": messages}).encode()
        with self._lock:
            used = self._used_bytes(adding=len(data))
            if used + len(data) > self.max_bytes:
                raise SpoolFull(f"spool {self.directory} is full ({used} of {self.max_bytes} bytes, SPOOL_MAX_BYTES)")
            self.directory.mkdir(parents=True, exist_ok=True)
            name = f"{time.time_ns():020d}-{os.getpid()}-{event_id}"
            tmp = self.directory / f".{name}.tmp"
            final = self.directory / f"{name}{READY}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
            _fsync_dir(self.directory)
            self._size = used + len(data)
            self._written += len(data)
        return final

    # -- reading ----------------------------------------------------------------

    def pending(self) -> int:
        """How many entries wait (claimed ones included)."""
        return sum(1 for _ in self._entries(claimed=True))

    def size(self) -> int:
        """Bytes the spool holds now (the directory summed)."""
        self.refresh(force=True)
        with self._lock:
            return self._size or 0

    def refresh(self, force: bool = False) -> bool:
        """Sum the directory again if the figure is older than ``SIZE_CACHE_SECONDS`` (and 1/``REFRESH_COST_SHARE``
        times the last sum's duration), or with ``force``; True when it did. Not under the lock: a call that
        spools meanwhile is not held up. Its bytes are added to the sum, which may have read its file already:
        counted twice until the next sum, a figure too high for a moment, never too low."""
        if not force and time.monotonic() - self._size_at < max(SIZE_CACHE_SECONDS,
                                                                 self._sum_seconds / REFRESH_COST_SHARE):
            return False
        with self._lock:
            written = self._written
        total = self._sum()
        with self._lock:
            self._size, self._size_at = total + self._written - written, time.monotonic()
        return True

    def drain(self, push: Callable[[list[Message]], None], limit: int | None = None) -> int:
        """Publish waiting entries oldest first with ``push``; returns how many were published.

        Stops at the first entry ``push`` fails on (it stays for the next drain)
        and re-raises that error.
        """
        self._reclaim_orphans()
        done = 0
        for path in sorted(self._entries(claimed=False)):
            if limit is not None and done >= limit:
                break
            claimed = path.with_name(f"{path.name}{CLAIMED}{os.getpid()}")
            try:
                os.rename(path, claimed)
            except FileNotFoundError:  # another process took it
                continue
            try:
                raw = claimed.read_bytes()
                entry = json.loads(raw)
                messages = [tuple(str(part) for part in item) for item in entry["messages"]]
            except (ValueError, KeyError, TypeError) as exc:
                log.error("spool entry %s is unreadable, set aside as %s.bad: %s", path.name, path.name, exc)
                os.replace(claimed, path.with_name(path.name + ".bad"))
                continue
            try:
                push(messages)
            except BaseException:
                os.replace(claimed, path)  # give it back, untouched
                raise
            claimed.unlink()
            done += 1
            with self._lock:
                if self._size is not None:
                    self._size = max(0, self._size - len(raw))
        return done

    # -- internals --------------------------------------------------------------

    def _scan(self) -> Iterator[os.DirEntry[str]]:
        """The directory's entries, yielding the GIL every ``SCAN_CHUNK`` of them (none: no directory)."""
        try:
            with os.scandir(self.directory) as it:
                for i, entry in enumerate(it, 1):
                    yield entry
                    if i % SCAN_CHUNK == 0:
                        time.sleep(0)
        except (FileNotFoundError, NotADirectoryError):  # no spool directory there: nothing waits in it
            return

    def _entries(self, claimed: bool) -> Iterator[Path]:
        for entry in self._scan():
            name = entry.name
            if name.endswith(READY) or (claimed and CLAIMED in name):
                yield Path(entry.path)

    def _sum(self) -> int:
        started = time.monotonic()
        total = 0
        for entry in self._scan():
            try:
                total += entry.stat().st_size
            except FileNotFoundError:
                pass
        self._sum_seconds = time.monotonic() - started
        return total

    def _used_bytes(self, adding: int) -> int:
        """The size as known (called under the lock); summed first only when unknown, or when ``adding`` more
        would not fit and the figure is older than ``SIZE_CACHE_SECONDS``."""
        if self._size is None or (self._size + adding > self.max_bytes
                                  and time.monotonic() - self._size_at > SIZE_CACHE_SECONDS):
            self._size, self._size_at = self._sum(), time.monotonic()
        return self._size

    def _reclaim_orphans(self) -> None:
        """Give back entries claimed by processes that no longer exist."""
        for path in list(self._entries(claimed=True)):
            name, sep, pid = path.name.rpartition(CLAIMED)
            if not sep or not pid.isdigit() or _alive(int(pid)):
                continue
            try:
                os.rename(path, path.with_name(name))
                log.warning("spool entry %s was claimed by dead process %s; it will be published again", name, pid)
            except FileNotFoundError:
                pass


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
