"""API keys, scopes and tenants: issue, list and revoke keys, and authenticate a bearer token."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    # The database layer is imported where it is used: `splan estimate` and `plan` load this module through the
    # CLI parser and must not pay for SQLAlchemy.
    from sqlalchemy.orm import Session

    from service.db.models import ApiKey
    from service.db.tenants import Quotas, QuotaUsage

# Keyless requests in the embedded default (loopback, no keys required) act as this tenant; existing rows from
# before tenants existed belong to it too (migration 0003).
DEFAULT_TENANT = "local"
KEY_PREFIX = "splan"
TENANT_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_TOKEN = re.compile(rf"^{KEY_PREFIX}_([0-9a-f]{{12}})_([A-Za-z0-9_-]{{43}})$")


class Scope(StrEnum):
    """What a key may do."""

    PLANS_READ = "plans:read"
    PLANS_WRITE = "plans:write"
    ESTIMATES = "estimates"
    CLUSTERS_READ = "clusters:read"
    CLUSTERS_WRITE = "clusters:write"
    PLACEMENTS = "placements"
    ADMIN = "admin"


ALL_SCOPES = frozenset(Scope)


class AuthError(Exception):
    """A key or tenant argument the caller can fix (bad tenant name, unknown scope, unknown key)."""


@dataclass(frozen=True)
class Principal:
    """Who is calling: the tenant, the key id (None when keyless) and the scopes granted."""

    tenant: str
    key_id: str | None
    scopes: frozenset[Scope]

    def allows(self, scope: Scope) -> bool:
        """Whether the principal holds the scope; admin holds every scope of its tenant."""
        return scope in self.scopes or Scope.ADMIN in self.scopes


KEYLESS = Principal(tenant=DEFAULT_TENANT, key_id=None, scopes=ALL_SCOPES)


@dataclass(frozen=True)
class IssuedKey:
    """A new key: the token is shown once and never stored."""

    key_id: str
    tenant: str
    scopes: tuple[str, ...]
    token: str


def secret_digest(secret: str) -> str:
    """SHA-256 of the key's secret part, hex; what the database keeps instead of the key."""
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_token(token: str) -> tuple[str, str] | None:
    """(key id, secret) of a well-formed token, else None."""
    match = _TOKEN.match(token)
    return (match.group(1), match.group(2)) if match else None


def parse_scopes(text: str) -> tuple[str, ...]:
    """Scopes from a comma-separated list; an unknown one is an error naming the known ones."""
    names = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    if not names:
        raise AuthError(f"give at least one scope of: {', '.join(s.value for s in Scope)}")
    unknown = [name for name in names if name not in {s.value for s in Scope}]
    if unknown:
        raise AuthError(f"unknown scope {unknown[0]!r}; known: {', '.join(s.value for s in Scope)}")
    return names


def check_tenant(tenant: str) -> str:
    """The tenant id if it is one (lower-case letters, digits, '-' and '_', up to 63 characters)."""
    if not TENANT_PATTERN.match(tenant):
        raise AuthError(f"tenant {tenant!r} must be 1-63 of a-z, 0-9, '-', '_' and start with a letter or digit")
    return tenant


def cluster_key(tenant: str, name: str) -> str:
    """Where a tenant's cluster is stored: cluster names hold no '/', so tenants never share a key."""
    return name if tenant == DEFAULT_TENANT else f"{tenant}/{name}"


