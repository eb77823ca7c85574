"""The worker's Faust agents on in-memory channels, without Kafka or Redis.

`Agent.test_context` feeds messages to an agent through a channel in
memory, so these tests cover how each agent hands its batches to the
processor. The same agents run against the real broker in the integration
tests.
"""

from __future__ import annotations

import asyncio
import signal
from dataclasses import replace

import orjson
import pytest

from stream.app import Worker
from stream.settings import Settings

T0 = 1_700_000_000_000


@pytest.fixture
def worker(tmp_path) -> Worker:
    # Port 9 is closed, so nothing here reaches a broker or a Redis server,
    # even where the services of the integration tests are running.
    settings = replace(
        Settings(),
        data_dir=str(tmp_path),
        kafka_bootstrap="127.0.0.1:9",
        redis_url="redis://127.0.0.1:9/0",
    )
    return Worker(settings)


def _event(event_id: str, user: str, item: str, ms: int = T0) -> bytes:
    event = {"event_id": event_id, "type": "view", "user_id": user, "item_id": item}
    return orjson.dumps({**event, "timestamp": ms})


async def test_event_agent_learns_and_marks_user(worker: Worker) -> None:
    async with worker.app.agents["fusionrec.events"].test_context() as agent:
        await agent.put(key=b"u1", value=_event("e1", "u1", "i1"))

    pseudonym = worker.processor.pseudonymize("u1")
    assert worker.dirty == {pseudonym: "u1"}
    assert worker.processor.engine.has_user(pseudonym)
    assert "i1" in worker.processor.engine.catalog.index
    assert not worker.dead_letters


async def test_event_agent_dead_letters_bad_json(worker: Worker) -> None:
    async with worker.app.agents["fusionrec.events"].test_context() as agent:
        await agent.put(key=b"u1", value=b"{not json")
        await agent.put(key=b"u2", value=_event("e2", "u2", "i2"))

    assert len(worker.dead_letters) == 1
    letter = orjson.loads(next(iter(worker.dead_letters.values())).value)
    assert letter["reason"] == "not_json"
    assert worker.dirty == {worker.processor.pseudonymize("u2"): "u2"}


async def test_item_agent_applies_price(worker: Worker) -> None:
    update = {"item_id": "i1", "timestamp": T0, "price": 12.5}
    async with worker.app.agents["fusionrec.items"].test_context() as agent:
        await agent.put(key=b"i1", value=orjson.dumps(update))

    catalog = worker.processor.engine.catalog
    assert catalog.prices[catalog.index["i1"]] == pytest.approx(12.5)
    assert not worker.dead_letters


async def test_forget_agent_erases_user(worker: Worker) -> None:
    async with worker.app.agents["fusionrec.events"].test_context() as agent:
        await agent.put(key=b"u1", value=_event("e1", "u1", "i1"))
    pseudonym = worker.processor.pseudonymize("u1")
    assert worker.processor.engine.has_user(pseudonym)

    request = {"user_id": "u1", "timestamp": T0 + 1_000}
    async with worker.app.agents["fusionrec.forget"].test_context() as agent:
        await agent.put(key=b"u1", value=orjson.dumps(request))

    assert not worker.processor.engine.has_user(pseudonym)
    assert pseudonym not in worker.dirty
    assert not worker.dead_letters


async def test_failed_batch_stops_without_checkpoint(worker: Worker, monkeypatch) -> None:
    signals: list[int] = []
    monkeypatch.setattr("stream.app.signal.raise_signal", signals.append)

    def fail(events: object) -> None:
        raise RuntimeError("stands in for a fault while learning")

    monkeypatch.setattr(worker.processor.engine, "learn", fail)
    async with worker.app.agents["fusionrec.events"].test_context() as agent:
        await agent.put(key=b"u1", value=_event("e1", "u1", "i1"))
        await agent.put(key=b"u2", value=_event("e2", "u2", "i2"))
    await worker.checkpoint("interval")

    assert signals == [signal.SIGTERM]
    assert worker.fatal_error == "applying a batch of events failed with RuntimeError"
    assert worker.metrics.errors.labels(kind="batch_failed")._value.get() == 1
    assert worker.store.paths() == []
    assert not worker.dirty


async def test_failed_refresher_stops_worker(worker: Worker, monkeypatch) -> None:
    signals: list[int] = []
    monkeypatch.setattr("stream.app.signal.raise_signal", signals.append)

    def fail(limit: int | None = None) -> int:
        raise RuntimeError("stands in for a fault while scoring")

    monkeypatch.setattr(worker, "refresh_some", fail)
    worker.dirty["pseudonym-1"] = "user-1"
    task = asyncio.create_task(worker.refresher(), name="fusionrec-refresher")
    task.add_done_callback(worker._stop_when_task_fails)
    await asyncio.wait([task], timeout=5)
    await asyncio.sleep(0)
    await worker.checkpoint("interval")

    assert signals == [signal.SIGTERM]
    assert worker.fatal_error == "background task fusionrec-refresher failed with RuntimeError"
    assert worker.metrics.errors.labels(kind="background_task")._value.get() == 1
    assert worker.store.paths() == []
