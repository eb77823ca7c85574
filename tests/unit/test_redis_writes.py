"""What reaches Redis when writes fail, lists sell out and users are forgotten, without a server."""

from __future__ import annotations

import asyncio
import fnmatch
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from types import SimpleNamespace

import orjson
from redis.exceptions import ConnectionError as RedisConnectionError

from schemas import RecommendedItem
from stream.app import Worker
from stream.metrics import WorkerMetrics
from stream.settings import Settings
from stream.sink import RedisSink


class _FakeRedis:
    """Keeps keys in a dict. A pipeline can wait at a gate, then fail once."""

    def __init__(self) -> None:
        self.values: dict[str, bytes] = {}
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()
        self.fail_next = False
        self.connection_pool = self

    async def disconnect(self, inuse_connections: bool = True) -> None:
        return None

    async def aclose(self) -> None:
        return None

    def pipeline(self, transaction: bool = False) -> _FakePipeline:
        return _FakePipeline(self)


class _FakePipeline:
    def __init__(self, redis: _FakeRedis) -> None:
        self.redis = redis
        self.commands: list[tuple[str, str, bytes | None, bool]] = []

    async def __aenter__(self) -> _FakePipeline:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    def set(self, key: str, value: bytes, ex: int | None = None, xx=False, keepttl=False) -> None:
        self.commands.append(("set", key, value, xx))

    def delete(self, key: str) -> None:
        self.commands.append(("delete", key, None, False))

    async def execute(self) -> list[object]:
        redis = self.redis
        redis.entered.set()
        if redis.gate is not None:
            await redis.gate.wait()
            redis.gate = None
        if redis.fail_next:
            redis.fail_next = False
            raise RedisConnectionError("connection reset")
        replies: list[object] = []
        for command, key, value, xx in self.commands:
            if command == "delete":
                replies.append(int(redis.values.pop(key, None) is not None))
            elif xx and key not in redis.values:
                replies.append(None)
            else:
                assert value is not None
                redis.values[key] = value
                replies.append(True)
        return replies


def _settings(tmp_path) -> Settings:
    return replace(
        Settings(),
        data_dir=str(tmp_path),
        kafka_bootstrap="127.0.0.1:9",
        redis_url="redis://127.0.0.1:9/0",
    )


def _sink(settings: Settings) -> tuple[RedisSink, _FakeRedis]:
    sink = RedisSink(settings, WorkerMetrics())
    fake = _FakeRedis()
    sink.client = fake  # type: ignore[assignment]
    return sink, fake


async def _fail_while(fake: _FakeRedis, sink: RedisSink, during) -> None:
    """Hold one write in flight, run ``during``, then make the write fail."""
    fake.gate, fake.fail_next = asyncio.Event(), True
    flush = asyncio.create_task(sink.flush_once())
    await fake.entered.wait()
    await during()
    fake.gate.set()
    try:
        await flush
    except RedisConnectionError:
        pass


def test_failed_first_list_stays_plain_write(tmp_path):
    # A sold-out item rewrites a new user's first list while it is in flight.
    async def run() -> dict[str, bytes]:
        sink, fake = _sink(_settings(tmp_path))
        sink.put("recs:user:new", b"first list")

        async def rewrite() -> None:
            sink.put_existing("recs:user:new", b"first list without the sold-out item")

        await _fail_while(fake, sink, rewrite)
        while sink.pending:
            await sink.flush_once()
        return fake.values

    values = asyncio.run(run())

    assert values == {"recs:user:new": b"first list without the sold-out item"}


def test_failed_deletion_stays_deletion(tmp_path):
    async def run() -> dict[str, bytes]:
        sink, fake = _sink(_settings(tmp_path))
        fake.values["recs:user:gone"] = b"old list"
        sink.delete("recs:user:gone")

        async def rewrite() -> None:
            sink.put_existing("recs:user:gone", b"rewritten list")

        await _fail_while(fake, sink, rewrite)
        while sink.pending:
            await sink.flush_once()
        return fake.values

    assert asyncio.run(run()) == {}


def test_checkpoint_owes_lists_in_flight(tmp_path):
    settings = _settings(tmp_path)

    async def run() -> None:
        worker = Worker(settings)
        sink, fake = _sink(settings)
        worker.sink = sink
        sink.put("recs:user:alice", b"alice's list")

        async def checkpoint() -> None:
            await worker.checkpoint("interval")

        await _fail_while(fake, sink, checkpoint)

    asyncio.run(run())
    restarted = Worker(settings)

    assert restarted.restore()
    assert "recs:user:alice" in restarted._short.values()


