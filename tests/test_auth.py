"""API keys: hash-only storage, 401/403 as problem+json, keyless loopback embedded mode, refusal to bind publicly."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import text
from sqlalchemy.orm import Session

from service.api.app import create_app
from service.auth import (
    ALL_SCOPES,
    Principal,
    PrincipalCache,
    Scope,
    authenticate,
    create_key,
    parse_token,
    revoke_key,
)
from service.cli_service import openapi_document
from service.db.session import make_engine, make_session_factory
from service.settings import Settings
from tests.conftest import PG_ADMIN_URL, REPO, migrated_settings
from tests.helpers import SPLAN, free_port, stop, wait_ready
from tests.test_api import assert_problem
from tests.test_jobs import SPEC
from tests.test_placement_api import CLUSTER

# Each operation that needs a key, a request that reaches its handler, and the one scope it needs.
OPERATIONS: list[tuple[str, str, dict[str, Any] | None, Scope]] = [
    ("GET", "/v1/plans", None, Scope.PLANS_READ),
    ("GET", "/v1/plans/00000000-0000-0000-0000-000000000000", None, Scope.PLANS_READ),
    ("GET", "/v1/plans/00000000-0000-0000-0000-000000000000/report", None, Scope.PLANS_READ),
    ("GET", "/v1/plans/00000000-0000-0000-0000-000000000000/launch", None, Scope.PLANS_READ),
    ("POST", "/v1/plans", SPEC, Scope.PLANS_WRITE),
    ("POST", "/v1/plans/00000000-0000-0000-0000-000000000000/cancel", None, Scope.PLANS_WRITE),
    ("POST", "/v1/estimates", {"model": "llama-3.1-8b", "gpu": "h100-sxm", "isl": 128, "osl": 16}, Scope.ESTIMATES),
    ("GET", "/v1/clusters/demo", None, Scope.CLUSTERS_READ),
    ("PUT", "/v1/clusters/demo", CLUSTER, Scope.CLUSTERS_WRITE),
    ("POST", "/v1/clusters/demo/events", {"events": [{"type": "instance_stopped", "id": "x"}]}, Scope.CLUSTERS_WRITE),
    ("POST", "/v1/placements", {"cluster": "demo", "model": "llama-3.1-8b", "dry_run": True}, Scope.PLACEMENTS),
    ("POST", "/v1/placements/prewarm", {"cluster": "demo", "models": []}, Scope.PLACEMENTS),
]


@contextmanager
def session_on(settings: Settings) -> Iterator[Session]:
    """A session on the settings' database; its engine is disposed afterwards (no connection left behind)."""
    engine = make_engine(settings)
    try:
        with make_session_factory(engine)() as session:
            yield session
    finally:
        engine.dispose()


def bearer(settings: Settings, tenant: str, *scopes: Scope) -> dict[str, str]:
    with session_on(settings) as session:
        token = create_key(session, tenant=tenant, scopes=tuple(s.value for s in scopes)).token
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def keyed(db_settings: Settings) -> Iterator[tuple[TestClient, Settings]]:
    settings = db_settings.model_copy(update={"require_api_keys": True})
    with TestClient(create_app(settings)) as client:
        yield client, settings


def test_only_the_digest_of_the_secret_is_stored(db_settings: Settings) -> None:
    with session_on(db_settings) as session:
        issued = create_key(session, tenant="acme", scopes=("plans:read",))
        key_id, secret = parse_token(issued.token) or ("", "")
        assert key_id == issued.key_id
        assert len(secret) == 43  # 32 random bytes, URL-safe base64
        rows = [dict(row._mapping) for row in session.execute(text("SELECT * FROM api_keys"))]
    assert len(rows) == 1
    assert rows[0]["secret_sha256"] == hashlib.sha256(secret.encode()).hexdigest()
    stored = json.dumps(rows, default=str)
    assert secret not in stored
    assert issued.token not in stored


