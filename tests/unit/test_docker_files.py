"""Static checks for the deployment files in docker/.

These tests never import the ``worker`` package; they only read
docker/Dockerfile and docker/compose.yaml. The ``config`` tests additionally
run the real Compose CLI when one is installed and are skipped otherwise.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml  # PyYAML: dev extra

from worker.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKER_DIR = REPO_ROOT / "docker"
COMPOSE_FILE = DOCKER_DIR / "compose.yaml"
DOCKERFILE = DOCKER_DIR / "Dockerfile"

VENDOR_QUEUES = {"convertloop", "loops", "conveyour"}

# Everything the application reads from the environment: every field of the settings model, so that a
# new setting cannot be forgotten in compose.
APP_ENV_VARS = {name.upper() for name in Settings.model_fields}

SECRET_NAME_RE = re.compile(r"(_KEY|_TOKEN|_APPKEY|_APP_ID|^SENTRY_DSN|_PASSWORD|_SECRET|BASIC_AUTH)$")

# A value that is *only* a reference to another variable, with no non-empty
# default: ${NAME}, ${NAME:?msg}, ${NAME?msg}, ${NAME:-}, ${NAME-}.
PURE_INTERPOLATION_RE = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*(?:(?::?\?[^}]*)|(?::?-))?\}$")


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def compose() -> dict:
    assert COMPOSE_FILE.is_file(), f"missing {COMPOSE_FILE}"
    data = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict) -> dict:
    return compose["services"]


def command_tokens(service: dict) -> list[str]:
    cmd = service.get("command")
    if cmd is None:
        return []
    if isinstance(cmd, str):
        return shlex.split(cmd)
    return [str(part) for part in cmd]


def environment(service: dict) -> dict[str, str | None]:
    """Normalise list or mapping ``environment:`` to {name: value-or-None}."""
    env = service.get("environment") or {}
    if isinstance(env, dict):
        return {str(k): (None if v is None else str(v)) for k, v in env.items()}
    result: dict[str, str | None] = {}
    for item in env:
        name, sep, value = str(item).partition("=")
        result[name] = value if sep else None
    return result


def queues_of(tokens: list[str]) -> list[str]:
    queues: list[str] = []
    for i, tok in enumerate(tokens):
        if tok in ("-Q", "--queues") and i + 1 < len(tokens):
            queues.extend(tokens[i + 1].split(","))
        elif tok.startswith("--queues="):
            queues.extend(tok.split("=", 1)[1].split(","))
        elif tok.startswith("-Q") and len(tok) > 2:
            queues.extend(tok[2:].lstrip("=").split(","))
    return [q for q in queues if q]


def is_celery_worker(tokens: list[str]) -> bool:
    return tokens[:4] == ["celery", "-A", "worker", "worker"]


def worker_services(services: dict) -> dict[str, dict]:
    return {
        name: svc
        for name, svc in services.items()
        if is_celery_worker(command_tokens(svc))
    }


def dockerfile_instructions() -> list[tuple[str, str]]:
    """Return (INSTRUCTION, arguments) pairs, joining continuation lines."""
    assert DOCKERFILE.is_file(), f"missing {DOCKERFILE}"
    instructions: list[tuple[str, str]] = []
    buffer = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buffer += line[:-1] + " "
            continue
        buffer += line
        keyword, _, args = buffer.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        buffer = ""
    if buffer:
        keyword, _, args = buffer.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    return instructions


def exec_or_shell_tokens(args: str) -> list[str]:
    if args.startswith("["):
        return [str(x) for x in json.loads(args)]
    return shlex.split(args)


# --------------------------------------------------------------------------- #
# compose.yaml
# --------------------------------------------------------------------------- #


def test_redis_is_persistent_and_healthchecked(services: dict) -> None:
    redis = services["redis"]
    assert str(redis["image"]).startswith("redis:7")

    tokens = command_tokens(redis)
    assert tokens and tokens[0] == "redis-server"
    assert "--appendonly" in tokens
    assert tokens[tokens.index("--appendonly") + 1] == "yes"
    assert tokens[tokens.index("--maxmemory-policy") + 1] == "noeviction"

    volumes = [str(v) for v in redis.get("volumes", [])]
    targets = [v.split(":")[1] for v in volumes if ":" in v]
    assert "/data" in targets, f"redis needs a volume on /data, got {volumes}"

    health = " ".join(str(x) for x in redis["healthcheck"]["test"])
    assert "redis-cli" in health and "ping" in health


def test_redis_data_volume_is_named(compose: dict, services: dict) -> None:
    for vol in services["redis"]["volumes"]:
        source, _, target = str(vol).partition(":")
        if target.split(":")[0] == "/data":
            assert source in (compose.get("volumes") or {}), (
                f"/data should use a named volume declared under top-level volumes, got {vol}"
            )
            return
    pytest.fail("no /data volume on redis")


def test_exactly_one_worker_per_vendor_queue(services: dict) -> None:
    workers = worker_services(services)
    assert workers, "no `celery -A worker worker` services found"

    seen: list[str] = []
    for name, svc in workers.items():
        queues = queues_of(command_tokens(svc))
        assert len(queues) == 1, f"{name} must consume exactly one queue via -Q, got {queues}"
        seen.extend(queues)

    assert sorted(seen) == sorted(VENDOR_QUEUES), f"queues covered: {seen}"


def test_worker_services_share_build_and_wait_for_redis(services: dict) -> None:
    for name, svc in worker_services(services).items():
        build = svc["build"]
        assert build["dockerfile"] == "docker/Dockerfile", name
        assert (DOCKER_DIR / build["context"]).resolve() == REPO_ROOT, name

        depends = svc["depends_on"]
        assert isinstance(depends, dict), f"{name}: depends_on must use the long form"
        assert depends["redis"]["condition"] == "service_healthy", name

        assert svc.get("restart") == "unless-stopped", name
        assert svc.get("stop_grace_period"), f"{name}: needs a stop_grace_period for warm shutdown"

        tokens = command_tokens(svc)
        assert "-n" in tokens, f"{name}: give each worker a distinct node name"


def test_workers_receive_application_environment(services: dict) -> None:
    for name, svc in worker_services(services).items():
        env = environment(svc)
        missing = APP_ENV_VARS - env.keys()
        assert not missing, f"{name} does not pass through {sorted(missing)}"
        assert env["REDIS_URL"] == "redis://redis:6379/0", name


def test_flower_requires_basic_auth_from_the_environment(services: dict) -> None:
    flower = services["flower"]
    tokens = command_tokens(flower)
    assert tokens[:4] == ["celery", "-A", "worker", "flower"]
    assert not any("basic-auth" in t for t in tokens), "the login must not be on the command line (ps shows it)"
    env = environment(flower)
    value = env.get("FLOWER_BASIC_AUTH")
    assert value and PURE_INTERPOLATION_RE.match(value), \
        f"FLOWER_BASIC_AUTH must come from the environment, got {value!r}"
    assert ":?" in value, "an unset FLOWER_BASIC_AUTH must stop compose, not open Flower without a login"
    assert set(env) == {"REDIS_URL", "FLOWER_BASIC_AUTH"}, "Flower must not receive vendor credentials"

    ports = [str(p) for p in flower.get("ports", [])]
    assert any(p.endswith("5555") for p in ports), ports


def test_no_literal_secrets_in_environment(services: dict) -> None:
    offenders = []
    for name, svc in services.items():
        for key, value in environment(svc).items():
            if not SECRET_NAME_RE.search(key):
                continue
            # None = bare name: passed through from the host environment.
            if value is None or PURE_INTERPOLATION_RE.match(value):
                continue
            offenders.append(f"{name}: {key}={value}")
    assert not offenders, "hard-coded secrets in compose.yaml: " + ", ".join(offenders)


def test_no_credentials_in_redis_url(services: dict) -> None:
    for name, svc in services.items():
        url = environment(svc).get("REDIS_URL")
        if url and not url.startswith("${"):
            assert "@" not in url, f"{name}: REDIS_URL must not embed credentials"


# --------------------------------------------------------------------------- #
# Dockerfile
# --------------------------------------------------------------------------- #


def test_dockerfile_base_image() -> None:
    froms = [args for kw, args in dockerfile_instructions() if kw == "FROM"]
    assert froms and froms[-1].split()[0] == "python:3.11-slim"


def test_dockerfile_runs_as_non_root() -> None:
    instructions = dockerfile_instructions()
    users = [args for kw, args in instructions if kw == "USER"]
    assert users, "Dockerfile has no USER line"
    final_user = users[-1].split(":")[0]
    assert final_user not in ("root", "0"), f"final USER is {users[-1]!r}"

    keywords = [kw for kw, _ in instructions]
    last_user = len(keywords) - 1 - keywords[::-1].index("USER")
    assert last_user < keywords.index("CMD"), "USER must precede CMD"


def test_dockerfile_installs_package_with_pip() -> None:
    runs = [args for kw, args in dockerfile_instructions() if kw == "RUN"]
    # The project itself, with the gevent extra (the gevent pool: docs/pools.md).
    assert any(re.search(r"\bpip install\b.*--no-cache-dir.*\s'\.\[gevent\]'(\s|$)", r) for r in runs), runs


def test_dockerfile_copies_project_files() -> None:
    copied = " ".join(args for kw, args in dockerfile_instructions() if kw in ("COPY", "ADD"))
    for required in ("pyproject.toml", "celeryconfig.py", "worker/", "README.md"):
        assert required in copied, f"{required} is not copied into the image"
    assert not re.search(r"(^|\s)\.\s", copied), "copy explicit paths, not the whole context (.venv!)"


def test_dockerfile_env_unbuffered() -> None:
    env = " ".join(args for kw, args in dockerfile_instructions() if kw == "ENV")
    assert re.search(r"PYTHONUNBUFFERED[= ]1\b", env)


def test_dockerfile_cmd_runs_celery_worker() -> None:
    cmds = [args for kw, args in dockerfile_instructions() if kw == "CMD"]
    assert cmds, "Dockerfile has no CMD"
    tokens = exec_or_shell_tokens(cmds[-1])
    assert is_celery_worker(tokens), tokens


def test_no_secrets_in_dockerfile() -> None:
    for kw, args in dockerfile_instructions():
        if kw in ("ENV", "ARG"):
            for name in APP_ENV_VARS | {"FLOWER_BASIC_AUTH"}:
                if SECRET_NAME_RE.search(name):
                    assert name not in args, f"{kw} {args!r} bakes a secret into the image"


# --------------------------------------------------------------------------- #
# real Compose CLI
# --------------------------------------------------------------------------- #


def _compose_cli() -> list[str] | None:
    """Docker Compose v2 (``docker compose``) as the README runs it, else v1 (``docker-compose``),
    as make compose-check."""
    if shutil.which("docker"):
        probe = subprocess.run(
            ["docker", "compose", "version"], capture_output=True, text=True, timeout=60
        )
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


COMPOSE_CLI = _compose_cli()
requires_compose = pytest.mark.skipif(
    COMPOSE_CLI is None,
    reason="docker-compose (or the `docker compose` plugin) is not installed; "
    "install it (e.g. `apt-get install docker-compose`) to validate docker/compose.yaml",
)


def _run_config(tmp_path: Path, flower_auth: str | None) -> subprocess.CompletedProcess:
    assert COMPOSE_CLI is not None
    env = os.environ.copy()
    env.pop("FLOWER_BASIC_AUTH", None)
    if flower_auth is not None:
        env["FLOWER_BASIC_AUTH"] = flower_auth
    # Empty env file so a developer's docker/.env cannot change the outcome.
    empty_env = tmp_path / "empty.env"
    empty_env.write_text("", encoding="utf-8")
    return subprocess.run(
        [*COMPOSE_CLI, "--env-file", str(empty_env), "-f", str(COMPOSE_FILE), "config", "-q"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@requires_compose
def test_compose_config_is_valid(tmp_path: Path) -> None:
    result = _run_config(tmp_path, flower_auth="admin:example-password")
    assert result.returncode == 0, result.stderr or result.stdout


@requires_compose
def test_compose_config_requires_flower_basic_auth(tmp_path: Path) -> None:
    result = _run_config(tmp_path, flower_auth=None)
    assert result.returncode != 0, "config must fail when FLOWER_BASIC_AUTH is unset"
    assert "FLOWER_BASIC_AUTH" in (result.stderr + result.stdout)
