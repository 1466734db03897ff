"""The container files wire what the README's deployment section says.

Docker is not needed: docker-compose.yml is read with yaml.safe_load and the Dockerfile and
.dockerignore by the small parsers below (instructions, `${VAR}` substitution, Docker's ignore
rules). What the service makes of its environment comes from app.settings.Settings itself, and the
health-check commands are run for real against a stub HTTP server.
"""

import functools
import json
import os
import posixpath
import re
import shlex
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from pydantic import AliasChoices, AliasPath, ValidationError
from pydantic_settings import SettingsError

from app.auth import ApiKey, hash_key, write_compose_keys
from app.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
SETTINGS_PREFIXES = ("EMA_", "REDIS_")


# --- Dockerfile -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str


@dataclass(frozen=True)
class Stage:
    name: str | None
    base: str
    instructions: tuple[Instruction, ...]

    def all(self, keyword: str) -> list[tuple[int, Instruction]]:
        return [(i, ins) for i, ins in enumerate(self.instructions) if ins.keyword == keyword]


@dataclass(frozen=True)
class Dockerfile:
    global_args: dict[str, str]
    stages: tuple[Stage, ...]

    @property
    def final(self) -> Stage:
        return self.stages[-1]


VARIABLE = re.compile(r"\$(?:\{(?P<braced>\w+)(?::?-(?P<default>[^}]*))?\}|(?P<bare>\w+))")


def expand(text: str, env: dict[str, str]) -> str:
    """Docker's `$VAR`, `${VAR}` and `${VAR:-default}`; an unknown variable is empty."""

    def value(match: re.Match[str]) -> str:
        name = match["braced"] or match["bare"]
        return env.get(name) or match["default"] or ""

    return VARIABLE.sub(value, text)


def logical_lines(text: str) -> Iterator[str]:
    """Instructions with their `\\` continuations joined; comment lines dropped, as Docker does."""
    pending: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending.append(line[:-1].strip())
            continue
        pending.append(line)
        yield " ".join(pending)
        pending = []
    assert not pending, "the Dockerfile ends inside a line continuation"


def parse_dockerfile(text: str) -> Dockerfile:
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical_lines(text):
        keyword, _, args = line.partition(" ")
        instruction = Instruction(keyword.upper(), args.strip())
        if instruction.keyword == "FROM":
            words = expand(instruction.args, global_args).split()
            words = [w for w in words if not w.startswith("--")]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(name, words[0], ()))
        elif not stages:
            assert instruction.keyword == "ARG", f"{keyword} before the first FROM"
            name, _, default = instruction.args.partition("=")
            global_args[name] = default.strip("\"'")
        else:
            last = stages[-1]
            stages[-1] = Stage(last.name, last.base, (*last.instructions, instruction))
    return Dockerfile(global_args, tuple(stages))


@cache
def dockerfile() -> Dockerfile:
    return parse_dockerfile((ROOT / "Dockerfile").read_text(encoding="utf-8"))


def exec_form(args: str) -> list[str]:
    """A CMD/HEALTHCHECK/COPY argument list: JSON (exec) form, else a shell command."""
    if args.startswith("["):
        words = json.loads(args)
        assert isinstance(words, list)
        assert all(isinstance(w, str) for w in words)
        return words
    return ["/bin/sh", "-c", args]


def split_flags(args: str) -> tuple[dict[str, str], list[str]]:
    """`--flag=value ... rest` of COPY and HEALTHCHECK: the flags and the remaining words."""
    flags: dict[str, str] = {}
    rest = args
    while rest.startswith("--"):
        flag, _, rest = rest.partition(" ")
        name, _, value = flag[2:].partition("=")
        flags[name] = value
        rest = rest.lstrip()
    words = json.loads(rest) if rest.startswith("[") else shlex.split(rest)
    return flags, words


