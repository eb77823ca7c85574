"""Measure the operational promises against real services: ``python -m stream.drills``.

Each drill starts a real worker process on topics of its own and times one
effect in Redis:

- ``stock_fanout``: an item in N lists goes out of stock; the time from
  producing the update until no list in Redis contains it, for several N.
- ``forget``: the time from a forget request until the user's list is gone.
- ``redis_outage``: a private redis-server is killed for 30 s while events
  arrive; the time from its restart until every pending list is written.
- ``broker_restart``: a private broker is stopped for 10 s; the time from its
  return until an event produced then reaches its user's list.
- ``sigterm`` and ``restart``: how long a graceful stop takes, and how long a
  worker killed with SIGKILL takes to be ready again.

The results print as JSON and, with ``--markdown PATH``, as the page
docs/operations.md.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import platform
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer

from schemas import Event
from stream.kafka import client_options
from stream.logs import configure_logging
from stream.runner import (
    KafkaBroker,
    RedisServer,
    WorkerProcess,
    free_port,
    wait_for_lists,
)
from stream.settings import Settings
from stream.sink import redis_client
from stream.topics import EVENT_TOPICS, FORGET_TOPIC, ITEMS_TOPIC, create_topics

logger = logging.getLogger("stream.drills")


def _run_settings(base: Settings, folder: Path, **changes: Any) -> Settings:
    run_id = f"drill{uuid.uuid4().hex[:8]}"
    settings = replace(
        base,
        app_id=f"fusionrec-{run_id}",
        topic_prefix=f"{run_id}.",
        redis_key_prefix=f"{run_id}:recs:",
        data_dir=str(folder / run_id),
        web_port=free_port(),
        consumer_session_timeout_s=6.0,
        consumer_heartbeat_s=1.0,
        checkpoint_interval_s=5.0,
        pseudonym_key="11" * 32,
    )
    return replace(settings, **changes)


async def _produce(settings: Settings, records: Iterable[tuple[str, bytes, bytes]]) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap, acks="all", **client_options(settings)
    )
    await producer.start()
    try:
        for topic, key, value in records:
            await producer.send(settings.topic(topic), key=key, value=value)
        await producer.flush()
    finally:
        await producer.stop()


def _event_records(events: Iterable[Event]) -> list[tuple[str, bytes, bytes]]:
    return [(EVENT_TOPICS[e.type], e.user_id.encode(), orjson.dumps(e.to_json())) for e in events]


def _crowd(item: str, start_ms: int) -> list[Event]:
    # Buyers who make the item the best seller, so that the list of nearly
    # every user who comes after them contains it.
    return [
        Event(f"crowd-{n}-{item}", "purchase", f"crowd-{n}", item, start_ms - 1000 + n, quantity=1)
        for n in range(200)
    ]


def _holding_users(users: int, item: str, start_ms: int) -> list[Event]:
    events = []
    for n in range(users):
        user = f"fan-{n}"
        events.append(Event(f"{user}-a", "view", user, item, start_ms + n))
        events.append(Event(f"{user}-b", "view", user, f"own-{n % 500}", start_ms + n + 1))
    return events


async def _count_holders(settings: Settings, users: list[str], item: str) -> int:
    client = redis_client(settings)
    prefix = f"{settings.redis_key_prefix}user:"
    held = 0
    try:
        for start in range(0, len(users), 2000):
            chunk = users[start : start + 2000]
            for raw in await client.mget([prefix + u for u in chunk]):
                if raw is not None and any(
                    entry["item_id"] == item for entry in orjson.loads(raw)["items"]
                ):
                    held += 1
    finally:
        await client.aclose()
    return held


async def _set_calls(client: Any) -> int:
    stats = await client.info("commandstats")
    return int(stats.get("cmdstat_set", {}).get("calls", 0))


async def _time_sold_out(settings: Settings, update: dict[str, Any], holders: int) -> float:
    """Return the seconds from sending ``update`` until Redis has taken ``holders`` more SETs.

    Scanning every list takes longer than the rewrite it would measure. So the
    clock reads Redis's own count of SET commands, which every list write
    raises, and a scan afterwards checks that no list holds the item. The
    producer connects before the clock starts, so its start-up is not counted.
    """
    client = redis_client(settings)
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap, acks="all", **client_options(settings)
    )
    await producer.start()
    try:
        before = await _set_calls(client)
        sent = time.monotonic()
        await producer.send_and_wait(
            settings.topic(ITEMS_TOPIC), key=update["item_id"].encode(), value=orjson.dumps(update)
        )
        while await _set_calls(client) < before + holders:
            if time.monotonic() - sent > 120:
                break
            await asyncio.sleep(0.005)
        return time.monotonic() - sent
    finally:
        await producer.stop()
        await client.aclose()


def drill_stock_fanout(base: Settings, folder: Path, sizes: list[int]) -> list[dict[str, Any]]:
    """Time how fast a sold-out item leaves every list that contains it."""
    results = []
    for size in sizes:
        # Fixed-weight fusion, so that the best seller ranks high in every
        # list; the online-learned weights adapt to the drill's odd traffic.
        settings = _run_settings(base, folder, fusion="weighted")
        asyncio.run(create_topics(settings))
        start_ms = int(time.time() * 1000) - 3_600_000
        users = [f"fan-{n}" for n in range(size)]
        worker = WorkerProcess(settings, Path(settings.data_dir) / "worker.log").start()
        try:
            worker.wait_ready()
            holders = _build_holding_lists(settings, size, "hot", start_ms)
            update = {"item_id": "hot", "timestamp": start_ms + 3_000_000, "in_stock": False}
            elapsed = asyncio.run(_time_sold_out(settings, update, holders))
            left = asyncio.run(_count_holders(settings, users, "hot"))
            results.append(
                {"lists_holding": holders, "seconds": round(elapsed, 3), "still_holding": left}
            )
            logger.info("stock fan-out over %d lists: %.3f s, %d left", holders, elapsed, left)
        finally:
            worker.terminate()
    return results


def _build_holding_lists(settings: Settings, size: int, item: str, start_ms: int) -> int:
    """Give ``size`` users a list that contains ``item``; return how many lists contain it."""
    users = [f"fan-{n}" for n in range(size)]
    asyncio.run(_produce(settings, _event_records(_crowd(item, start_ms))))
    asyncio.run(wait_for_lists(settings, ["crowd-199"], timeout_s=120))
    asyncio.run(_produce(settings, _event_records(_holding_users(size, item, start_ms))))
    asyncio.run(wait_for_lists(settings, users, timeout_s=600))
    return asyncio.run(_count_holders(settings, users, item))


def drill_stock_while_stopped(base: Settings, folder: Path, size: int) -> dict[str, Any]:
    """Sell out an item while the worker is stopped, and time the restart that repairs lists.

    The update waits in Kafka, so the restarted worker consumes it while it
    still rebuilds its index of served lists from Redis. The clock runs from
    the start of the new worker process until it reports ready, and then
    until no list write is pending.
    """
    settings = _run_settings(base, folder, fusion="weighted")
    asyncio.run(create_topics(settings))
    start_ms = int(time.time() * 1000) - 3_600_000
    users = [f"fan-{n}" for n in range(size)]
    log = Path(settings.data_dir) / "worker.log"
    worker = WorkerProcess(settings, log).start()
    try:
        worker.wait_ready()
        holders = _build_holding_lists(settings, size, "gone", start_ms)
    finally:
        worker.terminate()
    # Stamped after every event of the drill and before the worker's clock,
    # which rejects updates stamped ahead of it.
    update = {"item_id": "gone", "timestamp": start_ms + 3_000_000, "in_stock": False}
    asyncio.run(_produce(settings, [(ITEMS_TOPIC, b"gone", orjson.dumps(update))]))
    starting = time.monotonic()
    worker = WorkerProcess(settings, log).start()
    try:
        worker.wait_ready()
        ready_s = time.monotonic() - starting
        while (worker.health() or {}).get("lists_pending", 1) > 0:
            if time.monotonic() - starting > 300:
                break
            time.sleep(0.05)
        written_s = time.monotonic() - starting
    finally:
        worker.terminate()
    left = asyncio.run(_count_holders(settings, users, "gone"))
    logger.info(
        "stock-out while stopped: %d lists, ready after %.3f s, %d still holding the item",
        holders,
        ready_s,
        left,
    )
    return {
        "lists_holding": holders,
        "seconds_to_ready": round(ready_s, 3),
        "seconds_to_written": round(written_s, 3),
        "still_holding": left,
    }


def drill_forget(base: Settings, folder: Path) -> dict[str, Any]:
    """Time from a forget request to the deletion of the user's list."""
    settings = _run_settings(base, folder)
    asyncio.run(create_topics(settings))
    start_ms = int(time.time() * 1000) - 3_600_000
    events = _holding_users(50, "x", start_ms)
    worker = WorkerProcess(settings, Path(settings.data_dir) / "worker.log").start()
    try:
        worker.wait_ready()
        asyncio.run(_produce(settings, _event_records(events)))
        asyncio.run(wait_for_lists(settings, ["fan-7"], timeout_s=120))
        request = orjson.dumps({"user_id": "fan-7", "timestamp": int(time.time() * 1000)})
        sent = time.monotonic()
        asyncio.run(_produce(settings, [(FORGET_TOPIC, b"fan-7", request)]))
        key = f"{settings.redis_key_prefix}user:fan-7"
        while asyncio.run(_exists(settings, key)):
            time.sleep(0.01)
        elapsed = time.monotonic() - sent
    finally:
        worker.terminate()
    logger.info("forget: list deleted %.3f s after the request", elapsed)
    return {"seconds": round(elapsed, 3)}


