"""What a restarted worker repairs in Redis while it rebuilds its index of served lists."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace

import orjson

from schemas import Event, ItemUpdate, RecommendationList, RecommendedItem
from stream.app import Worker
from stream.runner import RedisServer
from stream.settings import Settings
from stream.sink import redis_client

T0 = 1_700_000_000_000


def _worker(redis_url: str, tmp_path) -> Worker:
    settings = replace(
        Settings(),
        redis_url=redis_url,
        redis_key_prefix=f"t{uuid.uuid4().hex[:10]}:recs:",
        data_dir=str(tmp_path),
        pseudonym_key="00" * 32,
    )
    return Worker(settings)


def _with_password(settings: Settings, redis: RedisServer) -> Settings:
    """Return ``settings`` with the URL that logs in to ``redis`` with its password."""
    return replace(settings, redis_url=f"redis://:{redis.password}@127.0.0.1:{redis.port}/0")


def _list(*item_ids: str) -> bytes:
    items = [
        RecommendedItem(item_id, 1.0 - n / 100, ("popular",)) for n, item_id in enumerate(item_ids)
    ]
    return RecommendationList(items, T0, "test").to_json()


def _key(worker: Worker, user_id: str) -> str:
    processor = worker.processor
    return processor.redis_key(user_id, processor.pseudonymize(user_id))


async def _restart(
    worker: Worker, lists: dict[str, bytes]
) -> tuple[dict[str, bytes | None], dict[bytes, bytes]]:
    """Write ``lists`` to Redis, run the start-up repairs, and read the lists and registry."""
    client = redis_client(worker.settings)
    try:
        for key, value in lists.items():
            await client.set(key, value, ex=3600)
        await worker.start_sink()
        await worker.load_forgotten()
        await asyncio.wait_for(worker.rebuild_served(), 60)
        # Ready means that Redis has taken the rewrites.
        unwritten = [key for key in lists if worker._require_sink().unwritten(key)]
        await worker._require_sink().close()
        assert unwritten == []
        values = {key: await client.get(key) for key in lists}
        return values, await client.hgetall(worker.forgotten_key)
    finally:
        async for key in client.scan_iter(f"{worker.settings.redis_key_prefix}*"):
            await client.delete(key)
        await client.aclose()


def test_restart_deletes_forgotten_users_lists(redis_url, tmp_path):
    worker = _worker(redis_url, tmp_path)
    processor = worker.processor
    processor.engine.learn([Event("e1", "view", processor.pseudonymize("kept"), "i1", T0)])
    # The request reached the checkpoint, but neither the deletion of the
    # list nor the registry entry reached Redis before the worker stopped.
    token = processor.forget_token(processor.pseudonymize("gone"))
    processor.forgotten[token] = T0
    erased_key, kept_key = _key(worker, "gone"), _key(worker, "kept")

    lists = {erased_key: _list("i1"), kept_key: _list("i1")}

    values, registry = asyncio.run(_restart(worker, lists))

    assert values[erased_key] is None
    assert values[kept_key] is not None
    assert registry == {
        token.encode(): str(T0).encode(),
        b"key-check": processor.registry_check().encode(),
    }
    assert worker.served_ready


def test_restart_applies_stock_outs_to_loaded_lists(redis_url, tmp_path):
    worker = _worker(redis_url, tmp_path)
    engine = worker.processor.engine
    engine.learn([Event(f"e{n}", "view", f"p{n}", f"i{n}", T0 + n) for n in range(1, 4)])
    # The stock-out was applied while the index of served lists was empty.
    engine.update_item(ItemUpdate("i1", T0 + 10, in_stock=False))
    shopper = _key(worker, "shopper")

    values, _ = asyncio.run(_restart(worker, {shopper: _list("i1", "i2", "i3")}))

    shown_items = [item.item_id for item in RecommendationList.from_json(values[shopper]).items]
    assert shown_items == ["i2", "i3"]
    assert worker.served_ready


def test_rebuild_skips_values_that_are_not_lists(redis_url, tmp_path):
    worker = _worker(redis_url, tmp_path)
    prefix = f"{worker.settings.redis_key_prefix}user:"
    odd_item = orjson.dumps(
        {
            "items": [{"item_id": ["i5"], "score": 1, "sources": []}],
            "computed_at": 1,
            "model_version": "x",
        }
    )
    lists = {
        prefix + "odd-item": odd_item,
        prefix + "not-json": b"not a list",
        prefix + "valid": _list("i1"),
    }

    async def run() -> None:
        client = redis_client(worker.settings)
        try:
            await client.set(prefix.encode() + b"\xff\xfe", b"key that is not UTF-8")
        finally:
            await client.aclose()
        await _restart(worker, lists)

    asyncio.run(run())

    assert worker.served_ready
    assert len(worker.served) == 1


def test_rebuild_waits_for_redis_at_start(tmp_path):
    # The server refuses the worker, which has no password, until the
    # password is cleared, and keeps its data meanwhile.
    with RedisServer(tmp_path / "redis", password="secret") as redis:
        worker = _worker(redis.url, tmp_path / "worker")
        admin_settings = _with_password(worker.settings, redis)
        key = _key(worker, "shopper")

        async def run() -> bool:
            admin = redis_client(admin_settings)
            try:
                await admin.set(key, _list("i1", "i2"), ex=3600)
                rebuild = asyncio.create_task(worker.rebuild_served())
                await asyncio.sleep(2.0)
                ready_while_locked_out = worker.served_ready
                await admin.config_set("requirepass", "")
                await asyncio.wait_for(rebuild, 60)
            finally:
                await admin.aclose()
                await worker._require_sink().client.aclose()
            return ready_while_locked_out

        ready_while_locked_out = asyncio.run(run())

    assert ready_while_locked_out is False
    assert worker.served_ready
    assert len(worker.served) == 1


def test_rebuild_reads_prefix_with_glob_characters(redis_url, tmp_path):
    worker = _worker(redis_url, tmp_path)
    namespace = f"t[{uuid.uuid4().hex[:6]}]*?:"
    worker.settings = replace(worker.settings, redis_key_prefix=namespace)
    worker.processor.settings = worker.settings
    # A key that the unescaped pattern would take for one of this prefix.
    neighbour = f"t{namespace[2:8]}x:user:someone"

    async def run() -> None:
        client = redis_client(worker.settings)
        try:
            await client.set(neighbour, _list("i1"), ex=60)
            await _restart(worker, {_key(worker, "shopper"): _list("i1", "i2")})
        finally:
            await client.delete(neighbour)
            await client.aclose()

    asyncio.run(run())

    assert worker.processor.pseudonymize("shopper") in worker.served
    assert len(worker.served) == 1


def test_registry_merged_once_redis_replies(tmp_path):
    with RedisServer(tmp_path / "redis", password="secret") as redis:
        worker = _worker(redis.url, tmp_path / "worker")
        admin_settings = _with_password(worker.settings, redis)
        processor = worker.processor
        pseudonym = processor.pseudonymize("gone")
        processor.engine.learn([Event("e1", "view", pseudonym, "i1", T0)])
        token = processor.forget_token(pseudonym)

        async def run() -> bool:
            admin = redis_client(admin_settings)
            try:
                # Only the registry in Redis has the request, because the state predates it.
                await admin.hset(worker.forgotten_key, token, T0 + 1000)
                await admin.set(_key(worker, "gone"), _list("i1"), ex=3600)
                assert await worker.load_forgotten() == 0
                rebuild = asyncio.create_task(worker.rebuild_served())
                await asyncio.sleep(1.0)
                erased_while_locked_out = not processor.engine.has_user(pseudonym)
                await admin.config_set("requirepass", "")
                await worker.start_sink()
                await asyncio.wait_for(rebuild, 60)
                await worker._require_sink().close()
                assert await admin.get(_key(worker, "gone")) is None
            finally:
                await admin.aclose()
            return erased_while_locked_out

        erased_while_locked_out = asyncio.run(run())

    assert erased_while_locked_out is False
    assert not processor.engine.has_user(pseudonym)


def test_bad_registry_entry_skipped(redis_url, tmp_path):
    worker = _worker(redis_url, tmp_path)
    processor = worker.processor
    pseudonym = processor.pseudonymize("gone")
    processor.engine.learn([Event("e1", "view", pseudonym, "i1", T0)])
    token = processor.forget_token(pseudonym)

    async def run() -> None:
        client = redis_client(worker.settings)
        try:
            await client.hset(worker.forgotten_key, mapping={token: T0 + 1000, "odd": "not a time"})
            await _restart(worker, {_key(worker, "kept"): _list("i1")})
        finally:
            await client.aclose()

    asyncio.run(run())

    assert worker.served_ready
    assert not processor.engine.has_user(pseudonym)
