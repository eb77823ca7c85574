"""The rebalance hook that moves committed offsets back to the state's, with a failing broker."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace

import pytest
from aiokafka.errors import GroupAuthorizationFailedError, KafkaConnectionError
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
def test_align_hook_survives_broker_failure(fail_at, tmp_path, monkeypatch, caplog):
    # "start": the broker is unreachable; "committed": it is lost midway.
    consumer = _Consumer(fail_at=fail_at)
    worker = _worker(tmp_path, monkeypatch, consumer)
    monkeypatch.setattr("stream.app._ALIGN_TIMEOUT_S", 2.0)

    with caplog.at_level(logging.ERROR, logger="stream.app"):
        asyncio.run(worker.align_assigned_offsets(_assigned(worker)))

    assert consumer.stopped
    assert worker.metrics.errors.labels(kind="offset_align")._value.get() == 1
    # The error names the partitions, so an operator knows which ones are paused.
    assert f"{worker.settings.topic('events.view')}[0]" in caplog.text


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

    monkeypatch.setattr(worker.app.consumer, "commit_offsets", commit)

    asyncio.run(asyncio.wait_for(worker.align_assigned_offsets(_assigned(worker)), timeout=60))

    # The group committed offset 100, and the state has read nothing yet.
    assert commits == [{TP(worker.settings.topic("events.view"), 0): 0}]
    assert worker.metrics.errors.labels(kind="offset_align")._value.get() == 0


class _FaustCalls:
    """Stubs for the broker calls of Faust's consumer, recorded in the order they happen."""

    def __init__(self, worker: Worker, monkeypatch, assignment: set[TP]) -> None:
        self.consumer = worker.app.consumer
        self.assignment = set(assignment)
        self.calls: list[tuple[str, dict]] = []
        monkeypatch.setattr(self.consumer, "assignment", lambda: set(self.assignment))
        monkeypatch.setattr(self.consumer, "commit_offsets", self._commit)
        monkeypatch.setattr(self.consumer, "_seek", self._seek)

    async def _commit(self, offsets: dict) -> bool:
        self.calls.append(("commit", dict(offsets)))
        return True

    async def _seek(self, tp: TP, offset: int) -> None:
        self.calls.append(("seek", {tp: offset}))

    def resume_after_rebalance(self) -> None:
        """Resume every assigned partition, as Faust does right after the rebalance hook."""
        self.consumer.resume_partitions(self.assignment)

    def active(self) -> set[TP]:
        return set(self.consumer._get_active_partitions())

    def seeks(self) -> list[dict]:
        return [offsets for name, offsets in self.calls if name == "seek"]

    def commits(self) -> list[dict]:
        return [offsets for name, offsets in self.calls if name == "commit"]


