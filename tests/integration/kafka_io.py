"""Produce to and read from the real broker in tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from schemas import Event
from stream.settings import Settings
from stream.topics import EVENT_TOPICS


async def produce_events(settings: Settings, events: Iterable[Event]) -> int:
    """Produce events to their topics keyed by user id; return how many."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await producer.start()
    count = 0
    try:
        for event in events:
            topic = settings.topic(EVENT_TOPICS[event.type])
            await producer.send(
                topic, key=event.user_id.encode(), value=orjson.dumps(event.to_json())
            )
            count += 1
        await producer.flush()
    finally:
        await producer.stop()
    return count


async def produce_raw(
    settings: Settings, records: Iterable[tuple[str, bytes | None, bytes | None]]
) -> None:
    """Produce (topic name without prefix, key, value) records as they are."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        for name, key, value in records:
            await producer.send(settings.topic(name), key=key, value=value)
        await producer.flush()
    finally:
        await producer.stop()


async def read_topic(settings: Settings, name: str, expected: int, timeout_s: float = 60.0) -> list:
    """Read records of a topic from the start until ``expected`` arrived or time ran out."""
    consumer = AIOKafkaConsumer(
        settings.topic(name),
        bootstrap_servers=settings.kafka_bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
    )
    await consumer.start()
    records = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(records) < expected and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for items in batch.values():
                records.extend(items)
        await asyncio.sleep(0)
    finally:
        await consumer.stop()
    return records


async def committed_offsets(settings: Settings, name: str) -> dict[int, int | None]:
    """Return the consumer group's committed offset of each partition of a topic.

    Assumes the topic has ``settings.partitions`` partitions, the count that
    `stream.topics.create_topics` creates. The consumer reads the offsets
    without joining the group, so it takes no partition from its members.
    """
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=settings.app_id,
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        tps = [TopicPartition(settings.topic(name), p) for p in range(settings.partitions)]
        consumer.assign(tps)
        return {tp.partition: await consumer.committed(tp) for tp in tps}
    finally:
        await consumer.stop()