class _RecordingSink:
    """Stands in for the Redis sink and records each queued write in order."""

    def __init__(self) -> None:
        self.writes: list[tuple[str, str]] = []
        self.pending: dict[str, bytes | None] = {}
        self.in_outage = False

    def put(self, key: str, payload: bytes) -> None:
        self.writes.append(("put", key))

    def put_existing(self, key: str, payload: bytes) -> None:
        self.writes.append(("put_existing", key))

    def delete(self, key: str) -> None:
        self.writes.append(("delete", key))

    def owed_keys(self) -> list[str]:
        return []


def _record(topic: str, offset: int, key: bytes, value: bytes) -> SimpleNamespace:
    return SimpleNamespace(
        message=SimpleNamespace(topic=topic, partition=0, offset=offset, key=key, value=value)
    )


def _view(offset: int, user: str, item: str) -> SimpleNamespace:
    event = {"event_id": f"e{offset}", "type": "view", "user_id": user, "item_id": item}
    stamp = int(time.time() * 1000) - 60_000 + offset
    return _record(
        "events.view", offset, user.encode(), orjson.dumps({**event, "timestamp": stamp})
    )


def _sold_out(item: str) -> list[SimpleNamespace]:
    update = {"item_id": item, "timestamp": int(time.time() * 1000), "in_stock": False}
    return [_record("items.updates", 0, item.encode(), orjson.dumps(update))]


def _served_worker(tmp_path, user: str, expires_at: float) -> tuple[Worker, _RecordingSink, str]:
    """Return a worker that served ``user`` a list holding only the item "hot"."""
    worker = Worker(_settings(tmp_path))
    sink = _RecordingSink()
    worker.sink = sink  # type: ignore[assignment]
    asyncio.run(worker.on_event_batch([_view(0, user, "hot")]))
    worker.refresh_some()
    pseudonym = worker.processor.pseudonymize(user)
    hot = [RecommendedItem("hot", 1.0, ("popular",))]
    row = worker.processor.engine.catalog.index.get
    worker.served.record(pseudonym, f"recs:user:{user}", hot, row, expires_at)
    sink.writes.clear()
    return worker, sink, pseudonym


def test_active_user_renews_ttl_after_sold_out(tmp_path):
    worker, sink, pseudonym = _served_worker(tmp_path, "alice", time.time() + 60)
    asyncio.run(worker.on_event_batch([_view(1, "alice", "other")]))

    asyncio.run(worker.on_item_batch(_sold_out("hot")))
    worker.refresh_some()

    assert sink.writes[-1] == ("put", "recs:user:alice")
    assert worker.served.expires_at(pseudonym) > time.time() + 3600


def test_short_list_expired_not_written_again(tmp_path):
    expiry = time.time() + 2.0
    worker, sink, pseudonym = _served_worker(tmp_path, "bob", expiry)
    asyncio.run(worker.on_item_batch(_sold_out("hot")))

    worker.served.expire(expiry + 1.0)
    worker.refresh_some()

    assert ("put", "recs:user:bob") not in sink.writes
    assert pseudonym not in worker.served


class _RegistryClient:
    """Serves the forget registry from a dict, as Redis would."""

    def __init__(self, registry: dict[bytes, bytes]) -> None:
        self.registry = registry

    async def hgetall(self, key: str) -> dict[bytes, bytes]:
        return dict(self.registry)

    async def hsetnx(self, key: str, field: str, value: str) -> int:
        return 1

    async def hset(self, key: str, mapping: dict[str, object]) -> int:
        return len(mapping)


def test_registry_merge_deletes_queued_list(tmp_path):
    # Redis was down at start, so the list was queued before the registry
    # named the user as forgotten.
    worker = Worker(_settings(tmp_path))
    asyncio.run(worker.on_event_batch([_view(0, "carol", "hot")]))
    pseudonym = worker.processor.pseudonymize("carol")
    sink, _ = _sink(worker.settings)
    worker.sink = sink
    worker.refresh_some()
    assert "recs:user:carol" in sink.pending
    token = worker.processor.forget_token(pseudonym).encode()
    stamp = str(int(time.time() * 1000)).encode()
    sink.client = _RegistryClient({token: stamp})  # type: ignore[assignment]

    asyncio.run(worker._merge_registry())

    assert not worker.processor.engine.has_user(pseudonym)
    assert sink.pending["recs:user:carol"] is None
    assert "recs:user:carol" not in worker._pending_keys()
    assert pseudonym not in worker.served