def is_loopback_host(host: str) -> bool:
    """Whether a listen address or client address is loopback only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def is_remote_address(host: str) -> bool:
    """Whether a client address is an IP address off this machine (names such as a test client's are not)."""
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def create_key(session: Session, *, tenant: str, scopes: tuple[str, ...], label: str | None = None) -> IssuedKey:
    """Issue a key for a tenant (created with default quotas when new); only the secret's digest is stored."""
    from service.db import tenants as tenant_store

    check_tenant(tenant)
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    tenant_store.add_key(
        session, key_id=key_id, tenant=tenant, digest=secret_digest(secret), scopes=list(scopes), label=label
    )
    return IssuedKey(key_id, tenant, scopes, f"{KEY_PREFIX}_{key_id}_{secret}")


def revoke_key(session: Session, *, key_id: str) -> ApiKey:
    """Revoke a key by its id (the part after `splan_`); unknown ids are an error."""
    from service.db import tenants as tenant_store

    key = tenant_store.revoke_key(session, key_id=key_id)
    if key is None:
        raise AuthError(f"no key with id {key_id!r}")
    return key


def authenticate(session: Session, token: str) -> Principal | None:
    """The principal of a live key, or None for a malformed, unknown or revoked one."""
    parsed = parse_token(token)
    if parsed is None:
        return None
    from service.db import tenants as tenant_store

    key_id, secret = parsed
    key = tenant_store.live_key(session, key_id=key_id)
    # Compared in constant time, so the digest cannot be learned a byte at a time from response timing.
    if key is None or not hmac.compare_digest(key.secret_sha256, secret_digest(secret)):
        return None
    return Principal(tenant=key.tenant_id, key_id=key.id, scopes=frozenset(Scope(s) for s in key.scopes))


class PrincipalCache:
    """Tokens checked recently, by digest, with what they authenticated as (None: refused), for `ttl_s` seconds."""

    def __init__(self, ttl_s: float, *, max_entries: int = 10_000, clock: Callable[[], float] = time.monotonic):
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.clock = clock
        self.entries: dict[str, tuple[float, Principal | None]] = {}

    def get(self, token: str) -> tuple[bool, Principal | None]:
        """(found, principal): found is False when the token was not checked within the TTL."""
        entry = self.entries.get(secret_digest(token))
        if entry is None or entry[0] <= self.clock():
            return False, None
        return True, entry[1]

    def put(self, token: str, principal: Principal | None) -> None:
        """Remember a check; the oldest entries go first past `max_entries` (unknown tokens cannot grow it)."""
        if self.ttl_s <= 0:
            return
        if len(self.entries) >= self.max_entries:
            now = self.clock()
            self.entries = {k: v for k, v in self.entries.items() if v[0] > now}
            while len(self.entries) >= self.max_entries:
                self.entries.pop(next(iter(self.entries)))
        self.entries[secret_digest(token)] = (self.clock() + self.ttl_s, principal)


class QuotaExceededError(Exception):
    """A submission past one of the tenant's quotas: the status to answer, and when to retry."""

    def __init__(self, status: int, detail: str, *, quota: str, limit: int, retry_after_s: int | None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.quota = quota
        self.limit = limit
        self.retry_after_s = retry_after_s


def admit_plans(
    session: Session,
    *,
    tenant: str,
    search_spaces: list[int],
    defaults: Quotas,
    in_flight_retry_s: int,
    search_space_retry_s: int,
) -> list[QuotaExceededError | None]:
    """Judge a tenant's new plans in order against its quotas, holding its quota lock until the transaction ends."""
    from service.db import tenants as tenant_store

    tenant_store.lock_quotas(session, tenant=tenant)
    limits = tenant_store.quotas(session, tenant=tenant, defaults=defaults)
    now = datetime.now(UTC)
    usage = tenant_store.quota_usage(session, tenant=tenant, since=now - timedelta(hours=1))
    admitted = 0
    verdicts: list[QuotaExceededError | None] = []
    for search_space in search_spaces:
        verdict = _quota_verdict(
            tenant, search_space, limits, usage, admitted, now, in_flight_retry_s, search_space_retry_s
        )
        verdicts.append(verdict)
        admitted += verdict is None
    return verdicts


def _quota_verdict(
    tenant: str,
    search_space: int,
    limits: Quotas,
    usage: QuotaUsage,
    admitted: int,
    now: datetime,
    in_flight_retry_s: int,
    search_space_retry_s: int,
) -> QuotaExceededError | None:
    if search_space > limits.search_space:
        # Only a narrower search or a larger quota (an admin's change) helps: Retry-After says to come back late.
        return QuotaExceededError(
            429,
            f"the search space has {search_space} strategies; tenant {tenant!r} may search {limits.search_space} "
            "per plan: narrow search.tp, search.pp, search.modes or max_gpus",
            quota="search_space",
            limit=limits.search_space,
            retry_after_s=search_space_retry_s,
        )
    in_flight = usage.in_flight + admitted
    if in_flight >= limits.plans_in_flight:
        return QuotaExceededError(
            429,
            f"tenant {tenant!r} has {in_flight} plans queued or running; its quota is {limits.plans_in_flight}",
            quota="plans_in_flight",
            limit=limits.plans_in_flight,
            retry_after_s=in_flight_retry_s,
        )
    count = usage.since_count + admitted
    if count >= limits.plans_per_hour:
        # The window frees a slot when its oldest plan turns an hour old.
        oldest = usage.oldest_since
        wait_s = 3600.0 - (now - oldest).total_seconds() if oldest is not None else 1.0
        return QuotaExceededError(
            429,
            f"tenant {tenant!r} submitted {count} plans in the last hour; its quota is {limits.plans_per_hour}",
            quota="plans_per_hour",
            limit=limits.plans_per_hour,
            retry_after_s=max(1, math.ceil(wait_s)),
        )
    return None
