"""The drop-in deployment: Dockerfile, .dockerignore, compose.yaml and .env.example.

No Docker engine is needed: the files are parsed and checked against the sidecar's own CLI and
configuration, the wheel the image installs is built for real, and the health-check commands are
run against a local HTTP server.
"""

from __future__ import annotations

import ast
import base64
import fnmatch
import http.server
import importlib.util
import json
import os
import re
import secrets
import shlex
import subprocess
import sys
import textwrap
import threading
import tomllib
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from psycopg.conninfo import conninfo_to_dict

from sidecar.cli import build_parser
from sidecar.config import Config, ConfigError

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
ENV_EXAMPLE = ROOT / ".env.example"
READMES = (ROOT / "README.md", ROOT / "README.zh-CN.md")
CI_RUN = ROOT / ".ci" / "run"
CONTAINER_CHECK = ROOT / ".ci" / "container-check.sh"

MIGRATE, SIDECAR = "sms-sidecar-migrate", "sms-sidecar"

# interface.md §2, in its order.
INTERFACE_VARS = (
    "DATABASE_URL",
    "SEND_SMS_HOOK_SECRETS",
    "ALIYUN_ACCESS_KEY_ID",
    "ALIYUN_ACCESS_KEY_SECRET",
    "ALIYUN_SMS_SIGN_NAME",
    "ALIYUN_SMS_TEMPLATE_CODE",
    "ALIYUN_SMS_TEMPLATE_PARAM",
    "ALIYUN_SMS_INTL_SIGN_NAME",
    "ALIYUN_SMS_INTL_TEMPLATE_CODE",
    "ALIYUN_SMS_ENDPOINT",
    "ALIYUN_SMS_REPORT_TOKEN",
    "SMS_PROVIDER",
)
# gotrue-send-sms-hook.md §8: the only hosts GoTrue accepts with plain http.
GOTRUE_HTTP_HOSTS = {"localhost", "127.0.0.1", "::1", "host.docker.internal"}
HOOK_PATHS = ("/hooks/send-sms", "/functions/v1/supabase-aliyun-sms-sender")  # interface §3
PG_IDENTIFIER = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]{0,62}$")
PLACEHOLDER = re.compile(r"REPLACE_WITH|your-super-secret", re.IGNORECASE)


# --------------------------------------------------------------------------------------------
# Compose's variable interpolation (compose-spec "Interpolation"), enough for these files.
# --------------------------------------------------------------------------------------------

_INTERPOLATION = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))"
)


class MissingVariable(Exception):
    pass


