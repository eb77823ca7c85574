"""Fixtures that give each integration test its own topics, group, keys and folder."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from stream.runner import WorkerProcess, free_port
from stream.settings import Settings
from stream.topics import create_topics

pytestmark = pytest.mark.integration


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(autouse=True)
def _stop_leftover_workers() -> Iterator[None]:
    yield
    for worker in list(WorkerProcess.running):
        worker.kill()


@pytest.fixture
def run_settings(kafka_bootstrap: str, redis_url: str, tmp_path: Path) -> Iterator[Settings]:
    """Settings of an isolated run: topic prefix, consumer group, Redis prefix, data folder."""
    run_id = f"t{uuid.uuid4().hex[:10]}"
    settings = replace(
        Settings(),
        kafka_bootstrap=kafka_bootstrap,
        redis_url=redis_url,
        app_id=f"fusionrec-{run_id}",
        topic_prefix=f"{run_id}.",
        redis_key_prefix=f"{run_id}:recs:",
        data_dir=str(tmp_path / "var"),
        web_port=free_port(),
        partitions=4,
        checkpoint_interval_s=2.0,
        consumer_session_timeout_s=6.0,
        consumer_heartbeat_s=1.0,
        pseudonym_key="00" * 32,
    )
    asyncio.run(create_topics(settings))
    yield settings
    asyncio.run(_cleanup(settings))


async def _cleanup(settings: Settings) -> None:
    from aiokafka.admin import AIOKafkaAdminClient

    from stream.sink import redis_client
    from stream.topics import ALL_TOPICS

    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        await admin.delete_topics([settings.topic(name) for name in ALL_TOPICS])
    except Exception:  # noqa: BLE001 - cleanup of a test run must not hide its result
        pass
    finally:
        await admin.close()
    client = redis_client(settings)
    try:
        async for key in client.scan_iter(f"{settings.redis_key_prefix}*", count=1000):
            await client.delete(key)
    finally:
        await client.aclose()
