"""Faust's Kafka consumer, with partitions that stay paused until the worker releases them."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from aiokafka import TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError
from aiokafka.structs import OffsetAndMetadata
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

    async def commit_offsets(self, offsets: Mapping[TP, int]) -> bool:
        """Commit ``offsets`` for the group, and return False when a rebalance prevented it.

        Faust's own commit crashes the whole app on any other error, and so
        stops the worker over a commit that the next checkpoint repeats.
        This method raises those errors to the caller instead. The commit
        runs in Faust's consumer thread, because the aiokafka consumer
        belongs to that thread's event loop.
        """
        thread = self._thread

        async def commit() -> bool:
            consumer = thread._ensure_consumer()
            assigned = consumer.assignment()
            batch = {
                partition: OffsetAndMetadata(offset, "")
                for tp, offset in offsets.items()
                if (partition := TopicPartition(tp.topic, tp.partition)) in assigned
            }
            if not batch:
                return False
            try:
                await consumer.commit(batch)
            except (CommitFailedError, IllegalStateError):
                # aiokafka raises CommitFailedError only when the group has a
                # new generation, and IllegalStateError for a partition that
                # was revoked after the check above.
                return False
            return True

        result: bool = await thread.call_thread(commit)
        return result

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
