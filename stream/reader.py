"""Read lists from Redis and send forget requests, as a storefront would."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from jsonschema.exceptions import best_match

from schemas import validator
from stream.kafka import CONNECT_TIMEOUT_S, client_options
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


class ListFormatError(ValueError):
    """A value in Redis that is not a list in the shape that the worker writes."""


async def read_list(settings: Settings, user_id: str, *, popular: bool = False) -> Any:
    """Return the parsed list of ``user_id`` (or ``recs:popular``), or None when absent.

    Raises `ListFormatError` when the value of the key is not a list as
    recommendations.schema.json describes it.
    """
    key = f"{settings.redis_key_prefix}popular" if popular else list_key(settings, user_id)
    client = redis_client(settings)
    try:
        raw = await client.get(key)
    finally:
        await client.aclose()
    if raw is None:
        return None
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        msg = f"the value of {key} is not JSON ({exc}); expected a list that the worker wrote"
        raise ListFormatError(msg) from exc
    error = best_match(validator("recommendations.schema.json").iter_errors(value))
    if error is not None:
        where = "/".join(str(part) for part in error.absolute_path) or "the value"
        msg = (
            f"the value of {key} is not a list that the worker writes: at {where}, {error.message}"
        )
        raise ListFormatError(msg)
    return value


class ForgetError(RuntimeError):
    """Failure to deliver a forget request: no broker was reached, or it rejected the request."""


async def request_forget(settings: Settings, user_id: str) -> None:
    """Produce a forget request for ``user_id`` stamped now, and wait for the broker's ack.

    Raises
    ------
    ForgetError
        If no broker can be reached within `CONNECT_TIMEOUT_S`, or the
        broker does not take the request.

    """
    bootstrap = settings.kafka_bootstrap
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", **client_options(settings))
    try:
        await asyncio.wait_for(producer.start(), CONNECT_TIMEOUT_S)
    except (KafkaError, OSError, TimeoutError) as exc:
        await producer.stop()
        msg = (
            f"cannot connect to Kafka at {bootstrap}: {exc!r}; start the broker "
            "(make services-up) or set FUSIONREC_KAFKA_BOOTSTRAP"
        )
        raise ForgetError(msg) from exc
    topic = settings.topic(FORGET_TOPIC)
    try:
        value = orjson.dumps({"user_id": user_id, "timestamp": int(time.time() * 1000)})
        await producer.send_and_wait(topic, value=value, key=user_id.encode())
    except (KafkaError, OSError, TimeoutError) as exc:
        msg = (
            f"Kafka at {bootstrap} did not take the forget request on {topic}: {exc!r}; "
            "check that the topic exists (fusionrec topics --create)"
        )
        raise ForgetError(msg) from exc
    finally:
        await producer.stop()
