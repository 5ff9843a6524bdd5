"""docker-compose.yml and the Dockerfile agree with the real `splan` CLI, the health routes and each other."""

from __future__ import annotations

import argparse
import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from service.api.routers import health
from service.cli import SERVICE_COMMANDS, build_parser

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"


def compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    return document


def services() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose()["services"]
    return found


def built_services() -> dict[str, dict[str, Any]]:
    """The services whose image is built from this repository (ENTRYPOINT ["splan"])."""
    return {name: svc for name, svc in services().items() if "build" in svc}


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    lines = [line for line in DOCKERFILE.read_text(encoding="utf-8").splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    pairs = []
    for line in joined.splitlines():
        if line.strip():
            instruction, _, rest = line.strip().partition(" ")
            pairs.append((instruction.upper(), rest.strip()))
    return pairs


def dockerfile_exec_form(instruction: str) -> list[str]:
    """The JSON (exec) form of the last CMD or ENTRYPOINT, as Docker uses the last one."""
    values = [rest for name, rest in dockerfile_instructions() if name == instruction]
    assert values, f"Dockerfile has no {instruction}"
    argv = json.loads(values[-1])
    assert isinstance(argv, list), f"{instruction} must use the exec form"
    assert all(isinstance(arg, str) for arg in argv)
    return argv


def command_argv(svc: dict[str, Any]) -> list[str]:
    command = svc.get("command")
    assert command is not None, "a service built from this repo must say which splan command it runs"
    return shlex.split(command) if isinstance(command, str) else [str(arg) for arg in command]


def parse_splan(argv: list[str]) -> argparse.Namespace:
    """Parse argv exactly as the `splan` console script would; a bad command fails the test."""
    args = build_parser().parse_args(argv)
    assert args.command in SERVICE_COMMANDS, f"{argv} is not a service command"
    return args


def healthcheck_test(svc: dict[str, Any]) -> str:
    check = svc.get("healthcheck")
    assert check is not None, "missing healthcheck"
    assert not check.get("disable"), "healthcheck disabled"
    test = check["test"]
    return test if isinstance(test, str) else " ".join(str(part) for part in test)


def test_entrypoint_is_the_splan_console_script() -> None:
    assert dockerfile_exec_form("ENTRYPOINT") == ["splan"]
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    assert project["project"]["scripts"]["splan"] == "service.cli:main"
    for name, svc in built_services().items():
        assert "entrypoint" not in svc, f"{name} must keep the image's splan entrypoint"


def test_dockerfile_cmd_serves_on_all_interfaces_on_the_exposed_port() -> None:
    args = parse_splan(dockerfile_exec_form("CMD"))
    assert args.command == "serve"
    assert args.host == "0.0.0.0"
    exposed = [rest for name, rest in dockerfile_instructions() if name == "EXPOSE"]
    assert exposed == [str(args.port)]


def test_dockerfile_healthcheck_hits_a_real_liveness_route() -> None:
    checks = [rest for name, rest in dockerfile_instructions() if name == "HEALTHCHECK"]
    assert len(checks) == 1
    assert "/livez" in checks[0]
    assert "/livez" in {getattr(route, "path", None) for route in health.router.routes}


def test_dockerfile_ships_the_migrations_where_migrate_py_finds_them() -> None:
    instructions = dockerfile_instructions()
    assert ("COPY", "migrations ./migrations") in instructions
    assert ("WORKDIR", "/app") in instructions
    env = " ".join(rest for name, rest in instructions if name == "ENV")
    assert "PYTHONPATH=/app" in env  # service/ imported from /app, so parents[2] / "migrations" is /app/migrations
    ignored = (REPO / ".dockerignore").read_text(encoding="utf-8").split()
    assert not {"migrations", "service", "workers", "pyproject.toml", "README.md"} & set(ignored)


def test_dockerfile_runs_as_a_non_root_user() -> None:
    users = [rest for name, rest in dockerfile_instructions() if name == "USER"]
    assert users
    assert users[-1] not in ("root", "0")


def test_compose_has_the_services() -> None:
    assert {"postgres", "redis", "migrate", "api", "worker"} <= set(services())
    assert {"migrate", "api", "worker"} <= set(built_services())


@pytest.mark.parametrize(
    ("service", "probe"), [("postgres", "pg_isready"), ("redis", "redis-cli ping"), ("api", "/readyz")]
)
def test_healthchecks(service: str, probe: str) -> None:
    assert probe in healthcheck_test(services()[service])


def test_api_healthcheck_route_exists_and_uses_the_served_port() -> None:
    api = services()["api"]
    args = parse_splan(command_argv(api))
    test = healthcheck_test(api)
    assert f"127.0.0.1:{args.port}/readyz" in test
    assert "/readyz" in {getattr(route, "path", None) for route in health.router.routes}
    assert any(str(port).endswith(f":{args.port}") for port in api.get("ports", []))


def test_worker_healthcheck_pings_its_celery_node() -> None:
    test = healthcheck_test(services()["worker"])
    assert "workers.celery_app" in test
    assert "ping" in test


@pytest.mark.parametrize("service", ["api", "worker"])
def test_api_and_worker_wait_for_healthy_dependencies_and_the_migration(service: str) -> None:
    depends = services()[service]["depends_on"]
    assert depends == {
        "postgres": {"condition": "service_healthy"},
        "redis": {"condition": "service_healthy"},
        "migrate": {"condition": "service_completed_successfully"},
    }


def test_migrate_waits_for_a_healthy_postgres() -> None:
    depends = services()["migrate"]["depends_on"]
    assert depends["postgres"] == {"condition": "service_healthy"}


@pytest.mark.parametrize("service", sorted(built_services()))
def test_built_service_commands_parse_with_the_splan_parser(service: str) -> None:
    parse_splan(command_argv(built_services()[service]))


@pytest.mark.parametrize(
    ("service", "expected"), [("migrate", ["db", "upgrade"]), ("api", ["serve"]), ("worker", ["worker"])]
)
def test_each_service_runs_its_subcommand(service: str, expected: list[str]) -> None:
    argv = command_argv(services()[service])
    args = parse_splan(argv)
    assert argv[: len(expected)] == expected
    assert args.command == expected[0]
    if service == "migrate":
        assert args.db_command == "upgrade"
    if service == "api":
        assert args.host == "0.0.0.0"


def env(service: str) -> dict[str, str]:
    environment = services()[service].get("environment") or {}
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    return {str(k): str(v) for k, v in environment.items()}


def test_api_worker_and_migrate_share_the_database_and_broker() -> None:
    api, worker, migrate = env("api"), env("worker"), env("migrate")
    assert api["DATABASE_URL"] == worker["DATABASE_URL"] == migrate["DATABASE_URL"]
    assert api["BROKER_URL"] == worker["BROKER_URL"]
    # A different queue name would leave every plan queued forever.
    assert api.get("SPLAN_QUEUE_NAME") == worker.get("SPLAN_QUEUE_NAME")


def test_urls_point_at_the_compose_postgres_and_redis() -> None:
    database = urlsplit(env("api")["DATABASE_URL"])
    postgres = services()["postgres"]["environment"]
    assert database.scheme in ("postgresql", "postgres")
    assert database.hostname == "postgres"
    assert database.username == postgres["POSTGRES_USER"]
    assert database.password == postgres["POSTGRES_PASSWORD"]
    assert database.path.lstrip("/") == postgres["POSTGRES_DB"]
    broker = urlsplit(env("api")["BROKER_URL"])
    assert broker.scheme == "redis"
    assert broker.hostname == "redis"