def interpolate(value: str, env: Mapping[str, str]) -> str:
    def replace(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name = match["braced"] or match["plain"]
        op, arg = match["op"], match["arg"] or ""
        current = env.get(name)
        unset = current is None or (op is not None and op.startswith(":") and current == "")
        if op in (":-", "-"):
            return arg if unset else str(current)
        if op in (":?", "?"):
            if unset:
                raise MissingVariable(f"{name}: {arg}")
            return str(current)
        if op in (":+", "+"):
            return "" if unset else arg
        return current or ""

    return _INTERPOLATION.sub(replace, value)


def variables_in(value: str) -> set[str]:
    return {m["braced"] or m["plain"] for m in _INTERPOLATION.finditer(value) if not m["escaped"]}


def strings_in(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, Mapping):
        for item in node.values():
            yield from strings_in(item)
    elif isinstance(node, list):
        for item in node:
            yield from strings_in(item)


def environment(service: Mapping[str, Any]) -> dict[str, str]:
    """A service's `environment:`, in either of Compose's two forms, uninterpolated."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


# --------------------------------------------------------------------------------------------
# .env.example and Dockerfile readers
# --------------------------------------------------------------------------------------------


def read_dotenv(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        # Plain KEY=value lines only: no quotes, blanks or `$`, which Compose's dotenv would
        # treat specially (inline comments, interpolation).
        assert re.fullmatch(r"[A-Z][A-Z0-9_]*=[^\s\"'$#]*", line), (
            f"{path.name}:{number}: not a plain KEY=value: {line!r}"
        )
        key, value = line.split("=", 1)
        assert key not in values, f"{path.name}:{number}: {key} set twice"
        values[key] = value
    return values


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for instruction, args in self.instructions if instruction == keyword]

    def last(self, keyword: str) -> str | None:
        found = self.all(keyword)
        return found[-1] if found else None


def dockerfile_stages(text: str) -> list[Stage]:
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        if raw.lstrip().startswith("#"):  # comments, also inside a continuation, are dropped
            continue
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        line = (pending + raw).strip()
        pending = ""
        if line:
            logical.append(line)
    assert not pending, "Dockerfile ends inside a line continuation"

    stages: list[Stage] = []
    for line in logical:
        instruction, _, args = line.partition(" ")
        instruction, args = instruction.upper(), args.strip()
        if instruction == "FROM":
            words = [w for w in args.split() if not w.startswith("--")]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=words[0], name=name))
        elif stages:
            stages[-1].instructions.append((instruction, args))
        else:
            assert instruction == "ARG", f"{instruction} before the first FROM"
    return stages


def dockerfile_env(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in stage.all("ENV"):
        for word in shlex.split(args):
            key, _, value = word.partition("=")
            env[key] = value
    return env


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), f"not exec form: {args}"
    return value


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(document, dict)
    return document


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return dockerfile_stages(DOCKERFILE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def final(stages: list[Stage]) -> Stage:
    return stages[-1]


@pytest.fixture(scope="module")
def example() -> dict[str, str]:
    return read_dotenv(ENV_EXAMPLE)


def filled_in(example: Mapping[str, str]) -> dict[str, str]:
    """`.env.example` with every placeholder replaced the way its comments tell an operator to."""
    env = dict(example)
    for key, value in example.items():
        if not PLACEHOLDER.search(value):
            continue
        if key == "SEND_SMS_HOOK_SECRETS":  # echo "v1,whsec_$(openssl rand -base64 32)"
            env[key] = "v1,whsec_" + base64.b64encode(os.urandom(32)).decode()
        else:  # openssl rand -hex 24, or a value from the Supabase / Aliyun consoles
            env[key] = secrets.token_hex(24)
    return env


def container_env(service: Mapping[str, Any], stage: Stage, dotenv: Mapping[str, str]) -> dict[str, str]:
    """The process environment `sms-sidecar` sees: image ENV, then the interpolated service env."""
    env = dockerfile_env(stage)
    env.update({key: interpolate(value, dotenv) for key, value in environment(service).items()})
    return env


def serve_env(service: Mapping[str, Any], stage: Stage, dotenv: Mapping[str, str]) -> dict[str, str]:
    """What `sms-sidecar serve` hands to Config.from_env, with the service's command-line flags."""
    env = container_env(service, stage, dotenv)
    args = build_parser().parse_args(service["command"])
    assert args.command == "serve"
    if args.host:
        env["HOST"] = args.host
    if args.port:
        env["PORT"] = str(args.port)
    return env


# --------------------------------------------------------------------------------------------
# compose.yaml
# --------------------------------------------------------------------------------------------


def test_compose_has_the_migrate_and_sidecar_services(services: dict[str, Any]) -> None:
    assert {MIGRATE, SIDECAR} <= services.keys()
    migrate, sidecar = services[MIGRATE], services[SIDECAR]
    assert migrate["image"] == sidecar["image"], "migrate must run the sidecar's image"
    build = sidecar["build"]
    assert (build if isinstance(build, str) else build.get("context")) == ".", "builds from this folder"
    assert migrate["command"] == ["migrate"]
    assert migrate["restart"] == "no"
    assert sidecar["command"] == ["serve", "--host", "0.0.0.0"]
    assert sidecar["restart"] == "unless-stopped"


@pytest.mark.parametrize("name", [MIGRATE, SIDECAR])
def test_compose_runs_both_services_hardened(services: dict[str, Any], name: str) -> None:
    # .ci/container-check.sh runs the image with these same settings (its HARDEN) and checks them
    # on the compose services; here they are pinned so a change shows up without a container run.
    service = services[name]
    assert service["read_only"] is True
    assert service["tmpfs"] == ["/tmp"], "/tmp: the one writable place on the read-only root"
    assert service["cap_drop"] == ["ALL"] and "cap_add" not in service
    assert service["security_opt"] == ["no-new-privileges:true"]
    assert "user" not in service and "privileged" not in service, "the image's USER 10001:10001 applies"


@pytest.mark.parametrize("name", [MIGRATE, SIDECAR])
def test_compose_commands_are_accepted_by_the_cli(services: dict[str, Any], name: str) -> None:
    args = build_parser().parse_args(services[name]["command"])  # argparse exits on anything unknown
    assert args.command == {MIGRATE: "migrate", SIDECAR: "serve"}[name]


def test_sidecar_starts_only_after_migrations_complete(services: dict[str, Any]) -> None:
    depends_on = services[SIDECAR]["depends_on"]
    assert isinstance(depends_on, dict), "the long form is needed for a condition"
    assert depends_on[MIGRATE]["condition"] == "service_completed_successfully"
    assert "depends_on" not in services[MIGRATE]


def test_network_is_supabases_external_default(compose: dict[str, Any], services: dict[str, Any]) -> None:
    assert compose["networks"]["default"] == {"name": "supabase_default", "external": True}
    for name in (MIGRATE, SIDECAR):
        # Anything else would take the service off supabase_default, where `db` resolves.
        assert "network_mode" not in services[name]
        assert services[name].get("networks", ["default"]) in (["default"], {"default": None})


@pytest.mark.parametrize("variable", INTERFACE_VARS)
def test_interface_variable_reaches_the_sidecar(services: dict[str, Any], variable: str) -> None:
    env = environment(services[SIDECAR])
    assert variable in env, f"{variable} is not passed to {SIDECAR}"
    if variable != "DATABASE_URL":  # built from parts below; the others come straight from .env
        assert variable in variables_in(env[variable]), f"{variable} is not taken from .env: {env[variable]!r}"


def test_database_urls_use_the_right_roles(services: dict[str, Any], final: Stage, example: dict[str, str]) -> None:
    dotenv = filled_in(example)
    migrate = conninfo_to_dict(container_env(services[MIGRATE], final, dotenv)["DATABASE_URL"])
    sidecar = conninfo_to_dict(container_env(services[SIDECAR], final, dotenv)["DATABASE_URL"])
    assert migrate["user"] == "postgres" and migrate["password"] == dotenv["POSTGRES_PASSWORD"]
    assert sidecar["user"] == "sms_sidecar" and sidecar["password"] == dotenv["SMS_SIDECAR_DB_PASSWORD"]
    for conninfo in (migrate, sidecar):
        # Supabase's database service on supabase_default, as its own services reach it.
        assert (conninfo["host"], conninfo["port"], conninfo["dbname"]) == ("db", "5432", "postgres")


@pytest.mark.parametrize(
    ("variable", "service"),
    [
        ("POSTGRES_PASSWORD", MIGRATE),
        ("SMS_SIDECAR_DB_PASSWORD", SIDECAR),
        ("SEND_SMS_HOOK_SECRETS", SIDECAR),
    ],
)
def test_required_settings_stop_compose_with_a_message(
    services: dict[str, Any], example: dict[str, str], variable: str, service: str
) -> None:
    dotenv = filled_in(example)
    for value in environment(services[service]).values():
        interpolate(value, dotenv)  # complete: no error
    for missing in ({k: v for k, v in dotenv.items() if k != variable}, {**dotenv, variable: ""}):
        with pytest.raises(MissingVariable, match=variable):
            for value in environment(services[service]).values():
                interpolate(value, missing)


def test_every_compose_variable_is_in_env_example_and_vice_versa(
    compose: dict[str, Any], example: dict[str, str]
) -> None:
    used = {name for text in strings_in(compose) for name in variables_in(text)}
    assert used, "compose.yaml takes nothing from .env"
    assert used - example.keys() == set(), "used in compose.yaml but not in .env.example"
    assert example.keys() - used == set(), "in .env.example but unused by compose.yaml"


def test_env_example_holds_no_real_looking_secret(example: dict[str, str]) -> None:
    for key in ("POSTGRES_PASSWORD", "SMS_SIDECAR_DB_PASSWORD", "SEND_SMS_HOOK_SECRETS", "ALIYUN_ACCESS_KEY_SECRET"):
        assert PLACEHOLDER.search(example[key]), f"{key} should be an obvious placeholder, not {example[key]!r}"
    text = ENV_EXAMPLE.read_text(encoding="utf-8")
    assert 'echo "v1,whsec_$(openssl rand -base64 32)"' in text
    assert "gives the role a login" in text


def test_migrate_gives_the_sidecar_role_its_password(services: dict[str, Any]) -> None:
    # One `docker compose up -d`: the sidecar's DATABASE_URL password is the one migrate sets.
    migrate_env = services[MIGRATE]["environment"]
    assert "${SMS_SIDECAR_DB_PASSWORD" in migrate_env["SMS_SIDECAR_DB_PASSWORD"]
    assert "${SMS_SIDECAR_DB_PASSWORD" in services[SIDECAR]["environment"]["DATABASE_URL"]


def test_env_example_works_once_filled_in(services: dict[str, Any], final: Stage, example: dict[str, str]) -> None:
    config = Config.from_env(serve_env(services[SIDECAR], final, filled_in(example)))
    assert config.provider == "aliyun"
    assert len(config.hook_secrets) == 1
    assert config.aliyun is not None
    assert config.aliyun.template_code == example["ALIYUN_SMS_TEMPLATE_CODE"]
    assert config.aliyun.template_param == example["ALIYUN_SMS_TEMPLATE_PARAM"]
    assert (config.aliyun.endpoint, config.aliyun.protocol) == ("dysmsapi.aliyuncs.com", "https")
    assert config.aliyun.intl_template_code is None
    assert (config.host, config.port) == ("0.0.0.0", 8090)


def test_env_example_placeholders_stop_start_up(
    services: dict[str, Any], final: Stage, example: dict[str, str]
) -> None:
    # An operator who forgets to generate the database password or the hook secret gets a clear
    # start-up error naming it.
    with pytest.raises(ConfigError, match="DATABASE_URL: the password is still the REPLACE_WITH_"):
        Config.from_env(serve_env(services[SIDECAR], final, example))
    password_set = {**example, "SMS_SIDECAR_DB_PASSWORD": filled_in(example)["SMS_SIDECAR_DB_PASSWORD"]}
    with pytest.raises(ConfigError, match="SEND_SMS_HOOK_SECRETS"):
        Config.from_env(serve_env(services[SIDECAR], final, password_set))


def test_console_provider_needs_no_aliyun_settings(
    services: dict[str, Any], final: Stage, example: dict[str, str]
) -> None:
    dotenv = {k: v for k, v in filled_in(example).items() if not k.startswith("ALIYUN_")}
    config = Config.from_env(serve_env(services[SIDECAR], final, {**dotenv, "SMS_PROVIDER": "console"}))
    assert config.provider == "console" and config.aliyun is None


def test_published_port_matches_the_image(services: dict[str, Any], final: Stage) -> None:
    (mapping,) = services[SIDECAR]["ports"]
    published = interpolate(mapping, {})  # defaults only
    *host_ip, host_port, container_port = published.split(":")
    assert host_ip in ([], ["0.0.0.0"]), "a loopback binding is unreachable through host-gateway"
    exposed = final.all("EXPOSE")
    assert exposed == [container_port], f"EXPOSE {exposed} vs published container port {container_port}"
    assert dockerfile_env(final)["PORT"] == container_port
    assert host_port == "8090"
    assert "ports" not in services[MIGRATE]


def test_container_listens_on_all_interfaces(services: dict[str, Any], final: Stage) -> None:
    image_env = dockerfile_env(final)
    assert image_env["HOST"] == "0.0.0.0"
    assert exec_form(final.last("CMD") or "null") == ["serve", "--host", "0.0.0.0"]
    assert build_parser().parse_args(services[SIDECAR]["command"]).host == "0.0.0.0"


def _auth_snippet() -> dict[str, Any]:
    """The commented `auth:` block compose.yaml tells operators to add, parsed as YAML."""
    lines = COMPOSE.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if re.fullmatch(r"#\s+auth:\s*", line))
    block = []
    for line in lines[start:]:
        if not line.startswith("#") or not line[1:].strip():
            break
        block.append(line[1:])
    snippet = yaml.safe_load(textwrap.dedent("\n".join(block)))
    assert isinstance(snippet, dict)
    return snippet["auth"]


