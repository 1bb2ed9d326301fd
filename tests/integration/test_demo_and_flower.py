"""The demo runs end to end, and Flower shows retries and dead letters."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import pytest

import worker
from worker.localstack import FlowerProcess, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_demo_shows_delivery_retry_and_dead_letter(base_env):
    env = {k: v for k, v in base_env.items() if not k.startswith(("CONVERTLOOP_", "LOOPS_", "CONVEYOUR_", "REDIS_URL"))}
    out = subprocess.run([sys.executable, "-m", "worker.demo", "--exit-after", "0", "--flower-port", "0"],
                         env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert "to every vendor" in text
    assert "'503': 1" in text and "delivered on attempt 2" in text
    assert "1 dead letter(s)" in text and "rejected" in text and "422" in text


@pytest.fixture(scope="module")
def flower(base_env, worker_factory, tmp_path_factory, leak_watch):
    """Flower on loopback against the test broker (basic auth); its log and task output go to leak_watch."""
    worker_factory("flower-w", RETRY_BACKOFF_MAX=10)  # lets a Retry-After of 5 s stand
    log_path = tmp_path_factory.mktemp("flower") / "flower.log"
    proc = FlowerProcess(base_env, log_path, basic_auth="ops:secret-pw")
    url = proc.url
    try:
        proc.start()
        yield url
        leak_watch.add_text("flower /api/tasks", httpx.get(f"{url}/api/tasks", auth=("ops", "secret-pw"), timeout=5).text,
                            kind="flower")
    finally:
        proc.stop()
        leak_watch.add_log(log_path)


def flower_task(url: str, task_id: str) -> dict | None:
    tasks = httpx.get(f"{url}/api/tasks", auth=("ops", "secret-pw"), timeout=5).json()
    return tasks.get(task_id)


def test_flower_shows_dead_letter_as_failure_and_the_retry(flower, product_env, sandbox_client, unique_email):
    assert httpx.get(f"{flower}/api/tasks", timeout=5).status_code == 401, "Flower must ask for a login"
    sandbox_client.configure("convertloop", fail_next=[{"status": 422}])
    dead = worker.identify(email=unique_email, vendors=["convertloop"])
    # Loops answers 503 with Retry-After: 5, so the retry waits about 5 s: long enough to watch Flower show it.
    sandbox_client.configure("loops", fail_next=[{"status": 503, "retry_after": "5"}])
    retried = worker.track("t", email=unique_email, vendors=["loops"])

    # Watch the retried task's state in Flower while its countdown runs.
    states: list[tuple[float, str | None, dict | None]] = []
    deadline = time.monotonic() + 25
    while time.monotonic() < deadline:
        task = flower_task(flower, f"{retried}.loops")
        states.append((time.time(), task and task["state"], task))
        if task and task["state"] == "SUCCESS":
            break
        time.sleep(0.1)
    attempts = [r for r in sandbox_client.requests(vendor="loops") if r["idempotency_key"] == retried]
    assert [r["status"] for r in attempts] == [503, 200]
    failed_at, delivered_at = attempts[0]["ts"], attempts[1]["ts"]
    waiting = [(state, task) for t, state, task in states if failed_at + 0.3 < t < delivered_at - 0.3]
    sequence = [state for _, state, _ in states]
    changes = [s for i, s in enumerate(sequence) if i == 0 or s != sequence[i - 1]]
    shown_retry = sum(1 for state, _ in waiting if state == "RETRY")
    print(f"\nFlower states of the retried delivery: {changes}; RETRY in {shown_retry} of {len(waiting)} polls "
          f"during the {delivered_at - failed_at:.1f}s countdown")
    # While the countdown runs the delivery is not in a worker thread: Flower shows it waiting with the vendor's
    # answer. The state is RETRY when Celery's task-retried event reaches Flower after the task-received event
    # of the retry message; when the two race the other way, Flower shows RECEIVED (still marked retried).
    assert len(waiting) >= 10, "too few polls during the countdown"
    for state, task in waiting:
        assert state in ("RETRY", "RECEIVED"), f"Flower showed {state} during the countdown: {changes}"
        assert task["retried"] and "loops answered 503" in task["exception"], task
    done = states[-1][2]
    assert done["state"] == "SUCCESS" and done["retried"] and done["retries"] == 1

    failed = wait_until(lambda: (t := flower_task(flower, f"{dead}.convertloop")) and t["state"] == "FAILURE" and t,
                        timeout=20, message="FAILURE in Flower")
    assert "DeadLettered" in failed["exception"]
    assert "convertloop" in failed["exception"] and "status=422" in failed["exception"] and "reason=rejected" in failed["exception"]