async def _exists(settings: Settings, key: str) -> bool:
    client = redis_client(settings)
    try:
        return bool(await client.exists(key))
    finally:
        await client.aclose()


def drill_redis_outage(base: Settings, folder: Path, outage_s: float) -> dict[str, Any]:
    """Kill a private Redis for ``outage_s`` and time the catch-up after it returns."""
    with RedisServer(folder / "redis-drill") as redis:
        settings = _run_settings(base, folder, redis_url=redis.url)
        asyncio.run(create_topics(settings))
        start_ms = int(time.time() * 1000) - 3_600_000
        worker = WorkerProcess(settings, Path(settings.data_dir) / "worker.log").start()
        try:
            worker.wait_ready()
            redis.kill()
            during = _holding_users(2000, "y", start_ms)
            asyncio.run(_produce(settings, _event_records(during)))
            time.sleep(outage_s)
            alive = worker.process is not None and worker.process.poll() is None
            pending = (worker.health() or {}).get("lists_pending", 0)
            redis.start()
            back = time.monotonic()
            asyncio.run(wait_for_lists(settings, [f"fan-{n}" for n in range(2000)], 120))
            elapsed = time.monotonic() - back
        finally:
            worker.terminate()
    logger.info("redis outage: %d pending lists written %.3f s after return", pending, elapsed)
    return {
        "outage_s": outage_s,
        "worker_alive": alive,
        "lists_pending": pending,
        "seconds_to_write_all": round(elapsed, 3),
    }


