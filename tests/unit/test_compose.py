"""docker-compose.yml agrees with scripts/services.sh, which starts the same services locally.

No Docker engine is needed: the compose file is parsed with PyYAML and its
settings are compared with what ``scripts/services.sh env`` and
``scripts/services.sh kafka-config`` print.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import yaml

from stream.settings import PREFIX, Settings
from stream.topics import ALL_TOPICS

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "services.sh"
COMPOSE = REPO / "docker-compose.yml"

# Broker settings that differ by design: inside Docker the broker listens on
# all interfaces, has a third listener for the other containers and keeps its
# data in a volume.
DOCKER_SPECIFIC = {
    "listeners",
    "advertised.listeners",
    "listener.security.protocol.map",
    "inter.broker.listener.name",
    "controller.quorum.voters",
    "log.dirs",
}
_DEFAULT = re.compile(r"\$\{(\w+):-([^}]*)\}")


def _script(*args: str) -> str:
    if shutil.which("bash") is None:
        pytest.skip("bash is not installed")
    env = {k: v for k, v in os.environ.items() if not k.startswith(PREFIX) and k != "KAFKA_HOME"}
    done = subprocess.run(
        ["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, f"services.sh {' '.join(args)} failed: {done.stderr}"
    return done.stdout


def _key_values(text: str) -> dict[str, str]:
    pairs = {}
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


def _with_defaults(value: object) -> str:
    """Resolve ``${NAME:-default}`` to its default, as compose does with NAME unset."""
    return _DEFAULT.sub(lambda match: match.group(2), str(value))


def _property_name(variable: str) -> str:
    """Map an apache/kafka image variable (KAFKA_LOG_DIRS) to its property (log.dirs)."""
    name = variable.removeprefix("KAFKA_").lower()
    return (
        name.replace("___", "\0")
        .replace("__", "\1")
        .replace("_", ".")
        .replace("\0", "-")
        .replace("\1", "_")
    )


def _listener_ports(listeners: str) -> dict[str, int]:
    ports = {}
    for listener in listeners.split(","):
        name, _, address = listener.partition("://")
        ports[name] = int(address.rpartition(":")[2])
    return ports


def _published(service: dict[str, Any]) -> list[tuple[str, int, int]]:
    published = []
    for entry in service.get("ports", []):
        parts = _with_defaults(entry).split(":")
        if len(parts) == 2:
            parts.insert(0, "0.0.0.0")
        host, host_port, container_port = parts
        published.append((host, int(host_port), int(container_port)))
    return published


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def script_env() -> dict[str, str]:
    return _key_values(_script("env"))


@pytest.fixture(scope="module")
def script_broker() -> dict[str, str]:
    return _key_values(_script("kafka-config"))


@pytest.fixture(scope="module")
def compose_broker(compose: dict[str, Any]) -> dict[str, str]:
    environment = compose["services"]["kafka"]["environment"]
    return {
        _property_name(name): _with_defaults(value)
        for name, value in environment.items()
        if name.startswith("KAFKA_") and name != "KAFKA_HEAP_OPTS"
    }


def test_compose_has_every_service(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"kafka", "redis", "topics", "worker"}


def test_kafka_image_matches_script_version(
    compose: dict[str, Any], script_env: dict[str, str]
) -> None:
    image = compose["services"]["kafka"]["image"]
    assert image == f"apache/kafka:{script_env['FUSIONREC_KAFKA_VERSION']}"


def test_broker_settings_match_script(
    compose_broker: dict[str, str], script_broker: dict[str, str]
) -> None:
    shared = set(script_broker) - DOCKER_SPECIFIC
    for name in sorted(shared):
        assert name in compose_broker, f"compose sets no KAFKA_ variable for {name}"
        assert compose_broker[name] == script_broker[name], f"{name} differs"


def test_compose_broker_has_no_extra_settings(
    compose_broker: dict[str, str], script_broker: dict[str, str]
) -> None:
    extra = set(compose_broker) - set(script_broker)
    assert extra == set()


def test_script_broker_is_kraft_without_autocreate(script_broker: dict[str, str]) -> None:
    assert script_broker["process.roles"] == "broker,controller"
    assert script_broker["node.id"] == "1"
    assert script_broker["auto.create.topics.enable"] == "false"
    assert script_broker["group.initial.rebalance.delay.ms"] == "0"
    assert script_broker["offsets.topic.replication.factor"] == "1"
    assert script_broker["transaction.state.log.replication.factor"] == "1"
    assert script_broker["transaction.state.log.min.isr"] == "1"


def test_listener_ports_match_script(
    compose_broker: dict[str, str], script_broker: dict[str, str]
) -> None:
    compose_ports = _listener_ports(compose_broker["listeners"])
    script_ports = _listener_ports(script_broker["listeners"])
    assert compose_ports["PLAINTEXT"] == script_ports["PLAINTEXT"]
    assert compose_ports["CONTROLLER"] == script_ports["CONTROLLER"]
    voter_port = int(compose_broker["controller.quorum.voters"].rpartition(":")[2])
    assert voter_port == script_ports["CONTROLLER"]


def test_listener_names_match_script(
    compose_broker: dict[str, str], script_broker: dict[str, str]
) -> None:
    assert compose_broker["controller.listener.names"] == script_broker["controller.listener.names"]
    compose_protocols = compose_broker["listener.security.protocol.map"].split(",")
    for pair in script_broker["listener.security.protocol.map"].split(","):
        assert pair in compose_protocols


def test_advertised_host_listener_matches_bootstrap(
    compose_broker: dict[str, str], script_env: dict[str, str]
) -> None:
    advertised = compose_broker["advertised.listeners"].split(",")
    assert f"PLAINTEXT://{script_env['FUSIONREC_KAFKA_BOOTSTRAP']}" in advertised


def test_inter_broker_listener_is_declared(compose_broker: dict[str, str]) -> None:
    listener = compose_broker["inter.broker.listener.name"]
    assert listener in _listener_ports(compose_broker["listeners"])
    assert listener in _listener_ports(compose_broker["advertised.listeners"])


def test_heap_matches_script(compose: dict[str, Any], script_env: dict[str, str]) -> None:
    heap = script_env["FUSIONREC_KAFKA_HEAP"]
    options = compose["services"]["kafka"]["environment"]["KAFKA_HEAP_OPTS"].split()
    assert f"-Xmx{heap}" in options
    assert f"-Xms{heap}" in options


def test_published_ports_match_script(compose: dict[str, Any], script_env: dict[str, str]) -> None:
    host = script_env["FUSIONREC_SERVICES_HOST"]
    kafka_port = int(script_env["FUSIONREC_KAFKA_PORT"])
    redis_port = int(script_env["FUSIONREC_REDIS_PORT"])
    assert (host, kafka_port, kafka_port) in _published(compose["services"]["kafka"])
    assert (host, redis_port, 6379) in _published(compose["services"]["redis"])


def test_host_ports_follow_script_variables(compose: dict[str, Any]) -> None:
    kafka_ports = " ".join(compose["services"]["kafka"]["ports"])
    redis_ports = " ".join(compose["services"]["redis"]["ports"])
    assert "${FUSIONREC_KAFKA_PORT:-" in kafka_ports
    assert "${FUSIONREC_REDIS_PORT:-" in redis_ports


def test_ports_bind_loopback_only(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for host, _, _ in _published(service):
            assert host == "127.0.0.1", f"service {name} publishes on {host}"


def test_topics_job_creates_topics(compose: dict[str, Any], script_env: dict[str, str]) -> None:
    topics = compose["services"]["topics"]
    assert topics["command"] == ["python", "-m", "stream.topics", "--create"]
    assert topics["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert topics["environment"]["FUSIONREC_PARTITIONS"] == script_env["FUSIONREC_PARTITIONS"]


def test_partitions_match_everywhere(
    compose: dict[str, Any], compose_broker: dict[str, str], script_env: dict[str, str]
) -> None:
    partitions = script_env["FUSIONREC_PARTITIONS"]
    assert compose_broker["num.partitions"] == partitions
    assert compose["services"]["worker"]["environment"]["FUSIONREC_PARTITIONS"] == partitions
    assert str(Settings().partitions) == partitions


def test_worker_runs_from_repository(compose: dict[str, Any]) -> None:
    worker = compose["services"]["worker"]
    assert worker["build"] == "."
    assert worker["command"] == ["fusionrec", "worker"]
    assert worker["depends_on"]["topics"]["condition"] == "service_completed_successfully"
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    assert (REPO / "Dockerfile").is_file()


def test_worker_reaches_services_by_name(compose: dict[str, Any]) -> None:
    environment = compose["services"]["worker"]["environment"]
    docker_port = _listener_ports(compose["services"]["kafka"]["environment"]["KAFKA_LISTENERS"])
    assert environment["FUSIONREC_KAFKA_BOOTSTRAP"] == f"kafka:{docker_port['DOCKER']}"
    assert environment["FUSIONREC_REDIS_URL"] == "redis://redis:6379/0"


def test_compose_variables_are_known_settings(compose: dict[str, Any]) -> None:
    known = {PREFIX + spec.name.upper() for spec in fields(Settings)}
    for name, service in compose["services"].items():
        for variable in service.get("environment", {}):
            if variable.startswith(PREFIX):
                assert variable in known, f"service {name} sets unknown {variable}"


def test_script_defaults_match_settings(script_env: dict[str, str]) -> None:
    defaults = Settings()
    assert script_env["FUSIONREC_KAFKA_BOOTSTRAP"] == defaults.kafka_bootstrap
    assert script_env["FUSIONREC_REDIS_URL"] == defaults.redis_url


def test_topic_names_are_the_contract() -> None:
    assert set(ALL_TOPICS) == {
        "events.view",
        "events.click",
        "events.purchase",
        "events.deadletter",
        "items.updates",
        "users.forget",
    }


def test_script_env_follows_overrides() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(PREFIX)}
    env.update(FUSIONREC_KAFKA_PORT="19092", FUSIONREC_REDIS_PORT="16379")
    done = subprocess.run(
        ["bash", str(SCRIPT), "env"], env=env, capture_output=True, text=True, check=True
    )
    values = _key_values(done.stdout)
    assert values["FUSIONREC_KAFKA_BOOTSTRAP"] == "127.0.0.1:19092"
    assert values["FUSIONREC_REDIS_URL"] == "redis://127.0.0.1:16379/0"


def test_script_rejects_invalid_port() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(PREFIX)}
    env["FUSIONREC_KAFKA_PORT"] = "not-a-port"
    done = subprocess.run(
        ["bash", str(SCRIPT), "env"], env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode != 0
    assert "FUSIONREC_KAFKA_PORT=not-a-port" in done.stderr