def stage_env(stage: Stage) -> dict[str, str]:
    """The variables the stage's ENV instructions set, in order (the base image's are unknown)."""
    env: dict[str, str] = {}
    for _, instruction in stage.all("ENV"):
        words = shlex.split(instruction.args)
        if "=" not in words[0]:  # the legacy `ENV NAME value` form
            env[words[0]] = expand(instruction.args.split(None, 1)[1], env)
            continue
        for word in words:
            name, _, value = word.partition("=")
            env[name] = expand(value, env)
    return env


def healthcheck_command(stage: Stage) -> list[str]:
    checks = stage.all("HEALTHCHECK")
    assert checks, "the runtime stage has no HEALTHCHECK"
    _, instruction = checks[-1]
    flags = re.match(r"^(?:--\S+\s+)*", instruction.args)
    assert flags is not None
    rest = instruction.args[flags.end() :]
    keyword, _, command = rest.partition(" ")
    assert keyword.upper() == "CMD", f"HEALTHCHECK {rest!r} runs no command"
    return exec_form(command.strip())


# --- .dockerignore ----------------------------------------------------------------------------


def glob_regex(pattern: str) -> re.Pattern[str]:
    """Go's filepath.Match syntax plus `**`, as in Docker's ignore-file matcher."""
    out: list[str] = []
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):
                out.append("(?:.*/)?")
                i += 1
            else:
                out.append(".*")
            continue
        if char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif char == "[" and "]" in pattern[i + 1 :]:
            end = pattern.index("]", i + 1)
            body = pattern[i + 1 : end]
            if body.startswith(("!", "^")):
                body = "^" + body[1:]
            out.append(f"[{body}]")
            i = end + 1
            continue
        elif char == "\\" and i + 1 < len(pattern):
            out.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        else:
            out.append(re.escape(char))
        i += 1
    return re.compile("".join(out))


class DockerIgnore:
    """A path is left out when the last pattern matching it, or one of its parent folders, is
    not a `!` exception."""

    def __init__(self, text: str) -> None:
        self.rules: list[tuple[re.Pattern[str], bool]] = []
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            excludes = not line.startswith("!")
            pattern = posixpath.normpath(line.removeprefix("!").strip()).lstrip("/")
            if pattern != ".":
                self.rules.append((glob_regex(pattern), excludes))

    def excludes(self, path: str) -> bool:
        parts = PurePosixPath(path).parts
        candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
        excluded = False
        for regex, excludes in self.rules:
            if any(regex.fullmatch(candidate) for candidate in candidates):
                excluded = excludes
        return excluded


@cache
def dockerignore() -> DockerIgnore:
    return DockerIgnore((ROOT / ".dockerignore").read_text(encoding="utf-8"))


# --- docker-compose.yml -----------------------------------------------------------------------


@cache
def compose() -> dict[str, Any]:
    document = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
    assert isinstance(document, dict)
    return document


def service(name: str) -> dict[str, Any]:
    services = compose().get("services", {})
    assert name in services, f"docker-compose.yml has no {name!r} service"
    found = services[name]
    assert isinstance(found, dict)
    return found


INTERPOLATION = re.compile(r"\$\$|\$\{(\w+)(?:(:?-)([^}]*)|[^}]*)\}|\$(\w+)")


def interpolate(value: object) -> str:
    """Compose's interpolation as a fresh checkout sees it: `${VAR:-default}` is its default,
    `$$` a dollar; a variable without a default cannot be checked here and fails."""

    def replace(match: re.Match[str]) -> str:
        if match[0] == "$$":
            return "$"
        assert match[2], f"{match[0]} has no default: the checked-in file must work as is"
        return match[3]

    return INTERPOLATION.sub(replace, str(value))


def compose_env(definition: dict[str, Any]) -> dict[str, str]:
    environment = definition.get("environment") or {}
    if isinstance(environment, list):  # the `- NAME=value` form
        environment = dict(item.partition("=")[::2] for item in environment)
    return {name: interpolate(value) for name, value in environment.items() if value is not None}