def test_documented_auth_lines(services: dict[str, Any]) -> None:
    auth = _auth_snippet()
    assert auth["extra_hosts"] == ["host.docker.internal:host-gateway"]
    env = auth["environment"]
    assert env["GOTRUE_HOOK_SEND_SMS_ENABLED"] == "true"  # a string, as Compose requires
    assert env["GOTRUE_HOOK_SEND_SMS_SECRETS"] == "${SEND_SMS_HOOK_SECRETS}"
    uri = urlsplit(env["GOTRUE_HOOK_SEND_SMS_URI"])
    assert uri.scheme == "http" and uri.hostname == "host.docker.internal"
    published_host_port = interpolate(services[SIDECAR]["ports"][0], {}).split(":")[-2]
    assert str(uri.port) == published_host_port
    assert uri.path == "/hooks/send-sms"


def test_documented_hook_uris_are_accepted_by_gotrue() -> None:
    text = COMPOSE.read_text(encoding="utf-8")
    comments = "\n".join(line for line in text.splitlines() if line.lstrip().startswith("#"))
    uris = re.findall(r"GOTRUE_HOOK_SEND_SMS_URI:\s*(\S+)", comments)
    assert len(uris) >= 3, "the default and the alternatives should be documented"
    schemes = set()
    for raw in uris:
        uri = urlsplit(raw)
        schemes.add(uri.scheme)
        if uri.scheme == "http":
            assert uri.hostname in GOTRUE_HTTP_HOSTS, f"GoTrue refuses to start with {raw}"
            assert uri.path.endswith(HOOK_PATHS), raw
        elif uri.scheme == "https":
            assert uri.path.endswith(HOOK_PATHS), raw
        else:
            assert uri.scheme == "pg-functions", raw
            schema, function = uri.path.strip("/").split("/")
            assert PG_IDENTIFIER.match(schema) and PG_IDENTIFIER.match(function), raw
            assert (schema, function) == ("sms", "send_sms_hook"), raw
    assert {"http", "pg-functions"} <= schemes
    assert "ENABLE_PHONE_AUTOCONFIRM=false" in comments
    assert 'network_mode: "service:auth"' in comments


