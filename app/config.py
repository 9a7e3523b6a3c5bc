"""Settings, read from the environment and `.env`.

There is no module-level instance: `Settings()` is built by whoever starts the service
(`app.main`, `python -m app`), and tests build their own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

FREELANCER_USERS_API = "https://www.freelancer.com/api/users/0.1/users"

UpstreamKind = Literal["freelancer", "simulator"]


class Settings(BaseSettings):
    """Every setting of the gateway; `.env.template` documents each one."""

    # An empty variable counts as unset: compose passes `${FREELANCER_OAUTH_TOKEN:-}` as "".
    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        case_sensitive=False,
        env_ignore_empty=True,
    )

    # Serving
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    access_log: bool = False
    max_users_per_request: int = Field(100, ge=1, le=1000)
    max_body_bytes: int = Field(64 * 1024, ge=1024)
    wait_timeout_s: float = Field(10.0, gt=0)
    shutdown_grace_s: float = Field(10.0, ge=0)

    log_format: Literal["text", "json"] = "text"

    # Access: API keys with roles (read < crawl < admin), and fair limits per client.
    api_keys: SecretStr | None = None
    api_keys_file: Path | None = None
    auth_disabled: bool = False
    # Open mode (no keys) serves this machine's pages only: loopback Host names, plus these.
    allowed_hosts: str | None = None
    # Proxies whose X-Forwarded-For / Forwarded headers name the client (comma-separated
    # addresses or networks; uvicorn's own setting, which `python -m app` passes on).
    forwarded_allow_ips: str | None = None
    metrics_require_key: bool = False
    events_max_streams_per_key: int = Field(5, ge=1)
    rate_limit_per_min: int = Field(600, ge=1)
    rate_limit_ids_per_min: int = Field(6000, ge=1)
    key_misses_per_min: int = Field(300, ge=1)

    # Several processes as one gateway: coordinated through Redis when REDIS_URL is set.
    redis_url: SecretStr | None = None
    redis_prefix: str = Field("fl", min_length=1, pattern=r"^[A-Za-z0-9_.:-]+$")
    redis_timeout_s: float = Field(0.5, gt=0)
    flight_lease_s: float = Field(5.0, gt=0)
    workers: int = Field(1, ge=1, le=64)

    # Store: MongoDB when MONGODB_URL is set, else SQLite at SQLITE_PATH.
    mongodb_url: SecretStr | None = None
    database_name: str = "user_crawler"
    sqlite_path: Path = Path("./data/users.db")
    store_timeout_s: float = Field(5.0, gt=0)
    store_save_attempts: int = Field(3, ge=1)

    # Freelancer
    freelancer_api_base: str | None = None
    freelancer_oauth_token: SecretStr | None = None
    freelancer_client_id: str | None = None
    upstream_timeout_s: float = Field(30.0, gt=0)
    upstream_max_attempts: int = Field(3, ge=1)
    upstream_backoff_s: float = Field(0.5, ge=0)
    upstream_concurrency: int = Field(4, ge=1)
    # Freelancer's limits: at most floor(rate) calls in any 60 s / 3600 s, deployment-wide.
    upstream_rate_per_min: float = Field(50.0, ge=2)
    upstream_rate_per_hour: float = Field(1000.0, ge=2)
    # Calls of each window that crawl jobs and refreshes leave to clients' misses.
    upstream_reserve_per_min: int = Field(10, ge=0)
    upstream_reserve_per_hour: int = Field(200, ge=0)
    # Calls jobs and refreshes may send back to back before their pace holds them.
    upstream_burst: int = Field(10, ge=1)
    # Added to each window's period: a call reaches Freelancer after it is logged.
    upstream_window_margin_s: float = Field(1.0, ge=0, le=30)
    simulator_latency_ms: float = Field(100.0, ge=0)

    # Batching and bounds
    batch_size: int = Field(100, ge=1, le=100)
    batch_window_ms: float = Field(5.0, ge=0)
    queue_max: int = Field(1000, ge=1)
    max_waiters_per_id: int = Field(1000, ge=1)

    # Crawl jobs
    job_share: float = Field(0.2, ge=0, le=1)
    job_max_ids: int = Field(100_000, ge=1)
    job_max_range: int = Field(10_000_000, ge=1)
    job_max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    job_max_attempts: int = Field(3, ge=1)
    csv_formula_guard: bool = True
    webhook_secret: SecretStr | None = None
    webhook_timeout_s: float = Field(5.0, gt=0)
    webhook_allow_private: bool = False

    # The `python -m app jobs` command line: which gateway it talks to, with which key.
    gateway_url: str = "http://127.0.0.1:8000"
    gateway_api_key: SecretStr | None = None

    # Failure handling
    breaker_failures: int = Field(5, ge=1)
    breaker_cooldown_s: float = Field(30.0, gt=0)
    not_found_ttl_s: float = Field(3600.0, ge=0)
    error_ttl_s: float = Field(30.0, ge=0)
    negative_cache_size: int = Field(100_000, ge=1)

    # Freshness and memory
    cache_ttl_s: float = Field(86400.0, gt=0)
    stale_if_error_s: float = Field(3600.0, ge=0)
    refresh_interval_s: float = Field(0.0, ge=0)
    # Refresh-ahead: users asked for at least MIN_HITS times per CACHE_TTL_S are refreshed
    # with spare budget once their copy is older than AT of CACHE_TTL_S.
    refresh_ahead: bool = True
    refresh_ahead_at: float = Field(0.8, gt=0, lt=1)
    refresh_ahead_min_hits: int = Field(3, ge=1)
    memory_cache_size: int = Field(100_000, ge=1000)

    @model_validator(mode="after")
    def _check_bounds(self) -> Settings:
        if self.queue_max < self.max_users_per_request:
            raise ValueError("QUEUE_MAX must be at least MAX_USERS_PER_REQUEST")
        for window, limit, reserve in (
            ("MIN", self.upstream_rate_per_min, self.upstream_reserve_per_min),
            ("HOUR", self.upstream_rate_per_hour, self.upstream_reserve_per_hour),
        ):
            if reserve >= int(limit):
                raise ValueError(
                    f"UPSTREAM_RESERVE_PER_{window} ({reserve}) must be below "
                    f"UPSTREAM_RATE_PER_{window} ({int(limit)}): jobs and refreshes need a call"
                )
        return self

    @property
    def upstream_kind(self) -> UpstreamKind:
        """`simulator` (demo mode) when no credentials and no API base are configured."""
        if (
            self.freelancer_oauth_token is None
            and self.freelancer_client_id is None
            and self.freelancer_api_base is None
        ):
            return "simulator"
        return "freelancer"

    @property
    def upstream_base(self) -> str:
        """The users endpoint the gateway calls (`.../users/0.1/users`)."""
        return (self.freelancer_api_base or FREELANCER_USERS_API).rstrip("/")