def drill_broker_restart(base: Settings, folder: Path) -> dict[str, Any]:
    """Stop a private broker for 10 s and time until new events reach Redis."""
    with KafkaBroker(folder / "broker-drill") as broker:
        settings = _run_settings(base, folder, kafka_bootstrap=broker.bootstrap)
        asyncio.run(create_topics(settings))
        start_ms = int(time.time() * 1000) - 3_600_000
        worker = WorkerProcess(settings, Path(settings.data_dir) / "worker.log").start()
        try:
            worker.wait_ready()
            asyncio.run(_produce(settings, _event_records(_holding_users(20, "z", start_ms))))
            asyncio.run(wait_for_lists(settings, ["fan-0"], 60))
            # The clock starts before the stop, which waits for the broker's
            # shutdown and can outlast a probe.
            stopped = time.monotonic()
            broker.stop()
            unready_s = math.nan
            while time.monotonic() - stopped < 10:
                report = worker.health() or {}
                if math.isnan(unready_s) and report.get("broker_reachable") is False:
                    unready_s = time.monotonic() - stopped
                time.sleep(0.1)
            broker.start()
            back = time.monotonic()
            after = [Event("after-restart", "view", "late-user", "z", start_ms + 50_000)]
            asyncio.run(_produce(settings, _event_records(after)))
            asyncio.run(wait_for_lists(settings, ["late-user"], 300))
            elapsed = time.monotonic() - back
        finally:
            worker.terminate()
    logger.info("broker restart: new event in Redis %.3f s after the broker returned", elapsed)
    return {"seconds_to_first_list": round(elapsed, 3), "seconds_to_unready": round(unready_s, 3)}


