"""Outages of Redis and of the broker, with a worker that must ride them out."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from pathlib import Path

from schemas import Event
from stream.checkpoint import CheckpointStore
from stream.privacy import Pseudonymizer
from stream.runner import WorkerProcess, wait_for_lists
from stream.topics import create_topics

from kafka_io import produce_events
from servers import KafkaBroker, RedisServer


def _events(prefix: str, users: int, per_user: int, start_ms: int) -> list[Event]:
    return [
        Event(f"{prefix}-{n}", "view", f"{prefix}-user-{n % users}", f"item-{n % 37}", start_ms + n)
        for n in range(users * per_user)
    ]


def _applied(settings) -> int:
    key = Pseudonymizer(bytes.fromhex(settings.pseudonym_key)).derive_key("checkpoint")
    restored = CheckpointStore(Path(settings.data_dir) / "checkpoints", key).restore()
    assert restored is not None
    return int(restored[0]["counts"]["applied"])


def test_redis_outage_of_30_seconds(run_settings, tmp_path):
    now = int(time.time() * 1000) - 600_000
    before = _events("before", users=20, per_user=5, start_ms=now)
    during = _events("during", users=30, per_user=5, start_ms=now + 10_000)

    with RedisServer(tmp_path / "redis") as redis:
        settings = replace(run_settings, redis_url=redis.url, redis_retry_max_s=1.0)
        with WorkerProcess(settings, tmp_path / "worker.log") as worker:
            worker.wait_ready()
            asyncio.run(produce_events(settings, before))
            asyncio.run(wait_for_lists(settings, {e.user_id for e in before}, 60))

            redis.kill()
            asyncio.run(produce_events(settings, during))
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                report = worker.health()
                assert report is not None, "the worker stopped answering during the outage"
                time.sleep(1.0)
            assert report["redis_outage"] is True
            assert report["ready"] is False
            assert report["lists_pending"] > 0

            redis.start()
            back = time.monotonic()
            lists = asyncio.run(wait_for_lists(settings, {e.user_id for e in during}, 60))
            recovered_s = time.monotonic() - back
            assert len(lists) == 30
            print(f"pending lists written {recovered_s:.2f} s after Redis came back")
            # This Redis keeps nothing across a restart, so the lists written
            # before the outage must be written again.
            lost = asyncio.run(wait_for_lists(settings, {e.user_id for e in before}, 60))
            assert len(lost) == 20
            deadline = time.monotonic() + 30
            while not (worker.health() or {}).get("ready"):
                assert time.monotonic() < deadline, "worker did not report ready again"
                time.sleep(0.5)
            log = worker.log_text()
            assert worker.terminate() == 0

    assert "Redis outage begun" in log
    assert "Redis outage ended" in log
    assert "Redis restarted, and may have lost what the worker wrote" in log
    assert _applied(settings) == len(before) + len(during)


def test_broker_restart(run_settings, tmp_path):
    now = int(time.time() * 1000) - 600_000
    before = _events("pre", users=15, per_user=4, start_ms=now)
    after = _events("post", users=15, per_user=4, start_ms=now + 10_000)

    with KafkaBroker(tmp_path / "broker") as broker:
        settings = replace(run_settings, kafka_bootstrap=broker.bootstrap)
        asyncio.run(create_topics(settings))
        with WorkerProcess(settings, tmp_path / "worker.log") as worker:
            worker.wait_ready()
            asyncio.run(produce_events(settings, before))
            asyncio.run(wait_for_lists(settings, {e.user_id for e in before}, 60))

            broker.stop()
            deadline = time.monotonic() + 20
            report = worker.health() or {}
            while report.get("broker_reachable", True) and time.monotonic() < deadline:
                time.sleep(0.5)
                report = worker.health() or {}
            assert report["broker_reachable"] is False
            assert report["ready"] is False
            assert worker.process.poll() is None, "the worker died with the broker"
            broker.start()

            asyncio.run(produce_events(settings, after))
            asyncio.run(wait_for_lists(settings, {e.user_id for e in after}, 180))
            worker.wait_ready(60)
            assert worker.terminate() == 0

    assert _applied(settings) == len(before) + len(after)
