"""The group offset commit of the worker's consumer, against a fake aiokafka consumer."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import CommitFailedError, GroupAuthorizationFailedError, IllegalStateError
from faust.types import TP

from stream.app import Worker
from stream.consumer import HoldingConsumer
from stream.settings import Settings


class _KafkaConsumer:
    """Fake aiokafka consumer of Faust's consumer thread."""

    def __init__(self, assigned: set[TopicPartition], error: Exception | None = None) -> None:
        self.assigned = assigned
        self.error = error
        self.commits: list[dict[TopicPartition, int]] = []

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    async def commit(self, offsets: dict) -> None:
        if self.error is not None:
            raise self.error
        self.commits.append({tp: meta.offset for tp, meta in offsets.items()})


def _consumer(tmp_path, monkeypatch, kafka: _KafkaConsumer) -> HoldingConsumer:
    # The port is never reached, because the fake replaces the client.
    worker = Worker(replace(Settings(), data_dir=str(tmp_path), kafka_bootstrap="127.0.0.1:9"))
    consumer = worker.app.consumer
    assert isinstance(consumer, HoldingConsumer)
    thread = consumer._thread

    async def call_in_place(fun, *args, **kwargs):
        return await fun(*args, **kwargs)

    monkeypatch.setattr(thread, "call_thread", call_in_place)
    monkeypatch.setattr(thread, "_ensure_consumer", lambda: kafka)
    return consumer


def test_commit_skips_unassigned_partitions(tmp_path, monkeypatch):
    kafka = _KafkaConsumer({TopicPartition("events.view", 0)})
    consumer = _consumer(tmp_path, monkeypatch, kafka)

    ok = asyncio.run(consumer.commit_offsets({TP("events.view", 0): 7, TP("events.view", 1): 9}))

    assert ok is True
    assert kafka.commits == [{TopicPartition("events.view", 0): 7}]


@pytest.mark.parametrize("error", [CommitFailedError(), IllegalStateError("not assigned")])
def test_rebalance_error_returns_false(tmp_path, monkeypatch, error):
    kafka = _KafkaConsumer({TopicPartition("events.view", 0)}, error)
    consumer = _consumer(tmp_path, monkeypatch, kafka)

    assert asyncio.run(consumer.commit_offsets({TP("events.view", 0): 7})) is False


def test_revoked_partitions_return_false(tmp_path, monkeypatch):
    kafka = _KafkaConsumer(set())
    consumer = _consumer(tmp_path, monkeypatch, kafka)

    assert asyncio.run(consumer.commit_offsets({TP("events.view", 0): 7})) is False
    assert kafka.commits == []


def test_other_error_raised_without_crash(tmp_path, monkeypatch):
    kafka = _KafkaConsumer({TopicPartition("events.view", 0)}, GroupAuthorizationFailedError())
    consumer = _consumer(tmp_path, monkeypatch, kafka)

    with pytest.raises(GroupAuthorizationFailedError):
        asyncio.run(consumer.commit_offsets({TP("events.view", 0): 7}))
    assert consumer.app.crash_reason is None
    assert consumer._thread.crash_reason is None