def test_compose_healthcheck_is_stdlib_python(services: dict[str, Any]) -> None:
    test = services[SIDECAR]["healthcheck"]["test"]
    assert test[0] == "CMD" and test[1] == "python", "the slim image has no curl or wget"
    assert "/healthz" in " ".join(test)
    assert services[MIGRATE].get("healthcheck") == {"disable": True}, "a one-shot job serves no /healthz"


def _readme_auth_snippet(readme: Path) -> dict[str, Any]:
    """The ```yaml block with the `auth:` lines a README tells operators to add."""
    blocks = re.findall(r"```yaml\n(.*?)```", readme.read_text(encoding="utf-8"), re.DOTALL)
    for block in blocks:
        snippet = yaml.safe_load(textwrap.dedent(block))
        if isinstance(snippet, dict) and "auth" in snippet:
            return snippet["auth"]
    raise AssertionError(f"{readme.name}: no yaml block with the auth service")


@pytest.mark.parametrize("readme", READMES, ids=lambda path: path.name)
def test_readme_auth_lines_match_compose(readme: Path) -> None:
    # The default wiring depends on Docker's host-gateway: compose.yaml publishes the port on the
    # host, and `auth` reaches it as host.docker.internal. CI's podman has no host-gateway.
    documented, readme_auth = _auth_snippet(), _readme_auth_snippet(readme)
    assert readme_auth["extra_hosts"] == documented["extra_hosts"] == ["host.docker.internal:host-gateway"]
    for key in ("GOTRUE_HOOK_SEND_SMS_ENABLED", "GOTRUE_HOOK_SEND_SMS_URI", "GOTRUE_HOOK_SEND_SMS_SECRETS"):
        assert readme_auth["environment"][key] == documented["environment"][key], key


