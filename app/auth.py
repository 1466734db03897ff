"""API keys: who may read, write or administer which streams.

Keys are configured as SHA-256 hashes (the service never sees a key at rest), each with scopes
and optionally the stream-name prefixes it is limited to. A key is presented as
`Authorization: Bearer <key>` (or, for browsers' EventSource, which cannot send headers, as an
`api_key` query parameter on GET requests).

    read   GET a stream, its history and events, list streams, /metrics
    write  push values
    admin  everything, including creating, replacing and deleting streams

`python -m app.auth` prints a new random key and the configuration entry that admits it.
"""

import argparse
import hashlib
import hmac
import json
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Final, Literal
from urllib.parse import parse_qs

from pydantic import BaseModel, ConfigDict, Field
from starlette.types import ASGIApp, Receive, Scope, Send

from app.errors import ServiceError, service_problem
from app.keys import NAME_PATTERN

Permission = Literal["read", "write", "admin"]

_NAME = NAME_PATTERN.strip("^$")
_STREAM_PATH: Final = re.compile(f"/v1/streams/({_NAME})(/values|/history|/events)?")
_PUBLIC: Final = re.compile(r"/(healthz|readyz|docs|redoc|openapi\.json|static/.*)?")


def is_public(path: str) -> bool:
    """Is `path` served without a key (the probes, the docs, the live page's files)?"""
    return _PUBLIC.fullmatch(path) is not None


class ApiKey(BaseModel):
    """One key's configuration entry."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Who holds the key; for logs and humans.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the key, hex.")
    scopes: frozenset[Permission] = Field(min_length=1)
    prefixes: tuple[str, ...] | None = Field(
        default=None, description="Stream-name prefixes the key is limited to; null: all."
    )

    def may(self, scope: Permission) -> bool:
        """Does this key have `scope` (over some streams at least)?"""
        return scope in self.scopes or "admin" in self.scopes

    def allows(self, scope: Permission, name_prefix: str) -> bool:
        """May this key act with `scope` on every stream whose name starts with `name_prefix`?"""
        if scope not in self.scopes and "admin" not in self.scopes:
            return False
        return self.prefixes is None or any(name_prefix.startswith(p) for p in self.prefixes)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class Unauthorized(ServiceError):
    status = HTTPStatus.UNAUTHORIZED

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="ema"'}


class Forbidden(ServiceError):
    status = HTTPStatus.FORBIDDEN


@dataclass(frozen=True)
class Need:
    """What a request needs: a scope, over the streams starting with `prefix`."""

    scope: Permission
    prefix: str
    # The route checks each stream it acts on itself (bulk pushes): only the scope is needed.
    per_stream: bool = False


def need_of(method: str, path: str, query: dict[str, list[str]]) -> Need | None:
    """The permission a request needs; None for the public routes."""
    if _PUBLIC.fullmatch(path):
        return None
    read: Permission | None = "read" if method in ("GET", "HEAD") else None
    if match := _STREAM_PATH.fullmatch(path):
        name, sub = match[1], match[2]
        if read:
            return Need("read", name)
        return Need("write" if sub == "/values" else "admin", name)
    if path in ("/v1/streams", "/v1/events"):
        return Need("read", query.get("prefix", [""])[0])
    if path == "/v1/values" and not read:
        return Need("write", "", per_stream=True)
    # Anything else (metrics, unknown routes): a valid key with the scope, over every stream.
    return Need(read or "admin", "")


class ApiKeyAuth:
    """Admits a request only with a key that allows what it asks. Comparisons of the presented
    key's hash with every configured hash run in constant time."""

    def __init__(self, app: ASGIApp, keys: Iterable[ApiKey]) -> None:
        self.app = app
        self.keys = tuple(keys)

    def _holder(self, presented: str) -> ApiKey | None:
        digest = hash_key(presented).encode()
        found = None
        for key in self.keys:  # no early exit: every key is compared
            if hmac.compare_digest(digest, key.sha256.encode()):
                found = key
        return found

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        need = need_of(scope["method"], scope["path"], query)
        if need is None:
            await self.app(scope, receive, send)
            return
        error: ServiceError | None = None
        presented = _bearer(scope) or (
            query.get("api_key", [None])[0] if scope["method"] == "GET" else None
        )
        holder = self._holder(presented) if presented else None
        if holder is None:
            error = Unauthorized("a valid API key is required (Authorization: Bearer <key>)")
        elif not (
            holder.may(need.scope) if need.per_stream else holder.allows(need.scope, need.prefix)
        ):
            where = f"streams starting with {need.prefix!r}" if need.prefix else "every stream"
            limits = f" (it is limited to {list(holder.prefixes)})" if holder.prefixes else ""
            error = Forbidden(f"the key {holder.name!r} may not {need.scope} {where}{limits}")
        if error is not None:
            await service_problem(error, scope["path"])(scope, receive, send)
            return
        scope.setdefault("state", {})["api_key"] = holder
        await self.app(scope, receive, send)


def _bearer(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            kind, _, token = str(value.decode("latin-1")).partition(" ")
            if kind.lower() == "bearer" and token:
                return token.strip()
    return None


def write_compose_keys(directory: Path) -> str:
    """Write the keys docker-compose.yml runs with into `directory`: `api-keys.json` (the hashes
    of an admin key and of a read-only key for Prometheus) and `metrics-key` (that read-only
    key). Returns the admin key, which is stored nowhere."""
    admin, metrics = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    entries = [
        ApiKey(name="admin", sha256=hash_key(admin), scopes=frozenset({"admin"})),
        ApiKey(name="prometheus", sha256=hash_key(metrics), scopes=frozenset({"read"})),
    ]
    directory.mkdir(parents=True, exist_ok=True)
    listed = [entry.model_dump(mode="json") for entry in entries]
    (directory / "api-keys.json").write_text(json.dumps(listed, indent=2) + "\n")
    (directory / "metrics-key").write_text(metrics)
    for name in ("api-keys.json", "metrics-key"):
        (directory / name).chmod(0o600)
    return admin


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m app.auth", description="Make a new API key and its configuration entry."
    )
    parser.add_argument("name", help="who will hold the key")
    parser.add_argument("--scope", action="append", choices=["read", "write", "admin"])
    parser.add_argument("--prefix", action="append", help="limit the key to these name prefixes")
    args = parser.parse_args(argv)
    key = secrets.token_urlsafe(32)
    entry = ApiKey(
        name=args.name,
        sha256=hash_key(key),
        scopes=frozenset(args.scope or ["read"]),
        prefixes=tuple(args.prefix) if args.prefix else None,
    )
    print(f"key (give it to {args.name}; it is not stored anywhere): {key}")
    print("entry for EMA_API_KEYS (a JSON list) or the EMA_API_KEYS_FILE:")
    print(json.dumps(entry.model_dump(mode="json")))


if __name__ == "__main__":
    main()
