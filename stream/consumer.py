"""Faust's Kafka consumer, with partitions that stay paused until the worker releases them."""

from __future__ import annotations

from collections.abc import Iterable

from faust.transport.drivers.aiokafka import Consumer
from faust.types import TP


class HoldingConsumer(Consumer):
    """Faust's aiokafka consumer that keeps held partitions paused.

    Faust resumes every assigned partition right after the rebalance hooks
    and seeks it to the group's committed offset, so a partition paused in
    a hook would still be read from there. Held partitions are left out of
    every resume until `release`, and a revoked partition is no longer held.
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.held: set[TP] = set()

    def hold(self, tps: Iterable[TP]) -> None:
        """Pause fetching from ``tps`` until `release` is called for them."""
        partitions = set(tps)
        self.held.update(partitions)
        self.pause_partitions(partitions)

    def release(self, tps: Iterable[TP]) -> None:
        """Stop holding ``tps`` and resume fetching from them."""
        partitions = set(tps)
        self.held.difference_update(partitions)
        self.resume_partitions(partitions)

    def resume_partitions(self, tps: Iterable[TP]) -> None:
        """Resume fetching from the partitions of ``tps`` that are not held."""
        super().resume_partitions({tp for tp in tps if tp not in self.held})

    def on_buffer_drop(self, tp: TP) -> None:
        """Make ``tp`` active again once its stream buffer has room, unless it is held."""
        if tp not in self.held:
            super().on_buffer_drop(tp)

    async def on_partitions_revoked(self, revoked: set[TP]) -> None:
        """Drop revoked partitions from the held ones, then let Faust revoke them."""
        self.held.difference_update(revoked)
        await super().on_partitions_revoked(revoked)
