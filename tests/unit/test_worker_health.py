"""Readiness facts of the worker that need no Kafka or Redis."""

from __future__ import annotations

import asyncio
import signal
import socket
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
from aiokafka.errors import GroupAuthorizationFailedError
from faust.types import TP

from stream import app as app_module
from stream.app import RegistryKeyError, Worker
from stream.settings import Settings


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _worker(tmp_path, bootstrap: str) -> Worker:
    return Worker(replace(Settings(), data_dir=str(tmp_path), kafka_bootstrap=bootstrap))


def test_unreachable_broker_makes_worker_unready(tmp_path):
    worker = _worker(tmp_path, f"127.0.0.1:{_closed_port()}")

    asyncio.run(worker.check_brokers())

    assert worker.broker_reachable is False
    assert worker.health()["broker_reachable"] is False
    assert worker.health()["ready"] is False
    assert worker.metrics.errors.labels(kind="kafka_unreachable")._value.get() == 1


def test_silent_broker_makes_worker_unready(tmp_path):
    # The kernel still accepts connections for a frozen broker process. This
    # listener accepts them too and never replies.
    async def run() -> bool:
        server = await asyncio.start_server(lambda reader, writer: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        worker = _worker(tmp_path, f"127.0.0.1:{port}")
        async with server:
            await asyncio.wait_for(worker.check_brokers(), timeout=30)
        return worker.broker_reachable

    assert asyncio.run(run()) is False


def test_offset_commit_gives_up_after_timeout(tmp_path, monkeypatch):
    worker = _worker(tmp_path, "127.0.0.1:9")
    worker.assigned = {TP("events.view", 0)}

    async def commit_waiting_for_broker(offsets: object) -> bool:
        await asyncio.sleep(3600)
        return True

    monkeypatch.setattr(worker.app.consumer, "commit_offsets", commit_waiting_for_broker)
    monkeypatch.setattr("stream.app._COMMIT_TIMEOUT_S", 0.2)

    asyncio.run(asyncio.wait_for(worker._commit({("events.view", 0): 10}), timeout=10))

    assert worker.metrics.errors.labels(kind="offset_commit")._value.get() == 1


def test_rejected_commit_counted_not_raised(tmp_path, monkeypatch):
    worker = _worker(tmp_path, "127.0.0.1:9")
    worker.assigned = {TP("events.view", 0)}

    async def commit_rejected(offsets: object) -> bool:
        raise GroupAuthorizationFailedError()

    monkeypatch.setattr(worker.app.consumer, "commit_offsets", commit_rejected)

    asyncio.run(asyncio.wait_for(worker._commit({("events.view", 0): 10}), timeout=10))

    assert worker.metrics.errors.labels(kind="offset_commit")._value.get() == 1


class _Sink:
    """Stands in for the Redis sink and records the keys the worker writes."""

    in_outage = False

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.pending: dict[str, bytes] = {}

    def put(self, key: str, payload: bytes) -> None:
        self.keys.append(key)

    def owed_keys(self) -> list[str]:
        return list(self.pending)


def test_timer_goes_on_while_checkpoint_waits(tmp_path, monkeypatch):
    worker = _worker(tmp_path, "127.0.0.1:9")
    sink = _Sink()
    worker.sink = sink  # type: ignore[assignment]
    released = asyncio.Event()
    started: list[str] = []

    async def checkpoint(reason: str, **kwargs: object) -> None:
        # Stands for an offset commit that waits for a broker that is down.
        started.append(reason)
        await released.wait()

    monkeypatch.setattr(worker, "checkpoint", checkpoint)
    monkeypatch.setattr("stream.app._POPULAR_EVERY_S", 0.0)
    worker.last_checkpoint -= 10 * worker.settings.checkpoint_interval_s
    worker._changed_since_checkpoint = True

    async def run() -> None:
        for _ in range(3):
            await asyncio.wait_for(worker.tick(), timeout=5)
            await asyncio.sleep(0)
        released.set()
        assert worker._interval_checkpoint is not None
        await worker._interval_checkpoint

    asyncio.run(run())

    assert started == ["interval"]
    assert sink.keys.count(worker.processor.popular_key) == 3


def test_failed_checkpoint_waits_an_interval(tmp_path, monkeypatch):
    worker = _worker(tmp_path, "127.0.0.1:9")
    worker.sink = _Sink()  # type: ignore[assignment]
    attempts: list[str] = []

    async def checkpoint(reason: str, **kwargs: object) -> None:
        attempts.append(reason)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(worker, "checkpoint", checkpoint)
    worker.last_checkpoint -= 10 * worker.settings.checkpoint_interval_s
    worker._changed_since_checkpoint = True

    async def run() -> None:
        for _ in range(3):
            await asyncio.wait_for(worker.tick(), timeout=5)
            if worker._interval_checkpoint is not None:
                await asyncio.wait([worker._interval_checkpoint], timeout=5)

    asyncio.run(run())

    assert attempts == ["interval"]
    assert worker.metrics.errors.labels(kind="checkpoint_write")._value.get() == 1
    assert worker.metrics.errors.labels(kind="background_task")._value.get() == 0
    worker.sink = None
    assert worker.health()["checkpoint_failing"] is True


def test_unknown_partition_count_is_not_ready(tmp_path, monkeypatch, caplog):
    worker = _worker(tmp_path, "127.0.0.1:9")
    sink = _Sink()
    worker.sink = sink  # type: ignore[assignment]
    worker.served_ready = True
    topics = worker._source_topics()
    worker.assigned = {TP(topics[0], 0)}

    # The consumer has no metadata of the topics yet.
    assert worker.health()["ready"] is False

    monkeypatch.setattr(worker.app.consumer, "topic_partitions", lambda topic: 1)
    asyncio.run(worker.tick())
    assert worker.partitions_total == len(topics)
    assert worker.health()["ready"] is False
    assert "another worker with app id" in caplog.text

    worker.assigned = {TP(topic, 0) for topic in topics}
    assert worker.health()["ready"] is True


class _RegistryClient:
    """A Redis client stand-in with one forget registry written with another key."""

    def __init__(self) -> None:
        self.registry = {b"key-check": b"0" * 32, b"ab" * 16: b"1700000000000"}

    async def hget(self, key: str, field: str) -> bytes | None:
        return self.registry.get(field.encode())

    async def hgetall(self, key: str) -> dict[bytes, bytes]:
        return dict(self.registry)


class _RegistrySink:
    def __init__(self) -> None:
        self.client = _RegistryClient()


def test_registry_of_other_key_stops_worker(tmp_path, monkeypatch):
    # Redis was down when the worker started, so the check runs in the rebuild.
    worker = _worker(tmp_path, "127.0.0.1:9")
    worker.sink = _RegistrySink()
    signals: list[int] = []
    monkeypatch.setattr("stream.app.signal.raise_signal", signals.append)

    assert asyncio.run(worker.rebuild_served()) == 0

    assert signals == [signal.SIGTERM]
    assert worker.fatal_error is not None
    assert "another pseudonym key" in worker.fatal_error
    assert not worker.served_ready


def test_registry_of_other_key_fails_start_check(tmp_path):
    worker = _worker(tmp_path, "127.0.0.1:9")
    worker.sink = _RegistrySink()

    with pytest.raises(RegistryKeyError, match="FUSIONREC_PSEUDONYM_KEY"):
        asyncio.run(worker.check_registry_key())


def test_failed_prune_keeps_checkpoint_written(tmp_path, monkeypatch):
    worker = _worker(tmp_path, "127.0.0.1:9")
    sink = _Sink()
    worker.sink = sink  # type: ignore[assignment]
    committed: list[dict[tuple[str, int], int]] = []

    async def commit(offsets: dict[tuple[str, int], int]) -> None:
        committed.append(offsets)

    monkeypatch.setattr(worker, "_commit", commit)
    asyncio.run(worker.checkpoint("interval"))
    older = worker.store.paths()[0][1]
    unlink = Path.unlink

    def fail_on_older(path: Path, missing_ok: bool = False) -> None:
        if path == older:
            raise PermissionError(13, "Permission denied")
        unlink(path, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", fail_on_older)
    asyncio.run(worker._try_checkpoint("forget", prune=True))

    assert len(committed) == 2
    assert worker.checkpoint_failing is False
    assert worker.metrics.errors.labels(kind="checkpoint_write")._value.get() == 0
    assert worker.metrics.errors.labels(kind="checkpoint_prune")._value.get() == 1
    assert older.exists()

    monkeypatch.setattr(Path, "unlink", unlink)
    asyncio.run(worker.checkpoint("interval"))

    assert not older.exists()
    assert len(worker.store.paths()) == 1


def test_tick_reports_users_to_refresh(tmp_path):
    worker = _worker(tmp_path, "127.0.0.1:9")
    worker.sink = _Sink()  # type: ignore[assignment]
    worker.dirty = {"pseudonym-1": "user-1", "pseudonym-2": ""}

    asyncio.run(worker.tick())

    assert worker.metrics.users_to_refresh._value.get() == 2


def test_prune_deletes_checkpoints_set_aside(tmp_path):
    worker = _worker(tmp_path, "127.0.0.1:9")
    worker.store.write({"n": 1})
    folder = worker.store.folder
    (folder / "checkpoint-00000000000000000007.bin.invalid").write_bytes(b"torn")
    (folder / "checkpoint-00000000000000000008.bin.invalid").mkdir()

    worker._prune_older_checkpoints()

    assert worker.store.set_aside() == []
    assert len(worker.store.paths()) == 1


class _DownRedis:
    """Stands in for a Redis client whose every call fails."""

    def __init__(self) -> None:
        self.calls = 0

    async def hset(self, key: str, mapping: dict[str, object]) -> int:
        self.calls += 1
        raise OSError("connection refused")


def test_registry_retries_back_off(tmp_path):
    worker = _worker(tmp_path, "127.0.0.1:9")
    sink = _Sink()
    client = _DownRedis()
    sink.client = client  # type: ignore[attr-defined]
    worker.sink = sink  # type: ignore[assignment]
    worker._registry_owed = {"ab" * 16: 1_700_000_000_000}

    async def ticks(count: int) -> None:
        for _ in range(count):
            await worker.tick()

    asyncio.run(ticks(5))

    assert client.calls == 1
    assert worker._registry_pause_s == 2.0
    assert worker.metrics.errors.labels(kind="redis_forget_registry")._value.get() == 1


def test_broker_probe_survives_busy_loop(monkeypatch):
    # The worker's loop is blocked for longer than the probe's time limit,
    # as by a recomputation of thousands of lists. The probe runs on a loop
    # of its own, so it still gets the broker's reply.
    async def replies_soon(settings: Settings, partitions: object) -> tuple[bool, dict]:
        # On the worker's own loop, the held loop would count against the
        # time limit.
        await asyncio.wait_for(asyncio.sleep(0.05), 1.0)
        return threading.current_thread() is not threading.main_thread(), {}

    monkeypatch.setattr(app_module, "_probe_brokers", replies_soon)

    async def run() -> bool:
        probe = asyncio.create_task(app_module._broker_replies(Settings()))
        await asyncio.sleep(0.01)
        time.sleep(1.5)
        reachable, _ = await probe
        return reachable

    assert asyncio.run(run()) is True


def test_lag_uses_probed_end_offsets(tmp_path, monkeypatch):
    # The last fetch saw offset 120, and the producer has gone on to 500
    # since; the fetched records still wait in the consumer's buffer.
    worker = _worker(tmp_path, "127.0.0.1:9")
    tp = TP("events.view", 0)
    worker.assigned = {tp}
    worker.processor.offsets[("events.view", 0)] = 100
    monkeypatch.setattr(worker.app.consumer, "highwater", lambda partition: 120)

    async def probe(settings: Settings, partitions: object) -> tuple[bool, dict]:
        return True, {("events.view", 0): 500}

    monkeypatch.setattr(app_module, "_probe_brokers", probe)

    worker._update_lag()
    fetched_only = worker.metrics.lag.labels(topic="events.view", partition="0")._value.get()
    asyncio.run(worker.check_brokers())
    worker._update_lag()
    probed = worker.metrics.lag.labels(topic="events.view", partition="0")._value.get()

    assert fetched_only == 20
    assert probed == 400
