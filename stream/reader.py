"""Read lists from Redis and send forget requests, as a storefront would."""

from __future__ import annotations

import time
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer

from stream.kafka import client_options
from stream.privacy import load_pseudonymizer
from stream.settings import Settings
from stream.sink import redis_client
from stream.topics import FORGET_TOPIC


def list_key(settings: Settings, user_id: str) -> str:
    """Return the Redis key of ``user_id``'s list.

    Raises `SettingsError` when the list is keyed by pseudonym and the
    worker's pseudonym key cannot be read. A missing key is never created.
    """
    if settings.redis_key_by == "pseudonym":
        user_id = load_pseudonymizer(settings)(user_id)
    return f"{settings.redis_key_prefix}user:{user_id}"


async def read_list(settings: Settings, user_id: str, *, popular: bool = False) -> Any:
    """Return the parsed list of ``user_id`` (or ``recs:popular``), or None when absent."""
    key = f"{settings.redis_key_prefix}popular" if popular else list_key(settings, user_id)
    client = redis_client(settings)
    try:
        raw = await client.get(key)
    finally:
        await client.aclose()
    return None if raw is None else orjson.loads(raw)


async def request_forget(settings: Settings, user_id: str) -> None:
    """Produce a forget request for ``user_id`` stamped now, and wait for the broker's ack."""
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap, acks="all", **client_options(settings)
    )
    await producer.start()
    try:
        value = orjson.dumps({"user_id": user_id, "timestamp": int(time.time() * 1000)})
        await producer.send_and_wait(
            settings.topic(FORGET_TOPIC), value=value, key=user_id.encode()
        )
    finally:
        await producer.stop()