def test_authenticate_accepts_only_the_exact_live_key(db_settings: Settings) -> None:
    with session_on(db_settings) as session:
        token = create_key(session, tenant="acme", scopes=("plans:read", "estimates")).token
        principal = authenticate(session, token)
        assert principal is not None
        assert (principal.tenant, principal.scopes) == ("acme", frozenset({Scope.PLANS_READ, Scope.ESTIMATES}))
        flipped = token[:-1] + ("A" if token[-1] != "A" else "B")
        assert authenticate(session, flipped) is None
        assert authenticate(session, "splan_000000000000_" + token[-43:]) is None
        assert authenticate(session, "not a key") is None
        revoke_key(session, key_id=token.split("_")[1])
        assert authenticate(session, token) is None


@given(st.text(max_size=80))
def test_arbitrary_text_never_parses_as_a_token_unless_well_formed(candidate: str) -> None:
    parsed = parse_token(candidate)
    if parsed is not None:
        assert candidate == f"splan_{parsed[0]}_{parsed[1]}"


def test_missing_or_bad_keys_are_401_problems_with_a_challenge(keyed: tuple[TestClient, Settings]) -> None:
    client, settings = keyed
    for method, path, body, _scope in OPERATIONS:
        missing = client.request(method, path, json=body)
        assert_problem(missing, 401)
        assert missing.headers["WWW-Authenticate"] == 'Bearer realm="splan"'
    revoked = bearer(settings, "acme", Scope.PLANS_READ)
    with session_on(settings) as session:
        revoke_key(session, key_id=revoked["Authorization"].split("_")[1])
    for header in ("Basic dXNlcjpwYXNz", "Bearer", "Bearer splan_nope", revoked["Authorization"]):
        bad = client.get("/v1/plans", headers={"Authorization": header})
        assert_problem(bad, 401)
        assert bad.headers["WWW-Authenticate"] == 'Bearer realm="splan", error="invalid_token"'
    # Probes and the catalog need no key.
    for path in ("/livez", "/readyz", "/metrics", "/v1/catalog/gpus"):
        assert client.get(path).status_code == 200


def test_each_operation_needs_its_scope(keyed: tuple[TestClient, Settings]) -> None:
    client, settings = keyed
    admin = bearer(settings, "acme", Scope.ADMIN)
    assert client.put("/v1/clusters/demo", json=CLUSTER, headers=admin).status_code == 201
    for method, path, body, scope in OPERATIONS:
        others = bearer(settings, "acme", *(ALL_SCOPES - {scope, Scope.ADMIN}))
        refused = client.request(method, path, json=body, headers=others)
        problem = assert_problem(refused, 403)
        assert repr(scope.value) in problem["detail"]
        assert f'scope="{scope.value}"' in refused.headers["WWW-Authenticate"]
        allowed = client.request(method, path, json=body, headers=bearer(settings, "acme", scope))
        assert allowed.status_code not in (401, 403), (method, path, allowed.text)
        assert client.request(method, path, json=body, headers=admin).status_code not in (401, 403)


def test_embedded_default_is_keyless_for_loopback_clients_only(tmp_path: Path) -> None:
    settings = migrated_settings(f"sqlite:///{tmp_path / 'splan.db'}", tmp_path, require_api_keys=None)
    assert not settings.api_keys_required
    app = create_app(settings)
    with TestClient(app, client=("127.0.0.1", 50000)) as local:
        plan = local.post("/v1/plans", json=SPEC)
        assert plan.status_code == 202, plan.text
        # A key still names its tenant: the keyless plan is the default tenant's, not acme's.
        acme = bearer(settings, "acme", Scope.PLANS_READ)
        assert local.get("/v1/plans", headers=acme).json()["items"] == []
        assert_problem(local.get(f"/v1/plans/{plan.json()['id']}", headers=acme), 404)
        assert local.get(f"/v1/plans/{plan.json()['id']}").status_code == 200
    with TestClient(app, client=("203.0.113.7", 50000)) as remote:
        refused = remote.get("/v1/plans")
        assert "loopback" in assert_problem(refused, 401)["detail"]
        assert remote.get("/v1/plans", headers=acme).status_code == 200
    insecure = create_app(settings.model_copy(update={"insecure": True}))
    with TestClient(insecure, client=("203.0.113.7", 50000)) as remote:
        assert remote.get("/v1/plans").status_code == 200


