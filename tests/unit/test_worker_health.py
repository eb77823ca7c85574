"""Readiness facts of the worker that need no Kafka or Redis."""

from __future__ import annotations

import asyncio
import socket
from dataclasses import replace

from stream.app import Worker
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


def test_any_listening_broker_counts_as_reachable(tmp_path):
    async def run() -> bool:
        server = await asyncio.start_server(lambda reader, writer: writer.close(), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        worker = _worker(tmp_path, f"127.0.0.1:{_closed_port()},127.0.0.1:{port}")
        worker.broker_reachable = False
        async with server:
            await worker.check_brokers()
        return worker.broker_reachable

    assert asyncio.run(run()) is True


class _Sink:
    """Stands in for the Redis sink and records the keys the worker writes."""

    in_outage = False

    def __init__(self) -> None:
        self.keys: list[str] = []

    def put(self, key: str, payload: bytes) -> None:
        self.keys.append(key)


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
