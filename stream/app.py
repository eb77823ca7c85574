"""The Faust worker: agents on the event, item and forget topics.

Offsets and state move together. The worker never lets Faust commit offsets
on its own, because every source topic is declared with ``acks=False``.
Instead it commits the offsets a checkpoint covers once that checkpoint is on
disk. So the committed offsets are never ahead of the newest checkpoint, a
restart resumes where the restored state ends, and messages between the
committed offsets and the checkpoint's are skipped by offset. Before Faust
joins the group, the committed offsets are aligned with the restored
checkpoint, which covers the fall-back to an older checkpoint.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import pickle
import re
import shutil
import signal
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import faust
import numpy as np
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.client import AIOKafkaClient
from aiokafka.errors import KafkaError, MessageSizeTooLargeError
from faust.types import TP
from faust.web import Request, Response, View
from redis.exceptions import RedisError

from schemas import RecommendationList
from stream.checkpoint import CheckpointStore, format_error
from stream.consumer import HoldingConsumer
from stream.kafka import client_options, ssl_context
from stream.metrics import WorkerMetrics
from stream.privacy import Sealer, load_pseudonymizer
from stream.processor import BatchOutcome, Message, Processor
from stream.served import ServedLists
from stream.settings import Settings
from stream.sink import RedisSink
from stream.topics import (
    DEADLETTER_TOPIC,
    EVENT_TOPICS,
    FORGET_TOPIC,
    ITEMS_TOPIC,
    topic_partitions,
)

logger = logging.getLogger(__name__)

_POPULAR_EVERY_S = 5.0
_BROKER_PROBE_EVERY_S = 5.0
_BROKER_PROBE_TIMEOUT_S = 2.0
# The time that one refresh batch may hold the event loop, and the fewest
# users that a batch takes when lists are slower than that to compute.
_REFRESH_SLICE_S = 0.1
_REFRESH_MIN_USERS = 8
_COMMIT_TIMEOUT_S = 10.0
# Time limit of the broker calls of the rebalance hook, which Faust waits for,
# and the pause between its tries while the broker cannot be reached.
_ALIGN_TIMEOUT_S = 30.0
_ALIGN_RETRY_S = 1.0
# Maximum pause between tries of the background alignment of paused partitions.
_ALIGN_RETRY_MAX_S = 30.0
# How long one round of dead-letter delivery waits for the broker, and the
# longest pause between rounds after a failure.
_DEAD_LETTER_TIMEOUT_S = 10.0
_LETTER_RETRY_MAX_S = 30.0
# How long a stopping worker tries to deliver dead letters before its final
# checkpoint takes the rest along.
_FINAL_DELIVERY_S = 5.0
# A dead letter owed for longer makes the worker not ready: the topic may be
# missing, or the worker not allowed to write to it.
_LETTERS_OWED_MAX_S = 30.0
# At this many letters owed, the worker takes no more messages until the
# broker takes some: the messages wait in Kafka, not in memory and checkpoints.
_MAX_LETTERS_OWED = 10_000


# The field of the forget registry that contains the check value of the key
# its tokens were derived with. Tokens are hex, so no token has this name.
_REGISTRY_CHECK_FIELD = "key-check"
# How often the worker checks whether Redis restarted and so may have lost
# the lists it wrote.
_RESTART_CHECK_S = 5.0
# The maximum pause between two tries of writing the forget registry.
_REGISTRY_RETRY_MAX_S = 30.0


class RegistryKeyError(RuntimeError):
    """The forget registry in Redis was written with another pseudonym key."""


class GroupBusyError(RuntimeError):
    """Another member kept the consumer group busy for longer than a worker waits at start."""


class BrokerUnreachableError(RuntimeError):
    """No bootstrap broker replied for as long as a worker waits at start."""


# How long a starting worker waits for its broker, as when both start together.
_START_WAIT_S = 60.0


# The note that replaces the payload of a dead letter larger than the
# producer's request limit, and the lengths of detail and key it keeps then.
_PAYLOAD_LEFT_OUT = "<left out: the letter was larger than the producer takes>"
_SHRUNK_DETAIL_CHARS = 512
_SHRUNK_KEY_BYTES = 256


@dataclass(slots=True)
class _Letter:
    """A dead letter on its way to the broker."""

    key: bytes | None
    value: bytes
    # Wall-clock time when the letter was first queued, kept over restarts.
    queued_at: float
    delivery: asyncio.Future[Any] | None = None


def _too_large(error: BaseException) -> bool:
    """Tell whether ``error``, or an error that caused it, reports a message as too large."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, MessageSizeTooLargeError):
            return True
        seen = seen.__cause__
    return False


def _partition_names(tps: list[TopicPartition]) -> str:
    """Return the partitions as ``topic[partition]``, sorted, for a log line."""
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(tps))