class _RestartingRedis(_FakeRedis):
    """Adds the server's run id, which a restart changes, to the in-memory Redis."""

    run_id = "first"

    async def info(self, section: str) -> dict[str, str]:
        return {"run_id": self.run_id}

    async def scan_iter(self, match: str, count: int) -> AsyncIterator[bytes]:
        for key in list(self.values):
            if fnmatch.fnmatchcase(key, match):
                yield key.encode()


def test_restarted_redis_gets_every_list_again(tmp_path):
    worker = Worker(_settings(tmp_path))
    sink, _ = _sink(worker.settings)
    fake = _RestartingRedis()
    sink.client = fake  # type: ignore[assignment]
    worker.sink = sink
    asyncio.run(worker.on_event_batch([_view(n, f"user-{n}", "hot") for n in range(3)]))
    worker.refresh_some()

    async def run() -> tuple[bool, bool]:
        worker._redis_run_id = await worker._server_run_id()
        while sink.pending:
            await sink.flush_once()
        kept = await worker.check_redis_kept()
        # Redis restarts without persistence.
        fake.values.clear()
        fake.run_id = "second"
        restarted = await worker.check_redis_kept()
        worker.refresh_some()
        while sink.pending:
            await sink.flush_once()
        return kept, restarted

    kept, restarted = asyncio.run(run())

    assert kept is True
    assert restarted is False
    assert {f"recs:user:user-{n}" for n in range(3)} <= set(fake.values)
    assert "recs:popular" in fake.values
    assert worker.metrics.errors.labels(kind="redis_restarted")._value.get() == 1


def test_refresher_waits_for_queued_writes(tmp_path):
    # Thousands of lists rewritten at once by a sale are queued. The refresher
    # computes the lists of users with new events only once Redis has taken
    # them all, so the rewrites do not wait behind it.
    settings = replace(_settings(tmp_path), redis_write_batch=100)
    worker = Worker(settings)
    sink, fake = _sink(settings)
    worker.sink = sink
    # Each write takes a while, as over a network, and lets other tasks run.
    fake.gate = asyncio.Event()
    asyncio.run(worker.on_event_batch([_view(0, "kim", "hot")]))
    queued_at_refresh: list[int] = []
    refresh = worker.refresh_some

    def recording_refresh(limit: int | None = None) -> int:
        queued_at_refresh.append(len(sink.pending))
        return refresh(limit)

    worker.refresh_some = recording_refresh  # type: ignore[method-assign]
    for n in range(450):
        sink.put_existing(f"recs:user:other-{n}", b"{}")

    async def run() -> None:
        writer = asyncio.create_task(sink.run())
        refresher = asyncio.create_task(worker.refresher())
        while worker.dirty or sink.pending:
            await asyncio.sleep(0.005)
            if fake.gate is None:
                fake.gate = asyncio.Event()
            fake.gate.set()
        for task in (writer, refresher):
            task.cancel()

    asyncio.run(asyncio.wait_for(run(), timeout=30))

    assert queued_at_refresh
    assert max(queued_at_refresh) == 0


def test_refresher_shrinks_slow_batches(tmp_path):
    # Lists that take 5 ms each would hold the event loop for over a second
    # in a batch of 256, so later batches take about 0.1 s of them.
    settings = _settings(tmp_path)
    worker = Worker(settings)
    sink, _ = _sink(settings)
    worker.sink = sink
    worker.dirty = {f"user-{n}": f"user-{n}" for n in range(600)}
    limits: list[int] = []

    def slow_refresh(limit: int | None = None) -> int:
        assert limit is not None
        limits.append(limit)
        chunk = list(worker.dirty)[:limit]
        for pseudonym in chunk:
            del worker.dirty[pseudonym]
        time.sleep(0.005 * len(chunk))
        return len(chunk)

    worker.refresh_some = slow_refresh  # type: ignore[method-assign]

    async def run() -> None:
        refresher = asyncio.create_task(worker.refresher())
        while worker.dirty:
            await asyncio.sleep(0.01)
        refresher.cancel()

    asyncio.run(asyncio.wait_for(run(), timeout=60))

    assert limits[0] == settings.refresh_batch
    assert max(limits[1:]) <= 25
