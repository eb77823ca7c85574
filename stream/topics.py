"""Names of the Kafka topics and their explicit creation.

Faust creates its internal topics with the app's partition count. Source
topics that a broker auto-creates with another count make table writes fail,
so every topic is created up front with the same count.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from stream.kafka import CONNECT_TIMEOUT_S, client_options
from stream.logs import configure_logging
from stream.settings import Service, Settings

logger = logging.getLogger("stream.topics")

EVENT_TOPICS = {"view": "events.view", "click": "events.click", "purchase": "events.purchase"}
DEADLETTER_TOPIC = "events.deadletter"
ITEMS_TOPIC = "items.updates"
FORGET_TOPIC = "users.forget"
ALL_TOPICS = (*EVENT_TOPICS.values(), DEADLETTER_TOPIC, ITEMS_TOPIC, FORGET_TOPIC)


async def create_topics(settings: Settings, timeout_s: float = 60.0) -> list[str]:
    """Create every topic of the project that does not exist yet; return those created."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.kafka_bootstrap, **client_options(settings)
    )
    try:
        await asyncio.wait_for(admin.start(), timeout_s)
    except BaseException:
        await admin.close()
        raise
    try:
        existing = set(await admin.list_topics())
        wanted = [settings.topic(name) for name in ALL_TOPICS]
        missing = [name for name in wanted if name not in existing]
        if missing:
            new = [NewTopic(name, settings.partitions, 1) for name in missing]
            try:
                await admin.create_topics(new, timeout_ms=int(timeout_s * 1000))
            except TopicAlreadyExistsError:
                logger.info("topics were created concurrently by another process")
        for name in missing:
            logger.info("created topic %s with %d partitions", name, settings.partitions)
        return missing
    finally:
        await admin.close()


async def topic_partitions(settings: Settings, names: list[str]) -> dict[str, list[int]]:
    """Return the partition numbers of each existing topic in ``names``."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.kafka_bootstrap, **client_options(settings)
    )
    await admin.start()
    try:
        described = await admin.describe_topics(names)
    finally:
        await admin.close()
    out: dict[str, list[int]] = {}
    for topic in described:
        if topic["error_code"] == 0:
            out[topic["topic"]] = sorted(p["partition"] for p in topic["partitions"])
    return out


def main(argv: list[str] | None = None) -> int:
    """Create the project's topics: ``python -m stream.topics --create``."""
    parser = argparse.ArgumentParser(prog="python -m stream.topics", description=main.__doc__)
    parser.add_argument("--create", action="store_true", help="create missing topics")
    parser.add_argument("--list", action="store_true", help="print the topic names")
    args = parser.parse_args(argv)
    logging_settings = Settings.from_env(services=Service.NONE)
    configure_logging(logging_settings.log_level, logging_settings.log_format)
    return run(create=args.create, list_names=args.list or not args.create)


def run(*, create: bool, list_names: bool) -> int:
    """Print the topic names, create the missing topics, or both, and return the exit code.

    The caller configures logging, so that ``fusionrec --log-level`` and
    FUSIONREC_LOG_FORMAT apply to the lines logged here.
    """
    settings = Settings.from_env(services=Service.KAFKA if create else Service.NONE)
    if list_names:
        for name in ALL_TOPICS:
            print(settings.topic(name))
    if create:
        try:
            created = asyncio.run(create_topics(settings, timeout_s=CONNECT_TIMEOUT_S))
        except (KafkaError, OSError, TimeoutError) as exc:
            print(
                f"fusionrec topics: cannot create the topics on Kafka at "
                f"{settings.kafka_bootstrap}: {exc!r}; start the broker (make services-up) "
                "or set FUSIONREC_KAFKA_BOOTSTRAP",
                file=sys.stderr,
            )
            return 1
        print(f"created {len(created)} topic(s); {len(ALL_TOPICS) - len(created)} existed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
