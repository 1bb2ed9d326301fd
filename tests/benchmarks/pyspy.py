"""Where a worker's time goes: py-spy samples of a worker process, summarised.

:class:`PySpy` records a running process (``py-spy record --format raw --gil``,
collapsed stacks of the thread holding the GIL only: a worker is one Python process,
so the GIL is what its threads compete for, and blocked threads are not counted). :func:`summarize` ranks frames by
*self* samples (the leaf of a stack) and by *inclusive* samples (anywhere on it),
and groups them by area (logging, HTTP client, Redis, kombu/celery, JSON, ...).
``python -m tests.benchmarks.pyspy FILE`` prints the summary of a recorded file.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

#: (area, pattern on the frame's file as py-spy prints it, e.g. "celery/app/trace.py") — first match wins.
AREAS = [
    ("logging", r"^logging/|^celery/utils/log|^kombu/log"),
    ("HTTP client (worker/http11, httpx/httpcore/h11)", r"^worker/http11\.py|^httpx/|^httpcore/|^h11/"),
    ("Redis client (redis-py)", r"^redis/"),
    ("JSON", r"^json/|^kombu/utils/json"),
    ("pydantic", r"^pydantic"),
    ("sockets/selectors", r"^socket\.py|^ssl\.py|^selectors\.py"),
    ("threading/queue", r"^threading\.py|^queue\.py|^concurrent/futures"),
    ("kombu", r"^kombu/"),
    ("celery", r"^celery/|^billiard/"),
    ("product (worker/)", r"^worker/"),
]

#: Calls worth knowing the inclusive share of: (label, regex on "function (file").
KEY_CALLS = [
    ("task body: worker.deliver (all of the product's work)", r"^deliver \(worker/broker/tasks\.py"),
    ("  parse + build request", r"^(parse_event|.*\.build|.*\.build_batch) \(worker/"),
    ("  rate limiter / throttle", r"^(Throttle\.wait|\w+\.(acquire|admit|hold)) \(worker/limits/"),
    ("  HTTP exchange (VendorHTTP.exchange)", r"^VendorHTTP\.exchange \(worker/clients\.py"),
    ("  dead-letter / batching store", r"\(worker/delivery/(deadletters|batching)\.py"),
    ("logging, anywhere (Logger.handle)", r"^Logger\.handle \(logging/"),
    ("Celery task events (EventDispatcher.send)", r"^EventDispatcher\.send \(celery/"),
    ("message receipt (Celery's task_message_handler)", r"task_message_handler \(celery/worker/strategy"),
    ("ack (Message.ack)", r"^Message\.ack \(kombu/"),
    ("  the person's turn ends with it (PersonLog.finish)", r"^PersonLog\.finish \(worker/delivery/"),
    ("taking messages (the transport's BRPOP/take)", r"^Channel\._(brpop|take)_\w+ \(worker/broker/transport"),
    ("Redis commands, anywhere (redis-py execute_command)", r"^(Redis|Pipeline)\.(execute_command|execute) \(redis/"),
]


class PySpy:
    def __init__(self, pid: int, out: Path, rate: int = 200) -> None:
        self.out = out
        binary = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        self.proc = subprocess.Popen([binary, "record", "-p", str(pid), "-o", str(out), "--format", "raw",
                                      "-r", str(rate), "--nonblocking", "--gil"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def stop(self) -> str:
        """Stop recording (py-spy writes its file on SIGINT); returns py-spy's stderr."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            _, err = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return (err or b"").decode(errors="replace")


def _frames(stack: str) -> list[str]:
    return [f for f in stack.split(";") if f]


def _short(frame: str) -> str:
    m = re.match(r"(.*) \((.*?):(\d+)\)$", frame)
    if not m:
        return frame
    func, path, _line = m.groups()
    for marker in ("site-packages/", "/lib/python3", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{func} ({path})"


def _file(frame: str) -> str:
    m = re.search(r"\(([^()]*?)(?::\d+)?\)$", frame)
    return m.group(1) if m else ""


def _area(frames: list[str]) -> str:
    for frame in reversed(frames):
        path = _file(frame)
        for name, pattern in AREAS:
            if re.search(pattern, path):
                return name
    return "other"


def summarize(path: Path, top: int = 15) -> dict:
    self_counts: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    keys: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = _frames(stack)
        if frames and frames[0].startswith("process "):
            frames = frames[1:]
        if frames and frames[0].startswith("thread "):
            frames = frames[1:]
        if not frames:
            continue
        total += n
        self_counts[_short(frames[-1])] += n
        for f in {_short(f) for f in frames}:
            incl[f] += n
        areas[_area(frames)] += n
        for label, pattern in KEY_CALLS:
            if any(re.search(pattern, f) for f in frames):
                keys[label] += n

    def pct(c: Counter[str]) -> list[tuple[str, float]]:
        return [(k, round(100 * v / total, 1)) for k, v in c.most_common(top)] if total else []

    key_calls = [(label, round(100 * keys[label] / total, 1) if total else 0.0) for label, _ in KEY_CALLS]
    return {"samples": total, "areas": pct(areas), "key_calls": key_calls, "self": pct(self_counts),
            "inclusive": pct(incl)}


def render(summary: dict) -> str:
    out = [f"  {summary['samples']} samples of the GIL holder", "  by area (leaf-most match):"]
    out += [f"    {p:5.1f}%  {k}" for k, p in summary["areas"]]
    out.append("  inclusive share of key calls:")
    out += [f"    {p:5.1f}%  {k}" for k, p in summary["key_calls"]]
    out.append("  top self:")
    out += [f"    {p:5.1f}%  {k}" for k, p in summary["self"]]
    return "\n".join(out)


if __name__ == "__main__":
    print(render(summarize(Path(sys.argv[1]), top=int(sys.argv[2]) if len(sys.argv) > 2 else 15)))