def compose_command(definition: dict[str, Any]) -> list[str]:
    command = definition.get("command") or []
    if isinstance(command, str):
        return shlex.split(interpolate(command))
    return [interpolate(word) for word in command]


def compose_healthcheck(definition: dict[str, Any]) -> list[str]:
    test = (definition.get("healthcheck") or {}).get("test")
    assert test, "no healthcheck test"
    if isinstance(test, str):
        return ["/bin/sh", "-c", interpolate(test)]
    kind, *words = (interpolate(word) for word in test)
    assert kind in ("CMD", "CMD-SHELL"), f"healthcheck test {test!r} runs no command"
    return words if kind == "CMD" else ["/bin/sh", "-c", " ".join(words)]


def published_ports(definition: dict[str, Any]) -> list[tuple[str | None, int]]:
    """(host port, container port) of each `ports` entry, short or long syntax."""
    found: list[tuple[str | None, int]] = []
    for entry in definition.get("ports") or []:
        if isinstance(entry, dict):
            published = entry.get("published")
            found.append((None if published is None else str(published), int(entry["target"])))
            continue
        spec = interpolate(entry).split("/")[0]
        *host, target = spec.rsplit(":", 2)
        found.append((host[-1] if host else None, int(target)))
    return found


# --- what the container runs ------------------------------------------------------------------


@functools.cache
def compose_secrets() -> Path:
    """The compose secrets, as scripts/compose-keys makes them, in a folder of their own."""
    folder = Path(tempfile.mkdtemp(prefix="ema-compose-secrets-"))
    write_compose_keys(folder)
    return folder


def container_env() -> dict[str, str]:
    """The app container's environment: the image's ENV, then compose's `environment`, with
    the compose secrets it names (/run/secrets/...) where this test can read them."""
    env = {**stage_env(dockerfile().final), **compose_env(service("app"))}
    secrets = compose().get("secrets", {})
    for name, value in env.items():
        secret = value.removeprefix("/run/secrets/")
        if value.startswith("/run/secrets/") and secret in secrets:
            env[name] = str(compose_secrets() / Path(secrets[secret]["file"]).name)
    return env


def settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The Settings `python -m app` would read in an environment made only of `env`."""
    for name in list(os.environ):
        if name.upper().startswith(SETTINGS_PREFIXES):
            monkeypatch.delenv(name)
    for name, value in env.items():
        if name.upper().startswith(SETTINGS_PREFIXES):
            monkeypatch.setenv(name, value)
    return Settings()


@pytest.fixture
def container_settings(monkeypatch: pytest.MonkeyPatch) -> Settings:
    return settings_from(container_env(), monkeypatch)


def settings_env_names() -> set[str]:
    """Every environment variable Settings reads, from its fields, aliases and config."""
    config = Settings.model_config
    prefix = config.get("env_prefix", "")
    target = config.get("env_prefix_target", "variable")
    names: set[str] = set()
    for field_name, field in Settings.model_fields.items():
        alias = field.validation_alias or field.alias
        if alias is None:
            names.add((prefix if target in ("variable", "all") else "") + field_name)
            continue
        choices = alias.choices if isinstance(alias, AliasChoices) else [alias]
        for choice in choices:
            first = choice.path[0] if isinstance(choice, AliasPath) else choice
            if isinstance(first, str):
                names.add((prefix if target in ("alias", "all") else "") + first)
    if not config.get("case_sensitive", False):
        names = {name.upper() for name in names}
    return names


def redis_port(definition: dict[str, Any]) -> int:
    command = compose_command(definition)
    return int(command[command.index("--port") + 1]) if "--port" in command else 6379


# --- docker-compose.yml: Redis and its wiring -------------------------------------------------


def test_app_redis_url_names_the_redis_service_and_its_port(
    container_settings: Settings,
) -> None:
    url = compose_env(service("app")).get("REDIS_URL")
    assert url, "the app service sets no REDIS_URL"
    parts = urlsplit(url)
    assert parts.scheme in ("redis", "rediss")
    assert parts.hostname == "redis"
    assert (parts.port or 6379) == redis_port(service("redis"))
    assert service("redis")["image"].startswith("redis:")
    # ...and it is what the service reads, so it does not start an embedded Redis.
    assert container_settings.redis_url == url


def test_app_waits_until_redis_is_healthy() -> None:
    depends_on = service("app").get("depends_on")
    assert isinstance(depends_on, dict), "depends_on needs the long form to carry a condition"
    assert depends_on.get("redis", {}).get("condition") == "service_healthy"
    probe = " ".join(compose_healthcheck(service("redis")))
    assert "redis-cli" in probe
    assert "ping" in probe.lower()


def test_redis_keeps_an_append_only_file_on_a_named_volume() -> None:
    redis = service("redis")
    assert re.fullmatch(r"redis:7(\.\d+)*(-\w+)?", redis["image"])
    command = compose_command(redis)
    assert "--appendonly" in command
    assert command[command.index("--appendonly") + 1] == "yes"
    sources: list[str] = []
    for volume in redis.get("volumes") or []:
        if isinstance(volume, dict):
            if volume.get("target") == "/data":
                assert volume.get("type", "volume") == "volume"
                sources.append(volume["source"])
        else:
            source, _, rest = interpolate(volume).partition(":")
            if rest.split(":")[0] == "/data":
                sources.append(source)
    assert len(sources) == 1, "redis needs exactly one volume on /data"
    assert not sources[0].startswith((".", "/", "~")), f"{sources[0]} is a bind mount"
    assert sources[0] in (compose().get("volumes") or {}), f"{sources[0]} is not declared"


@pytest.mark.parametrize("name", ["redis", "app"])
def test_services_restart_and_report_health(name: str) -> None:
    definition = service(name)
    restart = definition.get("restart", "no")
    assert restart in ("always", "unless-stopped") or restart.startswith("on-failure")
    assert compose_healthcheck(definition)


# --- the port ---------------------------------------------------------------------------------


def test_published_port_is_the_port_the_service_listens_on(container_settings: Settings) -> None:
    port = container_settings.port
    targets = {target: host for host, target in published_ports(service("app"))}
    assert port in targets, f"the app listens on {port} but publishes {sorted(targets)}"
    assert targets[port], "the port is not published on the host"
    exposed = [
        int(word.split("/")[0])
        for _, instruction in dockerfile().final.all("EXPOSE")
        for word in expand(instruction.args, stage_env(dockerfile().final)).split()
    ]
    assert port in exposed
    # Bound to loopback, the port would be published to nothing.
    assert container_settings.host in ("0.0.0.0", "::")


# --- Dockerfile -------------------------------------------------------------------------------


def test_image_runs_python_m_app_from_its_virtualenv() -> None:
    final = dockerfile().final
    assert not final.all("ENTRYPOINT"), "an ENTRYPOINT would wrap the CMD"
    commands = final.all("CMD")
    assert commands, "the runtime stage has no CMD"
    # Exec form: a shell form would make /bin/sh PID 1, and it does not pass SIGTERM on.
    assert exec_form(commands[-1][1].args) == ["python", "-m", "app"]
    # `python` is the one with the service installed: the first PATH entry is the bin folder of
    # a tree copied from an earlier stage (the builder's virtualenv).
    first_path = stage_env(final).get("PATH", "").split(":")[0]
    copied: set[str] = set()
    earlier = {stage.name for stage in dockerfile().stages[:-1]}
    for _, instruction in final.all("COPY"):
        flags, words = split_flags(instruction.args)
        if "from" in flags:
            assert flags["from"] in earlier, f"COPY --from={flags['from']}: no such stage"
            copied.add(words[-1].rstrip("/"))
    assert posixpath.dirname(first_path) in copied


def test_stages_share_one_python_base_image() -> None:
    # The virtualenv's interpreter is a link to the base image's: it must be the same Python.
    bases = {stage.base for stage in dockerfile().stages}
    assert len(bases) == 1, bases
    assert bases.pop().startswith("python:3.11-slim")


def test_image_switches_to_a_non_root_user_before_cmd() -> None:
    final = dockerfile().final
    users = final.all("USER")
    assert users, "the runtime stage runs as root"
    position, instruction = users[-1]
    assert position < final.all("CMD")[-1][0]
    user = instruction.args.split(":")[0]
    assert user not in ("root", "0")
    if not user.isdigit():
        created = " ".join(i.args for _, i in final.all("RUN"))
        assert re.search(rf"(useradd|adduser)\b.*\b{re.escape(user)}\b", created)


class ProbeServer(ThreadingHTTPServer):
    status = 200

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), ProbeHandler)
        self.paths: list[str] = []


class ProbeHandler(BaseHTTPRequestHandler):
    server: ProbeServer

    def do_GET(self) -> None:
        self.server.paths.append(self.path)
        self.send_response(self.server.status if self.path == "/healthz" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def probe_server() -> Iterator[ProbeServer]:
    server = ProbeServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


HEALTHCHECKS = {
    "Dockerfile": lambda: healthcheck_command(dockerfile().final),
    "docker-compose.yml": lambda: compose_healthcheck(service("app")),
}


@pytest.mark.parametrize("source", list(HEALTHCHECKS))
@pytest.mark.parametrize(("status", "healthy"), [(200, True), (503, False)])
def test_healthcheck_probes_healthz_on_the_listening_port(
    source: str,
    status: int,
    healthy: bool,
    probe_server: ProbeServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The container's environment with the service moved to the stub's port: the probe must
    # follow (a probe with a hard-coded port fails here), ask for /healthz, and fail on an error.
    port = probe_server.server_address[1]
    env = {**container_env(), "EMA_PORT": str(port)}
    assert settings_from(env, monkeypatch).port == port
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.defpath])
    probe_server.status = status
    done = subprocess.run(
        HEALTHCHECKS[source](), env=env, capture_output=True, timeout=30, check=False
    )
    assert probe_server.paths == ["/healthz"]
    assert (done.returncode == 0) is healthy, done.stderr


# --- build context ----------------------------------------------------------------------------


def context_files(source: str) -> list[str]:
    """Files under `source` that a checkout has: tracked, or new and not git-ignored."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", source],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [name for name in listed.decode().split("\0") if name]


