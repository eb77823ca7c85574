"""Private Redis servers and Kafka brokers that a test may stop and restart."""

from stream.runner import KafkaBroker, RedisServer

__all__ = ["KafkaBroker", "RedisServer"]
