"""The demo runs end to end, and Flower shows retries and dead letters."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

import worker
from worker.localstack import free_port, wait_until

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
def flower(base_env, worker_factory):
    worker_factory("flower-w")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "celery", "-A", "worker", "flower", f"--port={port}",
                             "--address=127.0.0.1", "--basic-auth=ops:secret-pw"],
                            env=base_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"

    def up():
        try:
            return httpx.get(f"{url}/healthcheck", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(up, timeout=30, message="Flower")
    yield url
    proc.terminate()
    proc.wait(10)


def flower_task(url: str, task_id: str) -> dict | None:
    tasks = httpx.get(f"{url}/api/tasks", auth=("ops", "secret-pw"), timeout=5).json()
    return tasks.get(task_id)


def test_flower_shows_dead_letter_as_failure_and_the_retry(flower, product_env, sandbox_client, unique_email):
    assert httpx.get(f"{flower}/api/tasks", timeout=5).status_code == 401, "Flower must ask for a login"
    sandbox_client.configure("convertloop", fail_next=[{"status": 422}])
    dead = worker.identify(email=unique_email, vendors=["convertloop"])
    sandbox_client.configure("loops", fail_next=[{"status": 503, "retry_after": "4"}])
    retried = worker.track("t", email=unique_email, vendors=["loops"])

    failed = wait_until(lambda: (t := flower_task(flower, f"{dead}.convertloop")) and t["state"] == "FAILURE" and t,
                        timeout=20, message="FAILURE in Flower")
    assert "DeadLettered" in failed["exception"]
    assert "convertloop" in failed["exception"] and "status=422" in failed["exception"] and "reason=rejected" in failed["exception"]
    # A retry is the task-retried event: Flower marks the task RETRY with the vendor's answer and keeps
    # the time and count. (While the countdown runs, the next task-received event shows it as RECEIVED.)
    done = wait_until(lambda: (t := flower_task(flower, f"{retried}.loops")) and t["state"] == "SUCCESS" and t,
                      timeout=20, message="SUCCESS after the retry")
    assert done["retried"] and done["retries"] == 1
    assert "loops answered 503" in done["exception"]
    assert "sandbox-loops-key" not in str(done) and "sandbox-loops-key" not in str(failed)
