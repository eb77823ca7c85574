"""The rebalance hook that moves committed offsets back to the state's, with a failing broker."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
from aiokafka.errors import KafkaConnectionError
from faust.types import TP

from stream.app import Worker
from stream.settings import Settings


class _Consumer:
    """Stand-in for the offsets consumer, as the broker goes away at one step."""

    def __init__(self, fail_at: str, failures: int = 1_000_000) -> None:
        self.fail_at = fail_at
        # How many times the step fails before the broker is back.
        self.failures = failures
        self.stopped = False

    async def _step(self, name: str) -> None:
        if self.fail_at == name and self.failures > 0:
            self.failures -= 1
            raise KafkaConnectionError(f"Unable to bootstrap ({name})")
        if self.fail_at == f"hang:{name}":
            await asyncio.sleep(3600)

    async def start(self) -> None:
        await self._step("start")

    async def stop(self) -> None:
        self.stopped = True

    async def beginning_offsets(self, tps: list) -> dict:
        await self._step("beginning_offsets")
        return {tp: 0 for tp in tps}

    async def end_offsets(self, tps: list) -> dict:
        return {tp: 100 for tp in tps}

    def assign(self, tps: list) -> None:
        pass

    async def committed(self, tp: object) -> int:
        await self._step("committed")
        return 100


def _worker(tmp_path, monkeypatch, consumer: _Consumer) -> Worker:
    # The port is never reached: the stand-in consumer replaces every client.
    settings = replace(Settings(), data_dir=str(tmp_path), kafka_bootstrap="127.0.0.1:9")
    worker = Worker(settings)
    monkeypatch.setattr(worker, "_offsets_consumer", lambda: consumer)
    return worker


def _assigned(worker: Worker) -> set[TP]:
    return {TP(worker.settings.topic("events.view"), 0)}


@pytest.mark.parametrize("fail_at", ["start", "committed"])
def test_align_hook_survives_broker_failure(fail_at, tmp_path, monkeypatch):
    # "start": the broker is unreachable; "committed": it is lost midway.
    consumer = _Consumer(fail_at=fail_at)
    worker = _worker(tmp_path, monkeypatch, consumer)
    monkeypatch.setattr("stream.app._ALIGN_TIMEOUT_S", 2.0)

    asyncio.run(worker.align_assigned_offsets(_assigned(worker)))

    assert consumer.stopped
    assert worker.metrics.errors.labels(kind="offset_align")._value.get() == 1


def test_align_hook_gives_up_on_silent_broker(tmp_path, monkeypatch):
    consumer = _Consumer(fail_at="hang:committed")
    worker = _worker(tmp_path, monkeypatch, consumer)
    monkeypatch.setattr("stream.app._ALIGN_TIMEOUT_S", 0.5)

    async def run() -> None:
        await asyncio.wait_for(worker.align_assigned_offsets(_assigned(worker)), timeout=30)

    asyncio.run(run())

    assert consumer.stopped
    assert worker.metrics.errors.labels(kind="offset_align")._value.get() == 1


def test_align_hook_frees_lock_during_broker_reads(tmp_path, monkeypatch):
    # Checkpoints and the final checkpoint of a stop take the same lock, so
    # a broker that does not reply must not hold them up.
    consumer = _Consumer(fail_at="hang:beginning_offsets")
    worker = _worker(tmp_path, monkeypatch, consumer)

    async def run() -> bool:
        hook = asyncio.create_task(worker.align_assigned_offsets(_assigned(worker)))
        await asyncio.sleep(0.2)
        try:
            await asyncio.wait_for(worker.lock.acquire(), timeout=10)
        except TimeoutError:
            return False
        finally:
            hook.cancel()
        worker.lock.release()
        return True

    assert asyncio.run(run()) is True


def test_align_hook_retries_until_broker_is_back(tmp_path, monkeypatch):
    consumer = _Consumer(fail_at="start", failures=2)
    worker = _worker(tmp_path, monkeypatch, consumer)
    commits: list[dict] = []

    async def commit(offsets: dict) -> bool:
        commits.append(offsets)
        return True

    monkeypatch.setattr(worker.app.consumer, "_commit", commit)

    asyncio.run(asyncio.wait_for(worker.align_assigned_offsets(_assigned(worker)), timeout=60))

    # The group committed offset 100, and the state has read nothing yet.
    assert commits == [{TP(worker.settings.topic("events.view"), 0): 0}]
    assert worker.metrics.errors.labels(kind="offset_align")._value.get() == 0