def drill_lifecycle(base: Settings, folder: Path) -> dict[str, Any]:
    """Time a graceful stop and a restart after SIGKILL."""
    settings = _run_settings(base, folder)
    asyncio.run(create_topics(settings))
    start_ms = int(time.time() * 1000) - 3_600_000
    log = Path(settings.data_dir) / "worker.log"
    worker = WorkerProcess(settings, log).start()
    worker.wait_ready()
    asyncio.run(_produce(settings, _event_records(_holding_users(500, "w", start_ms))))
    asyncio.run(wait_for_lists(settings, ["fan-499"], 120))
    stopping = time.monotonic()
    code = worker.terminate()
    sigterm_s = time.monotonic() - stopping

    worker = WorkerProcess(settings, log).start()
    worker.wait_ready()
    worker.kill()
    restarting = time.monotonic()
    worker = WorkerProcess(settings, log).start()
    worker.wait_ready()
    restart_s = time.monotonic() - restarting
    worker.terminate()
    return {
        "sigterm_exit_code": code,
        "sigterm_seconds": round(sigterm_s, 3),
        "restart_after_sigkill_seconds": round(restart_s, 3),
        "session_timeout_s": settings.consumer_session_timeout_s,
    }


def _markdown(results: dict[str, Any], command: str) -> str:
    lines = [
        "# Operations: measured recovery and fan-out times",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {os.cpu_count()} cores, {_memory_gb():.0f} GB memory, "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}. "
        "Kafka 3.9.1 and redis-server run on the same machine, started by "
        "scripts/services.sh. Each drill runs a real `fusionrec worker` process on "
        "topics of its own; times are wall-clock seconds of one run, on a shared "
        "machine, so read them as single measurements rather than percentiles.",
        "",
        "## Stock fan-out",
        "",
        "An item in N lists goes out of stock. The time runs from producing the",
        "`items.updates` message, with the producer already connected, until Redis has",
        "taken N more SET commands (its own `cmdstat_set` count, read every 5 ms). A",
        "scan of all the lists afterwards counts those that still contain the item.",
        "The promise is 1 second at 10,000 lists.",
        "",
        "| lists holding the item | seconds until all are rewritten | lists still holding it |",
        "| ---: | ---: | ---: |",
    ]
    for row in results["stock_fanout"]:
        lines.append(
            f"| {row['lists_holding']:,} | {row['seconds']:.3f} | {row['still_holding']} |"
        )
    stopped = results["stock_while_stopped"]
    lines += [
        "",
        "## Stock-out while the worker is stopped",
        "",
        "An item in N lists goes out of stock while the worker is stopped. The new",
        "worker consumes the update while it still rebuilds its index of served",
        "lists from Redis, and rewrites every list that holds a sold-out item",
        "once the index is complete. It reports ready only when Redis has taken",
        "those rewrites. The clock runs from the start of the new worker process.",
        "",
        "| lists holding the item | seconds until ready | seconds until no write is pending "
        "| lists still holding it |",
        "| ---: | ---: | ---: | ---: |",
        f"| {stopped['lists_holding']:,} | {stopped['seconds_to_ready']:.3f} "
        f"| {stopped['seconds_to_written']:.3f} | {stopped['still_holding']} |",
    ]
    forget = results["forget"]
    outage = results["redis_outage"]
    broker = results["broker_restart"]
    life = results["lifecycle"]
    lines += [
        "",
        "## Other promises",
        "",
        "| drill | measured | promise |",
        "| --- | ---: | --- |",
        f"| forget request to list deleted | {forget['seconds']:.3f} s | within 1 s |",
        f"| Redis back after {outage['outage_s']:.0f} s down: all "
        f"{outage['lists_pending']:,} pending lists written | "
        f"{outage['seconds_to_write_all']:.3f} s | within 5 s; worker alive: "
        f"{outage['worker_alive']} |",
        f"| broker stopped: /health reports it unreachable and the worker unready | "
        f"{broker['seconds_to_unready']:.3f} s | within 10 s (probed every 5 s) |",
        f"| broker back after 10 s down: first new event in Redis | "
        f"{broker['seconds_to_first_list']:.3f} s | reconnects, loses and repeats nothing |",
        f"| SIGTERM to exit (code {life['sigterm_exit_code']}) | "
        f"{life['sigterm_seconds']:.3f} s | finish batch, write lists, checkpoint, exit 0 |",
        f"| restart after SIGKILL until ready | {life['restart_after_sigkill_seconds']:.3f} s "
        f"| includes the wait for the dead member's session "
        f"({life['session_timeout_s']:.0f} s here) |",
        "",
        "The restart time is dominated by the consumer session timeout: the broker keeps a "
        "killed member in the group until its session expires. The drills use 6 s; the "
        "default of `FUSIONREC_CONSUMER_SESSION_TIMEOUT_S` is 30 s.",
        "",
    ]
    return "\n".join(lines)


