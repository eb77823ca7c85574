"""Forget requests, sold-out rewrites and Redis restarts, driven without Kafka or Redis."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import orjson
from test_redis_writes import (
    _FakePipeline,
    _FakeRedis,
    _record,
    _RegistryClient,
    _RestartingRedis,
    _settings,
    _sink,
    _sold_out,
    _view,
)

from stream.app import Worker
from stream.topics import FORGET_TOPIC, ITEMS_TOPIC


class _RegistryRedis(_RestartingRedis):
    """The in-memory Redis with a run id and the hash that contains the forget registry."""

    def __init__(self) -> None:
        super().__init__()
        self.hashes: dict[str, dict[str, object]] = {}

    async def hset(self, key: str, mapping: dict[str, object]) -> int:
        self.hashes.setdefault(key, {}).update(mapping)
        return len(mapping)


class _ReadingPipeline(_FakePipeline):
    """A pipeline that also replies to MGET and PTTL, which the served-index rebuild sends."""

    def mget(self, keys: list[str]) -> None:
        self.commands.append(("mget", keys, None, False))  # type: ignore[arg-type]

    def pttl(self, key: str) -> None:
        self.commands.append(("pttl", key, None, False))

    async def execute(self) -> list[object]:
        reads = [command for command in self.commands if command[0] in ("mget", "pttl")]
        if not reads:
            return await super().execute()
        replies: list[object] = []
        for command, key, _, _ in reads:
            if command == "mget":
                replies.append([self.redis.values.get(name) for name in key])
            else:
                replies.append(3_600_000 if key in self.redis.values else -2)
        return replies


class _ReadableRedis(_FakeRedis):
    def pipeline(self, transaction: bool = False) -> _ReadingPipeline:
        return _ReadingPipeline(self)


def _forget(worker: Worker, user: str, offset: int = 0) -> list[SimpleNamespace]:
    request = {"user_id": user, "timestamp": int(time.time() * 1000)}
    topic = worker.settings.topic(FORGET_TOPIC)
    return [_record(topic, offset, user.encode(), orjson.dumps(request))]


async def _flush(sink) -> None:
    while sink.pending:
        await sink.flush_once()


def test_redis_snapshot_deletes_forgotten_list(tmp_path):
    # Redis restarts from a snapshot taken before the user was forgotten,
    # so the deleted list is back. The worker reads the new run id, writes
    # its lists again and deletes the forgotten user's list.
    worker = Worker(_settings(tmp_path))
    sink, _ = _sink(worker.settings)
    redis = _RegistryRedis()
    sink.client = redis  # type: ignore[assignment]
    worker.sink = sink

    async def run() -> bool:
        await worker.on_event_batch([_view(0, "dora", "hot"), _view(1, "erin", "hot")])
        worker.refresh_some()
        worker._redis_run_id = await worker._server_run_id()
        await _flush(sink)
        snapshot = dict(redis.values)
        await worker.on_forget_batch(_forget(worker, "dora"))
        await _flush(sink)
        assert "recs:user:dora" not in redis.values

        redis.values = snapshot
        redis.run_id = "second"
        redis_kept = await worker.check_redis_kept()
        worker.refresh_some()
        await _flush(sink)
        return redis_kept

    redis_kept = asyncio.run(run())

    assert redis_kept is False
    assert "recs:user:erin" in redis.values
    assert "recs:user:dora" not in redis.values


def test_rebuilt_list_drops_sold_out_item(tmp_path):
    # After a restart from a checkpoint, Redis contains a list with an item
    # that the restored catalog learns only when the events after the
    # checkpoint are read again. The item then sells out.
    worker = Worker(_settings(tmp_path))
    sink, _ = _sink(worker.settings)
    redis = _ReadableRedis()
    sink.client = redis  # type: ignore[assignment]
    worker.sink = sink
    stamp = int(time.time() * 1000)
    served = {
        "items": [
            {"item_id": "fresh", "score": 2.0, "sources": ["popular"]},
            {"item_id": "hot", "score": 1.0, "sources": ["popular"]},
        ],
        "computed_at": stamp,
        "model_version": "v1",
    }
    redis.values["recs:user:fay"] = orjson.dumps(served)

    async def run() -> int:
        await worker.on_event_batch([_view(0, "gus", "hot")])
        loaded = await worker._load_served_keys(["recs:user:fay"], [])
        await worker.on_event_batch([_view(1, "gus", "fresh")])
        worker.refresh_some()
        await _flush(sink)
        await worker.on_item_batch(_sold_out("fresh"))
        await _flush(sink)
        return loaded

    loaded = asyncio.run(run())

    assert loaded == 1
    items = [entry["item_id"] for entry in orjson.loads(redis.values["recs:user:fay"])["items"]]
    assert "fresh" not in items


def test_forget_checkpoint_omits_forgotten_key(tmp_path):
    # The user's list is in flight to Redis when the forget request arrives.
    # The checkpoint written for the request must not owe that list.
    settings = _settings(tmp_path)
    worker = Worker(settings)
    sink, redis = _sink(settings)
    worker.sink = sink

    async def hset(key: str, mapping: dict[str, object]) -> int:
        return len(mapping)

    redis.hset = hset  # type: ignore[attr-defined]

    async def run() -> None:
        await worker.on_event_batch([_view(0, "hana", "hot")])
        worker.refresh_some()
        redis.gate = asyncio.Event()
        flush = asyncio.create_task(sink.flush_once())
        await redis.entered.wait()
        await worker.on_forget_batch(_forget(worker, "hana"))
        redis.gate.set()
        await flush
        await _flush(sink)

    asyncio.run(run())
    newest = worker.store.paths()[0][1]
    owed = orjson.loads(worker.sealer.open(worker.store.read(newest)["pending_lists"]))
    restarted = Worker(settings)
    restarted.restore()

    assert "recs:user:hana" not in redis.values
    assert "recs:user:hana" not in owed
    assert "recs:user:hana" not in restarted._short.values()


def test_registry_erasure_prunes_old_checkpoints(tmp_path):
    # A worker falls back to a checkpoint older than a forget request, and
    # the registry in Redis erases the user. Then the timer runs with a
    # checkpoint due, and no file on disk may still contain the user.
    settings = _settings(tmp_path)
    first = Worker(settings)
    first.sink = _sink(settings)[0]
    asyncio.run(first.on_event_batch([_view(0, "ivy", "hot")]))
    asyncio.run(first.checkpoint("interval"))
    pseudonym = first.processor.pseudonymize("ivy")

    worker = Worker(settings)
    assert worker.restore()
    sink, _ = _sink(settings)
    worker.sink = sink
    token = worker.processor.forget_token(pseudonym).encode()
    stamp = str(int(time.time() * 1000)).encode()
    sink.client = _RegistryClient({token: stamp})  # type: ignore[assignment]

    async def run() -> None:
        await worker._merge_registry()
        worker.last_checkpoint -= 10 * settings.checkpoint_interval_s
        await worker.tick()
        if worker._interval_checkpoint is not None:
            await worker._interval_checkpoint

    asyncio.run(run())

    assert not worker.processor.engine.has_user(pseudonym)
    for _, path in worker.store.paths():
        engine = worker.store.read(path)["engine"]
        assert not engine.has_user(pseudonym), path.name


def test_item_update_stamped_ahead_rejected(tmp_path):
    # An update stamped a day ahead, as from a producer with a wrong clock,
    # would make every real update of the item stale until that day. The
    # item's sale then never reaches the lists.
    worker = Worker(_settings(tmp_path))
    sink, redis = _sink(worker.settings)
    worker.sink = sink
    topic = worker.settings.topic(ITEMS_TOPIC)
    now_ms = int(time.time() * 1000)
    ahead = {"item_id": "hot", "timestamp": now_ms + 86_400_000, "in_stock": True}
    sold = {"item_id": "hot", "timestamp": now_ms, "in_stock": False}

    async def run() -> None:
        await worker.on_event_batch([_view(0, "jack", "hot")])
        worker.refresh_some()
        await _flush(sink)
        await worker.on_item_batch([_record(topic, 0, b"hot", orjson.dumps(ahead))])
        await worker.on_item_batch([_record(topic, 1, b"hot", orjson.dumps(sold))])
        await _flush(sink)

    asyncio.run(run())
    catalog = worker.processor.engine.catalog
    items = [entry["item_id"] for entry in orjson.loads(redis.values["recs:user:jack"])["items"]]

    assert len(worker.dead_letters) == 1
    assert not catalog.in_stock[catalog.index["hot"]]
    assert "hot" not in items