def test_every_copy_source_exists_and_passes_dockerignore() -> None:
    sources = []
    for stage in dockerfile().stages:
        for _, instruction in stage.all("COPY") + stage.all("ADD"):
            flags, words = split_flags(instruction.args)
            if "from" not in flags:
                sources.extend(words[:-1])
    assert sources, "the Dockerfile copies nothing from the build context"
    for source in sources:
        matches = sorted(ROOT.glob(source.removeprefix("./")))
        assert matches, f"COPY {source}: not in the repository"
        for match in matches:
            relative = match.relative_to(ROOT).as_posix()
            assert not dockerignore().excludes(relative), f"{relative} is in .dockerignore"
            files = context_files(relative)
            assert files, f"COPY {source}: nothing tracked"
            for name in files:
                assert not dockerignore().excludes(name), f"{name} is in .dockerignore"


@pytest.mark.parametrize(
    "path",
    [
        ".git/HEAD",
        ".venv/bin/python",
        "data/appendonlydir/appendonly.aof.1.incr.aof",
        "app/__pycache__/main.cpython-311.pyc",
        ".pytest_cache/v/cache/nodeids",
        ".mypy_cache/3.11/app/main.meta.json",
        ".ruff_cache/CACHEDIR.TAG",
        "ema_service.egg-info/PKG-INFO",
        "bench/results.json",
        "artifacts/bench.json",
        ".env",
    ],
)
def test_dockerignore_keeps_local_state_out(path: str) -> None:
    assert dockerignore().excludes(path)