def test_migrate_is_a_one_shot_the_sidecar_waits_for(services: dict[str, Any]) -> None:
    # service_completed_successfully waits for the container to exit: the migrate service must exit
    # (a `migrate` command, never restarted) and exit 0 when it applied nothing new, since podman
    # runs it a second time next to the sidecar (tests/test_migrate.py: a second run is a no-op).
    migrate = services[MIGRATE]
    assert migrate["command"] == ["migrate"] and migrate["restart"] == "no"
    assert services[SIDECAR]["depends_on"] == {MIGRATE: {"condition": "service_completed_successfully"}}
    assert "ports" not in migrate and "depends_on" not in migrate


@pytest.mark.parametrize("path", [COMPOSE, *READMES], ids=lambda path: path.name)
def test_docker_only_behaviour_is_documented(path: Path) -> None:
    # What Docker users meet and CI's podman-compose does not: Compose v2, the exit-code gate on
    # migrate, and host-gateway (Docker Engine >= 20.10 on Linux).
    text = path.read_text(encoding="utf-8")
    if path == COMPOSE:
        text = "\n".join(line for line in text.splitlines() if line.lstrip().startswith("#"))
    for needle in ("service_completed_successfully", "host-gateway", "20.10", "podman", "Compose v2"):
        assert needle in text, f"{path.name} does not mention {needle}"


