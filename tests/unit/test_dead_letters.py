"""Dead letters on their way to the broker, and the checkpoints that carry them."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import orjson
from aiokafka.errors import KafkaTimeoutError, MessageSizeTooLargeError
from faust.exceptions import ProducerSendError
from faust.types import TP

from stream.app import Worker
from stream.processor import Message
from stream.settings import Settings


class _Topic:
    """Stands in for the dead-letter topic. Each send takes the next planned outcome.

    Outcomes: ``ok`` (delivered), ``fail`` (delivery fails), ``wait`` (never
    confirmed), ``raise`` (the producer does not take the letter) and
    ``hang`` (the send waits for metadata that never comes).
    """

    def __init__(self, *outcomes: str, max_bytes: int = 1_000_000) -> None:
        self.outcomes = list(outcomes)
        self.delivered: list[bytes] = []
        self.max_bytes = max_bytes

    def get_topic_name(self) -> str:
        return "events.deadletter"

    async def send(self, key: bytes | None, value: bytes) -> asyncio.Future[None]:
        outcome = self.outcomes.pop(0) if self.outcomes else "ok"
        if outcome == "raise":
            raise KafkaTimeoutError("no metadata for the topic")
        if len(value) > self.max_bytes:
            # Faust's aiokafka driver wraps the producer's error.
            cause = MessageSizeTooLargeError(f"{len(value)} bytes")
            raise ProducerSendError(f"Error while sending: {cause!r}") from cause
        if outcome == "batch too large":
            # The broker refuses a whole batch larger than the topic takes.
            failed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            failed.set_exception(MessageSizeTooLargeError())
            return failed
        if outcome == "hang":
            await asyncio.sleep(3600)
        delivery: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if outcome == "ok":
            self.delivered.append(value)
            delivery.set_result(None)
        elif outcome == "fail":
            delivery.set_exception(KafkaTimeoutError("batch expired"))
        return delivery


class _Sink:
    """Stands in for the Redis sink and records the keys the worker writes."""

    in_outage = False

    def __init__(self) -> None:
        self.pending: dict[str, bytes] = {}
        self.keys: list[str] = []

    def put(self, key: str, payload: bytes) -> None:
        self.keys.append(key)

    put_existing = put

    def owed_keys(self) -> list[str]:
        return list(self.pending)

    async def wait_drained(self) -> None:
        return None


def _worker(tmp_path, monkeypatch, topic: _Topic) -> Worker:
    settings = replace(
        Settings(), data_dir=str(tmp_path), kafka_bootstrap="127.0.0.1:9", pseudonym_key="00" * 32
    )
    worker = Worker(settings)
    worker.deadletter_topic = topic
    worker.sink = _Sink()  # type: ignore[assignment]
    monkeypatch.setattr("stream.app._DEAD_LETTER_TIMEOUT_S", 0.2)
    monkeypatch.setattr("stream.app._FINAL_DELIVERY_S", 0.2)
    return worker


def _errors(worker: Worker, kind: str) -> float:
    return worker.metrics.errors.labels(kind=kind)._value.get()


def _queued(worker: Worker) -> list[bytes]:
    return [letter.value for letter in worker.dead_letters.values()]


def test_failed_delivery_queued_again_in_order(tmp_path, monkeypatch):
    topic = _Topic("ok", "fail", "fail", "ok")
    worker = _worker(tmp_path, monkeypatch, topic)
    worker.queue_dead_letters([(None, b"a"), (None, b"b"), (None, b"c"), (None, b"d")])

    async def run() -> tuple[bool, list[bytes], bool]:
        first = await worker.deliver_dead_letters(1.0)
        queued = _queued(worker)
        return first, queued, await worker.deliver_dead_letters(1.0)

    first, queued, second = asyncio.run(run())

    assert first is False
    assert queued == [b"b", b"c"]
    assert second is True
    assert topic.delivered == [b"a", b"d", b"b", b"c"]
    assert worker.dead_letters == {}
    assert _errors(worker, "dead_letter_send") == 2


def test_producer_error_keeps_letters_queued(tmp_path, monkeypatch):
    topic = _Topic("ok", "raise")
    worker = _worker(tmp_path, monkeypatch, topic)
    worker.queue_dead_letters([(None, b"a"), (None, b"b"), (None, b"c")])

    delivered = asyncio.run(worker.deliver_dead_letters(1.0))

    assert delivered is False
    assert _queued(worker) == [b"b", b"c"]
    assert _errors(worker, "dead_letter_send") == 1


def test_checkpoint_carries_unconfirmed_letters(tmp_path, monkeypatch):
    worker = _worker(tmp_path, monkeypatch, _Topic("wait"))
    worker.queue_dead_letters([(b"k", b"a")])

    async def run() -> float:
        await worker.deliver_dead_letters(0.1)
        started = time.monotonic()
        await worker.checkpoint("interval")
        return time.monotonic() - started

    took_s = asyncio.run(run())
    restarted = _worker(tmp_path, monkeypatch, _Topic())
    assert restarted.restore()

    assert took_s < 5.0
    assert len(worker.store.paths()) == 1
    assert [(letter.key, letter.value) for letter in restarted.dead_letters.values()] == [
        (b"k", b"a")
    ]


def test_final_checkpoint_written_while_broker_silent(tmp_path, monkeypatch):
    worker = _worker(tmp_path, monkeypatch, _Topic("hang"))
    worker.queue_dead_letters([(None, b"a")])

    asyncio.run(asyncio.wait_for(worker.checkpoint("shutdown", final=True), timeout=10))
    restarted = _worker(tmp_path, monkeypatch, _Topic())
    assert restarted.restore()

    assert _queued(restarted) == [b"a"]


def test_refresh_goes_on_while_letters_wait(tmp_path, monkeypatch):
    worker = _worker(tmp_path, monkeypatch, _Topic("hang"))
    monkeypatch.setattr("stream.app._DEAD_LETTER_TIMEOUT_S", 60.0)
    now_ms = int(time.time() * 1000)
    view = {"event_id": "e1", "type": "view", "user_id": "u1", "item_id": "i1", "timestamp": now_ms}
    messages = [
        Message("events.view", 0, 0, b"u1", orjson.dumps(view)),
        Message("events.view", 0, 1, b"u1", b"not json"),
    ]

    async def run() -> float:
        tasks = [
            asyncio.create_task(worker.letter_sender()),
            asyncio.create_task(worker.refresher()),
        ]
        await asyncio.sleep(0)
        started = time.monotonic()
        worker._take(worker.processor.process_events(messages))
        while not worker.sink.keys:
            await asyncio.sleep(0.01)
        waited = time.monotonic() - started
        for task in tasks:
            task.cancel()
        return waited

    waited_s = asyncio.run(asyncio.wait_for(run(), timeout=30))

    assert waited_s < 5.0
    assert worker.health()["dead_letters_pending"] == 1


def test_sender_delivers_after_producer_error(tmp_path, monkeypatch):
    topic = _Topic("raise")
    worker = _worker(tmp_path, monkeypatch, topic)
    monkeypatch.setattr("stream.app._LETTER_RETRY_MAX_S", 0.05)

    async def run() -> None:
        sender = asyncio.create_task(worker.letter_sender())
        await asyncio.sleep(0)
        worker.queue_dead_letters([(None, b"a")])
        while worker.dead_letters:
            await asyncio.sleep(0.01)
        sender.cancel()

    asyncio.run(asyncio.wait_for(run(), timeout=30))

    assert topic.delivered == [b"a"]
    assert worker.health()["dead_letters_pending"] == 0


def test_sender_keeps_pace_with_steady_letters(tmp_path, monkeypatch):
    topic = _Topic()
    worker = _worker(tmp_path, monkeypatch, topic)

    async def run() -> float:
        sender = asyncio.create_task(worker.letter_sender())
        for n in range(50):
            worker.queue_dead_letters([(None, str(n).encode())])
            await asyncio.sleep(0.01)
        started = time.monotonic()
        while worker.dead_letters:
            await asyncio.sleep(0.01)
        sender.cancel()
        return time.monotonic() - started

    drained_s = asyncio.run(asyncio.wait_for(run(), timeout=30))

    assert drained_s < 0.5
    assert len(topic.delivered) == 50


def test_letters_owed_too_long_make_worker_unready(tmp_path, monkeypatch):
    worker = _worker(tmp_path, monkeypatch, _Topic())
    worker.assigned = {TP("events.view", 0)}
    worker.partitions_total = 1
    worker.served_ready = True
    worker.queue_dead_letters([(None, b"a")])
    ready_while_recent = worker.health()["ready"]
    next(iter(worker.dead_letters.values())).queued_at -= 31.0

    report = worker.health()

    assert ready_while_recent is True
    assert report["ready"] is False
    assert report["dead_letters_owed_s"] >= 31.0


def test_forgotten_user_letters_leave_the_queue(tmp_path, monkeypatch):
    worker = _worker(tmp_path, monkeypatch, _Topic())
    worker.queue_dead_letters([(b"p-alice", b"a"), (b"p-bob", b"b"), (None, b"c")])

    worker.forget_dead_letters({"p-alice"})

    assert _queued(worker) == [b"b", b"c"]


class _SlowTopic(_Topic):
    """A topic whose sends take a while, so other work can run meanwhile."""

    async def send(self, key: bytes | None, value: bytes) -> asyncio.Future[None]:
        await asyncio.sleep(0.05)
        return await super().send(key, value)


def test_letters_dropped_during_send_are_not_sent(tmp_path, monkeypatch):
    topic = _SlowTopic()
    worker = _worker(tmp_path, monkeypatch, topic)
    worker.queue_dead_letters([(b"p-alice", b"a1"), (b"p-alice", b"a2"), (b"p-bob", b"b")])

    async def run() -> None:
        delivery = asyncio.create_task(worker.deliver_dead_letters(5.0))
        await asyncio.sleep(0.02)
        worker.forget_dead_letters({"p-alice"})
        await delivery

    asyncio.run(run())

    assert topic.delivered == [b"a1", b"b"]


def test_users_erased_at_restore_lose_their_letters(tmp_path, monkeypatch):
    worker = _worker(tmp_path, monkeypatch, _Topic())
    worker.processor.process_events(
        [
            Message(
                "events.view",
                0,
                0,
                b"alice",
                orjson.dumps(
                    {
                        "event_id": "e1",
                        "type": "view",
                        "user_id": "alice",
                        "item_id": "i1",
                        "timestamp": int(time.time() * 1000) - 60_000,
                    }
                ),
            )
        ]
    )
    alice = worker.processor.pseudonymize("alice")
    worker.queue_dead_letters([(alice.encode(), b"a"), (b"p-bob", b"b")])

    erased = worker.processor.merge_forgotten(
        {worker.processor.forget_token(alice): int(time.time() * 1000)}
    )

    assert erased == 1
    assert _queued(worker) == [b"b"]


class _Record:
    def __init__(self, topic: str, offset: int, key: bytes, value: bytes) -> None:
        self.message = Message(topic, 0, offset, key, value)


def test_forget_drops_letters_of_kept_user(tmp_path, monkeypatch):
    worker = _worker(tmp_path, monkeypatch, _Topic())
    worker.sink.delete = lambda key: None  # type: ignore[attr-defined]

    async def nothing(*args: object, **kwargs: object) -> None:
        return None

    # The registry write and the checkpoint need Redis and are tested elsewhere.
    monkeypatch.setattr(worker, "_record_forgotten", nothing)
    monkeypatch.setattr(worker, "checkpoint", nothing)
    now_ms = int(time.time() * 1000)
    view = {
        "event_id": "e1",
        "type": "view",
        "user_id": "alice",
        "item_id": "i1",
        "timestamp": now_ms,
    }
    worker.processor.process_events([Message("events.view", 0, 0, b"alice", orjson.dumps(view))])
    alice = worker.processor.pseudonymize("alice")
    worker.queue_dead_letters([(alice.encode(), b"a")])
    request = orjson.dumps({"user_id": "alice", "timestamp": now_ms - 60_000})

    async def run() -> None:
        await worker.on_forget_batch([_Record("users.forget", 0, b"alice", request)])

    asyncio.run(run())

    assert worker.processor.engine.has_user(alice)
    assert worker.dead_letters == {}


def test_owed_age_survives_restart(tmp_path, monkeypatch):
    worker = _worker(tmp_path, monkeypatch, _Topic())
    worker.queue_dead_letters([(None, b"a")], [time.time() - 3600])
    asyncio.run(worker.checkpoint("interval"))

    restarted = _worker(tmp_path, monkeypatch, _Topic())
    assert restarted.restore()

    assert restarted.health()["dead_letters_owed_s"] >= 3600


def test_full_letter_queue_holds_new_batches(tmp_path, monkeypatch):
    worker = _worker(tmp_path, monkeypatch, _Topic())
    monkeypatch.setattr("stream.app._MAX_LETTERS_OWED", 2)
    worker.queue_dead_letters([(None, b"a"), (None, b"b")])

    async def run() -> tuple[bool, bool]:
        batch = asyncio.create_task(worker.on_event_batch([]))
        await asyncio.sleep(0.2)
        waiting = not batch.done()
        worker.dead_letters.clear()
        await asyncio.wait_for(batch, timeout=5)
        return waiting, batch.done()

    waiting, done = asyncio.run(run())

    assert waiting is True
    assert done is True


def test_letters_of_user_named_by_registry_dropped(tmp_path, monkeypatch):
    worker = _worker(tmp_path, monkeypatch, _Topic())
    alice = worker.processor.pseudonymize("alice")
    # Alice's only message was rejected, so no state of hers is there to erase.
    worker.queue_dead_letters([(alice.encode(), b"a"), (b"p-bob", b"b")])

    class _Registry:
        async def hgetall(self, key: str) -> dict[bytes, bytes]:
            token = worker.processor.forget_token(alice)
            return {token.encode(): str(int(time.time() * 1000)).encode()}

        async def hsetnx(self, key: str, field: str, value: str) -> bool:
            return True

    worker.sink.client = _Registry()  # type: ignore[attr-defined]

    asyncio.run(worker._merge_registry())

    assert _queued(worker) == [b"b"]


def _letter(detail: str, payload: object) -> bytes:
    record = {
        "reason": "key_mismatch",
        "detail": detail,
        "field": None,
        "source": {"topic": "items.updates", "partition": 0, "offset": 7},
        "received_at": 1,
        "payload": payload,
    }
    return orjson.dumps(record)


def test_too_large_letter_sent_without_payload(tmp_path, monkeypatch):
    # The producer takes at most 2,000 bytes per message here.
    topic = _Topic(max_bytes=2000)
    worker = _worker(tmp_path, monkeypatch, topic)
    big = _letter("key differs", {"title": "x" * 5000})
    worker.queue_dead_letters([(b"k" * 3000, big), (None, b"small")])

    delivered = asyncio.run(worker.deliver_dead_letters(1.0))

    assert delivered is True
    assert worker.dead_letters == {}
    (shrunk,) = [orjson.loads(value) for value in topic.delivered if value != b"small"]
    assert shrunk["payload"].startswith("<left out")
    assert shrunk["detail"] == "key differs"
    assert shrunk["source"]["offset"] == 7
    assert b"small" in topic.delivered
    assert _errors(worker, "dead_letter_too_large") == 1


def test_letter_too_large_without_payload_dropped(tmp_path, monkeypatch):
    topic = _Topic(max_bytes=300)
    worker = _worker(tmp_path, monkeypatch, topic)
    worker.queue_dead_letters([(None, _letter("d" * 2000, "p")), (None, b"small")])

    async def run() -> None:
        await worker.deliver_dead_letters(1.0)
        await worker.deliver_dead_letters(1.0)

    asyncio.run(run())

    assert topic.delivered == [b"small"]
    assert worker.dead_letters == {}
    assert _errors(worker, "dead_letter_dropped") == 1


def test_batch_refused_by_topic_keeps_letters_whole(tmp_path, monkeypatch):
    # Each letter fits alone, but the broker refused the batch they shared.
    topic = _Topic("batch too large", "batch too large")
    worker = _worker(tmp_path, monkeypatch, topic)
    letters = [_letter("key differs", "x" * 100), _letter("key differs", "y" * 100)]
    worker.queue_dead_letters([(None, value) for value in letters])

    async def run() -> tuple[bool, bool]:
        first = await worker.deliver_dead_letters(1.0)
        return first, await worker.deliver_dead_letters(1.0)

    first, second = asyncio.run(run())

    assert first is False
    assert second is True
    assert topic.delivered == letters
    assert _errors(worker, "dead_letter_dropped") == 0