class Worker:
    """One worker process: the processor, its Redis sink, checkpoints and the Faust app."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = WorkerMetrics()
        (settings.data_path / "faust").mkdir(parents=True, exist_ok=True)
        pseudonymizer = load_pseudonymizer(settings, create=True)
        self.sealer = Sealer(pseudonymizer.derive_key("pending-lists"))
        self.processor = Processor(settings, pseudonymizer, self.metrics)
        self.processor.on_erase = self.forget_dead_letters
        self.store = CheckpointStore(
            settings.data_path / "checkpoints",
            pseudonymizer.derive_key("checkpoint"),
            keep=settings.checkpoints_kept,
        )
        self.sink: RedisSink | None = None
        # Users whose list must be recomputed: pseudonym to the shop's user id.
        self.dirty: dict[str, str] = {}
        # Users whose list was cut short by sold-out items, or that a restored
        # checkpoint owes to Redis: pseudonym to Redis key.
        self._short: dict[str, str] = {}
        # The users of `_short` that a restored checkpoint owes, whose lists
        # may never have reached Redis and so get a plain write.
        self._owed: set[str] = set()
        self.served = ServedLists(settings.k + settings.spare_items)
        # Dead letters that the broker has not confirmed, by sequence number,
        # oldest first. Checkpoints carry them, so none is lost in a crash.
        self.dead_letters: dict[int, _Letter] = {}
        self._letter_seq = 0
        self._dead_letter_lock: asyncio.Lock | None = None
        self._letters_wakeup: asyncio.Event | None = None
        self.assigned: set[TP] = set()
        # Partitions of the source topics, once the consumer has their metadata.
        self.partitions_total: int | None = None
        self.last_checkpoint = time.monotonic()
        self._last_popular = 0.0
        self._changed_since_checkpoint = False
        self._lock: asyncio.Lock | None = None
        self._sink_task: asyncio.Task[None] | None = None
        self._background: list[asyncio.Task[Any]] = []
        self._refresh_wakeup: asyncio.Event | None = None
        self._stopping = False
        # Whether the final checkpoint failed, which makes the process exit with 1.
        self.checkpoint_failed = False
        # Why the worker stopped itself, which makes the process exit with 2.
        self.fatal_error: str | None = None
        # Set when applying a batch failed part way: the state may hold part
        # of it, so no checkpoint is written and no later batch is applied.
        self.state_suspect = False
        # Whether the last checkpoint write failed, and when the next may be tried.
        self.checkpoint_failing = False
        self._checkpoint_retry_at = 0.0
        # Set while a forget request's checkpoint has not deleted the older files.
        self._prune_owed = False
        # Forget tokens that the registry in Redis still lacks, with their times.
        self._registry_owed: dict[str, int] = {}
        self._registry_merged = False
        # When the timer may try the registry again, and the pause after that.
        self._registry_retry_at = 0.0
        self._registry_pause_s = 1.0
        # Whether the served-list index has been rebuilt from Redis since start.
        self.served_ready = False
        # The run id of the Redis server that the lists were written to, which
        # changes when the server restarts; None until first read.
        self._redis_run_id: str | None = None
        # Set when Redis restarted until a scan has deleted the lists of
        # forgotten users that an older snapshot brought back.
        self._forgotten_scan_owed = False
        self._restart_checked = 0.0
        self._restart_check: asyncio.Task[bool] | None = None
        # Whether a bootstrap broker replied to a metadata request at the last probe.
        self.broker_reachable = True
        # The end offset of each assigned partition at the last broker probe.
        self._probed_ends: dict[tuple[str, int], int] = {}
        self._interval_checkpoint: asyncio.Task[None] | None = None
        # Aligns, seeks and resumes partitions held paused after a rebalance.
        self._align_retry: asyncio.Task[None] | None = None
        self.app = self._build_app()

    # -- startup ------------------------------------------------------------

    def restore(self) -> bool:
        """Load the newest valid checkpoint; return False when there is none."""
        restored = self.store.restore()
        if restored is None:
            logger.info("no checkpoint in %s; starting from empty state", self.store.folder)
            return False
        state, path = restored
        # Letters first, so that users erased while the state loads lose theirs.
        self._load_dead_letters(state.get("dead_letters"))
        try:
            erased = self.processor.load_state(state)
        except Exception as exc:  # noqa: BLE001 - the file is intact, so its format is at fault
            raise format_error(path, exc) from exc
        if erased:
            self._owe_pruned_checkpoint()
        self._drop_letters_of_forgotten()
        owed = self._load_pending(state.get("pending_lists"))
        self.last_checkpoint = time.monotonic()
        logger.info(
            "checkpoint restored from %s: %d partitions, %d events applied so far",
            path.name,
            len(self.processor.offsets),
            self.processor.counts.get("applied", 0),
            extra={"event": "checkpoint_restored", "checkpoint": path.name, "lists_owed": owed},
        )
        return True

    def _pending_keys(self) -> list[str]:
        # Every list the checkpoint's state owes Redis: users still to be
        # recomputed, and lists computed but not yet written.
        keys = set(self._short.values())
        for pseudonym, user_id in self.dirty.items():
            if user_id:
                keys.add(self.processor.redis_key(user_id, pseudonym))
        if self.sink is not None:
            # A batch in flight may still fail, and this checkpoint commits
            # the offsets of the events behind it.
            keys.update(self.sink.owed_keys())
        keys.discard(self.processor.popular_key)
        return sorted(keys)

    def _load_pending(self, sealed: bytes | None) -> int:
        if not sealed:
            return 0
        keys = orjson.loads(self.sealer.open(sealed))
        prefix = f"{self.settings.redis_key_prefix}user:"
        by_pseudonym = self.settings.redis_key_by == "pseudonym"
        for key in keys:
            ident = key[len(prefix) :]
            pseudonym = ident if by_pseudonym else self.processor.pseudonymize(ident)
            self.dirty.setdefault(pseudonym, "")
            self._short[pseudonym] = key
            self._owed.add(pseudonym)
        return len(keys)

    def _load_dead_letters(self, sealed: bytes | None) -> None:
        # States saved before checkpoints carried dead letters have none, and
        # the first states that carried them kept no queue times.
        if not sealed:
            return
        entries = pickle.loads(self.sealer.open(sealed))
        now = time.time()
        self.queue_dead_letters(
            [(entry[0], entry[1]) for entry in entries],
            [entry[2] if len(entry) > 2 else now for entry in entries],
        )

    async def _wait_for_topics(self, wait_s: float = _START_WAIT_S) -> dict[str, list[int]]:
        """Return the partitions of the source topics, waiting up to ``wait_s`` for a broker."""
        deadline = time.monotonic() + wait_s
        pause_s = 1.0
        while True:
            try:
                return await topic_partitions(self.settings, self._source_topics())
            except (KafkaError, OSError) as exc:
                remaining_s = deadline - time.monotonic()
                if remaining_s <= 0:
                    msg = (
                        f"no Kafka broker at {self.settings.kafka_bootstrap} replied within "
                        f"{wait_s:.0f} s ({exc!r}); start the broker, or set "
                        "FUSIONREC_KAFKA_BOOTSTRAP to its address"
                    )
                    raise BrokerUnreachableError(msg) from exc
                pause_s = min(pause_s, remaining_s)
                logger.warning(
                    "Kafka at %s not reachable yet (%r); trying again in %.0f s",
                    self.settings.kafka_bootstrap,
                    exc,
                    pause_s,
                )
                await asyncio.sleep(pause_s)
                pause_s = min(2 * pause_s, 10.0)

    async def align_committed_offsets(self, timeout_s: float | None = None) -> None:
        """Commit the restored offsets for the group before Faust joins it.

        Without a checkpoint the group starts from the earliest retained
        offsets, so the models are rebuilt from what Kafka still holds.
        """
        settings = self.settings
        waited_s = (
            timeout_s if timeout_s is not None else 2 * settings.consumer_session_timeout_s + 30
        )
        deadline = time.monotonic() + waited_s
        layout = await self._wait_for_topics()
        tps = [TopicPartition(name, p) for name, parts in layout.items() for p in parts]
        if not tps:
            logger.warning("no source topic exists; create them with `fusionrec topics --create`")
            return
        consumer = self._offsets_consumer()
        await consumer.start()
        try:
            target, committed = await self._resume_offsets(consumer, tps)
            changes = {tp: offset for tp, offset in target.items() if committed[tp] != offset}
            if not changes:
                return
            while True:
                try:
                    await consumer.commit(changes)
                    break
                except KafkaError as exc:
                    # A member that died without leaving keeps the group busy
                    # until its session times out; a running worker keeps it busy.
                    if time.monotonic() > deadline:
                        msg = (
                            f"consumer group {settings.app_id} still has another member "
                            f"after {waited_s:.0f} s ({exc!r}): another worker with this "
                            "FUSIONREC_APP_ID is running, and fusionrec runs one worker per "
                            "app id; stop it or give this worker its own FUSIONREC_APP_ID"
                        )
                        raise GroupBusyError(msg) from exc
                    logger.info(
                        "waiting for consumer group %s: another member keeps it busy until it "
                        "leaves or its session times out (%r)",
                        settings.app_id,
                        exc,
                    )
                    await asyncio.sleep(1.0)
            logger.info("aligned committed offsets of %d partitions to the state", len(changes))
        finally:
            await consumer.stop()

    def _offsets_consumer(self) -> AIOKafkaConsumer:
        """Build a consumer of the group that reads and commits offsets, and joins nothing."""
        return AIOKafkaConsumer(
            bootstrap_servers=self.settings.kafka_bootstrap,
            group_id=self.settings.app_id,
            enable_auto_commit=False,
            **client_options(self.settings),
        )

    async def _resume_offsets(
        self, consumer: AIOKafkaConsumer, tps: list[TopicPartition]
    ) -> tuple[dict[TopicPartition, int], dict[TopicPartition, int | None]]:
        """Return the offsets the state resumes at and the group's committed offsets."""
        beginnings, ends, committed = await self._read_offsets(consumer, tps)
        return self._target_offsets(beginnings, ends), committed

    async def _read_offsets(
        self, consumer: AIOKafkaConsumer, tps: list[TopicPartition]
    ) -> tuple[
        dict[TopicPartition, int], dict[TopicPartition, int], dict[TopicPartition, int | None]
    ]:
        """Return the beginning, end and committed offsets of ``tps`` from the broker."""
        beginnings = await consumer.beginning_offsets(tps)
        ends = await consumer.end_offsets(tps)
        consumer.assign(tps)
        # One request per partition, sent together so that many partitions
        # fit in the rebalance hook's time limit.
        values = await asyncio.gather(*(consumer.committed(tp) for tp in tps))
        return beginnings, ends, dict(zip(tps, values, strict=True))

    def _target_offsets(
        self, beginnings: dict[TopicPartition, int], ends: dict[TopicPartition, int]
    ) -> dict[TopicPartition, int]:
        """Return the offset where the state resumes each partition of ``beginnings``."""
        self._drop_offsets_past_end(beginnings, ends)
        return {
            tp: max(self.processor.offsets.get((tp.topic, tp.partition), 0), start)
            for tp, start in beginnings.items()
        }

    async def align_assigned_offsets(self, assigned: set[TP]) -> None:
        """Move committed offsets that are ahead of the state back, before Faust seeks to them.

        Another worker of the group may have held these partitions and
        committed offsets past the events this worker's state lacks. Faust
        seeks each assigned partition to its committed offset right after
        its rebalance-complete signal, which calls this, so the worker
        reads those events again. Broker errors are retried for up to
        _ALIGN_TIMEOUT_S. After a last error, a timeout or a failed commit,
        the source partitions are held paused and a background task aligns,
        seeks and resumes them once the broker replies. No error reaches
        Faust, whose recovery task it would end.
        """
        await self.stop_offset_alignment()
        consumer = self._consumer()
        # Partitions that another member took over are not this worker's to resume.
        consumer.held.intersection_update(assigned)
        sources = set(self._source_topics())
        tps = [TopicPartition(tp.topic, tp.partition) for tp in assigned if tp.topic in sources]
        if not tps:
            return
        if await self._align_before_seek(tps):
            consumer.release(set(consumer.held))
            return
        consumer.hold(TP(tp.topic, tp.partition) for tp in tps)
        self._align_retry = asyncio.create_task(
            self._retry_alignment(tps, self.app.consumer_generation_id),
            name="fusionrec-offset-align",
        )
        self._align_retry.add_done_callback(self._log_task_failure)

    async def stop_offset_alignment(self) -> None:
        """Cancel the background alignment of held partitions and wait until it has ended."""
        task, self._align_retry = self._align_retry, None
        if task is None or task.done():
            return
        task.cancel()
        await asyncio.wait([task])

    def _consumer(self) -> HoldingConsumer:
        consumer = self.app.consumer
        assert isinstance(consumer, HoldingConsumer)
        return consumer

    async def _align_before_seek(self, tps: list[TopicPartition]) -> bool:
        """Move committed offsets of ``tps`` back to the state's, and return whether it is done."""
        # The broker reads happen outside the lock, so that a broker that
        # does not reply holds up no checkpoint, and a stop still writes its own.
        deadline = time.monotonic() + _ALIGN_TIMEOUT_S
        while True:
            try:
                beginnings, ends, committed = await asyncio.wait_for(
                    self._read_assigned_offsets(tps), deadline - time.monotonic()
                )
                break
            except TimeoutError as exc:
                self._report_unaligned(tps, exc)
                return False
            except (KafkaError, OSError) as exc:
                if time.monotonic() + _ALIGN_RETRY_S >= deadline:
                    self._report_unaligned(tps, exc)
                    return False
                logger.info("reading the group's committed offsets failed, retrying: %r", exc)
                await asyncio.sleep(_ALIGN_RETRY_S)
        async with self.lock:
            target = self._target_offsets(beginnings, ends)
        return await self._commit_moved_back(target, committed)

    async def _commit_moved_back(
        self, target: dict[TopicPartition, int], committed: dict[TopicPartition, int | None]
    ) -> bool:
        """Commit ``target`` where ``committed`` is ahead, and return whether that succeeded."""
        # Only offsets ahead of the state move, because a running worker's
        # state is ahead of its own commits until the next checkpoint.
        changes = {tp: offset for tp, offset in target.items() if (committed[tp] or 0) > offset}
        if not changes:
            return True
        try:
            moved = await asyncio.wait_for(
                self._consumer().commit_offsets(
                    {TP(tp.topic, tp.partition): offset for tp, offset in changes.items()}
                ),
                _ALIGN_TIMEOUT_S,
            )
            reason = "the group is rebalancing again"
        except TimeoutError:
            moved = False
            reason = f"the commit timed out after {_ALIGN_TIMEOUT_S:.0f} s"
        except KafkaError as exc:
            moved = False
            reason = f"the commit failed: {exc!r}"
        if not moved:
            self.metrics.errors.labels(kind="offset_commit").inc()
            logger.error(
                "committed offsets of %d assigned partitions are ahead of the state's and "
                "were not moved back (%s), so the partitions stay paused until they are",
                len(changes),
                reason,
            )
            return False
        logger.warning(
            "committed offsets of %d assigned partitions were ahead of the state's, as "
            "after another worker of the group held them, so they are read from the state's",
            len(changes),
        )
        return True

    async def _retry_alignment(self, tps: list[TopicPartition], generation: int) -> None:
        """Align the held partitions once the broker replies, then seek and resume them.

        A new rebalance or a stop cancels this task, and the rebalance hook
        starts over for the new assignment.
        """
        delay_s = _ALIGN_RETRY_S
        tries = 0
        while True:
            await asyncio.sleep(delay_s)
            tries += 1
            try:
                target = await self._align_held(tps)
            except (KafkaError, OSError, TimeoutError) as exc:
                target = None
                logger.warning(
                    "reading the committed offsets of %d paused partitions (%s) failed at "
                    "try %d (%r). Trying again in %.0f s",
                    len(tps),
                    _partition_names(tps),
                    tries,
                    exc,
                    min(2 * delay_s, _ALIGN_RETRY_MAX_S),
                )
            if target is not None:
                break
            delay_s = min(2 * delay_s, _ALIGN_RETRY_MAX_S)
        # Faust seeks every assigned partition to its committed offset before
        # it ends the rebalance, and that seek must not land after this one.
        # NOTE: when Faust's own seek times out, its recovery task ends
        # without ending the rebalance (faust-streaming 0.15.3), and these
        # partitions stay paused along with the stopped flow of the others.
        while self.app.rebalancing:
            await asyncio.sleep(0.1)
        if self.app.consumer_generation_id != generation:
            # The hook of the new rebalance aligns the new assignment again.
            logger.info(
                "alignment of %d paused partitions dropped: the group rebalanced again",
                len(tps),
            )
            return
        consumer = self._consumer()
        assignment = consumer.assignment()
        resumed = set()
        for tp, offset in target.items():
            faust_tp = TP(tp.topic, tp.partition)
            if faust_tp in consumer.held and faust_tp in assignment:
                # Faust's seek also moves its read offset, below which it drops messages.
                await consumer.seek(faust_tp, offset)
                resumed.add(faust_tp)
        consumer.release(resumed)
        logger.info(
            "%d paused partitions resumed at the state's offsets after %d tries",
            len(resumed),
            tries,
        )

    async def _align_held(self, tps: list[TopicPartition]) -> dict[TopicPartition, int] | None:
        """Move committed offsets of ``tps`` back to the state's, and return the state's offsets.

        Returns None when the commit failed. Errors of the broker reads are raised.
        """
        beginnings, ends, committed = await asyncio.wait_for(
            self._read_assigned_offsets(tps), _ALIGN_TIMEOUT_S
        )
        async with self.lock:
            target = self._target_offsets(beginnings, ends)
        if not await self._commit_moved_back(target, committed):
            return None
        return target

    async def _read_assigned_offsets(
        self, tps: list[TopicPartition]
    ) -> tuple[
        dict[TopicPartition, int], dict[TopicPartition, int], dict[TopicPartition, int | None]
    ]:
        consumer = self._offsets_consumer()
        try:
            await consumer.start()
            return await self._read_offsets(consumer, tps)
        finally:
            await consumer.stop()

    def _report_unaligned(self, tps: list[TopicPartition], exc: BaseException) -> None:
        self.metrics.errors.labels(kind="offset_align").inc()
        logger.error(
            "committed offsets of %d assigned partitions (%s) not checked against the "
            "state's (%r). The partitions stay paused, so that no event another worker of "
            "the group applied is skipped, until the broker replies and they are aligned",
            len(tps),
            _partition_names(tps),
            exc,
        )

    def _drop_offsets_past_end(
        self, beginnings: dict[TopicPartition, int], ends: dict[TopicPartition, int]
    ) -> None:
        """Start partitions whose log ends before the restored offset from their beginning.

        A log never shrinks, so such a partition belongs to a topic that was
        deleted and created again. Its new messages have offsets the state
        counts as applied, and without this they would be skipped unseen.
        """
        # NOTE: a topic created again that already contains more messages than
        # the restored offset looks like the old one, and its first messages
        # are still skipped.
        offsets = self.processor.offsets
        for tp, end in ends.items():
            restored = offsets.get((tp.topic, tp.partition), 0)
            if restored <= end:
                continue
            self.metrics.errors.labels(kind="offset_past_log_end").inc()
            logger.error(
                "%s[%d] ends at offset %d, before the restored offset %d: the topic was "
                "created again, so its messages are read from offset %d",
                tp.topic,
                tp.partition,
                end,
                restored,
                beginnings[tp],
            )
            offsets[(tp.topic, tp.partition)] = beginnings[tp]

    # -- event handling -----------------------------------------------------

    async def _wait_for_letter_room(self) -> None:
        """Wait while the dead-letter queue is full, so that it cannot grow without bound."""
        if len(self.dead_letters) < _MAX_LETTERS_OWED:
            return
        logger.warning(
            "%d dead letters owed to topic %s; taking no messages until the broker takes some",
            len(self.dead_letters),
            self.deadletter_topic.get_topic_name(),
        )
        while len(self.dead_letters) >= _MAX_LETTERS_OWED and not self._stopping:
            await asyncio.sleep(0.5)

    def _batch_failed(self, kind: str, exc: BaseException) -> None:
        """Stop the worker after a batch failed part way, so that a restart applies it again.

        Faust would restart the agent and go on with the next batch, so the
        failed one would be lost once a later checkpoint covered its offsets.
        """
        self.metrics.errors.labels(kind="batch_failed").inc()
        self._stop_on_fault(f"applying a batch of {kind} failed", exc)

    def _stop_on_fault(self, what: str, exc: BaseException) -> None:
        """Stop the worker without a checkpoint after a fault in its code.

        The state or the lists owed may then hold part of a step, so the
        worker writes no checkpoint from now on and stops with exit code 2,
        and the restart resumes from the newest checkpoint on disk. Only the
        type and the stack are logged, because the error's text may quote a
        message and so a user id.
        """
        if self.state_suspect:
            return
        self.state_suspect = True
        self.fatal_error = f"{what} with {type(exc).__name__}"
        logger.error(
            "stopping without a checkpoint: %s. A restart resumes from the newest "
            "checkpoint on disk. Stack:\n%s",
            self.fatal_error,
            "".join(traceback.format_tb(exc.__traceback__)),
        )
        signal.raise_signal(signal.SIGTERM)

    def _apply(
        self,
        kind: str,
        process: Callable[[Iterable[Message]], BatchOutcome],
        events: Sequence[Any],
    ) -> BatchOutcome | None:
        """Apply a batch with ``process`` under the lock; return None when it was not applied.

        After a batch failed part way, no later batch is applied, because the
        worker is stopping to apply the failed one again from a checkpoint.
        """
        if self.state_suspect:
            return None
        try:
            outcome = process(_messages(events))
        except Exception as exc:  # noqa: BLE001 - the worker stops instead of losing the batch
            self._batch_failed(kind, exc)
            return None
        self._take(outcome)
        return outcome

    async def on_event_batch(self, events: Sequence[Any]) -> None:
        """Process one batch of Faust events from the event topics."""
        await self._wait_for_letter_room()
        async with self.lock:
            self._apply("events", self.processor.process_events, events)

    async def on_item_batch(self, events: Sequence[Any]) -> None:
        """Apply item updates, then rewrite at once every list that contains a sold-out item."""
        await self._wait_for_letter_room()
        async with self.lock:
            outcome = self._apply("item updates", self.processor.process_item_updates, events)
            if outcome is not None and outcome.unavailable:
                self.rewrite_without(outcome.unavailable)
                # Users with no list of their own read the popular list, so
                # it drops the sold-out items now rather than at its next timer.
                self._require_sink().put(self.processor.popular_key, self.processor.popular_list())
                self._last_popular = time.monotonic()
                # An item update marks no user dirty by itself, so nothing else
                # would wake the loop for the lists that the rewrite left short.
                self._wake_refresher()

    def rewrite_without(self, item_rows: Sequence[int]) -> list[str]:
        """Rewrite the served lists that hold any of ``item_rows``; return their Redis keys."""
        engine = self.processor.engine
        catalog = engine.catalog
        started = time.perf_counter()
        self.served.expire(time.time())
        rewritten = self.served.rewrite(
            item_rows,
            catalog.in_stock,
            catalog.ids,
            self.settings.k,
            int(time.time() * 1000),
            engine.model_version,
        )
        sink = self._require_sink()
        for entry in rewritten:
            sink.put_existing(entry.key, entry.payload)
            if entry.short:
                # A user with an event waiting keeps the user id, so that the
                # refresh writes a new list and renews its TTL.
                self.dirty.setdefault(entry.pseudonym, "")
                self._short[entry.pseudonym] = entry.key
        if rewritten:
            logger.info(
                "rewrote %d lists without %d sold-out items in %.3f s",
                len(rewritten),
                len(item_rows),
                time.perf_counter() - started,
            )
        return [entry.key for entry in rewritten]

    async def on_forget_batch(self, events: Sequence[Any]) -> None:
        """Erase users and delete their lists, then checkpoint so no file keeps them."""
        async with self.lock:
            outcome = self._apply("forget requests", self.processor.process_forget, events)
            if outcome is None:
                return
            sink = self._require_sink()
            # Queued dead letters carry no event time that would tell which
            # came after the request, so every named user loses them.
            self.forget_dead_letters({pseudonym for pseudonym, _ in outcome.forgotten})
            for pseudonym, key in outcome.forgotten:
                if self.processor.engine.has_user(pseudonym):
                    # Kept: every event learned of the user came after the request.
                    continue
                self.dirty.pop(pseudonym, None)
                self._short.pop(pseudonym, None)
                self._owed.discard(pseudonym)
                self.served.forget(pseudonym)
                sink.delete(key)
        if outcome.forgotten:
            await self._record_forgotten(outcome.forgotten)
            await self._try_checkpoint("forget", prune=True)

    async def _record_forgotten(self, forgotten: list[tuple[str, str]]) -> None:
        # Kept in Redis as well, so that a fall-back to a checkpoint older
        # than the request, after the topic dropped it, still erases the user.
        for pseudonym, _ in forgotten:
            token = self.processor.forget_token(pseudonym)
            self._registry_owed[token] = self.processor.forgotten[token]
        await self._write_registry()

    async def _write_registry(self) -> None:
        """Write the owed forget tokens to Redis; on failure keep them for the next try."""
        if not self._registry_owed:
            return
        sink = self._require_sink()
        owed = dict(self._registry_owed)
        check = {_REGISTRY_CHECK_FIELD: self.processor.registry_check()}
        try:
            await sink.client.hset(self.forgotten_key, mapping={**owed, **check})
        except (RedisError, OSError) as exc:
            self.metrics.errors.labels(kind="redis_forget_registry").inc()
            # The timer tries again after a pause that doubles up to 30 s, so
            # that a Redis the sink has not yet found down is not asked, and
            # this line not logged, every second.
            self._registry_retry_at = time.monotonic() + self._registry_pause_s
            logger.warning(
                "forget registry not written to Redis (%r); %d tokens kept for a retry "
                "in %.0f s, and the checkpoint has them",
                exc,
                len(owed),
                self._registry_pause_s,
            )
            self._registry_pause_s = min(2 * self._registry_pause_s, _REGISTRY_RETRY_MAX_S)
            return
        self._registry_pause_s = 1.0
        for token, stamp in owed.items():
            if self._registry_owed.get(token) == stamp:
                del self._registry_owed[token]

    async def _server_run_id(self) -> str:
        """Return the run id of the Redis server, empty when the server does not report one."""
        info = await self._require_sink().client.info("server")
        return str(info.get("run_id", ""))

    async def check_redis_kept(self) -> bool:
        """Rewrite every list when Redis restarted since the last check; return False then.

        A Redis server restarted without persistence has lost every list
        the worker wrote and the forget registry, and nothing else would
        write them again before each user's next event. A restart with
        persistence kept them, and writing them again only costs time. The
        server's run id changes at each start, so a new one shows a restart.
        """
        try:
            run_id = await self._server_run_id()
        except (RedisError, OSError) as exc:
            # The sink notices an outage and retries on its own.
            logger.debug("Redis run id not read: %r", exc)
            return True
        same_server = run_id == self._redis_run_id
        if not same_server:
            self._redis_run_id = run_id
            async with self.lock:
                self._rewrite_all_lists()
            # A server that loaded an older snapshot brought back lists
            # deleted since, also those of users forgotten meanwhile.
            self._forgotten_scan_owed = True
        if self._forgotten_scan_owed:
            try:
                deleted = await self._delete_forgotten_lists()
            except (RedisError, OSError) as exc:
                logger.warning(
                    "lists of forgotten users not looked for in Redis (%r); trying again "
                    "at the next check",
                    exc,
                )
                return same_server
            self._forgotten_scan_owed = False
            if deleted:
                logger.info("deleted %d lists of forgotten users found in Redis", deleted)
        return same_server

    async def _delete_forgotten_lists(self) -> int:
        """Delete every list in Redis whose user a forget request erased; return how many."""
        sink = self._require_sink()
        deleted = 0
        async for keys in self._user_keys():
            async with self.lock:
                for key in keys:
                    if self._erased(self._pseudonym_of(key)):
                        sink.delete(key)
                        deleted += 1
        return deleted

    def _erased(self, pseudonym: str) -> bool:
        """Return whether a forget request erased the user and no later event brought them back."""
        processor = self.processor
        forgotten = processor.forget_token(pseudonym) in processor.forgotten
        return forgotten and not processor.engine.has_user(pseudonym)

    def _pseudonym_of(self, key: str) -> str:
        """Return the pseudonym of the user whose list is under ``key``."""
        ident = key[len(f"{self.settings.redis_key_prefix}user:") :]
        if self.settings.redis_key_by == "pseudonym":
            return ident
        return self.processor.pseudonymize(ident)

    def _rewrite_all_lists(self) -> None:
        """Queue every served list, the popular list and the forget registry for Redis again."""
        owed = 0
        for pseudonym in self.served.pseudonyms():
            key = self.served.forget(pseudonym)
            if key is None:
                continue
            # Out of the index, so that the refresh writes it whole and not
            # only over a key that exists.
            self._short[pseudonym] = key
            self._owed.add(pseudonym)
            self.dirty.setdefault(pseudonym, "")
            owed += 1
        self._registry_owed.update(self.processor.forgotten)
        self._require_sink().put(self.processor.popular_key, self.processor.popular_list())
        self.metrics.errors.labels(kind="redis_restarted").inc()
        logger.warning(
            "Redis restarted, and may have lost what the worker wrote; writing %d lists, "
            "the popular list and %d forget tokens again",
            owed,
            len(self._registry_owed),
        )
        self._wake_refresher()

    async def check_registry_key(self) -> None:
        """Raise `RegistryKeyError` when the forget registry in Redis comes from another key.

        A worker whose key file was lost starts with a new key and no
        checkpoint it can read, and would learn forgotten users again from
        the events still in Kafka. When Redis does not reply, the merge of
        the registry checks once Redis is back.
        """
        try:
            stored = await self._require_sink().client.hget(
                self.forgotten_key, _REGISTRY_CHECK_FIELD
            )
        except (RedisError, OSError):
            return
        self._check_registry_key(stored)

    async def load_forgotten(self) -> int:
        """Merge the forget registry kept in Redis into the state; return its size.

        When Redis does not reply, the rebuild of the served index merges
        the registry once Redis is back.
        """
        try:
            return await self._merge_registry()
        except (RedisError, OSError) as exc:
            logger.warning(
                "forget registry not read from Redis (%r); using the checkpoint's until "
                "Redis replies",
                exc,
            )
            return 0

    async def _merge_registry(self) -> int:
        client = self._require_sink().client
        registry = await client.hgetall(self.forgotten_key)
        self._check_registry_key(registry.pop(_REGISTRY_CHECK_FIELD.encode(), None))
        if registry:
            # A registry written before the check existed gets it now.
            check = self.processor.registry_check()
            await client.hsetnx(self.forgotten_key, _REGISTRY_CHECK_FIELD, check)
        merged: dict[str, int] = {}
        for token, stamp in registry.items():
            try:
                merged[_text(token)] = int(stamp)
            except (UnicodeDecodeError, ValueError):
                self.metrics.errors.labels(kind="redis_forget_registry").inc()
                logger.warning(
                    "skipped an entry of %s that is not a token and a time", self.forgotten_key
                )
        processor = self.processor
        async with self.lock:
            # Tokens of the checkpoint that Redis lacks, because a write failed
            # before the worker stopped, are written again.
            for token, stamp in processor.forgotten.items():
                if merged.get(token, -1) < stamp:
                    self._registry_owed[token] = stamp
            erased = processor.merge_forgotten(merged)
            self._drop_letters_of_forgotten()
            sink = self._require_sink()
            for pseudonym in {*self.dirty, *self._short, *self.served.pseudonyms()}:
                if not self._erased(pseudonym):
                    continue
                # The refresher may have queued or written the user's list
                # before the registry could be read, under a key that may
                # contain the user id.
                self.dirty.pop(pseudonym, None)
                self._owed.discard(pseudonym)
                for key in (self._short.pop(pseudonym, None), self.served.forget(pseudonym)):
                    if key is not None:
                        sink.delete(key)
            self._registry_merged = True
        if erased:
            self._owe_pruned_checkpoint()
            logger.info("erased %d users named by the forget registry in Redis", erased)
        await self._write_registry()
        return len(registry)

    def _owe_pruned_checkpoint(self) -> None:
        """Have the next interval checkpoint written, and every older one deleted.

        Users were erased outside a forget batch, and the checkpoint files
        on disk still contain them.
        """
        self._changed_since_checkpoint = True
        self._prune_owed = True

    def _check_registry_key(self, stored: bytes | None) -> None:
        """Raise `RegistryKeyError` when the registry's tokens come from another key."""
        if stored is None or stored.decode("ascii", "replace") == self.processor.registry_check():
            return
        msg = (
            f"the forget registry {self.forgotten_key} in Redis was written with another "
            "pseudonym key, so users forgotten before would come back from events still "
            "in Kafka; restore the key file or FUSIONREC_PSEUDONYM_KEY that the worker "
            f"used before, or delete {self.forgotten_key} after deleting those events"
        )
        raise RegistryKeyError(msg)

    @property
    def forgotten_key(self) -> str:
        """Redis hash of forget tokens and the event time of each request."""
        return f"{self.settings.redis_key_prefix}forgotten"

    async def rebuild_served(self) -> int:
        """Load the lists in Redis into the served index, after a restart; return how many.

        A list of a forgotten user is deleted instead: its deletion may have
        been pending in a worker that stopped before Redis took it. While
        Redis cannot be read, the scan is tried again. Once the index is
        complete, lists that contain an item sold out in the meantime are
        rewritten, and the worker reports ready when Redis has taken them.
        """
        delay_s = 1.0
        while True:
            try:
                if not self._registry_merged:
                    await self._merge_registry()
                # Read before the lists, which are then those of this server.
                run_id = await self._server_run_id()
                loaded, deleted = await self._load_served()
                self._redis_run_id = run_id
                break
            except RegistryKeyError as exc:
                logger.error("stopping: %s", exc)
                self.fatal_error = str(exc)
                signal.raise_signal(signal.SIGTERM)
                return 0
            except (RedisError, OSError) as exc:
                if self._stopping:
                    return 0
                logger.warning(
                    "served lists not rebuilt from Redis (%r); trying again in %.0f s",
                    exc,
                    delay_s,
                )
                await asyncio.sleep(delay_s)
                delay_s = min(2 * delay_s, self.settings.redis_retry_max_s)
        async with self.lock:
            # Item updates applied while the index was incomplete missed the
            # lists not yet loaded, so every sold-out item is applied again.
            catalog = self.processor.engine.catalog
            sold_out = np.flatnonzero(~catalog.in_stock[: len(catalog)]).tolist()
            keys = self.rewrite_without(sold_out) if sold_out else []
            if keys:
                self._wake_refresher()
        await self._wait_written(keys + deleted)
        self.served_ready = True
        logger.info("served-list index rebuilt from Redis: %d lists", loaded)
        return loaded

    async def _load_served(self) -> tuple[int, list[str]]:
        """Scan Redis for user lists; return how many were loaded and the keys deleted."""
        loaded = 0
        deleted: list[str] = []
        async for keys in self._user_keys():
            loaded += await self._load_served_keys(keys, deleted)
        if deleted:
            logger.info("deleted %d lists of forgotten users found in Redis", len(deleted))
        return loaded, deleted

    async def _user_keys(self) -> AsyncIterator[list[str]]:
        """Yield the keys of the user lists in Redis, in batches of up to 1,000."""
        sink = self._require_sink()
        prefix = f"{self.settings.redis_key_prefix}user:"
        batch: list[str] = []
        pattern = re.sub(r"([*?\[\]\\])", r"\\\1", prefix) + "*"
        async for raw_key in sink.client.scan_iter(pattern, count=1000):
            try:
                batch.append(_text(raw_key))
            except UnicodeDecodeError:
                logger.warning("skipped a key under %s that is not UTF-8", prefix)
                continue
            if len(batch) == 1000:
                yield batch
                batch = []
        if batch:
            yield batch

    async def _load_served_keys(self, keys: list[str], deleted: list[str]) -> int:
        """Record the lists under ``keys``; return how many, and add deleted keys to ``deleted``."""
        sink = self._require_sink()
        async with sink.client.pipeline(transaction=False) as pipe:
            pipe.mget(keys)
            for key in keys:
                pipe.pttl(key)
            values, *ttls_ms = await pipe.execute()
        now_s = time.time()
        loaded = 0
        recomputed = 0
        catalog = self.processor.engine.catalog
        for key, raw, ttl_ms in zip(keys, values, ttls_ms, strict=True):
            # PTTL is -2 for a key that has gone and -1 for one without expiry.
            if raw is None or ttl_ms == -2:
                continue
            expires_at = math.inf if ttl_ms < 0 else now_s + ttl_ms / 1000
            pseudonym = self._pseudonym_of(key)
            # A user who came back after the request has a state and a new list.
            if self._erased(pseudonym):
                sink.delete(key)
                deleted.append(key)
                continue
            if pseudonym in self.served:
                continue
            try:
                value = RecommendationList.from_json(raw)
                self.served.record(pseudonym, key, value.items, catalog.index.get, expires_at)
            except (ValueError, KeyError, TypeError) as exc:
                logger.warning("skipped a value in Redis that is not a valid list: %r", exc)
                continue
            loaded += 1
            if any(entry.item_id not in catalog.index for entry in value.items):
                # A list written after the restored checkpoint can name items
                # that its catalog lacks, which the index leaves out, so a sale
                # of one would miss the list. It is computed again instead,
                # from items of the catalog, and keeps its TTL.
                self._short[pseudonym] = key
                self.dirty.setdefault(pseudonym, "")
                recomputed += 1
        if recomputed:
            logger.info("computing %d lists again that name items new to the state", recomputed)
            self._wake_refresher()
        return loaded

    async def _wait_written(self, keys: list[str]) -> None:
        """Wait until Redis has taken the pending writes of ``keys``, or the worker stops."""
        sink = self._require_sink()
        waiting = [key for key in keys if sink.unwritten(key)]
        while waiting and not self._stopping:
            await asyncio.sleep(0.05)
            waiting = [key for key in waiting if sink.unwritten(key)]

    def _take(self, outcome: BatchOutcome) -> None:
        self.dirty.update(outcome.dirty)
        self.queue_dead_letters(outcome.dead_letters)
        if outcome.applied or outcome.dead_letters:
            self._changed_since_checkpoint = True
        self._wake_refresher()

    def _wake_refresher(self) -> None:
        if self._refresh_wakeup is not None and self.dirty:
            self._refresh_wakeup.set()

    def queue_dead_letters(
        self, letters: Sequence[tuple[bytes | None, bytes]], queued_at: Sequence[float] = ()
    ) -> None:
        """Queue dead letters (key, value) for delivery by `letter_sender`.

        ``queued_at`` gives the wall-clock time each was first queued, for
        letters that a checkpoint carried over a restart; others are new.
        """
        now = time.time()
        for index, (key, value) in enumerate(letters):
            self._letter_seq += 1
            first = queued_at[index] if index < len(queued_at) else now
            self.dead_letters[self._letter_seq] = _Letter(key, value, first)
        if letters:
            self._wake_letter_sender()

    def _wake_letter_sender(self, *_: Any) -> None:
        if self._letters_wakeup is not None:
            self._letters_wakeup.set()

    async def letter_sender(self) -> None:
        """Deliver dead letters as they come, apart from the refresher.

        Delivery waits for the broker, and a list must not wait for it. After
        a failure the sender pauses, longer after each one in a row.
        """
        wakeup = self._letters_wakeup = asyncio.Event()
        wakeup.set()
        pause_s = 1.0
        while not self._stopping:
            await wakeup.wait()
            wakeup.clear()
            if await self.deliver_dead_letters(_DEAD_LETTER_TIMEOUT_S):
                pause_s = 1.0
                continue
            await asyncio.sleep(pause_s)
            pause_s = min(2 * pause_s, _LETTER_RETRY_MAX_S)
            wakeup.set()

    async def refresher(self) -> None:
        """Recompute dirty users' lists in batches and hand them to the sink."""
        wakeup = self._refresh_wakeup = asyncio.Event()
        # Lists owed by a restored checkpoint are due before any new event.
        self._wake_refresher()
        size = self.settings.refresh_batch
        while not self._stopping:
            await wakeup.wait()
            wakeup.clear()
            while self.dirty and not self._stopping:
                # Lists computed already go out first, so that the thousands
                # that a sale rewrites at once, and the popular list, do not
                # wait behind the recomputation of those it left short.
                await self._require_sink().wait_drained()
                # A checkpoint pickles the live state in a thread while it
                # holds the lock, and scoring may touch model caches.
                async with self.lock:
                    started = time.perf_counter()
                    done = self.refresh_some(size)
                    elapsed = time.perf_counter() - started
                # A batch blocks the event loop, so the next one is sized to
                # take about _REFRESH_SLICE_S, which leaves the loop free for
                # health checks, the broker and Redis between batches.
                if done and elapsed > 0:
                    fitting = int(done * _REFRESH_SLICE_S / elapsed)
                    size = max(_REFRESH_MIN_USERS, min(self.settings.refresh_batch, fitting))
                await asyncio.sleep(0)

    def refresh_some(self, limit: int | None = None) -> int:
        """Refresh up to ``limit`` dirty users (all when None); return how many."""
        if not self.dirty:
            return 0
        if limit is None or limit >= len(self.dirty):
            chunk, self.dirty = self.dirty, {}
        else:
            keys = list(itertools.islice(self.dirty, limit))
            chunk = {key: self.dirty.pop(key) for key in keys}
        # Lists cut short by a sold-out item have no user id at hand (the
        # user sent no event), so they are recomputed under their known key.
        plain: dict[str, str] = {}
        short: dict[str, str] = {}
        for pseudonym, user_id in chunk.items():
            key = self._short.pop(pseudonym, None)
            if user_id:
                plain[pseudonym] = user_id
            elif key is not None:
                short[pseudonym] = key
        sink = self._require_sink()
        item_row = self.processor.engine.catalog.index.get
        # NOTE: Redis starts the TTL when the write lands, so a write held back
        # by an outage expires that much later than the index expects. The
        # index then drops the list early, and a sold-out item can stay in it
        # for the length of the outage at the end of its TTL.
        expires_at = time.time() + self.settings.ttl_s
        for entry in self.processor.refresh(plain, keys=short):
            owed = entry.pseudonym in self._owed
            self._owed.discard(entry.pseudonym)
            if entry.pseudonym in short and entry.pseudonym in self.served:
                # A list cut short by a sold-out item: the user sent no event,
                # so it keeps its expiry and is not written once Redis has
                # expired it.
                expiry = self.served.expires_at(entry.pseudonym)
                self.served.record(entry.pseudonym, entry.key, entry.items, item_row, expiry)
                sink.put_existing(entry.key, entry.payload)
            elif entry.pseudonym in short and not owed:
                # Cut short, and its key expired before the recomputation: the
                # user's next event writes a new list.
                continue
            else:
                # New events of the user, or a list owed by a checkpoint,
                # which is not in the index until it is written.
                self.served.record(entry.pseudonym, entry.key, entry.items, item_row, expires_at)
                sink.put(entry.key, entry.payload)
        return len(chunk)

    async def deliver_dead_letters(self, timeout_s: float) -> bool:
        """Hand queued dead letters to the producer and collect confirmations.

        Waits at most ``timeout_s`` for the broker. Returns False when a
        letter could not be handed over or its delivery failed; such a letter
        stays queued.
        """
        started = time.monotonic()
        handed = True
        try:
            await asyncio.wait_for(self._hand_dead_letters(), timeout_s)
        except TimeoutError:
            handed = False
            self.metrics.errors.labels(kind="dead_letter_send").inc()
            logger.warning(
                "dead letters not handed to the producer within %.0f s, so they stay queued; "
                "check that topic %s exists and that the worker may write to it",
                timeout_s,
                self.deadletter_topic.get_topic_name(),
            )
        waiting = [
            letter.delivery
            for letter in self.dead_letters.values()
            if letter.delivery is not None and not letter.delivery.done()
        ]
        if waiting:
            remaining = max(timeout_s - (time.monotonic() - started), 0.0)
            await asyncio.wait(waiting, timeout=remaining)
        failed = await self._collect_deliveries()
        return handed and failed == 0 and not self._unhanded()

    def _unhanded(self) -> bool:
        return any(letter.delivery is None for letter in self.dead_letters.values())

    async def _hand_dead_letters(self) -> None:
        async with self._letters_lock:
            for seq, letter in list(self.dead_letters.items()):
                # A forget request may have dropped the letter during an earlier send.
                if letter.delivery is not None or seq not in self.dead_letters:
                    continue
                try:
                    sending = await self._send_letter(seq, letter)
                except Exception as exc:  # noqa: BLE001 - the letters stay queued for the next try
                    self.metrics.errors.labels(kind="dead_letter_send").inc()
                    logger.warning(
                        "dead letters not handed to the producer (%r), so they stay queued", exc
                    )
                    return
                if sending is None:
                    continue
                letter.delivery = asyncio.ensure_future(sending)
                letter.delivery.add_done_callback(self._wake_letter_sender)

    async def _collect_deliveries(self) -> int:
        """Drop the letters the broker confirmed and queue failed ones again; return those."""
        failed = 0
        async with self._letters_lock:
            for seq, letter in list(self.dead_letters.items()):
                delivery = letter.delivery
                if delivery is None or not delivery.done():
                    continue
                if delivery.cancelled() or delivery.exception() is not None:
                    letter.delivery = None
                    failed += 1
                else:
                    del self.dead_letters[seq]
        if failed:
            self.metrics.errors.labels(kind="dead_letter_send").inc(failed)
            logger.warning("%d dead letters not delivered, so they are queued again", failed)
        return failed

    async def _send_letter(self, seq: int, letter: _Letter) -> Awaitable[Any] | None:
        """Hand ``letter`` to the producer; return its delivery, or None once it is dropped.

        A letter larger than the producer's request limit can never be sent
        as it is, and the others must not wait behind it, so it is sent
        again at once without its payload. Faust's producer reports that
        limit as a ProducerSendError caused by MessageSizeTooLargeError.
        """
        while seq in self.dead_letters:
            try:
                return await self.deadletter_topic.send(key=letter.key, value=letter.value)
            except Exception as exc:
                if not _too_large(exc):
                    raise
                self._shrink_letter(seq, letter, exc)
        return None

    def _shrink_letter(self, seq: int, letter: _Letter, error: Exception) -> None:
        """Queue ``letter`` again without its payload, or drop it if it had none.

        The producer refused it as larger than its request limit of
        1,000,000 bytes. The letters that this worker writes stay far below
        that, but a checkpoint of an earlier version may carry larger ones.
        A letter that a forget request dropped meanwhile is left alone.
        """
        if seq not in self.dead_letters:
            return
        record = orjson.loads(letter.value)
        source = record.get("source", {})
        where = f"{source.get('topic')}[{source.get('partition')}]@{source.get('offset')}"
        if record.get("payload") == _PAYLOAD_LEFT_OUT:
            del self.dead_letters[seq]
            self.metrics.errors.labels(kind="dead_letter_dropped").inc()
            logger.error(
                "the dead letter of %s (%s) is larger than the producer's request limit "
                "even without its payload (%r), so it is dropped",
                where,
                record.get("reason"),
                error,
            )
            return
        record["payload"] = _PAYLOAD_LEFT_OUT
        record["detail"] = record["detail"][:_SHRUNK_DETAIL_CHARS]
        letter.value = orjson.dumps(record)
        letter.key = None if letter.key is None else letter.key[:_SHRUNK_KEY_BYTES]
        letter.delivery = None
        self.metrics.errors.labels(kind="dead_letter_too_large").inc()
        logger.warning(
            "the dead letter of %s is larger than the producer's request limit (%r); "
            "it is sent again without its payload",
            where,
            error,
        )

    def _drop_letters_of_forgotten(self) -> None:
        """Drop the queued dead letters of every user named by a forget request.

        A user whose messages were all rejected has no state to erase, so the
        erasure hook is never called for them, and their letters are found by token.
        """
        forgotten = self.processor.forgotten
        if not forgotten:
            return
        token = self.processor.forget_token
        for seq, letter in list(self.dead_letters.items()):
            if letter.key is None:
                continue
            pseudonym = letter.key.decode("utf-8", "replace")
            if token(pseudonym) in forgotten:
                del self.dead_letters[seq]

    def forget_dead_letters(self, pseudonyms: set[str]) -> None:
        """Drop the queued dead letters of forgotten users, keyed by their pseudonyms."""
        keys = {pseudonym.encode() for pseudonym in pseudonyms}
        for seq, letter in list(self.dead_letters.items()):
            if letter.key in keys:
                del self.dead_letters[seq]

    # -- periodic work and checkpoints --------------------------------------

    async def tick(self) -> None:
        """Refresh the popular list, gauges, and checkpoint when due."""
        now = time.monotonic()
        sink = self._require_sink()
        # Building the list touches the popularity cache, which a checkpoint
        # may be pickling, so the list waits for the next tick while the lock is taken.
        if now - self._last_popular >= _POPULAR_EVERY_S and not self.lock.locked():
            async with self.lock:
                self._last_popular = now
                sink.put(self.processor.popular_key, self.processor.popular_list())
                self.served.expire(time.time())
        if self._registry_owed and not sink.in_outage and now >= self._registry_retry_at:
            await self._write_registry()
        checking = self._restart_check is not None and not self._restart_check.done()
        check_due = now - self._restart_checked >= _RESTART_CHECK_S
        if check_due and not checking and self._redis_run_id is not None and not sink.in_outage:
            self._restart_checked = now
            # A task, because a hung Redis makes the read wait for the socket
            # timeout, and the timer must go on meanwhile.
            self._restart_check = asyncio.create_task(
                self.check_redis_kept(), name="fusionrec-redis-restart-check"
            )
            self._restart_check.add_done_callback(self._log_task_failure)
        self.metrics.checkpoint_age.set(now - self.last_checkpoint)
        self.metrics.users_to_refresh.set(len(self.dirty))
        if self.assigned and self.partitions_total is None:
            # A consumer that joins a group can get its assignment before the
            # topics' metadata, and until then it cannot tell whether it was
            # assigned every partition.
            self.partitions_total = self._count_source_partitions()
            self._report_shared_assignment()
        stats = self.processor.engine.stats()
        self.metrics.users.set(stats.get("n_users", 0))
        self.metrics.items.set(stats.get("n_items", 0))
        self._update_lag()
        due = (
            now - self.last_checkpoint >= self.settings.checkpoint_interval_s
            and now >= self._checkpoint_retry_at
        )
        idle = self._interval_checkpoint is None or self._interval_checkpoint.done()
        if due and idle and self._changed_since_checkpoint:
            # A task, because the offset commit at its end waits for the broker
            # during an outage, and the timer must go on meanwhile.
            self._interval_checkpoint = asyncio.create_task(
                self._try_checkpoint("interval"), name="fusionrec-checkpoint"
            )
            self._interval_checkpoint.add_done_callback(self._log_task_failure)

    def _log_task_failure(self, task: asyncio.Task[Any]) -> None:
        """Log and count the exception that ended a background task, if any."""
        if task.cancelled() or task.exception() is None:
            return
        self.metrics.errors.labels(kind="background_task").inc()
        logger.error("background task %s failed", task.get_name(), exc_info=task.exception())

    def _stop_when_task_fails(self, task: asyncio.Task[Any]) -> None:
        """Stop the worker when a task it cannot run without ends with an error.

        Without the refresher, the Redis writer or the dead-letter sender the
        worker would go on learning and reporting ready while lists or
        letters stop flowing. A refresh that failed part way has also taken
        its users off the set of those to recompute.
        """
        self._log_task_failure(task)
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        assert exc is not None
        self._stop_on_fault(f"background task {task.get_name()} failed", exc)

    async def watch_brokers(self) -> None:
        """Probe the bootstrap brokers every few seconds until the worker stops."""
        while not self._stopping:
            await self.check_brokers()
            await asyncio.sleep(_BROKER_PROBE_EVERY_S)

    async def check_brokers(self) -> None:
        """Probe the bootstrap brokers and record whether any replies to a metadata request.

        The consumer runs in Faust's own thread and only logs when it loses
        the broker, so readiness needs this separate probe.
        """
        partitions = [TopicPartition(tp.topic, tp.partition) for tp in self.assigned]
        reachable, ends = await _broker_replies(self.settings, partitions)
        self._probed_ends = ends
        if not reachable:
            self.metrics.errors.labels(kind="kafka_unreachable").inc()
        if reachable != self.broker_reachable:
            if reachable:
                logger.info("Kafka reachable again at %s", self.settings.kafka_bootstrap)
            else:
                logger.error(
                    "no Kafka broker at %s replies to a metadata request; the worker is not "
                    "ready and its lag figures are stale until one does",
                    self.settings.kafka_bootstrap,
                )
        self.broker_reachable = reachable

    async def _try_checkpoint(self, reason: str, *, prune: bool = False) -> None:
        """Write a checkpoint, or log and count a failed write and try again later.

        The next try waits a checkpoint interval, because each one pickles the
        whole state under the lock. A forget request's deletion of the older
        files waits for the next checkpoint that is written.
        """
        try:
            await self.checkpoint(reason, prune=prune)
        except OSError as exc:
            self.checkpoint_failing = True
            self._checkpoint_retry_at = time.monotonic() + self.settings.checkpoint_interval_s
            self.metrics.errors.labels(kind="checkpoint_write").inc()
            logger.error(
                "checkpoint (%s) not written to %s (%r). Trying again in %.0f s",
                reason,
                self.store.folder,
                exc,
                self.settings.checkpoint_interval_s,
            )

    def _prune_older_checkpoints(self) -> None:
        """Delete every checkpoint but the newest; on failure keep that owed to the next one.

        The newest file is written by then, so a failed deletion does not
        make the checkpoint fail, and its offsets are still committed.
        """
        failed = 0
        # Invalid files set aside at restore may still hold a forgotten user.
        older = [path for _, path in self.store.paths()[1:]] + self.store.set_aside()
        for path in older:
            try:
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
            except OSError as exc:
                failed += 1
                logger.error("older checkpoint %s not deleted (%r)", path.name, exc)
        if failed:
            self.metrics.errors.labels(kind="checkpoint_prune").inc(failed)
            return
        self._prune_owed = False

    async def checkpoint(self, reason: str, *, prune: bool = False, final: bool = False) -> None:
        """Write a checkpoint and commit the offsets it covers.

        The Redis keys of lists still owed (users to recompute, lists not yet
        written) and the dead letters the broker has not confirmed go into
        the checkpoint encrypted, and a restart recomputes and sends them. A
        ``final`` checkpoint first tries to deliver the dead letters for a
        few seconds, and computes and writes every owed list. With ``prune``
        every older checkpoint is deleted, which a forget request needs so
        that no file keeps the user.
        """
        if self.state_suspect:
            logger.warning("checkpoint (%s) not written: a batch failed part way", reason)
            return
        if prune:
            self._prune_owed = True
        if final:
            await self.deliver_dead_letters(_FINAL_DELIVERY_S)
        async with self.lock:
            if final:
                self.refresh_some()
                await self._drain_sink()
            state = self.processor.state()
            state["pending_lists"] = self.sealer.seal(orjson.dumps(self._pending_keys()))
            # The state covers the rejected messages, so the letters the broker
            # has not confirmed go along, and a restart sends them again.
            letters = [
                (letter.key, letter.value, letter.queued_at)
                for letter in self.dead_letters.values()
            ]
            state["dead_letters"] = self.sealer.seal(pickle.dumps(letters))
            offsets = dict(self.processor.offsets)
            info = await asyncio.to_thread(self.store.write, state)
            self._changed_since_checkpoint = False
            self.checkpoint_failing = False
        if self._prune_owed:
            self._prune_older_checkpoints()
        self.last_checkpoint = time.monotonic()
        self.metrics.checkpoint_seconds.observe(info.seconds)
        self.metrics.checkpoint_age.set(0)
        await self._commit(offsets)
        logger.info(
            "checkpoint written (%s): %s, %.1f MB in %.2f s",
            reason,
            info.path.name,
            info.size_bytes / 1e6,
            info.seconds,
            extra={
                "event": "checkpoint_written",
                "reason": reason,
                "checkpoint": info.path.name,
                "bytes": info.size_bytes,
                "seconds": round(info.seconds, 3),
            },
        )

    async def _drain_sink(self, timeout_s: float = 10.0) -> None:
        sink = self._require_sink()
        if self._sink_task is not None and not await sink.wait_idle(timeout_s):
            logger.warning(
                "%d lists not written to Redis before the final checkpoint; it records them",
                len(sink.pending),
            )

    async def _commit(self, offsets: dict[tuple[str, int], int]) -> None:
        assigned = {(tp.topic, tp.partition) for tp in self.assigned}
        committable = {TP(t, p): off for (t, p), off in offsets.items() if (t, p) in assigned}
        if not committable:
            return
        # The commit waits for the broker without a limit, so a stop during
        # a broker outage is bounded here. The checkpoint's offsets decide
        # where a restart begins, so a commit that did not happen loses
        # nothing, and the next checkpoint commits again.
        try:
            ok = await asyncio.wait_for(
                self._consumer().commit_offsets(committable), _COMMIT_TIMEOUT_S
            )
        except TimeoutError:
            self.metrics.errors.labels(kind="offset_commit").inc()
            logger.warning(
                "offset commit timed out after %.0f s; the checkpoint keeps the offsets",
                _COMMIT_TIMEOUT_S,
            )
            return
        except KafkaError as exc:
            self.metrics.errors.labels(kind="offset_commit").inc()
            logger.warning(
                "offset commit of %d partitions failed (%r), so the checkpoint keeps the "
                "offsets and the next one commits again",
                len(committable),
                exc,
            )
            return
        if not ok:
            self.metrics.errors.labels(kind="offset_commit").inc()
            logger.warning("offset commit skipped: the group is rebalancing")

    def _count_source_partitions(self) -> int | None:
        """Return the partition count of all source topics, or None while metadata is missing."""
        total = 0
        for topic in self._source_topics():
            count = self.app.consumer.topic_partitions(topic)
            if count is None:
                return None
            total += count
        return total

    def _report_shared_assignment(self) -> None:
        """Log an error when the assignment lacks partitions of the source topics."""
        total = self.partitions_total
        if total is None or len(self.assigned) >= total:
            return
        # Item updates and forget requests must reach the one worker that
        # keeps the global item state, so a second worker in the same group
        # makes both workers wrong.
        logger.error(
            "only %d of %d partitions are assigned: another worker with app id %s "
            "shares them, and fusionrec runs one worker per app id; stop the other "
            "worker or give it its own FUSIONREC_APP_ID",
            len(self.assigned),
            total,
            self.settings.app_id,
        )

    def _update_lag(self) -> None:
        # The high watermark comes with each fetch, and while the worker
        # works through a backlog its fetched records wait in a buffer, so
        # no new fetch brings the end of what was produced since. The
        # broker probe requests the end offsets every few seconds, and the
        # larger of the two ends is the more recent one.
        consumer = self.app.consumer
        for tp in self.assigned:
            try:
                fetched = consumer.highwater(tp)
            except Exception:  # noqa: BLE001 - a partition without a fetch yet has no end offset
                fetched = None
            probed = self._probed_ends.get((tp.topic, tp.partition))
            known = [end for end in (fetched, probed) if end is not None]
            if not known:
                continue
            end = max(known)
            done = self.processor.offsets.get((tp.topic, tp.partition), 0)
            self.metrics.lag.labels(topic=tp.topic, partition=str(tp.partition)).set(
                max(0, end - done)
            )

    # -- lifecycle ----------------------------------------------------------

    @property
    def lock(self) -> asyncio.Lock:
        """Serializes batches with checkpoints, created on the running loop."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    @property
    def _letters_lock(self) -> asyncio.Lock:
        """Serializes handing dead letters to the producer with queueing failed ones again."""
        if self._dead_letter_lock is None:
            self._dead_letter_lock = asyncio.Lock()
        return self._dead_letter_lock

    def _require_sink(self) -> RedisSink:
        if self.sink is None:
            self.sink = RedisSink(self.settings, self.metrics)
        return self.sink

    async def start_sink(self) -> None:
        """Start the background Redis writer."""
        sink = self._require_sink()
        if self._sink_task is None:
            self._sink_task = asyncio.create_task(sink.run(), name="fusionrec-redis-sink")
            self._sink_task.add_done_callback(self._stop_when_task_fails)

    async def shutdown(self) -> None:
        """Finish the current batch, write pending lists, checkpoint, close Redis."""
        if self._stopping:
            return
        logger.info("shutting down: writing pending lists and a final checkpoint")
        await self.stop_offset_alignment()
        try:
            await self.checkpoint("shutdown", final=True)
        except OSError as exc:
            # The worker still stops, and exits with 1 instead of 0. The
            # offsets of the newest checkpoint on disk were the last ones
            # committed, so a restart applies the later events again.
            self.checkpoint_failed = True
            self.metrics.errors.labels(kind="checkpoint_write").inc()
            logger.error(
                "final checkpoint not written to %s (%r). A restart resumes from the newest "
                "checkpoint on disk and applies the later events again",
                self.store.folder,
                exc,
            )
        self._stopping = True
        for task in self._background:
            if task.get_name() in ("fusionrec-broker-watch", "fusionrec-dead-letters"):
                task.cancel()
        if self._refresh_wakeup is not None:
            self._refresh_wakeup.set()
        sink = self._require_sink()
        await sink.close(timeout_s=10.0)
        if self._sink_task is not None:
            await asyncio.wait([self._sink_task], timeout=1.0)

    def health(self) -> dict[str, Any]:
        """Return liveness and readiness with the facts behind them."""
        sink = self.sink
        redis_ok = sink is not None and not sink.in_outage
        # An unknown partition count may hide a second worker in the group.
        shared = self.partitions_total is None or len(self.assigned) < self.partitions_total
        oldest = next(iter(self.dead_letters.values()), None)
        letters_owed_s = 0.0 if oldest is None else max(time.time() - oldest.queued_at, 0.0)
        # Partitions paused until their committed offsets are moved back to the state's.
        held = len(self._consumer().held)
        ready = (
            bool(self.assigned)
            and redis_ok
            and self.served_ready
            and self.broker_reachable
            and letters_owed_s <= _LETTERS_OWED_MAX_S
            and not shared
            and not held
            and not self._stopping
        )
        return {
            "live": True,
            "ready": ready,
            "served_index_ready": self.served_ready,
            "broker_reachable": self.broker_reachable,
            "partitions_assigned": len(self.assigned),
            "partitions_total": self.partitions_total,
            "partitions_paused": held,
            "redis_outage": bool(sink and sink.in_outage),
            "lists_pending": len(sink.pending) if sink else 0,
            "dead_letters_pending": len(self.dead_letters),
            "dead_letters_owed_s": round(letters_owed_s, 1),
            "checkpoint_age_s": round(time.monotonic() - self.last_checkpoint, 1),
            "checkpoint_failing": self.checkpoint_failing,
        }

    # -- the Faust app ------------------------------------------------------

    def _source_topics(self) -> list[str]:
        settings = self.settings
        names = [settings.topic(name) for name in EVENT_TOPICS.values()]
        return [*names, settings.topic(ITEMS_TOPIC), settings.topic(FORGET_TOPIC)]

    def _build_app(self) -> faust.App:
        settings = self.settings
        app = faust.App(
            settings.app_id,
            broker=[f"kafka://{host.strip()}" for host in settings.kafka_bootstrap.split(",")],
            broker_credentials=_credentials(settings),
            topic_partitions=settings.partitions,
            topic_disable_leader=True,
            consumer_auto_offset_reset="earliest",
            broker_session_timeout=settings.consumer_session_timeout_s,
            broker_heartbeat_interval=settings.consumer_heartbeat_s,
            producer_acks=-1,
            web_host=settings.web_host,
            web_bind=settings.web_host,
            web_port=settings.web_port,
            web_in_thread=False,
            autodiscover=False,
            store="memory://",
            datadir=str(settings.data_path / "faust"),
            stream_wait_empty=False,
        )
        # Faust has no setting for the consumer class: the transport creates
        # its consumer from this attribute, on first use of app.consumer.
        app.transport.Consumer = HoldingConsumer
        raw: dict[str, Any] = {"key_serializer": "raw", "value_serializer": "raw", "acks": False}
        events = app.topic(*(settings.topic(n) for n in EVENT_TOPICS.values()), **raw)
        items = app.topic(settings.topic(ITEMS_TOPIC), **raw)
        forget = app.topic(settings.topic(FORGET_TOPIC), **raw)
        self.deadletter_topic = app.topic(
            settings.topic(DEADLETTER_TOPIC), key_serializer="raw", value_serializer="raw"
        )
        wait_s = settings.event_batch_wait_ms / 1000

        @app.agent(events, name="fusionrec.events")
        async def event_agent(stream: Any) -> None:
            async for batch in stream.take_events(settings.event_batch, wait_s):
                await self.on_event_batch(batch)

        @app.agent(items, name="fusionrec.items")
        async def item_agent(stream: Any) -> None:
            async for batch in stream.take_events(500, wait_s):
                await self.on_item_batch(batch)

        @app.agent(forget, name="fusionrec.forget")
        async def forget_agent(stream: Any) -> None:
            async for batch in stream.take_events(100, wait_s):
                await self.on_forget_batch(batch)

        @app.task
        async def start_background() -> None:
            await self.start_sink()
            self._background.append(
                asyncio.create_task(self.refresher(), name="fusionrec-refresher")
            )
            self._background.append(
                asyncio.create_task(self.rebuild_served(), name="fusionrec-served-index")
            )
            self._background.append(
                asyncio.create_task(self.watch_brokers(), name="fusionrec-broker-watch")
            )
            self._background.append(
                asyncio.create_task(self.letter_sender(), name="fusionrec-dead-letters")
            )
            for task in self._background:
                task.add_done_callback(self._stop_when_task_fails)

        @app.timer(interval=1.0)
        async def periodic() -> None:
            await self.tick()

        @app.on_partitions_assigned.connect
        async def on_assigned(sender: Any, assigned: set[TP], **kwargs: Any) -> None:
            self.assigned = set(assigned)
            self.partitions_total = self._count_source_partitions()
            logger.info(
                "partitions assigned: %d of %s",
                len(assigned),
                self.partitions_total,
                extra={"event": "partitions_assigned", "partitions": len(assigned)},
            )
            self._report_shared_assignment()

        @app.on_rebalance_complete.connect
        async def on_rebalance_complete(sender: Any, **kwargs: Any) -> None:
            await self.align_assigned_offsets(set(self.assigned))

        @app.on_partitions_revoked.connect
        async def on_revoked(sender: Any, revoked: set[TP], **kwargs: Any) -> None:
            await self.stop_offset_alignment()
            logger.info(
                "partitions revoked: %d",
                len(revoked),
                extra={"event": "partitions_revoked", "partitions": len(revoked)},
            )

        @app.on_before_shutdown.connect
        async def on_shutdown(sender: Any, **kwargs: Any) -> None:
            await self.shutdown()

        worker = self

        @app.page("/metrics")
        class MetricsView(View):
            async def get(self, request: Request) -> Response:
                return self.bytes(worker.metrics.render(), content_type="text/plain; version=0.0.4")

        @app.page("/health")
        class HealthView(View):
            async def get(self, request: Request) -> Response:
                report = worker.health()
                return self.json(report, status=200 if report["ready"] else 503)

        self._agents = (event_agent, item_agent, forget_agent, MetricsView, HealthView)
        return app


async def _broker_replies(
    settings: Settings, partitions: Sequence[TopicPartition] = ()
) -> tuple[bool, dict[tuple[str, int], int]]:
    """Return whether a bootstrap broker replies in time, and the end offsets of ``partitions``.

    A TCP connection alone is not enough: the kernel accepts connections
    for a broker process that is frozen. The probe runs in a thread with
    an event loop of its own, so that a long recomputation of lists, which
    blocks the worker's loop for a while, does not time it out. End offsets
    that the broker did not give in time are left out.
    """
    return await asyncio.to_thread(asyncio.run, _probe_brokers(settings, partitions))


async def _probe_brokers(
    settings: Settings, partitions: Sequence[TopicPartition]
) -> tuple[bool, dict[tuple[str, int], int]]:
    client = AIOKafkaClient(
        bootstrap_servers=settings.kafka_bootstrap,
        request_timeout_ms=int(_BROKER_PROBE_TIMEOUT_S * 1000),
        **client_options(settings),
    )
    try:
        await asyncio.wait_for(client.bootstrap(), _BROKER_PROBE_TIMEOUT_S)
    except (KafkaError, OSError, TimeoutError):
        return False, {}
    finally:
        await client.close()
    if not partitions:
        return True, {}
    return True, await _end_offsets(settings, partitions)


async def _end_offsets(
    settings: Settings, partitions: Sequence[TopicPartition]
) -> dict[tuple[str, int], int]:
    """Return the end offset of each of ``partitions``, or none after an error or a timeout."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        enable_auto_commit=False,
        request_timeout_ms=int(_BROKER_PROBE_TIMEOUT_S * 1000),
        **client_options(settings),
    )
    try:
        await asyncio.wait_for(consumer.start(), _BROKER_PROBE_TIMEOUT_S)
        ends = await asyncio.wait_for(
            consumer.end_offsets(list(partitions)), _BROKER_PROBE_TIMEOUT_S
        )
    except (KafkaError, OSError, TimeoutError) as exc:
        logger.debug("end offsets not read at the broker probe: %r", exc)
        return {}
    finally:
        await consumer.stop()
    return {(tp.topic, tp.partition): int(end) for tp, end in ends.items()}


def _messages(events: Sequence[Any]) -> list[Message]:
    out = []
    for event in events:
        message = event.message
        out.append(
            Message(message.topic, message.partition, message.offset, message.key, message.value)
        )
    return out


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _credentials(settings: Settings) -> Any:
    protocol = settings.kafka_security_protocol
    if protocol == "PLAINTEXT":
        return None
    context = ssl_context(settings)
    if protocol.startswith("SASL"):
        return faust.SASLCredentials(
            username=settings.kafka_sasl_username,
            password=settings.kafka_sasl_password,
            mechanism=settings.kafka_sasl_mechanism,
            ssl_context=context,
        )
    return faust.SSLCredentials(context)