async def _wait_until(condition, timeout_s: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def _fast_retries(monkeypatch) -> None:
    monkeypatch.setattr("stream.app._ALIGN_TIMEOUT_S", 0.3)
    monkeypatch.setattr("stream.app._ALIGN_RETRY_S", 0.05)
    monkeypatch.setattr("stream.app._ALIGN_RETRY_MAX_S", 0.1)


def test_held_partition_stays_paused_on_resume(tmp_path, monkeypatch):
    worker = _worker(tmp_path, monkeypatch, _Consumer(fail_at="none"))
    held, other = TP("events.view", 0), TP("events.view", 1)
    faust = _FaustCalls(worker, monkeypatch, {held, other})

    faust.consumer.hold({held})
    faust.resume_after_rebalance()

    assert faust.active() == {other}
    faust.consumer.release({held})
    assert faust.active() == {held, other}


def test_unaligned_partitions_paused_while_broker_down(tmp_path, monkeypatch):
    consumer = _Consumer(fail_at="start")
    worker = _worker(tmp_path, monkeypatch, consumer)
    _fast_retries(monkeypatch)
    tp = TP(worker.settings.topic("events.view"), 0)
    faust = _FaustCalls(worker, monkeypatch, {tp})

    async def run() -> None:
        await worker.align_assigned_offsets({tp})
        faust.resume_after_rebalance()
        tries = consumer.failures
        # The retry task goes on trying the broker in the background.
        await _wait_until(lambda: consumer.failures <= tries - 3)
        assert tp not in faust.active()
        assert worker.health()["partitions_paused"] == 1
        assert worker._align_retry is not None
        assert not worker._align_retry.done()
        await worker.stop_offset_alignment()

    asyncio.run(run())

    assert faust.seeks() == []
    assert faust.commits() == []
    assert worker.metrics.errors.labels(kind="offset_align")._value.get() == 1


def test_partitions_resume_at_state_offsets(tmp_path, monkeypatch):
    consumer = _Consumer(fail_at="start")
    worker = _worker(tmp_path, monkeypatch, consumer)
    _fast_retries(monkeypatch)
    tp = TP(worker.settings.topic("events.view"), 0)
    worker.processor.offsets[(tp.topic, tp.partition)] = 40
    faust = _FaustCalls(worker, monkeypatch, {tp})

    async def run() -> None:
        await worker.align_assigned_offsets({tp})
        faust.resume_after_rebalance()
        assert tp not in faust.active()
        consumer.failures = 0
        await _wait_until(lambda: tp in faust.active())
        await _wait_until(lambda: worker._align_retry is None or worker._align_retry.done())

    asyncio.run(run())

    # The group committed offset 100, ahead of the state's 40.
    assert faust.calls == [("commit", {tp: 40}), ("seek", {tp: 40})]
    assert faust.consumer._read_offset[tp] == 40
    assert faust.consumer.held == set()


def test_rebalance_cancels_pending_retry(tmp_path, monkeypatch):
    consumer = _Consumer(fail_at="start")
    worker = _worker(tmp_path, monkeypatch, consumer)
    _fast_retries(monkeypatch)
    topic = worker.settings.topic("events.view")
    revoked, kept = TP(topic, 0), TP(topic, 1)
    faust = _FaustCalls(worker, monkeypatch, {revoked, kept})

    async def run() -> bool:
        await worker.align_assigned_offsets({revoked, kept})
        faust.resume_after_rebalance()
        first = worker._align_retry
        assert first is not None
        faust.assignment = {kept}
        await worker.align_assigned_offsets({kept})
        faust.resume_after_rebalance()
        consumer.failures = 0
        await _wait_until(lambda: kept in faust.active())
        return first.cancelled()

    # Checked inside the loop, because asyncio.run cancels the tasks left at its end.
    assert asyncio.run(run()) is True
    assert revoked not in faust.active()
    assert faust.seeks() == [{kept: 0}]
    assert faust.commits() == [{kept: 0}]


def test_shutdown_cancels_pending_retry(tmp_path, monkeypatch):
    consumer = _Consumer(fail_at="start")
    worker = _worker(tmp_path, monkeypatch, consumer)
    _fast_retries(monkeypatch)
    tp = TP(worker.settings.topic("events.view"), 0)
    faust = _FaustCalls(worker, monkeypatch, {tp})

    async def run() -> bool:
        await worker.align_assigned_offsets({tp})
        retry = worker._align_retry
        assert retry is not None
        await asyncio.wait_for(worker.shutdown(), timeout=60)
        return retry.cancelled()

    assert asyncio.run(run()) is True
    assert faust.seeks() == []
    assert tp not in faust.active()


def test_rejected_commit_keeps_partition_paused(tmp_path, monkeypatch):
    worker = _worker(tmp_path, monkeypatch, _Consumer(fail_at="none"))
    _fast_retries(monkeypatch)
    tp = TP(worker.settings.topic("events.view"), 0)
    faust = _FaustCalls(worker, monkeypatch, {tp})
    rejections = [GroupAuthorizationFailedError(), GroupAuthorizationFailedError()]

    async def commit(offsets: dict) -> bool:
        if rejections:
            raise rejections.pop()
        return await faust._commit(offsets)

    monkeypatch.setattr(faust.consumer, "commit_offsets", commit)

    async def run() -> None:
        await worker.align_assigned_offsets({tp})
        faust.resume_after_rebalance()
        assert tp not in faust.active()
        await _wait_until(lambda: tp in faust.active())

    asyncio.run(run())

    # The group committed offset 100, and the state has read nothing yet.
    assert faust.calls == [("commit", {tp: 0}), ("seek", {tp: 0})]
    assert worker.metrics.errors.labels(kind="offset_commit")._value.get() == 2
