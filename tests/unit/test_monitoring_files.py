"""The example monitoring files: docker/prometheus/alerts.yml (Prometheus alert rules), docker/keda/scaledobject.yaml
(KEDA autoscaling on queue depth) and the exporter service in docker/compose.yaml.

Every metric an alert uses must be one the exporter serves; the KEDA lists must be the vendor queues.
``promtool`` (Debian's ``prometheus`` package; .ci/run installs it) checks the rules' PromQL and runs their
unit tests (docker/prometheus/alerts.test.yml: each alert fires on made-up series); without it those two
tests skip.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from worker.ops.export import DEFAULT_PORT, exposed_names
from worker.vendors import VENDORS

DOCKER = Path(__file__).resolve().parents[2] / "docker"
ALERTS = DOCKER / "prometheus" / "alerts.yml"
ALERT_TESTS = DOCKER / "prometheus" / "alerts.test.yml"
KEDA = DOCKER / "keda" / "scaledobject.yaml"
COMPOSE = DOCKER / "compose.yaml"

DURATION = re.compile(r"^\d+[smhd]$")
#: A metric name in PromQL: a word starting vdw_ not followed by "(" (a function) — label names are not vdw_.
METRIC = re.compile(r"\b(vdw_[a-z_]+)\b(?!\s*\()")


@pytest.fixture(scope="module")
def rules() -> list[dict]:
    doc = yaml.safe_load(ALERTS.read_text())
    assert set(doc) == {"groups"} and doc["groups"]
    found = []
    for group in doc["groups"]:
        assert isinstance(group["name"], str) and group["rules"], group
        found.extend(group["rules"])
    return found


def test_every_alert_is_complete(rules):
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names)), "two alerts share a name"
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert isinstance(rule["expr"], str) and rule["expr"].strip()
        assert "for" not in rule or DURATION.match(rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]


def test_alerts_use_only_metrics_the_exporter_serves(rules):
    served = exposed_names()
    used = {m for rule in rules for m in METRIC.findall(rule["expr"])}
    assert used, "no vdw_ metric in any alert"
    assert used <= served, f"alerts use metrics the exporter does not serve: {sorted(used - served)}"


def test_the_issue_s_three_kinds_of_alert_are_there(rules):
    exprs = {r["alert"]: r["expr"] for r in rules}
    vendor_failing = [a for a, e in exprs.items() if "vdw_breaker_open" in e or 'outcome="dead_lettered"' in e]
    dead_letters_rising = [a for a, e in exprs.items() if "increase(vdw_dead_letters_total" in e]
    queue_behind = [a for a, e in exprs.items() if "vdw_queue_depth" in e]
    assert vendor_failing and dead_letters_rising and queue_behind, exprs


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    return found


def test_promtool_accepts_the_rules():
    out = subprocess.run([_promtool(), "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_each_alert_fires_in_its_promtool_unit_test(rules):
    tested = {t["alertname"] for case in yaml.safe_load(ALERT_TESTS.read_text())["tests"]
              for t in case["alert_rule_test"] if t["exp_alerts"]}
    assert tested == {r["alert"] for r in rules}, "every alert needs a case where it fires"
    out = subprocess.run([_promtool(), "test", "rules", str(ALERT_TESTS)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_keda_scales_one_worker_per_vendor_queue_on_its_redis_list():
    objects = [d for d in yaml.safe_load_all(KEDA.read_text()) if d]
    lists = []
    for obj in objects:
        assert (obj["apiVersion"], obj["kind"]) == ("keda.sh/v1alpha1", "ScaledObject")
        spec = obj["spec"]
        assert spec["minReplicaCount"] >= 1, "a worker must run to move due retries back onto the queue"
        assert spec["maxReplicaCount"] >= spec["minReplicaCount"]
        (trigger,) = spec["triggers"]
        assert trigger["type"] == "redis"
        meta = trigger["metadata"]
        assert meta["addressFromEnv"] and "address" not in meta and "host" not in meta, "address from the env only"
        assert "password" not in meta, "a password from the env only (passwordFromEnv)"
        assert isinstance(meta["listLength"], str) and int(meta["listLength"]) > 0, "KEDA wants a string"
        assert spec["scaleTargetRef"]["name"] == obj["metadata"]["name"] == f"worker-{meta['listName']}"
        lists.append(meta["listName"])
    assert sorted(lists) == sorted(VENDORS), lists


def test_compose_runs_the_exporter_without_credentials():
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    exporters = {name: svc for name, svc in services.items()
                 if shlex.split(svc.get("command", ""))[:4] == ["python", "-m", "worker", "metrics"]}
    assert len(exporters) == 1, "one exporter: the counts are global"
    (svc,) = exporters.values()
    tokens = shlex.split(svc["command"])
    assert tokens[tokens.index("--port") + 1] == str(DEFAULT_PORT)
    assert tokens[tokens.index("--host") + 1] == "0.0.0.0", "reachable from outside its container"
    env = {item.partition("=")[0] for item in svc["environment"]}
    assert "REDIS_URL" in env and not env & {"LOOPS_API_KEY", "CONVERTLOOP_API_KEY", "CONVERTLOOP_APP_ID",
                                              "CONVEYOUR_APPKEY", "CONVEYOUR_TOKEN", "SENTRY_DSN"}
    assert any(str(p).endswith(str(DEFAULT_PORT)) for p in svc["ports"])
