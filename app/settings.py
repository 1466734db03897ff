"""Every setting of the service, read from the environment once and validated."""

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import AliasChoices, Field, TypeAdapter, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.auth import ApiKey
from app.keys import NAME_PATTERN, NAME_RULE
from app.models import StreamConfig

_API_KEY_LIST = TypeAdapter(list[ApiKey])


class Settings(BaseSettings):
    """Service configuration. Each field is the environment variable `EMA_<FIELD>` unless noted."""

    model_config = SettingsConfigDict(env_prefix="EMA_", extra="ignore", frozen=True)

    redis_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("REDIS_URL", "EMA_REDIS_URL"),
        description="Redis to use (`REDIS_URL`). Unset: start a private embedded redis-server.",
    )
    redis_cluster: bool = Field(
        default=False,
        validation_alias=AliasChoices("REDIS_CLUSTER", "EMA_REDIS_CLUSTER"),
        description="REDIS_URL names a node of a Redis Cluster (`REDIS_CLUSTER`).",
    )
    key_prefix: str = Field(default="ema:", description="Prefix of every key the service owns.")
    default_decay: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] = 0.99
    default_initial: Annotated[float | None, Field(allow_inf_nan=False)] = None
    default_auto_num_updates: bool = False
    default_history: Annotated[int, Field(ge=0, le=100_000)] = 0
    auto_create: bool = Field(
        default=True, description="A push to a missing stream creates it with the defaults."
    )
    max_batch: Annotated[int, Field(ge=1, le=100_000)] = 10_000
    max_clock_skew: Annotated[float, Field(ge=0, le=86_400 * 366)] = Field(
        default=3600.0,
        description="Seconds a sample's timestamp may be ahead of Redis server time.",
    )
    idempotency_seconds: Annotated[int, Field(ge=1)] = Field(
        default=86_400, description="How long a push's Idempotency-Key is remembered."
    )
    events: bool = Field(
        default=True, description="Publish every update to Redis Pub/Sub for subscribers."
    )
    max_body_bytes: Annotated[int, Field(ge=1024)] = 1_048_576
    max_header_bytes: Annotated[int, Field(ge=1024)] = Field(
        default=65_536, description="Largest request line and headers (python -m app): else 431."
    )
    request_timeout: Annotated[float, Field(gt=0)] = Field(
        default=10.0,
        description="Seconds a client has to send a request, head and body (python -m app): "
        "else 408.",
    )
    redis_timeout: Annotated[float, Field(gt=0)] = Field(
        default=2.0, description="Seconds a Redis command may take before the request gets a 503."
    )
    redis_max_connections: Annotated[int, Field(ge=1)] = 512
    max_subscriptions: Annotated[int, Field(ge=0)] = Field(
        default=1000, description="Open event subscriptions one process serves."
    )
    subscriber_queue: Annotated[int, Field(ge=1)] = Field(
        default=1000, description="Updates buffered per subscriber before it is told it lagged."
    )
    sse_heartbeat: Annotated[float, Field(gt=0)] = Field(
        default=15.0, description="Seconds between heartbeats on an idle event stream."
    )
    retry_after: Annotated[int, Field(ge=1)] = Field(
        default=1, description="Seconds advertised in Retry-After on a 503."
    )
    fast_path: bool = Field(
        default=True,
        description="Serve pushes by a lean ASGI path in front of the framework (same validation).",
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "text"] = Field(
        default="auto",
        description="json: one JSON object per line; text: a line for people; auto: text on a "
        "terminal, else json.",
    )
    access_log: bool = Field(default=True, description="Log one line per request.")
    metrics_stream_prefixes: str = Field(
        default="",
        description="Streams whose values /metrics exports: comma-separated name prefixes, "
        "`*` for every stream; empty: none.",
    )
    metrics_max_streams: Annotated[int, Field(ge=0, le=100_000)] = Field(
        default=1000, description="Most streams one scrape of /metrics exports."
    )
    data_dir: Path = Field(default=Path("data"), description="Embedded Redis data folder.")
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8000
    # The CPUs this process may run on: in a container limited by cpuset, not the host's count.
    workers: Annotated[int, Field(ge=1)] = Field(
        default_factory=lambda: len(os.sched_getaffinity(0))
    )

    api_keys: tuple[ApiKey, ...] = Field(
        default=(),
        description="API keys, a JSON list of {name, sha256, scopes, prefixes}. None: open.",
    )
    api_keys_file: Path | None = Field(
        default=None, description="A JSON file of more API keys, in the same form (a secret)."
    )

    @model_validator(mode="before")
    @classmethod
    def _read_api_keys_file(cls, data: Any) -> Any:
        # The file's keys join EMA_API_KEYS', read once at start like every other setting.
        if not isinstance(data, dict) or not data.get("api_keys_file"):
            return data
        path = Path(data["api_keys_file"])
        try:
            listed = _API_KEY_LIST.validate_json(path.read_bytes())
        except OSError as error:
            raise ValueError(f"api_keys_file: cannot read {path} ({error.strerror})") from None
        given = data.get("api_keys") or []
        return {**data, "api_keys": [*_API_KEY_LIST.validate_python(given), *listed]}

    def stream_defaults(self) -> StreamConfig | None:
        """The configuration a push to a missing stream creates it with; None when such a push
        is refused (auto_create off)."""
        if not self.auto_create:
            return None
        return StreamConfig(
            decay=self.default_decay,
            initial=self.default_initial,
            auto_num_updates=self.default_auto_num_updates,
            history=self.default_history,
        )

    @property
    def metrics_prefixes(self) -> tuple[str, ...]:
        """metrics_stream_prefixes as a tuple; `*` is "" (every name starts with it)."""
        parts = self.metrics_stream_prefixes.split(",") if self.metrics_stream_prefixes else []
        return tuple("" if part == "*" else part for part in parts)

    @field_validator("metrics_stream_prefixes")
    @classmethod
    def _stream_name_prefixes(cls, value: str) -> str:
        parts = [part.strip() for part in value.split(",") if part.strip()]
        for part in parts:
            if part != "*" and not re.fullmatch(NAME_PATTERN, part):
                raise ValueError(f"{part!r}: not `*` nor a stream-name prefix ({NAME_RULE})")
        return ",".join(parts)

    @field_validator("key_prefix")
    @classmethod
    def _no_hash_tag_braces(cls, prefix: str) -> str:
        # The stream name is the key's cluster hash tag: a brace in the prefix would steal it.
        if "{" in prefix or "}" in prefix:
            raise ValueError("must not contain '{' or '}'")
        return prefix

    @model_validator(mode="after")
    def _cluster_needs_a_url(self) -> Self:
        if self.redis_cluster and self.redis_url is None:
            raise ValueError("REDIS_CLUSTER needs REDIS_URL: the embedded Redis is one node")
        return self
