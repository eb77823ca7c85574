"""What a restarted worker repairs in Redis while it rebuilds its index of served lists."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace

from schemas import Event, ItemUpdate, RecommendationList, RecommendedItem
from stream.app import Worker
from stream.settings import Settings

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
    sink = worker._require_sink()
    client = sink.client
    try:
        for key, value in lists.items():
            await client.set(key, value, ex=3600)
        await worker.load_forgotten()
        await worker.rebuild_served()
        while sink.pending:
            await sink.flush_once()
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
    assert registry == {token.encode(): str(T0).encode()}
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
