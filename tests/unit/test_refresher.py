"""The worker's refresh loop, driven without Kafka or Redis."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import orjson

from schemas import Event, RecommendedItem
from stream.app import Worker
from stream.settings import Settings


def _worker(tmp_path) -> tuple[Worker, list[dict[str, str]]]:
    worker = Worker(Settings(data_dir=str(tmp_path)))
    refreshed: list[dict[str, str]] = []

    def refresh_some(limit: int | None = None) -> int:
        refreshed.append(dict(worker.dirty))
        worker.dirty.clear()
        return len(refreshed[-1])

    worker.refresh_some = refresh_some  # type: ignore[method-assign]
    return worker, refreshed


async def _run_briefly(worker: Worker) -> None:
    task = asyncio.create_task(worker.refresher())
    await asyncio.sleep(0.1)
    worker._stopping = True
    assert worker._refresh_wakeup is not None
    worker._refresh_wakeup.set()
    await asyncio.wait_for(task, timeout=5)


def test_refresher_serves_owed_lists_at_start(tmp_path):
    worker, refreshed = _worker(tmp_path)
    worker.dirty["pseudonym-1"] = "user-1"

    asyncio.run(_run_briefly(worker))

    assert refreshed == [{"pseudonym-1": "user-1"}]


class _RecordingSink:
    """Stands in for the Redis sink and records what the worker queues."""

    def __init__(self) -> None:
        self.puts: dict[str, bytes] = {}
        self.existing: dict[str, bytes] = {}

    def put(self, key: str, payload: bytes) -> None:
        self.puts[key] = payload

    def put_existing(self, key: str, payload: bytes) -> None:
        self.existing[key] = payload

    def delete(self, key: str) -> None:
        self.puts.pop(key, None)


def _record(topic, offset, key, value):
    message = SimpleNamespace(topic=topic, partition=0, offset=offset, key=key, value=value)
    return SimpleNamespace(message=message)


def _served_worker(tmp_path) -> tuple[Worker, _RecordingSink]:
    worker = Worker(Settings(data_dir=str(tmp_path), fusion="weighted"))
    sink = _RecordingSink()
    worker.sink = sink  # type: ignore[assignment]
    now_ms = int(time.time() * 1000) - 60_000
    records = []
    for n in range(40):
        for item in ("hot", f"item-{n}"):
            event = Event(f"e-{n}-{item}", "view", f"user-{n}", item, now_ms + n)
            records.append(
                _record(
                    "events.view",
                    len(records),
                    event.user_id.encode(),
                    orjson.dumps(event.to_json()),
                )
            )
    asyncio.run(worker.on_event_batch(records))
    worker.refresh_some()
    sink.puts.clear()
    return worker, sink


def _sold_out(item: str):
    update = {"item_id": item, "timestamp": int(time.time() * 1000), "in_stock": False}
    return [_record("items.updates", 0, item.encode(), orjson.dumps(update))]


def test_sold_out_rewrites_lists_and_popular(tmp_path):
    worker, sink = _served_worker(tmp_path)

    asyncio.run(worker.on_item_batch(_sold_out("hot")))

    assert sink.existing
    for payload in sink.existing.values():
        assert "hot" not in [e["item_id"] for e in orjson.loads(payload)["items"]]
    popular = orjson.loads(sink.puts[worker.processor.popular_key])
    assert "hot" not in [e["item_id"] for e in popular["items"]]


def test_sold_out_skips_expired_lists(tmp_path):
    worker, sink = _served_worker(tmp_path)
    hot = [RecommendedItem("hot", 1.0, ("popular",))]
    item_row = worker.processor.engine.catalog.index.get
    for n in range(40):
        pseudonym = worker.processor.pseudonymize(f"user-{n}")
        worker.served.record(pseudonym, f"recs:user:user-{n}", hot, item_row, 0.0)

    asyncio.run(worker.on_item_batch(_sold_out("hot")))

    assert not sink.existing
    assert len(worker.served) == 0