@pytest.mark.parametrize(
    ("patterns", "path", "excluded"),
    [
        (["data"], "data/dump.rdb", True),
        (["data"], "app/data", False),
        (["*.md"], "docs/guide.md", False),
        (["**/*.md"], "docs/guide.md", True),
        (["*", "!app"], "app/routes/health.py", False),
        (["*", "!app", "**/__pycache__"], "app/__pycache__/x.pyc", True),
        (["/bench/", "!bench/keep.py"], "bench/keep.py", False),
        (["app/*.py[cod]"], "app/x.pyc", True),
    ],
)
def test_dockerignore_matcher_follows_docker_rules(
    patterns: list[str], path: str, excluded: bool
) -> None:
    assert DockerIgnore("\n".join(patterns)).excludes(path) is excluded


# --- settings ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "read"),
    [(name, True) for name in sorted(settings_env_names())]
    + [("EMA_NO_SUCH_SETTING", False), ("REDIS_HOST", False)],
)
def test_derived_names_are_the_ones_settings_reads(
    name: str, read: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A variable is read if setting it to junk changes the settings or is refused.
    baseline = settings_from({}, monkeypatch).model_dump()
    try:
        changed = settings_from({name: "!"}, monkeypatch).model_dump() != baseline
    except (ValidationError, SettingsError):  # SettingsError: junk where JSON is expected
        changed = True
    assert changed is read


def test_every_service_variable_is_a_setting() -> None:
    known = settings_env_names()
    declared = {
        f"Dockerfile ({stage.name or stage.base})": stage_env(stage)
        for stage in dockerfile().stages
    }
    for name, definition in compose()["services"].items():
        declared[f"docker-compose.yml ({name})"] = compose_env(definition)
    checked = 0
    for where, env in declared.items():
        for name in env:
            if name.upper().startswith(SETTINGS_PREFIXES):
                checked += 1
                assert name.upper() in known, f"{where} sets {name}, which Settings ignores"
    assert checked, "no EMA_/REDIS_ variable set anywhere"


def test_container_environment_is_valid(container_settings: Settings) -> None:
    # Values too: the fixture's Settings() validated them; check the worker count took effect.
    for name, value in container_env().items():
        if name.upper() == "EMA_WORKERS":
            assert container_settings.workers == int(value)


def test_compose_runs_with_api_keys_and_prometheus_holds_a_read_key(tmp_path: Path) -> None:
    secrets = compose()["secrets"]
    app, prometheus = service("app"), service("prometheus")
    keys_file = compose_env(app)["EMA_API_KEYS_FILE"]
    assert keys_file.startswith("/run/secrets/")
    assert keys_file.removeprefix("/run/secrets/") in app["secrets"]
    metrics_secret = next(name for name in prometheus["secrets"] if name in secrets)
    scrape = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())["scrape_configs"][0]
    assert scrape["authorization"]["credentials_file"] == f"/run/secrets/{metrics_secret}"
    # The files the secrets name are what scripts/compose-keys writes, and git-ignored.
    made = write_compose_keys(tmp_path)
    for name, secret in secrets.items():
        path = Path(secret["file"])
        assert path.parent == Path("deploy/secrets"), name
        assert (tmp_path / path.name).exists(), name
    assert "/deploy/secrets/" in (ROOT / ".gitignore").read_text().splitlines()
    keys = settings_with_file(tmp_path / "api-keys.json")
    metrics_key = (tmp_path / "metrics-key").read_text()
    holders = {key.name: key for key in keys if key.sha256 == hash_key(metrics_key)}
    assert [key.scopes for key in holders.values()] == [frozenset({"read"})]
    assert any(key.sha256 == hash_key(made) and "admin" in key.scopes for key in keys)