def _memory_gb() -> float:
    try:
        import psutil

        return float(psutil.virtual_memory().total) / 2**30
    except ImportError:
        return 0.0


def main(argv: list[str] | None = None) -> int:
    """Run the drills and print the results."""
    parser = argparse.ArgumentParser(prog="python -m stream.drills", description=__doc__)
    parser.add_argument(
        "--fanout", type=int, nargs="+", default=[1_000, 10_000, 30_000], help="list counts"
    )
    parser.add_argument("--outage", type=float, default=30.0, help="Redis outage in seconds")
    parser.add_argument(
        "--restart-lists",
        type=int,
        default=10_000,
        help="lists holding the item that sells out while the worker is stopped",
    )
    parser.add_argument("--markdown", type=Path, help="write the results as a Markdown page")
    args = parser.parse_args(argv)
    configure_logging("info")
    base = Settings.from_env()
    with tempfile.TemporaryDirectory(prefix="fusionrec-drills-") as tmp:
        folder = Path(tmp)
        results = {
            "stock_fanout": drill_stock_fanout(base, folder, args.fanout),
            "stock_while_stopped": drill_stock_while_stopped(base, folder, args.restart_lists),
            "forget": drill_forget(base, folder),
            "redis_outage": drill_redis_outage(base, folder, args.outage),
            "broker_restart": drill_broker_restart(base, folder),
            "lifecycle": drill_lifecycle(base, folder),
        }
    sys.stdout.buffer.write(orjson.dumps(results, option=orjson.OPT_INDENT_2) + b"\n")
    if args.markdown:
        command = "python -m stream.drills " + " ".join(argv or sys.argv[1:])
        args.markdown.write_text(_markdown(results, command.strip()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
