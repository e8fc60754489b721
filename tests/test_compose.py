"""docker-compose.yml and the Dockerfile stay consistent with the code.

No Docker engine is needed: the compose file is parsed with PyYAML and checked against
``pipeline.config.ENVIRONMENT`` (so a renamed setting cannot silently stop reaching the
containers). If the ``docker compose`` plugin is installed, its own validation runs too.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from pipeline.app.broker import apache_kafka
from pipeline.config import ENVIRONMENT

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
OUR_SERVICES = ("featurizer", "scorer", "producer")
#: `deeper` subcommands a service may run (to be replaced by the real CLI's list).
DEEPER_SUBCOMMANDS = {"featurizer", "scorer", "produce", "train", "demo"}
KNOWN_VARIABLES = {variable for variable, _ in ENVIRONMENT.values()}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment as a dict, whether written as a mapping or a list."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> source (volume name or host path), short or long syntax."""
    result = {}
    for volume in service.get("volumes") or []:
        if isinstance(volume, dict):
            result[volume["target"]] = volume.get("source", "")
        else:  # SOURCE:TARGET[:MODE]; a ${VAR:-default} source may itself contain ':'
            source = re.match(r"(\$\{[^}]*\}|[^:]*)", volume).group(1)
            result[volume[len(source) + 1:].split(":")[0]] = source
    return result


def command(service: dict[str, Any]) -> list[str]:
    cmd = service.get("command") or []
    return shlex.split(cmd) if isinstance(cmd, str) else [str(part) for part in cmd]


def test_services_exist(compose: dict[str, Any]) -> None:
    assert {"kafka", *OUR_SERVICES} <= set(compose["services"])


def test_kafka_is_a_single_node_kraft_apache_kafka(compose: dict[str, Any]) -> None:
    kafka = compose["services"]["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = environment(kafka)
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{env['KAFKA_NODE_ID']}@kafka:9093"
    assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "1"
    assert "CONTROLLER" in env["KAFKA_CONTROLLER_LISTENER_NAMES"]
    assert kafka["healthcheck"]["test"]
    for port in kafka.get("ports", []):  # anything published must stay on the host's loopback
        assert str(port).startswith("127.0.0.1:"), port


def test_kafka_is_the_pinned_version_with_the_dev_brokers_settings(compose: dict[str, Any]) -> None:
    """Same Apache Kafka as `deeper broker start --kafka` and the tests on Apache Kafka."""
    kafka = compose["services"]["kafka"]
    assert kafka["image"] == f"apache/kafka:{apache_kafka.KAFKA_VERSION}"
    env = environment(kafka)
    for name, value in apache_kafka.BROKER_SETTINGS.items():
        variable = "KAFKA_" + name.upper().replace(".", "_")  # the apache/kafka image's mapping
        assert env.get(variable) == value, f"{variable} should be {value!r} like {name} of the dev broker"
    assert int(env["KAFKA_MESSAGE_MAX_BYTES"]) >= 16 * 1024 * 1024  # camera photos


def test_our_services_only_set_known_variables(compose: dict[str, Any]) -> None:
    for name in OUR_SERVICES:
        ours = {k for k in environment(compose["services"][name]) if k.startswith(("DEEPER_", "KAFKA_"))}
        assert ours, name
        assert ours <= KNOWN_VARIABLES, f"{name}: unknown {sorted(ours - KNOWN_VARIABLES)}"


def test_bootstrap_server_is_kafkas_advertised_listener(compose: dict[str, Any]) -> None:
    kafka_env = environment(compose["services"]["kafka"])
    advertised = {url.split("://", 1)[1] for url in kafka_env["KAFKA_ADVERTISED_LISTENERS"].split(",")}
    for name in OUR_SERVICES:
        bootstrap = environment(compose["services"][name])["KAFKA_BOOTSTRAP_SERVERS"]
        assert bootstrap == "kafka:9092"
        assert bootstrap in advertised, name


@pytest.mark.parametrize("setting", ["data_dir", "registry_dir"])
def test_named_volumes_are_mounted_where_settings_point(compose: dict[str, Any], setting: str) -> None:
    variable = ENVIRONMENT[setting][0]
    declared = set(compose.get("volumes") or {})
    for name in ("featurizer", "scorer"):
        service = compose["services"][name]
        path = environment(service)[variable]
        assert path.startswith("/"), f"{name}: {variable} must be absolute in a container"
        assert mounts(service).get(path) in declared, f"{name}: no named volume at {variable}={path}"


def test_every_service_builds_the_one_dockerfile(compose: dict[str, Any]) -> None:
    builds = set()
    for name in OUR_SERVICES:
        build = compose["services"][name]["build"]
        build = {"context": build} if isinstance(build, str) else build
        builds.add((build.get("context", "."), build.get("dockerfile", "Dockerfile")))
    assert builds == {(".", "Dockerfile")}
    assert DOCKERFILE.is_file()


def test_commands_are_deeper_subcommands(compose: dict[str, Any]) -> None:
    for name in OUR_SERVICES:
        cmd = command(compose["services"][name])
        assert cmd[0] == "deeper" and cmd[1] in DEEPER_SUBCOMMANDS, (name, cmd)


def test_services_wait_for_a_healthy_kafka(compose: dict[str, Any]) -> None:
    for name in OUR_SERVICES:
        assert compose["services"][name]["depends_on"]["kafka"]["condition"] == "service_healthy"


def test_producer_runs_only_on_demand(compose: dict[str, Any]) -> None:
    producer = compose["services"]["producer"]
    assert producer.get("profiles")
    assert command(producer)[2] in mounts(producer)  # the folder it reads is mounted


def test_dockerfile_installs_the_project_on_python_311_slim() -> None:
    text = DOCKERFILE.read_text()
    assert "FROM python:3.11-slim" in text
    assert re.search(r"^RUN pip install [^\n]*\.(\s|$)", text, re.M), "the image must `pip install .` the project"


def _compose_command() -> list[str] | None:
    """`docker compose` (v2 plugin) or `docker-compose` (v1), whichever runs here."""
    candidates = [["docker", "compose"], ["docker-compose"]]
    for candidate in candidates:
        if shutil.which(candidate[0]) is None:
            continue
        probe = subprocess.run([*candidate, "version"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return candidate
    return None


COMPOSE = _compose_command()


@pytest.mark.skipif(COMPOSE is None, reason="neither `docker compose` nor `docker-compose` is installed")
def test_docker_compose_accepts_the_file() -> None:
    """`docker compose config` validates the file offline (no engine needed)."""
    assert COMPOSE is not None
    result = subprocess.run([*COMPOSE, "-f", str(COMPOSE_FILE), "--profile", "producer", "config", "-q"],
                            capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
