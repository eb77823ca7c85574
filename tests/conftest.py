"""Shared fixtures: service discovery for integration tests and data-set paths."""

from __future__ import annotations

import os
import socket

import pytest


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def _require(name: str, address: str) -> str:
    host, _, port = address.rpartition(":")
    if _reachable(host, int(port)):
        return address
    reason = f"{name} is not reachable at {address}; start it with `make services-up`"
    if os.environ.get("FUSIONREC_REQUIRE_SERVICES") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    """Address of the real Kafka broker started by scripts/services.sh."""
    return _require("Kafka", os.environ.get("FUSIONREC_KAFKA_BOOTSTRAP", "127.0.0.1:9092"))


@pytest.fixture(scope="session")
def redis_url() -> str:
    """URL of the real Redis server started by scripts/services.sh."""
    url = os.environ.get("FUSIONREC_REDIS_URL", "redis://127.0.0.1:6379/0")
    address = url.split("://", 1)[1].split("/", 1)[0].rpartition("@")[2]
    _require("Redis", address)
    return url
