"""The Redis sink's writes against the real Redis server."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace

from stream.metrics import WorkerMetrics
from stream.settings import Settings
from stream.sink import RedisSink


def _sink(redis_url: str) -> tuple[RedisSink, str]:
    settings = replace(Settings(), redis_url=redis_url, ttl_s=3600)
    prefix = f"t{uuid.uuid4().hex[:10]}:recs:user:"
    return RedisSink(settings, WorkerMetrics()), prefix


async def _flush_and_read(sink: RedisSink, keys: list[str]) -> list[tuple[bytes | None, int]]:
    try:
        while sink.pending:
            await sink.flush_once()
        out = []
        for key in keys:
            out.append((await sink.client.get(key), await sink.client.ttl(key)))
        await sink.client.delete(*keys)
        return out
    finally:
        await sink.client.aclose()


def test_rewrite_never_creates_expired_key(redis_url):
    sink, prefix = _sink(redis_url)
    sink.put_existing(prefix + "gone", b'{"items": []}')
    ((value, ttl),) = asyncio.run(_flush_and_read(sink, [prefix + "gone"]))
    assert value is None
    assert ttl == -2


def test_rewrite_keeps_ttl_of_existing_key(redis_url):
    sink, prefix = _sink(redis_url)
    key = prefix + "kept"

    async def run() -> tuple[bytes | None, int]:
        await sink.client.set(key, b"old", ex=100)
        sink.put_existing(key, b"new")
        ((value, ttl),) = await _flush_and_read(sink, [key])
        return value, ttl

    value, ttl = asyncio.run(run())
    assert value == b"new"
    assert 0 < ttl <= 100


def test_rewrite_after_pending_write_is_written(redis_url):
    sink, prefix = _sink(redis_url)
    key = prefix + "first"
    sink.put(key, b"first list")
    sink.put_existing(key, b"rewritten")
    ((value, ttl),) = asyncio.run(_flush_and_read(sink, [key]))
    assert value == b"rewritten"
    assert 3000 < ttl <= 3600


def test_rewrite_after_pending_delete_is_dropped(redis_url):
    sink, prefix = _sink(redis_url)
    key = prefix + "erased"
    sink.delete(key)
    sink.put_existing(key, b"rewritten")
    assert sink.pending == {key: None}
    asyncio.run(sink.client.aclose())


def test_written_counter_counts_user_lists_only(redis_url):
    namespace = f"t{uuid.uuid4().hex[:10]}:recs:"
    settings = replace(Settings(), redis_url=redis_url, ttl_s=3600, redis_key_prefix=namespace)
    metrics = WorkerMetrics()
    sink = RedisSink(settings, metrics)
    written = f"{namespace}user:written"
    sink.put(written, b"list")
    sink.put(f"{namespace}popular", b"popular list")
    sink.put_existing(f"{namespace}user:expired", b"rewrite of a list that expired")
    sink.delete(f"{namespace}user:erased")

    asyncio.run(_flush_and_read(sink, [written, f"{namespace}popular"]))

    assert metrics.lists_written._value.get() == 1