def test_production_settings_require_keys(tmp_path: Path) -> None:
    pg = "postgresql://postgres@127.0.0.1:5432/splan"
    assert Settings(database_url=pg, broker_url=None).api_keys_required
    assert Settings(database_url=None, broker_url="redis://127.0.0.1:6379/0").api_keys_required
    assert not Settings(database_url=None, broker_url=None, data_dir=tmp_path).api_keys_required
    assert not Settings(database_url=pg, broker_url=None, require_api_keys=False).api_keys_required
    assert Settings(database_url=None, broker_url=None, require_api_keys=True).api_keys_required


def embedded_env(workdir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "BROKER_URL", "SPLAN_REQUIRE_API_KEYS")}
    return {**env, "PYTHONPATH": str(REPO), "SPLAN_DATA_DIR": str(workdir), **extra}


def test_serving_keyless_on_a_public_address_is_refused(tmp_path: Path) -> None:
    refused = subprocess.run(
        [*SPLAN, "serve", "--host", "0.0.0.0", "--port", str(free_port())],
        env=embedded_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1
    assert refused.stderr.startswith("splan: error: refusing to serve without API keys on 0.0.0.0")
    assert "--insecure" in refused.stderr


@pytest.mark.parametrize("flags", [["--insecure"], []])
def test_a_public_address_serves_with_insecure_or_with_keys(tmp_path: Path, flags: list[str]) -> None:
    port = free_port()
    extra = {} if flags else {"SPLAN_REQUIRE_API_KEYS": "true"}
    with (tmp_path / "serve.log").open("wb") as log:
        server = subprocess.Popen(
            [*SPLAN, "serve", "--host", "0.0.0.0", "--port", str(port), *flags],
            env=embedded_env(tmp_path, **extra),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_ready(f"http://127.0.0.1:{port}", server)
            status = httpx.get(f"http://127.0.0.1:{port}/v1/plans", timeout=10).status_code
            assert status == (200 if flags else 401)
        finally:
            stop(server)
    started = (tmp_path / "serve.log").read_text()
    event = "auth.keyless" if flags else "auth.api_keys_required"
    assert sum(1 for line in started.splitlines() if f'"event": "{event}"' in line) == 1


@pytest.fixture
def fresh_postgres() -> Iterator[str]:
    """A database of its own, for a test that runs `splan db upgrade` itself."""
    import psycopg

    name = f"splan_auth_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{name}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_production_server_and_cli_client_with_a_key(fresh_postgres: str, tmp_path: Path) -> None:
    """`splan serve` on PostgreSQL needs keys; `splan submit/status` send SPLAN_API_KEY or --api-key."""
    env = {**embedded_env(tmp_path), "DATABASE_URL": fresh_postgres}

    def run(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*SPLAN, *args], env={**env, **extra}, capture_output=True, text=True, timeout=300)

    assert run("db", "upgrade").returncode == 0
    created = run("keys", "create", "--tenant", "acme", "--scopes", "plans:read,plans:write", "--json")
    key = json.loads(created.stdout)["key"]
    port = free_port()
    server = subprocess.Popen([*SPLAN, "serve", "--port", str(port)], env=env, stdout=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, server)
        assert httpx.get(f"{base}/v1/plans", timeout=10).status_code == 401
        spec = tmp_path / "spec.json"
        spec.write_text(json.dumps(SPEC))
        keyless = run("submit", str(spec), "--server", base)
        assert (keyless.returncode, keyless.stderr.startswith("splan: error: server answered 401")) == (2, True)
        submitted = run("submit", str(spec), "--server", base, "--wait", "--json", SPLAN_API_KEY=key)
        assert submitted.returncode == 0, submitted.stderr
        plan_id = json.loads(submitted.stdout)["id"]
        status = run("status", plan_id, "--server", base, "--json", "--api-key", key)
        assert json.loads(status.stdout)["status"] == "succeeded"
        listed = httpx.get(f"{base}/v1/plans", headers={"Authorization": f"Bearer {key}"}, timeout=10).json()
        assert [p["id"] for p in listed["items"]] == [plan_id]
    finally:
        stop(server)


def test_openapi_declares_the_bearer_scheme_and_each_operations_scope() -> None:
    document = json.loads(openapi_document())
    scheme = document["components"]["securitySchemes"]["bearer"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    for method, path, _body, scope in OPERATIONS:
        template = path.replace("00000000-0000-0000-0000-000000000000", "{plan_id}").replace("demo", "{name}")
        operation = document["paths"][template][method.lower()]
        assert operation["security"] == [{"bearer": [scope.value]}], (method, template)
        assert {"401", "403"} <= set(operation["responses"]), (method, template)
    assert "security" not in document["paths"]["/livez"]["get"]


def test_cli_keys_round_trip(tmp_path: Path) -> None:
    env = embedded_env(tmp_path)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "service.cli", *args], env=env, capture_output=True, text=True)

    assert run("db", "upgrade").returncode == 0
    created = json.loads(run("keys", "create", "--tenant", "acme", "--scopes", "estimates", "--json").stdout)
    listed = run("keys", "list").stdout.split()
    assert listed == [created["id"], "acme", "estimates", "active"]
    assert created["key"] not in run("keys", "list", "--json").stdout
    assert run("keys", "revoke", created["id"]).returncode == 0
    assert "revoked" in run("keys", "list").stdout
    bad = run("keys", "create", "--tenant", "Acme!", "--scopes", "estimates")
    assert (bad.returncode, bad.stderr.count("\n")) == (2, 1)
    assert "tenant 'Acme!'" in bad.stderr
    quota = run("tenants", "quota", "acme", "--plans-in-flight", "3")
    assert quota.stdout.split()[:5] == ["acme", "plans", "in", "flight", "3"]


