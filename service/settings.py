"""Service settings from the environment: embedded (SQLite, in-process) unless DATABASE_URL/BROKER_URL say otherwise."""

from __future__ import annotations

from enum import StrEnum
from functools import lru_cache
from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Execution(StrEnum):
    """Where plans run: in the API process, or on Celery workers through the broker."""

    IN_PROCESS = "in-process"
    CELERY = "celery"


class Settings(BaseSettings):
    """Everything the API, the workers and the CLI read from the environment."""

    model_config = SettingsConfigDict(env_prefix="SPLAN_", extra="ignore", frozen=True, populate_by_name=True)

    database_url: str | None = Field(default=None, validation_alias=AliasChoices("DATABASE_URL", "SPLAN_DATABASE_URL"))
    broker_url: str | None = Field(default=None, validation_alias=AliasChoices("BROKER_URL", "SPLAN_BROKER_URL"))
    data_dir: Path = Path()
    queue_name: str = "splan-plans"
    max_body_bytes: int = Field(default=1_048_576, ge=1024)
    # A running plan's worker renews its lease every plan_heartbeat_s; a plan whose lease lapses is re-run by the
    # sweeper within sweep_interval_s, so a lost worker costs at most lease + sweep interval (13 s by default).
    plan_lease_s: float = Field(default=10.0, gt=0)
    plan_heartbeat_s: float = Field(default=0.5, gt=0)
    plan_time_limit_s: float = Field(default=600.0, gt=0)
    requeue_queued_after_s: float = Field(default=120.0, gt=0)
    sweep_interval_s: float = Field(default=3.0, gt=0)
    max_attempts: int = Field(default=3, ge=1)
    in_process_workers: int = Field(default=2, ge=1)
    estimate_max_requests: int = Field(default=1000, ge=1)
    # Sequence-steps one POST /v1/estimates may simulate: the simulator does 1.4-1.6 M a second on one core, so
    # about 0.8 s (bench/RESULTS.md, issue 16).
    estimate_max_sequence_steps: int = Field(default=1_200_000, ge=1000)
    worker_concurrency: int = Field(default=2, ge=1)
    # `splan worker` lowers its CPU priority by this much (Unix nice): plans are batch work, and where the API
    # shares cores with a worker, its answers must not wait behind a simulation (0 keeps the priority).
    worker_nice: int = Field(default=10, ge=0, le=19)
    # API keys: required by default in production (a database other than SQLite, or a broker); the embedded
    # default is keyless and answers loopback clients only unless `insecure` (splan serve --insecure).
    require_api_keys: bool | None = None
    insecure: bool = False
    # Per-tenant quotas where a tenant has none of its own (splan tenants quota).
    quota_plans_in_flight: int = Field(default=20, ge=1)
    quota_plans_per_hour: int = Field(default=600, ge=1)
    quota_search_space: int = Field(default=5000, ge=1)
    # The Retry-After of a 429 for too many plans in flight: about one plan's run time.
    quota_in_flight_retry_after_s: int = Field(default=10, ge=1)
    # A search space over the tenant's quota stays over it until an admin raises the quota (or the search narrows).
    quota_search_space_retry_after_s: int = Field(default=3600, ge=1)
    # An API process trusts a key it has checked for this long: a burst of requests reads the key once, and a
    # revoked key stops working within this time on every process (0: check the database on every request).
    key_cache_ttl_s: float = Field(default=2.0, ge=0)
    # The most plans one group commit admits (concurrent POST /v1/plans are stored together).
    admission_max_batch: int = Field(default=256, ge=1)

    @property
    def execution(self) -> Execution:
        """Celery when a broker is configured, else in-process; never a fallback from one to the other."""
        return Execution.CELERY if self.broker_url else Execution.IN_PROCESS

    @property
    def api_keys_required(self) -> bool:
        """Whether every API request needs a key: as configured, else in production (PostgreSQL or a broker)."""
        if self.require_api_keys is not None:
            return self.require_api_keys
        return self.broker_url is not None or not self.sqlalchemy_url().startswith("sqlite")

    def sqlalchemy_url(self) -> str:
        """The database URL with an explicit driver; a SQLite file in the data directory by default."""
        url = self.database_url or f"sqlite:///{(self.data_dir / 'splan.db').resolve()}"
        for prefix in ("postgresql://", "postgres://"):
            if url.startswith(prefix):
                return "postgresql+psycopg://" + url[len(prefix) :]
        return url


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Settings read once per process."""
    return Settings()