def settings_with_file(path: Path) -> tuple[ApiKey, ...]:
    return Settings(api_keys_file=path).api_keys  # type: ignore[call-arg]


# --- the scale profile: replicas behind a load balancer ---------------------------------------


def nginx_conf() -> str:
    """deploy/nginx.conf without its comments."""
    text = (ROOT / "deploy" / "nginx.conf").read_text()
    return "\n".join(line.split("#", 1)[0] for line in text.splitlines())


def test_scale_profile_runs_replicas_of_the_app_on_the_same_redis_with_the_same_keys() -> None:
    app, replicas = service("app"), service("app-replicas")
    assert replicas.get("profiles") == ["scale"]
    assert replicas["image"] == app["image"]
    assert replicas.get("build") == app.get("build")
    assert replicas["deploy"]["replicas"] >= 2
    assert not replicas.get("ports"), "replicas are reached through the load balancer only"
    env, app_env = compose_env(replicas), compose_env(app)
    assert env["REDIS_URL"] == app_env["REDIS_URL"]
    assert env["EMA_API_KEYS_FILE"] == app_env["EMA_API_KEYS_FILE"]
    assert replicas["secrets"] == app["secrets"]
    assert replicas["depends_on"] == app["depends_on"]
    assert compose_healthcheck(replicas) == compose_healthcheck(app)
    assert replicas.get("restart") == app.get("restart")


def test_replica_environment_is_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {**stage_env(dockerfile().final), **compose_env(service("app-replicas"))}
    secret = Path(compose()["secrets"]["ema_api_keys"]["file"]).name
    env["EMA_API_KEYS_FILE"] = str(compose_secrets() / secret)
    settings = settings_from(env, monkeypatch)
    assert settings.workers == 1
    assert settings.api_keys


def test_load_balancer_listens_where_compose_publishes_and_proxies_to_the_replicas(
    container_settings: Settings,
) -> None:
    lb, conf = service("lb"), nginx_conf()
    assert lb.get("profiles") == ["scale"]
    assert re.fullmatch(r"nginx:\d+\.\d+\.\d+(-alpine)?", lb["image"]), "pin the nginx version"
    mounts = [interpolate(volume).split(":") for volume in lb["volumes"]]
    assert ["./deploy/nginx.conf", "/etc/nginx/nginx.conf", "ro"] in mounts
    listen = {int(port) for port in re.findall(r"^\s*listen\s+(\d+)\s*;", conf, re.MULTILINE)}
    targets = {target for host, target in published_ports(lb) if host}
    assert targets
    assert targets <= listen
    # proxy_pass names an upstream whose server is the replicas' service on the app's port.
    upstream = re.search(r"proxy_pass\s+http://(\w+)\s*;", conf)
    assert upstream
    block = re.search(r"upstream\s+" + upstream[1] + r"\s*\{([^}]*)\}", conf)
    assert block
    servers = re.findall(r"server\s+([\w.-]+):(\d+)", block[1])
    assert servers == [("app-replicas", str(container_settings.port))]
    # Replicas come and go with --scale: the name is re-resolved with Docker's DNS.
    assert "resolve" in block[1]
    assert re.search(r"resolver\s+127\.0\.0\.11\b", conf)
    assert lb["depends_on"]["app-replicas"]["condition"] == "service_healthy"


def test_load_balancer_streams_events_and_never_resends_a_push() -> None:
    conf = nginx_conf()
    # Server-Sent Events pass unbuffered and outlive the heartbeat interval.
    assert re.search(r"proxy_buffering\s+off\s*;", conf)
    timeout = re.search(r"proxy_read_timeout\s+(\d+)([smh]?)\s*;", conf)
    assert timeout
    seconds = int(timeout[1]) * {"": 1, "s": 1, "m": 60, "h": 3600}[timeout[2]]
    assert seconds > Settings.model_fields["sse_heartbeat"].default
    # A failed POST is never passed to another replica: it may have been applied.
    assert "non_idempotent" not in conf