# --------------------------------------------------------------------------------------------
# Dockerfile and .dockerignore
# --------------------------------------------------------------------------------------------


def test_dockerfile_is_multi_stage_on_python_311_slim(stages: list[Stage], final: Stage) -> None:
    assert len(stages) >= 2
    assert all(stage.base == "python:3.11-slim" for stage in stages)
    builder_names = {stage.name for stage in stages[:-1]}
    copies_from = {m[1] for args in final.all("COPY") if (m := re.search(r"--from=(\S+)", args))}
    assert copies_from and copies_from <= builder_names, "the final stage takes the build from the builder"
    builder_runs = " ".join(" ".join(stage.all("RUN")) for stage in stages[:-1])
    assert "pip wheel" in builder_runs


def test_image_installs_the_locked_runtime_dependencies(stages: list[Stage]) -> None:
    # CI tests requirements/dev.txt; the image must ship the same pins (runtime.txt is its subset).
    builder_runs = " ".join(" ".join(stage.all("RUN")) for stage in stages[:-1])
    assert "--require-hashes -r requirements/runtime.txt" in builder_runs
    assert "--no-deps" in builder_runs.split("requirements/runtime.txt", 1)[1]
    pins = {
        line.split(" ")[0] for line in (ROOT / "requirements" / "runtime.txt").read_text().splitlines() if "==" in line
    }
    dev = {line.split(" ")[0] for line in (ROOT / "requirements" / "dev.txt").read_text().splitlines() if "==" in line}
    assert pins and pins <= dev, sorted(pins - dev)
    names = {pin.split("==")[0] for pin in pins}
    assert {"standardwebhooks", "psycopg", "starlette", "uvicorn", "alibabacloud-dysmsapi20170525", "grpcio"} <= names


def test_final_stage_runs_as_non_root(final: Stage) -> None:
    user = final.last("USER")
    assert user is not None, "no USER: the container would run as root"
    name = user.split(":")[0]
    assert name not in ("root", "0"), user


def test_final_stage_has_no_build_tools(final: Stage) -> None:
    runs = " ".join(final.all("RUN"))
    for tool in ("gcc", "g++", "build-essential", "make ", "libpq-dev", "python3-dev"):
        assert tool not in runs, f"final stage installs {tool.strip()}"
    assert "pip wheel" not in runs


def _commands(runs: list[str]) -> list[list[str]]:
    """The simple commands of RUN lines, split on && (enough for this Dockerfile)."""
    return [shlex.split(part) for run in runs for part in run.split("&&") if part.strip()]


def test_final_stage_removes_the_installers(final: Stage) -> None:
    # python:3.11-slim ships pip, setuptools and wheel in /usr/local; nothing at run time uses them.
    commands = _commands(final.all("RUN"))
    pip_uninstall = (["python", "-m", "pip", "uninstall"], ["pip", "uninstall"])
    uninstall = next((i for i, c in enumerate(commands) if any(c[: len(p)] == p for p in pip_uninstall)), None)
    assert uninstall is not None, "the final stage keeps pip, setuptools and wheel"
    assert {"pip", "setuptools", "wheel"} <= set(commands[uninstall]), commands[uninstall]
    assert {"--yes", "-y"} & set(commands[uninstall]), "pip uninstall would wait for an answer"
    for command in commands[uninstall + 1 :]:
        assert "pip" not in command[:3], f"pip is gone by then: {shlex.join(command)}"