def test_the_principal_cache_remembers_a_check_for_its_ttl_only() -> None:
    now = [100.0]
    cache = PrincipalCache(2.0, max_entries=3, clock=lambda: now[0])
    principal = Principal("acme", "k1", frozenset({Scope.PLANS_READ}))
    assert cache.get("t1") == (False, None)
    cache.put("t1", principal)
    cache.put("t2", None)  # a refused token is remembered as refused
    assert cache.get("t1") == (True, principal)
    assert cache.get("t2") == (True, None)
    now[0] = 101.9
    assert cache.get("t1") == (True, principal)
    now[0] = 102.0
    assert cache.get("t1") == (False, None)
    # Never more than max_entries: expired ones go first, then the oldest.
    for i in range(10):
        cache.put(f"x{i}", None)
    assert len(cache.entries) == 3
    assert cache.get("x9") == (True, None)
    assert cache.get("x0") == (False, None)
    assert PrincipalCache(0.0).entries == {}
    assert not PrincipalCache(0.0).get("t1")[0]
    off = PrincipalCache(0.0)
    off.put("t1", principal)
    assert off.get("t1") == (False, None)


def test_a_revoked_key_is_refused_once_the_cache_ttl_has_passed(db_settings: Settings) -> None:
    settings = db_settings.model_copy(update={"require_api_keys": True, "key_cache_ttl_s": 0.5})
    headers = bearer(settings, "acme", Scope.PLANS_READ)
    with TestClient(create_app(settings)) as client:
        assert client.get("/v1/plans", headers=headers).status_code == 200
        with session_on(settings) as session:
            revoke_key(session, key_id=headers["Authorization"].split("_")[1])
        deadline = time.monotonic() + 5.0
        while client.get("/v1/plans", headers=headers).status_code == 200:
            assert time.monotonic() < deadline, "the revoked key was still accepted 5 s later"
            time.sleep(0.05)
        revoked_after_s = 5.0 - (deadline - time.monotonic())
        assert revoked_after_s <= 0.5 + 0.3
        assert_problem(client.get("/v1/plans", headers=headers), 401)