def test_runtime_user_is_10001_without_the_system_uid_warning(final: Stage) -> None:
    commands = _commands(final.all("RUN"))
    (useradd,) = (c for c in commands if c[0] == "useradd")
    (groupadd,) = (c for c in commands if c[0] == "groupadd")
    # 10001 is above SYS_UID_MAX (999): as a --system account useradd warns on every build.
    for command in (useradd, groupadd):
        assert not {"--system", "-r"} & set(command), shlex.join(command)
    assert useradd[useradd.index("--uid") + 1] == useradd[useradd.index("--gid") + 1] == "10001"
    assert groupadd[groupadd.index("--gid") + 1] == "10001"
    assert useradd[-1] == groupadd[-1] == "sidecar"
    assert "--no-log-init" in useradd, "lastlog/faillog entries for a high uid only bloat the image"
    assert final.last("USER") == "10001:10001"


def _python_c_imports(command: list[str]) -> set[str]:
    assert command[0] == "python" and command[1] == "-c", command
    modules: set[str] = set()
    for node in ast.walk(ast.parse(command[2])):
        if isinstance(node, ast.Import):
            modules |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            modules.add((node.module or "").split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__":
            raise AssertionError("__import__ hides what the health check needs")
    return modules


@pytest.mark.parametrize("source", ["Dockerfile", "compose.yaml"])
def test_healthchecks_need_only_the_standard_library(source: str, final: Stage, services: dict[str, Any]) -> None:
    # The runtime stage has no pip (and no curl): the health checks run on python's stdlib alone.
    if source == "Dockerfile":
        healthcheck = final.last("HEALTHCHECK") or ""
        command = exec_form(healthcheck[healthcheck.index("CMD") + len("CMD") :].strip())
    else:
        command = services[SIDECAR]["healthcheck"]["test"][1:]
    modules = _python_c_imports(command)
    assert modules and modules <= sys.stdlib_module_names, modules - sys.stdlib_module_names


def test_final_stage_environment_and_entrypoint(final: Stage) -> None:
    env = dockerfile_env(final)
    assert (env["HOST"], env["PORT"], env["PYTHONUNBUFFERED"]) == ("0.0.0.0", "8090", "1")
    assert exec_form(final.last("ENTRYPOINT") or "null") == ["sms-sidecar"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    assert scripts["sms-sidecar"] == "sidecar.cli:main"


def test_final_stage_healthcheck_uses_healthz_without_curl(final: Stage) -> None:
    healthcheck = final.last("HEALTHCHECK")
    assert healthcheck is not None
    command = exec_form(healthcheck[healthcheck.index("CMD") + len("CMD") :].strip())
    assert command[0] == "python"
    assert "/healthz" in command[-1]
    assert not {"curl", "wget"} & set(" ".join(command).split())


def _dockerignored(path: str, patterns: list[str]) -> bool:
    ignored = False
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        negate = pattern.startswith("!")
        glob = pattern.lstrip("!").strip("/")
        for prefix in prefixes:
            if fnmatch.fnmatch(prefix, glob) or fnmatch.fnmatch(prefix, glob.replace("**/", "")):
                ignored = not negate
    return ignored


def test_build_context_holds_what_the_dockerfile_copies(stages: list[Stage]) -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for ignored in (".venv", ".git", ".env", "sidecar/__pycache__", ".pytest_cache", ".mypy_cache"):
        assert _dockerignored(ignored, patterns), f".dockerignore lets {ignored} into the build context"
    copied = []
    for stage in stages:
        for args in stage.all("COPY"):
            if "--from=" not in args:
                copied.extend(shlex.split(args)[:-1])
    assert copied
    for source in copied:
        assert (ROOT / source).exists(), f"COPY {source}: no such file in the project"
        assert not _dockerignored(source, patterns), f"COPY {source}: excluded by .dockerignore"
    assert {"pyproject.toml", "README.md", "sidecar"} <= set(map(lambda s: s.rstrip("/"), copied))
    assert any(s.rstrip("/") in ("supabase", "supabase/migrations") for s in copied), "migrations are not copied"


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(params=[200, 503], ids=["healthy", "unhealthy"])
def health_server(request: pytest.FixtureRequest) -> Iterator[tuple[int, int]]:
    handler = type("Handler", (_Health,), {"status": request.param})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], request.param
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("source", ["Dockerfile", "compose.yaml"])
def test_healthcheck_commands_really_probe_healthz(
    health_server: tuple[int, int], source: str, final: Stage, services: dict[str, Any]
) -> None:
    port, status = health_server
    if source == "Dockerfile":
        healthcheck = final.last("HEALTHCHECK") or ""
        command = exec_form(healthcheck[healthcheck.index("CMD") + len("CMD") :].strip())
    else:
        command = [part.replace(":8090/", f":{port}/") for part in services[SIDECAR]["healthcheck"]["test"][1:]]
    command = [sys.executable if part == "python" else part for part in command]
    env = {**os.environ, "PORT": str(port)}
    result = subprocess.run(command, env=env, capture_output=True, timeout=20, check=False)
    assert (result.returncode == 0) == (status == 200), result.stderr.decode()


# --------------------------------------------------------------------------------------------
# The wheel the image installs
# --------------------------------------------------------------------------------------------


def test_wheel_bundles_migrations_and_standin(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path)]
    if importlib.util.find_spec("hatchling") is not None:
        command += ["--no-build-isolation", "--no-index"]
    subprocess.run([*command, str(ROOT)], check=True, timeout=120, capture_output=True)
    (wheel,) = tmp_path.glob("supabase_aliyun_sms-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        sources = sorted((ROOT / "supabase" / "migrations").glob("*.sql"))
        assert sources
        bundled = {name for name in names if re.fullmatch(r"sidecar/migrations/[^/]+\.sql", name)}
        assert bundled == {f"sidecar/migrations/{path.name}" for path in sources}
        for path in sources:
            assert archive.read(f"sidecar/migrations/{path.name}") == path.read_bytes(), path.name
        assert archive.read("sidecar/standin.sql") == (ROOT / "sidecar" / "standin.sql").read_bytes()
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        assert "sms-sidecar = sidecar.cli:main" in archive.read(entry_points).decode()


# --------------------------------------------------------------------------------------------
# CI: the image and compose.yaml are built and run on every submission
# --------------------------------------------------------------------------------------------


def test_ci_runs_the_container_check_after_the_tests() -> None:
    lines = [line.strip() for line in CI_RUN.read_text(encoding="utf-8").splitlines()]
    code = [line for line in lines if line and not line.startswith("#")]
    tests_at = next(i for i, line in enumerate(code) if line.startswith('eval "$test_command"'))
    (check_at,) = (i for i, line in enumerate(code) if line.startswith("bash .ci/container-check.sh"))
    assert check_at > tests_at, "the container check runs after the test suite"
    assert shlex.split(code[check_at]) == ["bash", ".ci/container-check.sh", "--compose"], code[check_at]
    assert "set -euo pipefail" in code, "a failing check fails CI"
    assert CONTAINER_CHECK.exists() and os.access(CONTAINER_CHECK, os.X_OK)


def test_container_check_builds_the_dockerfile_unchanged() -> None:
    script = CONTAINER_CHECK.read_text(encoding="utf-8")
    build = re.search(r"pm build [^\n]*-f \"\$SRC/Dockerfile\"", script)
    assert build, "the check builds the project's own Dockerfile"
    assert not re.search(r"(sed|awk|perl)[^\n]*\$SRC/Dockerfile", script), "the Dockerfile is used as it is"
    assert "--require-hashes" in script and "podman-compose.txt" in script


def test_podman_compose_pins_follow_the_lock() -> None:
    def pins(path: Path) -> dict[str, str]:
        text = path.read_text(encoding="utf-8").replace("\\\n", " ")
        return {m[1]: m[0] for m in re.finditer(r"^([a-z0-9-]+)==\S+(?:\s+--hash=\S+)*", text, re.MULTILINE)}

    ci, dev = pins(ROOT / ".ci" / "podman-compose.txt"), pins(ROOT / "requirements" / "dev.txt")
    assert "podman-compose" in ci
    for name, entry in ci.items():
        if name != "podman-compose":
            assert entry == dev.get(name), f".ci/podman-compose.txt: {name} differs from requirements/dev.txt"
